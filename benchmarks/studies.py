"""Studies on this machine: the merge-order study and the cost of sweeping strategies.

    .venv/bin/python benchmarks/studies.py order [--run-dir DIR] [--orders 20] [--strategies fusion,mixture,svd]
                                                 [--search-batch B --optimizer NAME] [--proxy-images M]
    .venv/bin/python benchmarks/studies.py scaling [--smoke] [--out DIR]
    .venv/bin/python benchmarks/studies.py reuse

``order``: a 12-institution run of the ``order`` study's full size (12 institutions × 1 contribution, demo training
and distillation sizes; made once, or ``--run-dir`` of an existing run) re-merged in 20 seeded orders × 3
strategies (``--run-dir DIR``: made there if DIR holds no run yet, reused otherwise), the orders split over the pool's workers as Ray tasks exactly as ``forgesim sweep order`` does
(``experiments.sweep.replay_run``). Prints the wall time of the order study (target ≤ 120 s) and the spread of each
strategy over the orders. ``--search-batch B --optimizer NAME`` replays with the batched search
(``merge.search_batch``; B > 1 needs an optimizer that asks in parallel, e.g. TwoPointsDE); ``--proxy-images M``
replays with the bounded proxy (``merge.proxy_images``: each stage scores at most M distilled images).

``scaling``: ``forgesim sweep scaling`` (``--smoke``: its CI size) with nested cohorts: per seed only the largest
community is trained, the smaller ones are built from its log (``sim.replay.replay_subset``). Prints the study's
wall, the trained contributions against a study of fresh runs (Σ N per seed), the wall of the largest runs alone
and of the subset builds, and the ratio of the study's wall to its largest runs' (target ≤ 1.3×).

``reuse``: ``forgesim sweep scaling --smoke`` with its 4 strategies (every trial keeps them as branches over one
commit stream, so training is paid once per point) vs the same sweep with 1 strategy. Prints both wall times and
the ratio (target ≤ 1.3×).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def order_study(args: argparse.Namespace) -> None:
    import pandas as pd
    import ray

    from actors.runner import connect, run_simulation
    from experiments.presets import get_study
    from experiments.sweep import replay_run
    from sim.replay import load_replayable

    study = get_study("order")
    strategies = tuple(args.strategies.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(args.run_dir) if args.run_dir else Path(tmp) / "run"
        merge = dataclasses.replace(study.base.merge, strategies=strategies, search_batch=args.search_batch,
                                    optimizer=args.optimizer or study.base.merge.optimizer,
                                    proxy_images=study.base.merge.proxy_images if args.proxy_images is None
                                    else args.proxy_images)
        cfg = study.base.replace(merge=merge)
        if not (run_dir / "summary.json").is_file():
            t0 = time.perf_counter()
            run_simulation(cfg, run_dir)
            print(f"made the run: {time.perf_counter() - t0:.0f}s (not part of the order study)")
        cfg = load_replayable(run_dir)[0].replace(merge=cfg.merge, runtime=cfg.runtime)
        connect(cfg)
        try:
            t0 = time.perf_counter()
            replay_run(cfg, run_dir, args.orders)
            wall = time.perf_counter() - t0
        finally:
            ray.shutdown()
        orders = pd.read_parquet(run_dir / "orders.parquet")
    print(f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; {cfg.data.institutions} institutions × "
          f"{cfg.schedule.contributions} contribution, {args.orders} orders × {len(strategies)} strategies on "
          f"{cfg.runtime.workers} workers; search: merge.search_batch {cfg.merge.search_batch}, "
          f"merge.optimizer {cfg.merge.optimizer}, merge.proxy_images {cfg.merge.proxy_images}")
    print("| strategy | ACC mean | ACC range | AUC mean | AUC range | merge s per order |")
    print("|---|---|---|---|---|---|")
    for s, g in orders.groupby("strategy", sort=False):
        print(f"| {s} | {g.acc.mean():.3f} | {g.acc.max() - g.acc.min():.3f} | {g.auc.mean():.3f} | "
              f"{g.auc.max() - g.auc.min():.3f} | {g.merge_s.mean():.2f} |")
    print(f"order study wall: {wall:.1f}s (target <= 120 s: {verdict(wall <= 120)})")


def sweep_wall(out: Path, extra: list[str]) -> float:
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "experiments.cli", "sweep", "scaling", "--smoke", "--out", str(out), *extra],
                   cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def reuse(args: argparse.Namespace) -> None:
    from experiments.presets import get_study

    strategies = get_study("scaling", smoke=True).base.merge.strategies
    with tempfile.TemporaryDirectory() as tmp:
        sweep_wall(Path(tmp) / "warm", ["--set", "merge.strategies=[svd]"])   # foundation cache, imports
        many = sweep_wall(Path(tmp) / "many", [])
        one = sweep_wall(Path(tmp) / "one", ["--set", f"merge.strategies=[{strategies[0]}]"])
    ratio = many / one
    print(f"scaling --smoke sweep: {len(strategies)} strategies ({','.join(strategies)}) {many:.1f}s, "
          f"1 strategy ({strategies[0]}) {one:.1f}s: {ratio:.2f}x (target <= 1.3x: {verdict(ratio <= 1.3)})")


def scaling(args: argparse.Namespace) -> None:
    import json

    import pandas as pd

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out) if args.out else Path(tmp) / "scaling"
        env = os.environ | {"PYTHONPATH": str(ROOT)}
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "experiments.cli", "sweep", "scaling", "--out", str(out),
                        *(["--smoke"] if args.smoke else [])], cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        plan = json.loads((out / "sweep.json").read_text())
        res = pd.read_parquet(out / "results.parquet").drop_duplicates("trial_id")
        summaries = {p["name"]: json.loads((out / "runs" / p["name"] / "summary.json").read_text())
                     for p in plan["points"]}
    fresh = [p for p in plan["points"] if not p.get("subset_of")]
    trained = sum(summaries[p["name"]]["n_contributions"] - int(res.set_index("trial_id").cache_hits.get(p["name"], 0))
                  for p in fresh)
    all_fresh = sum(s["n_contributions"] for s in summaries.values())
    largest_s = sum(summaries[p["name"]]["wall_s"] for p in fresh)
    subsets_s = sum(s["wall_s"] for s in summaries.values() if "replayed_from" in s)
    ratio = wall / largest_s
    print(f"{os.cpu_count()} cores; scaling{' --smoke' if args.smoke else ''}: {len(plan['points'])} runs, "
          f"{len(fresh)} trained, {len(plan['points']) - len(fresh)} built from the largest community's log")
    print("| run | institutions | built | commits | wall s |")
    print("|---|---|---|---|---|")
    for p in plan["points"]:
        s = summaries[p["name"]]
        print(f"| {p['name']} | {s['n_institutions']} | {'subset' if 'replayed_from' in s else 'fresh'} | "
              f"{s['commits_accepted']} | {s['wall_s']:.1f} |")
    print(f"study wall {wall:.1f}s; the largest runs alone {largest_s:.1f}s, the subset builds {subsets_s:.1f}s")
    print(f"trained contributions: {trained} (a study of fresh runs: {all_fresh})")
    print(f"study wall / largest runs' wall: {ratio:.2f}x (target <= 1.3x: {verdict(ratio <= 1.3)})")


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="part", required=True)
    p = sub.add_parser("order")
    p.add_argument("--run-dir")
    p.add_argument("--orders", type=int, default=20)
    p.add_argument("--strategies", default="fusion,mixture,svd")
    p.add_argument("--search-batch", type=int, default=1, help="merge.search_batch of the replays")
    p.add_argument("--optimizer", help="merge.optimizer of the replays (default: the study's)")
    p.add_argument("--proxy-images", type=int, help="merge.proxy_images of the replays (default: the study's)")
    p = sub.add_parser("scaling")
    p.add_argument("--smoke", action="store_true", help="the study's CI size (4 and 8 institutions, seed 0)")
    p.add_argument("--out", help="keep the sweep dir here (default: a temporary dir)")
    sub.add_parser("reuse")
    args = ap.parse_args()
    {"order": order_study, "scaling": scaling, "reuse": reuse}[args.part](args)


if __name__ == "__main__":
    main()
