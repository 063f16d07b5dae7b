"""``forgesim run``: one simulation on Ray (local embedded or an existing cluster) → a run dir."""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from experiments.cli import COMMON_FLAGS, CLIError, add_config_args, add_data_args, prepare_out_dir, resolve_config
from sim.config import SimConfig

RUN_DIR_MARKERS = ("config.yaml", "log.jsonl", "summary.json")
HELP = "run one simulation (institution actors, merge actor, schedule) and write a run dir"

FLAGS = COMMON_FLAGS | {"contributors": "data.institutions", "rank": "lora.rank", "ipc": "distill.ipc",
                        "address": "runtime.address", "clock": "runtime.clock", "workers": "runtime.workers"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", metavar="NAME", help="start from a study preset (experiments.presets: default, demo)")
    add_data_args(p)
    p.add_argument("--contributors", type=int, metavar="N", help="number of institutions (data.institutions)")
    p.add_argument("--strategies", metavar="A,B,C", help="merge strategies kept as branches (merge.strategies)")
    p.add_argument("--rank", type=int, help="LoRA rank (lora.rank)")
    p.add_argument("--ipc", type=int, metavar="K", help="distilled images per class (distill.ipc)")
    p.add_argument("--address", help="Ray address of an existing cluster (runtime.address; default RAY_ADDRESS, "
                                     "else a local embedded Ray)")
    p.add_argument("--clock", choices=("virtual", "wall"), help="runtime.clock")
    p.add_argument("--workers", type=int, metavar="M", help="pooled torch workers (runtime.workers)")
    add_config_args(p)
    p.add_argument("--out", required=True, metavar="DIR", help="run dir (new or empty)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing run dir at --out (only a forgesim run dir is deleted)")


def build_config(args: argparse.Namespace) -> SimConfig:
    """preset (or defaults) < --config < flags < --set."""
    from experiments.presets import get_preset
    from sim.merge import get_strategy

    base = get_preset(args.preset) if args.preset else None
    extra = [f"merge.strategies=[{args.strategies}]"] if args.strategies else []
    cfg = resolve_config(args, FLAGS, base=base, extra=extra)
    for s in cfg.merge.strategies:
        get_strategy(s)
    return cfg


def run(args: argparse.Namespace) -> int:
    from actors.runner import pull_strategy, run_simulation

    cfg = build_config(args)
    pull_strategy(cfg)                   # check before anything is written
    if cfg.schedule.arrival == "trace":
        from sim.schedule import read_trace

        read_trace(cfg.schedule.trace, cfg.data.institutions)
    if cfg.data.name == "medmnist":
        from sim.data import build_cohort

        build_cohort(cfg.data, cfg.seed)
    out = Path(args.out)
    if args.overwrite and out.is_dir() and any(out.iterdir()):
        # A run dir is resumable state (the merge actor restores from log.jsonl): never mix two runs, delete it.
        if not any((out / m).exists() for m in RUN_DIR_MARKERS):
            raise CLIError(f"--out {out} is not a forgesim run dir (no {', '.join(RUN_DIR_MARKERS)}); "
                           f"not deleting it")
        shutil.rmtree(out)
    out = prepare_out_dir(out)
    summary = run_simulation(cfg, out)
    lines = [f"{name:>16}: acc {s['acc']:.3f}  auc {s['auc']:.3f}  merge {s['merge_s']:.2f}s/commit"
             for name, s in summary["strategies"].items()]
    refs = summary["references"]
    print(f"{summary['commits_accepted']} commits accepted, {summary['commits_rejected']} rejected, "
          f"{summary['wall_s']:.0f}s wall")
    print("\n".join(lines))
    print(f"{'base':>16}: acc {refs['base']['acc']:.3f}\n{'individual':>16}: acc {refs['individual']['acc']:.3f}")
    print(f"run dir: {out}")
    return 0
