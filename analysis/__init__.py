"""Records → pandas DataFrames → matplotlib figures → a report (``build_report``); never imports the simulation."""
from __future__ import annotations

from analysis.report import build_report

__all__ = ["build_report"]
