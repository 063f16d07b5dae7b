"""``forgesim run``: one simulation on Ray (local embedded or an existing cluster) → a run dir.

``--resume DIR`` continues a run dir whose driver died, with the config it holds (``DIR/config.yaml``): contributions
already in its log are not trained again (``actors.runner.run_simulation(resume=True)``).
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from experiments.common import COMMON_FLAGS, CLIError, add_config_args, add_data_args, prepare_out_dir, resolve_config
from experiments.trackers import add_tracker_args, log_run, parse_trackers, where_logged
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
    p.add_argument("--out", metavar="DIR", help="run dir (new or empty); required unless --resume")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing run dir at --out (only a forgesim run dir is deleted)")
    p.add_argument("--resume", metavar="DIR",
                   help="continue the run dir DIR whose driver was killed, with its own config.yaml; contributions "
                        "already accepted are not retrained (only --address and --workers may be given with it)")
    add_tracker_args(p)


def build_config(args: argparse.Namespace) -> SimConfig:
    """preset (or defaults) < --config < flags < --set. Constructing the config validates it (unknown strategies,
    a branch to pull for ``init_from: main``), so nothing else is checked here."""
    from experiments.presets import get_preset

    base = get_preset(args.preset) if args.preset else None
    extra = [f"merge.strategies=[{args.strategies}]"] if args.strategies else []
    return resolve_config(args, FLAGS, base=base, extra=extra)


# flags that do not change what a run computes, so a resumed run may set them
RESUME_FLAGS = ("address", "workers")


def resume_config(args: argparse.Namespace) -> tuple[SimConfig, Path]:
    """The config of the run dir ``--resume DIR`` (plus --address/--workers); errors before anything is touched."""
    from sim.config import apply_overrides, load_config

    out = Path(args.resume)
    if args.out is not None and Path(args.out).resolve() != out.resolve():
        raise CLIError(f"--resume {out} continues that run dir; --out {args.out} names another (drop --out)")
    if args.overwrite:
        raise CLIError("--resume and --overwrite exclude each other")
    given = [f"--{name.replace('_', '-')}" for name in ("preset", "config", "strategies", *FLAGS)
             if name not in RESUME_FLAGS and getattr(args, name, None) is not None] + (["--set"] if args.overrides else [])
    if given:
        raise CLIError(f"--resume takes the config from {out / 'config.yaml'}; drop {', '.join(given)}")
    if not out.is_dir():
        raise CLIError(f"--resume {out} is not a directory")
    if not (out / "config.yaml").is_file():
        raise CLIError(f"--resume {out} is not a forgesim run dir (no config.yaml)")
    if (out / "summary.json").is_file():
        raise CLIError(f"--resume {out}: the run is complete (summary.json exists); nothing to resume")
    try:
        cfg = load_config(out / "config.yaml")
    except ValueError as exc:
        raise CLIError(f"--resume {out}: {exc}") from None
    flags = [f"{FLAGS[name]}={getattr(args, name)}" for name in RESUME_FLAGS if getattr(args, name) is not None]
    _check_log(out)
    return apply_overrides(cfg, flags), out


def _check_log(out: Path) -> None:
    """A log corrupted before its last line cannot be resumed: say so before starting Ray."""
    import warnings

    from sim.commit_log import CommitLog

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # a torn last line is expected after a crash; the restore drops it
        try:
            CommitLog(out, create=False).read()
        except ValueError as exc:
            raise CLIError(f"--resume {out}: {exc}") from None


def check_out(out: Path, overwrite: bool) -> None:
    """A new or empty --out, or --overwrite over a forgesim run dir; nothing is touched before this passes."""
    if not out.is_dir() or not any(out.iterdir()):
        return
    is_run = any((out / m).exists() for m in RUN_DIR_MARKERS)
    if not overwrite:
        if is_run:
            raise CLIError(f"--out {out} holds a forgesim run; continue it with --resume {out}, replace it with "
                           f"--overwrite, or choose a new directory")
        raise CLIError(f"--out {out} is not empty; choose a new directory")
    if not is_run:    # A run dir is resumable state: never mix two runs, delete it — but only a run dir.
        raise CLIError(f"--out {out} is not a forgesim run dir (no {', '.join(RUN_DIR_MARKERS)}); not deleting it")


def run(args: argparse.Namespace) -> int:
    trackers = parse_trackers(args.log_to, args.mlflow_uri)
    if args.resume is None and args.out is None:
        raise CLIError("--out DIR is required (or --resume DIR to continue a run)")
    if args.resume is not None:
        cfg, out = resume_config(args)
    else:
        cfg, out = build_config(args), Path(args.out)
    if cfg.schedule.arrival == "trace":
        from sim.schedule import read_trace

        read_trace(cfg.schedule.trace, cfg.data.institutions)
    from sim.data import FILE_DATASETS, build_cohort

    named = bool(cfg.model.prototypes) or cfg.model.pretrained != "none"
    if cfg.data.name in FILE_DATASETS or cfg.data.classes or named:     # bad input files end here, before Ray starts
        cohort = build_cohort(cfg.data, cfg.seed)
        if named:
            from sim.model import load_foundation

            # named weights and class embeddings are input files too: checked before the run dir is touched (the
            # foundation stays loaded in this process for the run)
            load_foundation(cfg.model, cfg.data.img_size).check_tasks(cohort.task_classes)
    if args.resume is None:
        check_out(out, args.overwrite)
        if args.overwrite and out.is_dir():
            shutil.rmtree(out)
        out = prepare_out_dir(out)
    from actors.runner import run_simulation

    summary = run_simulation(cfg, out, resume=args.resume is not None)
    if cfg.train.joint:                  # the `joint` reference (Ray Train), added to the run's records
        from experiments.joint import add_joint_reference

        summary = add_joint_reference(cfg, out)
    log_run(trackers, out, args.mlflow_uri)        # the finished run's records, summary and report figures
    lines = [f"{name:>16}: acc {s['acc']:.3f}  auc {s['auc']:.3f}  merge {s['merge_s']:.2f}s/commit"
             for name, s in summary["strategies"].items()]
    refs = summary["references"]
    print(f"{summary['commits_accepted']} commits accepted, {summary['commits_rejected']} rejected, "
          f"{summary['wall_s']:.0f}s wall")
    print("\n".join(lines))
    print(f"{'base':>16}: acc {refs['base']['acc']:.3f}\n{'individual':>16}: acc {refs['individual']['acc']:.3f}")
    print(f"run dir: {out}")
    for line in where_logged(trackers, out, args.mlflow_uri):
        print(line)
    return 0
