"""``forgesim report``: figures, report.md and a self-contained report.html from a run dir or a sweep dir."""
from __future__ import annotations

import argparse
import math
from pathlib import Path

from experiments.common import CLIError

HELP = ("turn a run dir or a sweep dir into figures (PNG + PDF), report.md and a self-contained report.html; "
        "prints the report's path")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", metavar="DIR", help="a run dir (holds summary.json) or a sweep dir (holds results.parquet "
                                              "or orders.parquet)")
    p.add_argument("--out", metavar="OUTDIR", help="where figures/, report.md and report.html go (default DIR/report); "
                                                   "an earlier report there is replaced")
    p.add_argument("--max-ms-per-point", type=float, default=None, metavar="MS",
                   help="cost figure: Mixture pays while each accuracy point it adds over Fusion costs at most MS "
                        "ms of inference per image (default 1.0)")
    p.add_argument("--claims", action="store_true",
                   help="also print the seed papers' claims with forgesim's numbers and verdicts for a sweep dir "
                        "(every row of it; analysis.claims) before the report's path")


def run(args: argparse.Namespace) -> int:
    # Step 1: check the input before anything is written.
    from analysis.cost import DEFAULT_MAX_MS_PER_POINT
    from analysis.load import dir_kind
    from analysis.report import build_report

    src = Path(args.dir)
    if not src.exists():
        raise CLIError(f"{src} does not exist")
    if dir_kind(src) is None:
        raise CLIError(f"{src} is neither a run dir (no summary.json) nor a sweep dir "
                       "(no results.parquet or orders.parquet)")
    out = Path(args.out) if args.out else src / "report"
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} exists and is not a directory")
    limit = DEFAULT_MAX_MS_PER_POINT if args.max_ms_per_point is None else args.max_ms_per_point
    if not (limit > 0 and math.isfinite(limit)):
        raise CLIError(f"--max-ms-per-point must be a finite number > 0, got {args.max_ms_per_point}")
    if args.claims and dir_kind(src) != "sweep":
        raise CLIError(f"--claims needs a sweep dir (results.parquet); {src} is a run dir")
    # Step 2: build it (a malformed records file ends as one ValueError line from the CLI).
    html = build_report(src, out, limit)
    if args.claims:
        print(claims_md(src))
    print(html)
    return 0


def claims_md(src: Path) -> str:
    """The claims table of every row of the sweep dir ``src``, as markdown."""
    from analysis.claims import claim_data, evaluate
    from analysis.load import load_sweep
    from analysis.report import claims_table, table_md

    return table_md(claims_table(evaluate(claim_data(load_sweep(src)))))
