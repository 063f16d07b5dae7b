"""Records → pandas DataFrames → matplotlib figures → a report (``build_report``); never imports the simulation."""
from __future__ import annotations

__all__ = ["build_report"]


def __getattr__(name: str):
    # ``build_report`` loads matplotlib: only when asked for, so that reading records (``analysis.load``,
    # ``analysis.layout``) stays light
    if name == "build_report":
        from analysis.report import build_report

        return build_report
    raise AttributeError(f"module 'analysis' has no attribute {name!r}")
