"""``forgesim replay``: re-merge a run's accepted commits in K seeded orders (merge-order sensitivity, no retraining)."""
from __future__ import annotations

import argparse
import json
import time

from experiments.common import CLIError, prepare_out_dir

HELP = "re-merge a run's accepted commits in K seeded orders (order 0 = original); writes orders.parquet"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run dir written by `forgesim run` (schedule.init_from=base)")
    p.add_argument("--orders", type=int, default=10, metavar="K", help="number of orders, the original included")
    p.add_argument("--strategies", metavar="A,B,C", help="strategies to re-merge (default: the run's)")
    p.add_argument("--per-step", action="store_true",
                   help="also evaluate every branch after every merge step of every order, on every task (OPCM's "
                        "protocol); writes orders_steps.parquet and prints accuracy on the tasks merged so far")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (new or empty)")
    p.add_argument("--overwrite", action="store_true", help="allow a non-empty --out")


def run(args: argparse.Namespace) -> int:
    import pandas as pd

    from sim.merge import get_strategy
    from sim.replay import load_replayable, replay

    strategies = [s for s in args.strategies.split(",") if s] if args.strategies else None
    if args.orders < 1:
        raise CLIError(f"--orders must be >= 1, got {args.orders}")
    for s in strategies or []:
        get_strategy(s)
    loaded = load_replayable(args.run_dir)           # checked before anything is written
    out = prepare_out_dir(args.out, args.overwrite)
    t0 = time.perf_counter()
    rows, per_task, info = replay(args.run_dir, args.orders, strategies, loaded=loaded, per_step=args.per_step)
    wall_s = time.perf_counter() - t0
    pd.DataFrame(rows).to_parquet(out / "orders.parquet", index=False)
    pd.DataFrame(per_task).to_parquet(out / "orders_per_task.parquet", index=False)
    steps = info.pop("steps", None)
    if steps is not None:
        pd.DataFrame(steps).to_parquet(out / "orders_steps.parquet", index=False)
    (out / "orders.json").write_text(json.dumps(info | {"run_dir": str(args.run_dir), "wall_s": wall_s}, indent=2))
    frame = pd.DataFrame(rows)
    print(f"{info['n_commits']} commits × {args.orders} orders × {len(info['strategies'])} strategies in "
          f"{wall_s:.1f}s")
    for s, g in frame.groupby("strategy", sort=False):
        print(f"{s:>16}: AUC {g.auc.mean():.3f} (range {g.auc.max() - g.auc.min():.3f})  "
              f"ACC {g.acc.mean():.3f} (range {g.acc.max() - g.acc.min():.3f})  order 0 ACC {g.acc.iloc[0]:.3f}")
    if steps is not None:
        from analysis.steps import step_summary

        summary = step_summary(pd.DataFrame(steps))
        for s, g in summary.groupby("strategy", sort=False):
            print(f"{s:>16}: ACC on the tasks merged so far, mean ± sd over orders, step 1..{g.step.max()}: "
                  + " ".join(f"{m:.3f}±{sd:.3f}" for m, sd in zip(g.acc_seen_mean, g.acc_seen_sd)))
    print(f"orders: {out / 'orders.parquet'}")
    return 0
