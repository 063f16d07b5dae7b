"""``forgesim sweep``: a Ray Tune experiment over a study preset → a sweep dir with ``results.parquet``."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from experiments.common import CLIError, add_config_args, resolve_config
from experiments.trackers import add_tracker_args, mlflow_uri, parse_trackers, where_logged

HELP = ("run a study (scaling, order, forgetting, ipc, rank, medforge, medlego, strategies, poisoning, asynchrony) as a "
        "Ray Tune sweep and write a sweep dir")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from experiments.presets import STUDIES

    p.add_argument("study", nargs="?", metavar="STUDY", help=f"study preset: {', '.join(STUDIES)}")
    p.add_argument("--out", metavar="DIR", help="sweep dir (new or empty)")
    p.add_argument("--resume", metavar="DIR", help="continue the interrupted sweep in DIR (finished trials are kept)")
    p.add_argument("--smoke", action="store_true", help="the study's smoke size (tiny model and grid; runs in CI)")
    p.add_argument("--address", help="Ray address of an existing cluster (default RAY_ADDRESS, else a local Ray)")
    p.add_argument("--max-concurrent", type=int, default=0, metavar="K",
                   help="at most K trials at once (default: as many as the cluster's resources allow)")
    add_config_args(p)
    add_tracker_args(p)


def split_grid_overrides(grid: dict, overrides: list[str]) -> tuple[dict[str, tuple], list[str]]:
    """``--set`` items naming one of the study's grid axes (``data.institutions=[10,50,100,200]``: the axis's values;
    a single value: that value alone), apart from the rest, which set the base config. Without this a ``--set`` of
    an axis would set the base and every trial would then replace it with the grid's value."""
    axes, rest = {}, []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if sep and key.strip() in grid:
            value = yaml.safe_load(raw) if raw.strip() else None
            values = tuple(value) if isinstance(value, list) else (value,)
            if not values or len(set(map(json.dumps, values))) != len(values):
                raise CLIError(f"--set {item}: grid axis {key.strip()} needs one or more distinct values")
            axes[key.strip()] = values
        else:
            rest.append(item)
    return axes, rest


def grid_values(base, axes: dict[str, tuple]) -> dict[str, tuple]:
    """``axes`` once each of their values is a valid config value over ``base`` (else the config's error, which names
    the field)."""
    from sim.config import apply_overrides

    for key, values in axes.items():
        for value in values:
            apply_overrides(base, [f"{key}={json.dumps(value)}"])
    return axes


def run(args: argparse.Namespace) -> int:
    from experiments.presets import get_study
    from experiments.sweep import SWEEP_FILE, read_plan, run_sweep, write_plan

    if args.max_concurrent < 0:
        raise CLIError(f"--max-concurrent must be >= 0, got {args.max_concurrent}")
    trackers = parse_trackers(args.log_to, args.mlflow_uri)
    if args.resume:
        if (args.study or args.out or args.overrides or args.config or args.smoke or args.seed is not None
                or args.max_concurrent or trackers):
            raise CLIError("--resume DIR continues a sweep as it was planned; it takes no study, --out, --smoke, "
                           "--config, --seed, --set, --max-concurrent, --log-to or --mlflow-uri")
        sweep_dir = Path(args.resume)
        plan = read_plan(sweep_dir)
        parse_trackers(plan.get("log_to", []))        # the trackers it was planned with must still be installed
    else:
        if not args.study or not args.out:
            raise CLIError("give a study and --out DIR (or --resume DIR)")
        study = get_study(args.study, smoke=args.smoke)
        axes, args.overrides = split_grid_overrides(study.grid, args.overrides)
        base = resolve_config(args, {"seed": "seed"}, base=study.base)     # constructing it validates it
        study.grid.update(grid_values(base, axes))
        for key, values in axes.items():
            print(f"{study.name}: grid axis {key} = {', '.join(map(str, values))} (from --set)")
        sweep_dir = Path(args.out)
        if sweep_dir.exists() and not sweep_dir.is_dir():
            raise CLIError(f"--out {sweep_dir} exists and is not a directory")
        if (sweep_dir / SWEEP_FILE).is_file():
            raise CLIError(f"--out {sweep_dir} already holds a sweep; continue it with --resume {sweep_dir}")
        if sweep_dir.is_dir() and any(sweep_dir.iterdir()):
            raise CLIError(f"--out {sweep_dir} is not empty; choose a new directory")
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if args.seed is not None:          # a fixed seed replaces the study's seed axis
            study.grid.pop("seed", None)
        uri = mlflow_uri(args.mlflow_uri, sweep_dir) if "mlflow" in trackers else None    # fixed for --resume
        plan = write_plan(study, base, sweep_dir, args.max_concurrent, trackers, uri)
    nested = [p for p in plan["points"] if p.get("subset_of")]
    fresh_because = sorted({p["fresh_because"] for p in plan["points"] if p.get("fresh_because")})
    if nested:
        print(f"{plan['study']}: {len(nested)} of {len(plan['points'])} runs built from the log of a larger "
              f"community of the same seed (nested cohorts), not trained again")
    for why in fresh_because:
        print(f"{plan['study']}: each community size is a fresh run: {why}")
    out = run_sweep(plan, sweep_dir, resume=bool(args.resume), address=args.address)
    res = out["results"]
    print(f"{plan['study']}: {out['trials']} trials ({len(out['errored'])} errored) in {out['wall_s']:.0f}s")
    for err in out["errored"]:
        print(f"  errored: {err}")
    if not res.empty:
        keys = [c for c in ("contributors", "ipc", "rank", "sigma", "protocol", "seed")
                if c in res and res[c].nunique() > 1]
        table = res.groupby(keys + ["strategy"], sort=False)[["acc", "auc"]].mean() if keys else \
            res.groupby("strategy", sort=False)[["acc", "auc"]].mean()
        print(table.round(3).to_string())
    print(f"results: {sweep_dir / 'results.parquet'}  (figures: forgesim report {sweep_dir})")
    for line in where_logged(plan.get("log_to", []), sweep_dir, plan.get("mlflow_uri"), sweep=True):
        print(line)
    return 1 if out["errored"] else 0
