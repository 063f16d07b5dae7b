"""A study's report layout as a record: its rows, x column, config columns, and the figures and tables it shows.

The sweep writes its study's layout into the sweep dir (``study.json``, from the study's entry in
``experiments.presets``); ``analysis.report`` reads it back, so a new study is one entry there and nothing here.
A sweep dir without ``study.json`` (written before it existed, a ``forgesim replay`` output, a hand-made records
dir) is read with ``DEFAULT_LAYOUTS``: the layouts of the studies such dirs were written for.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["Section", "StudyLayout", "LAYOUT_FILE", "DEFAULT_LAYOUTS", "read_layouts", "write_layout"]

LAYOUT_FILE = "study.json"


@dataclass(frozen=True)
class Section:
    """One heading of a study's report: at most one figure, then tables, shown when the figure's data exist.

    ``figure``: a figure of ``analysis.report.FIGURES`` (``scaling``, ``cost``, ``ipc``, ``rank`` read the study's
    rows over x; ``orders`` the sweep's merge orders; ``forgetting`` its forgetting rows and first run), or ``""``
    for tables only (shown when the study's rows over x exist, or, for tables with data of their own such as
    ``claims``, when those exist). ``tables``: names of ``analysis.report.TABLES``.
    """

    heading: str
    figure: str = ""
    tables: tuple[str, ...] = ()


@dataclass(frozen=True)
class StudyLayout:
    """What the report of one study shows. ``x`` is the results column the study varies (``""``: none, e.g. the
    seeds-only studies), ``x_label`` its name in table headers, ``axis_label`` on figure axes; ``columns`` the config
    columns of its ``results.parquet`` (column -> config field)."""

    study: str
    x: str = ""
    x_label: str = ""
    axis_label: str = ""
    columns: dict[str, str] = field(default_factory=dict)
    sections: tuple[Section, ...] = ()

    def to_record(self) -> dict:
        return asdict(self)

    @classmethod
    def from_record(cls, record: dict) -> "StudyLayout":
        """The layout of a ``to_record`` dict (lists back to tuples)."""
        sections = tuple(Section(s["heading"], s.get("figure", ""), tuple(s.get("tables", ())))
                         for s in record.get("sections", ()))
        return cls(record["study"], record.get("x", ""), record.get("x_label", ""), record.get("axis_label", ""),
                   dict(record.get("columns", {})), sections)


def write_layout(sweep_dir: str | Path, layout: StudyLayout) -> Path:
    path = Path(sweep_dir) / LAYOUT_FILE
    path.write_text(json.dumps(layout.to_record(), indent=2))
    return path


def read_layouts(sweep_dir: str | Path) -> tuple[StudyLayout, ...]:
    """The sweep dir's study layout, or ``DEFAULT_LAYOUTS`` when it has none.

    Raises:
        ValueError: ``study.json`` is not a layout record.
    """
    path = Path(sweep_dir) / LAYOUT_FILE
    if not path.is_file():
        return DEFAULT_LAYOUTS
    try:
        return (StudyLayout.from_record(json.loads(path.read_text())),)
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path} is not a study layout record ({exc})") from None


_COLUMNS = {"seed": "seed", "contributors": "data.institutions", "rank": "lora.rank", "ipc": "distill.ipc",
            "partition": "data.partition", "dataset": "data.name", "attack": "attacks.kind",
            "attack_share": "attacks.share", "gate": "gate.checks"}
# The built-in studies' layouts as their sweeps write them (tests/test_sweep.py checks they agree), in the order
# their sections appear in a report of a dir that holds several studies' records.
DEFAULT_LAYOUTS: tuple[StudyLayout, ...] = (
    StudyLayout("scaling", "contributors", "contributors", "contributors (institutions)", _COLUMNS, (
        Section("Scaling with the number of contributors", "scaling", ("acc", "auc")),
        Section("Cost", "cost", ("mixture_vs_fusion",)))),
    StudyLayout("order", columns=_COLUMNS, sections=(
        Section("Merge-order sensitivity", "orders", ("orders", "orders_per_task")),)),
    StudyLayout("forgetting", columns=_COLUMNS, sections=(Section("Forgetting", "forgetting"),)),
    StudyLayout("ipc", "ipc", "IPC", "images per class (IPC)", _COLUMNS, (
        Section("Distillation budget (IPC), fidelity and privacy", "ipc", ("acc",)),)),
    StudyLayout("rank", "rank", "rank", "LoRA rank r", _COLUMNS, (Section("LoRA rank", "rank", ("acc",)),)),
    StudyLayout("medforge", columns=_COLUMNS, sections=(
        Section("Claims side by side", tables=("claims",)),
        Section("Merge-order sensitivity", "orders", ("orders", "orders_per_task")))),
    StudyLayout("medlego", columns=_COLUMNS, sections=(Section("Claims side by side", tables=("claims",)),)),
    StudyLayout("strategies", columns=_COLUMNS, sections=(
        Section("Strategies side by side", tables=("strategies",)),
        Section("Merge-order sensitivity", "orders", ("orders",)),
        Section("Accuracy and forgetting per merge step", "steps", ("steps",)))),
    StudyLayout("poisoning", "attack_share", "malicious share", "share of malicious institutions",
                _COLUMNS | {"attack_share": "attacks.share"},
                (Section("Attacks and the gate", tables=("poisoning",)),)),
    StudyLayout("asynchrony", "sigma", "σ", "speed heterogeneity σ (lognormal sigma of institution speeds)",
                _COLUMNS | {"sigma": "schedule.speed_sigma"}, (
        Section("Asynchrony: accuracy over virtual time", "time_to_accuracy", ("asynchrony",)),
        Section("Staleness and idle time", "staleness_idle"))),
)
