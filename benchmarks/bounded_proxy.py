"""The sequential search on a bounded proxy (``merge.proxy_images``) against the whole one, as contributors arrive.

    .venv/bin/python benchmarks/bounded_proxy.py [--institutions 50] [--bounds 0,250] [--strategies fusion,mixture]
    .venv/bin/python benchmarks/bounded_proxy.py --run-dir DIR [--bounds 0,250]

Folds ``merge_step`` over N commits in arrival order, exactly as a run's fusion and mixture branches do (stage t
searches (a, b) on the sets of commits 0..t), once per bound (``0``: every image of every set, MedForge's). Without
``--run-dir`` the commits are made as ``benchmarks/search_batch.py`` makes them: the ``order`` study's cohort with
``--institutions`` sites, one adapter each trained ``--steps`` steps, ``--ipc`` real training images per class as its
distilled set. Per strategy and bound it prints the search's CPU seconds per commit over the first and the last ten
stages (flat is the target: the last ten within 1.3× of the first), the proxy images the last stage scored, and what
the coefficients found are worth: the final branch's cross-entropy on the *whole* proxy and its accuracy on every
task's pooled test set. One torch thread (a pooled worker's); CPU seconds, because the machine may be shared.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.search_batch import add_commit_args, load_commits  # noqa: E402


def fold(foundation, pairs, strategy: str, merge_cfg, seed: int) -> dict:
    """One branch over ``pairs`` in order: CPU seconds per stage, the last stage's proxy size, the final predictor."""
    from sim.coefficients import prepare_proxy
    from sim.data.base import derive_seed
    from sim.merge import merge_step, start_sequence

    state, cpu, sets = start_sequence(strategy), [], []
    for i, (adapter, ds) in enumerate(pairs):
        sets.append(ds)
        c0 = time.process_time()
        state = merge_step(state, adapter, foundation=foundation, proxy=list(sets), cfg=merge_cfg,
                           seed=derive_seed(seed, "merge", strategy, i + 1))
        cpu.append(time.process_time() - c0)
    return {"cpu": cpu[1:], "images": len(prepare_proxy(foundation, sets, merge_cfg.proxy_images)),
            "predictor": state.merged, "sets": sets}


def whole_proxy_ce(foundation, predictor, sets) -> float:
    """Cross-entropy of ``predictor`` on every image of every set (the unbounded objective, without the L1 term)."""
    from sim.coefficients import prepare_proxy, proxy_loss
    from sim.merge import Mixture
    from sim.merge.mixture import mixture_search_loss

    data = prepare_proxy(foundation, sets)
    if isinstance(predictor, Mixture):
        return mixture_search_loss(foundation, data, predictor.adapters)(predictor.weights)
    return proxy_loss(foundation, data, predictor)


def main() -> None:
    import numpy as np
    import torch

    ap = argparse.ArgumentParser()
    add_commit_args(ap, institutions=50)
    ap.add_argument("--bounds", default="0,250", help="comma-separated merge.proxy_images values (0 = whole proxy)")
    ap.add_argument("--strategies", default="fusion,mixture")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from sim.config import MergeConfig
    from sim.data import build_cohort
    from sim.evaluation import evaluate_predictor

    t0 = time.perf_counter()
    cfg, foundation, pairs = load_commits(args)
    cohort = build_cohort(cfg.data, cfg.seed)
    tasks = list(dict.fromkeys(ds.task for _, ds in pairs))
    print(f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; {len(pairs)} commits made or loaded in "
          f"{time.perf_counter() - t0:.0f} s, sets of {sorted({len(ds) for _, ds in pairs})} images "
          f"({sum(len(ds) for _, ds in pairs)} in all), budget {args.budget}, {len(tasks)} tasks")
    print("| strategy | proxy_images | images at the last stage | CPU s per commit, first 10 | last 10 | ratio | "
          "whole-proxy CE | mean test ACC |")
    print("|---|---|---|---|---|---|---|---|")
    for strategy in args.strategies.split(","):
        for bound in (int(b) for b in args.bounds.split(",")):
            merge_cfg = MergeConfig(strategies=(strategy,), budget=args.budget, proxy_images=bound)
            out = fold(foundation, pairs, strategy, merge_cfg, cfg.seed)
            first, last = float(np.mean(out["cpu"][:10])), float(np.mean(out["cpu"][-10:]))
            ce = whole_proxy_ce(foundation, out["predictor"], out["sets"])
            acc = float(np.mean([r["acc"] for r in evaluate_predictor(foundation, out["predictor"], cohort, tasks)]))
            print(f"| {strategy} | {bound} | {out['images']} | {first:.2f} | {last:.2f} | {last / first:.2f}x | "
                  f"{ce:.4f} | {acc:.3f} |", flush=True)
    print(f"total {time.perf_counter() - t0:.0f} s; load now {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
