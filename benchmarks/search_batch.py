"""Fusion's sequential coefficient search, one-at-a-time asks vs batched asks (``merge.search_batch``).

    .venv/bin/python benchmarks/search_batch.py --run-dir DIR [--modes 1:NGOpt,4:CMA,8:CMA] [--budget 20]
    .venv/bin/python benchmarks/search_batch.py [--institutions 12] [--ipc 5] [--steps 20] ...

Folds ``merge_step`` over the commits of a run dir in their order (``--run-dir``: any run dir with
``schedule.init_from: base``, e.g. one ``benchmarks/studies.py order --run-dir DIR`` made), exactly as a run's fusion
branch does: stage t searches (a, b) on the distilled sets of commits 0..t. Without ``--run-dir`` it makes the commits:
the ``order`` study's cohort, one adapter per institution trained ``--steps`` steps, and ``--ipc`` real training
images per class as each institution's distilled set. Per mode ``B:OPTIMIZER`` (B = 1: the one-at-a-time search;
B > 1: nevergrad with ``num_workers=B`` and the stacked forward) it prints the search seconds per commit (wall and
this process's CPU seconds — the machine may be shared), the speed-up over the first mode, and the search's result:
the mean over stages of the best objective (CE + L1) and the final branch's proxy cross-entropy on every set.
One torch thread, as a pooled worker runs (``runtime.threads``).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def add_commit_args(ap: argparse.ArgumentParser, institutions: int) -> None:
    """The options ``load_commits`` reads: ``--run-dir``, or the commits to make, and the search budget."""
    ap.add_argument("--run-dir", help="a run dir whose commits to fold (default: make them)")
    ap.add_argument("--budget", type=int, default=20, help="merge.budget (the demo's and order study's: 20)")
    ap.add_argument("--institutions", type=int, default=institutions, help="without --run-dir: commits to make")
    ap.add_argument("--ipc", type=int, default=5, help="without --run-dir: real images per class per set")
    ap.add_argument("--steps", type=int, default=20, help="without --run-dir: training steps per adapter")


def load_commits(args: argparse.Namespace):
    """(config, foundation, [(adapter, distilled set)]) from ``--run-dir`` or made from the order study's cohort."""
    import numpy as np

    from experiments.presets import get_study
    from sim.data import build_cohort
    from sim.data.base import DistilledSet
    from sim.model import load_foundation
    from sim.replay import load_replayable
    from sim.train import train_adapter

    if args.run_dir:
        cfg, commits = load_replayable(args.run_dir)
        foundation = load_foundation(cfg.model, cfg.data.img_size, "cpu")
        return cfg, foundation, [(c.adapter, c.distilled) for c in commits]
    cfg = get_study("order").base
    cfg = cfg.replace(data=dataclasses.replace(cfg.data, institutions=args.institutions),
                      train=dataclasses.replace(cfg.train, steps=args.steps))
    foundation = load_foundation(cfg.model, cfg.data.img_size, "cpu")
    pairs = []
    for inst in build_cohort(cfg.data, cfg.seed).institutions:
        adapter = train_adapter(foundation, inst.train, inst.task, inst.classes, cfg.lora, cfg.train, seed=inst.id,
                                head=cfg.model.head).adapter
        idx = np.concatenate([np.flatnonzero(inst.train.y == c)[:args.ipc] for c in range(len(inst.classes))])
        pairs.append((adapter, DistilledSet(inst.task, inst.classes, inst.train.x[idx].astype(np.float32) / 255.0,
                                            inst.train.y[idx], method="real")))
    return cfg, foundation, pairs


def fold(foundation, pairs, merge_cfg, seed: int) -> dict:
    """One fusion branch over ``pairs`` in order: search seconds per commit (wall, CPU), objectives, final CE."""
    import numpy as np

    from sim.coefficients import prepare_proxy, proxy_loss
    from sim.data.base import derive_seed
    from sim.merge import merge_step, start_sequence

    state, wall, cpu = start_sequence("fusion"), 0.0, 0.0
    sets = []
    for i, (adapter, ds) in enumerate(pairs):
        sets.append(ds)
        t0, c0 = time.perf_counter(), time.process_time()
        state = merge_step(state, adapter, foundation=foundation, proxy=list(sets), cfg=merge_cfg,
                           seed=derive_seed(seed, "merge", "fusion", i + 1))
        wall += time.perf_counter() - t0
        cpu += time.process_time() - c0
    searched = len(pairs) - 1
    objectives = [st["objective"] for st in state.stages[1:]]
    return {"wall": wall / searched, "cpu": cpu / searched, "objective": float(np.mean(objectives)),
            "final_ce": proxy_loss(foundation, prepare_proxy(foundation, sets), state.merged)}


def main() -> None:
    import torch

    ap = argparse.ArgumentParser()
    add_commit_args(ap, institutions=12)
    ap.add_argument("--modes", default="1:NGOpt,4:CMA,8:CMA,8:TwoPointsDE",
                    help="comma-separated B:OPTIMIZER (merge.search_batch : merge.optimizer)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from sim.config import MergeConfig
    from sim.stacked_forward import prefix_cache

    cfg, foundation, pairs = load_commits(args)
    modes = [(int(b), o) for b, o in (m.split(":") for m in args.modes.split(","))]
    print(f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; {len(pairs)} commits, proxy sets of "
          f"{sorted({len(ds) for _, ds in pairs})} images, {cfg.data.img_size} px, depth {cfg.model.depth}, "
          f"width {cfg.model.embed_dim}, LoRA {','.join(cfg.lora.target_modules)} r{cfg.lora.rank}, budget {args.budget}")
    print("| search_batch | optimizer | search s per commit (wall) | CPU s per commit | speed-up (CPU) | "
          "mean stage objective | final proxy CE |")
    print("|---|---|---|---|---|---|---|")
    base = None
    for batch, optimizer in modes:
        merge_cfg = MergeConfig(strategies=("fusion",), optimizer=optimizer, budget=args.budget, search_batch=batch)
        out = fold(foundation, pairs, merge_cfg, cfg.seed)
        base = base or out
        print(f"| {batch} | {optimizer} | {out['wall']:.2f} | {out['cpu']:.2f} | {base['cpu'] / out['cpu']:.2f}x | "
              f"{out['objective']:.4f} | {out['final_ce']:.4f} |", flush=True)
    cache = prefix_cache(foundation)
    print(f"prefix cache: {cache.misses} sets computed, {cache.hits} reused, {cache.nbytes / 2**20:.1f} MiB; "
          f"load now {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
