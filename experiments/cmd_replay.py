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
    rows, per_task, info = replay(args.run_dir, args.orders, strategies, loaded=loaded)
    wall_s = time.perf_counter() - t0
    pd.DataFrame(rows).to_parquet(out / "orders.parquet", index=False)
    pd.DataFrame(per_task).to_parquet(out / "orders_per_task.parquet", index=False)
    (out / "orders.json").write_text(json.dumps(info | {"run_dir": str(args.run_dir), "wall_s": wall_s}, indent=2))
    frame = pd.DataFrame(rows)
    print(f"{info['n_commits']} commits × {args.orders} orders × {len(info['strategies'])} strategies in "
          f"{wall_s:.1f}s")
    for s, g in frame.groupby("strategy", sort=False):
        print(f"{s:>16}: AUC {g.auc.mean():.3f} (range {g.auc.max() - g.auc.min():.3f})  "
              f"ACC {g.acc.mean():.3f} (range {g.acc.max() - g.acc.min():.3f})  order 0 ACC {g.acc.iloc[0]:.3f}")
    print(f"orders: {out / 'orders.parquet'}")
    return 0
