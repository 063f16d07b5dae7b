"""Merge latency and memory at ViT-B/16 shapes, against peft's ``add_weighted_adapter``; coefficient-search time.

    .venv/bin/python benchmarks/merge_latency.py [--quick] [--threads T] [--sizes 10,20,30,40,50]

Part 1 (CPU): N rank-16 adapters on the 12 ``blocks.i.attn.qkv`` projections of ViT-B/16 (768 → 2304). For every
parameter-space strategy: seconds and peak memory (the process's peak RSS above its level before the call, via
``/proc/self/clear_refs``; glibc is told to return freed tensors to the OS so that RSS follows live memory), and the
ratio to peft's ``add_weighted_adapter`` with ``svd`` and ``ties`` on the same
adapters (a peft model of 12 ``Linear(768, 2304)`` "qkv" modules). peft's ``ties`` works on the A and B factors;
ours on ΔW (peft's ΔW-space equivalent is ``ties_svd``, also timed for N ≤ 20 — it adds an SVD to the same work).
Targets at N = 50: svd ≤ 2 s and ≥ 3× faster than peft's svd; every ΔW-space strategy ≤ 5 s; peak ≤ 4 GB. The
data-aware merges (regmean, fisher) are timed on synthetic statistics of these shapes (``synthetic_statistics``),
the continual ones as the fold over the N adapters (what ``forgesim merge`` does) and, as ``NAME:step``, the N-th
step alone (what a run's branch pays per commit).

Part 2: a budget-40 coefficient search for fusion and mixture over 12 contributors' proxy sets (10 images per
class of each institution's training data, the stand-in for distilled sets) with the default model
(``SimConfig().model``); adapters from short ``train_adapter`` runs. Target ≤ 60 s per search.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import os
import re
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sim.config import MergeConfig, SimConfig, TrainConfig  # noqa: E402
from sim.merge import SPECS, continual, get_spec, merge, merge_step, start_sequence  # noqa: E402
from sim.model import PEFT_PREFIX, Adapter  # noqa: E402

DIM, QKV, RANK, BLOCKS = 768, 2304, 16, 12
MODULES = [f"blocks.{i}.attn.qkv" for i in range(BLOCKS)]
DELTA_SPACE = tuple(name for name, spec in SPECS.items() if spec.space == "delta")


# ------------------------------------------------------------------------------------------
# Measuring
# ------------------------------------------------------------------------------------------
_LIBC = ctypes.CDLL("libc.so.6")
_LIBC.mallopt(-3, 1 << 20)   # M_MMAP_THRESHOLD = 1 MiB: tensors are mmapped and unmapped on free (RSS = live memory)


def _rss_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def measure(fn: Callable[[], object]) -> tuple[float, float]:
    """(seconds, peak RSS above the starting RSS in MB) of one call; the result is dropped before returning."""
    gc.collect()
    _LIBC.malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")        # reset VmHWM to the current RSS
    start = _rss_kib("VmRSS")
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    peak = _rss_kib("VmHWM")
    del out
    gc.collect()
    return seconds, (peak - start) / 1024


def vit_b_adapters(n: int, seed: int = 0) -> list[Adapter]:
    """N rank-16 LoRA adapters of the ViT-B/16 qkv projections: A Kaiming-uniform, B ~ N(0, 0.02²) (trained-like)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        w = {}
        for m in MODULES:
            w[f"{PEFT_PREFIX}{m}.lora_A.weight"] = (torch.rand(RANK, DIM, generator=g) * 2 - 1) / DIM ** 0.5
            w[f"{PEFT_PREFIX}{m}.lora_B.weight"] = torch.randn(QKV, RANK, generator=g) * 0.02
        out.append(Adapter(w, float(RANK), "vit-b"))
    return out


def synthetic_statistics(name: str, adapters: list[Adapter], seed: int = 0) -> dict:
    """Stand-ins for a data-aware strategy's per-contributor statistics at these shapes (``spec.statistic``), which a
    run computes once per adapter when its commit arrives: RegMean's input Grams (a random PSD XᵀX/n from 256 token
    rows per contributor and module), Fisher merging's diagonals (random positive); the merge itself is timed."""
    spec = get_spec(name)
    if spec.statistic_impl is None:
        return {}
    g = torch.Generator().manual_seed(seed)
    if spec.statistic_option == "grams":
        stats = []
        for _ in adapters:
            grams = {}
            for m in MODULES:
                x = torch.randn(256, DIM, generator=g, dtype=torch.float64)
                grams[m] = x.T @ x / 256
            stats.append(grams)
    else:
        stats = [{k: torch.rand(v.shape, generator=g) + 1e-3 for k, v in a.weights.items()} for a in adapters]
    return {spec.statistic_option: stats}


def peft_model(adapters: list[Adapter]):
    """A peft model of 12 Linear(768, 2304) "qkv" modules holding the N adapters as a0 … a{N-1}."""
    from peft import get_peft_model, set_peft_model_state_dict

    base = torch.nn.ModuleDict({"blocks": torch.nn.ModuleList(
        [torch.nn.ModuleDict({"attn": torch.nn.ModuleDict({"qkv": torch.nn.Linear(DIM, QKV)})})
         for _ in range(BLOCKS)])})
    model = get_peft_model(base, adapters[0].to_peft_config(), adapter_name="a0")
    for i, a in enumerate(adapters):
        if i:
            model.add_adapter(f"a{i}", a.to_peft_config())
        set_peft_model_state_dict(model, a.weights, adapter_name=f"a{i}")
    return model


def peft_merge(model, n: int, combination: str) -> Callable[[], None]:
    weights = [1.0 / n] * n

    def run() -> None:
        kw = {"density": 0.5} if "ties" in combination else {}
        model.add_weighted_adapter([f"a{i}" for i in range(n)], weights, "merged", combination_type=combination, **kw)
        model.delete_adapter("merged")
    return run


# ------------------------------------------------------------------------------------------
# Part 1: latency and memory at ViT-B shapes
# ------------------------------------------------------------------------------------------
def latency_table(sizes: list[int], strategies: list[str], peft_ties_svd_max_n: int) -> list[dict]:
    rows = []
    cfg = MergeConfig()
    for n in sizes:
        adapters = vit_b_adapters(n)
        model = peft_model(adapters)
        ref = {}
        for comb in ("svd", "ties") + (("ties_svd",) if n <= peft_ties_svd_max_n else ()):
            ref[comb] = measure(peft_merge(model, n, comb))
            rows.append({"n": n, "method": f"peft:{comb}", "s": ref[comb][0], "peak_mb": ref[comb][1]})
            print(f"  N={n:2d} peft {comb:<16s} {ref[comb][0]:7.2f} s  {ref[comb][1]:7.0f} MB", flush=True)
        del model
        for name in strategies:
            stats = synthetic_statistics(name, adapters)
            if stats:       # data-aware: the merge on given statistics (merge() would compute them on a foundation)
                fn = lambda name=name, adapters=adapters, stats=stats: get_spec(name).fn(adapters, None, **stats)  # noqa: E731
            else:
                fn = lambda name=name, adapters=adapters: merge(name, adapters, cfg=cfg, seed=0).merged  # noqa: E731
            s, mb = measure(fn)
            del stats
            row = {"n": n, "method": name, "s": s, "peak_mb": mb,
                   "vs_peft_svd": ref["svd"][0] / s, "vs_peft_ties": ref["ties"][0] / s}
            rows.append(row)
            print(f"  N={n:2d} {name:<21s} {s:7.2f} s  {mb:7.0f} MB  peft svd/ours {row['vs_peft_svd']:6.2f}x  "
                  f"peft ties/ours {row['vs_peft_ties']:6.2f}x", flush=True)
            if get_spec(name).continual:     # what a run's branch pays per commit: the N-th step, after N − 1
                state = continual.start(name)
                for a in adapters[:-1]:
                    state = continual.step(state, a)
                s, mb = measure(lambda state=state, last=adapters[-1]: continual.step(state, last))
                rows.append({"n": n, "method": f"{name}:step", "s": s, "peak_mb": mb})
                print(f"  N={n:2d} {name + ':step':<21s} {s:7.2f} s  {mb:7.0f} MB  (the N-th commit's step)",
                      flush=True)
                del state
        del adapters
        gc.collect()
    return rows


# ------------------------------------------------------------------------------------------
# Part 2: coefficient search with the default model
# ------------------------------------------------------------------------------------------
def search_table(contributors: int, per_class: int, budget: int, train_steps: int) -> list[dict]:
    from sim.data import build_cohort
    from sim.data.base import DistilledSet
    from sim.model import load_foundation
    from sim.train import train_adapter

    cfg = SimConfig()
    foundation = load_foundation(cfg.model, cfg.data.img_size)
    cohort = build_cohort(cfg.data, cfg.seed)
    t0 = time.perf_counter()
    adapters, proxy = [], []
    for inst in cohort.institutions[:contributors]:
        res = train_adapter(foundation, inst.train, inst.task, inst.classes, cfg.lora,
                            TrainConfig(steps=train_steps, batch_size=32), seed=inst.id)
        adapters.append(res.adapter)
        idx = np.concatenate([np.flatnonzero(inst.train.y == c)[:per_class] for c in range(len(inst.classes))])
        proxy.append(DistilledSet(inst.task, inst.classes, inst.train.x[idx].astype(np.float32) / 255.0,
                                  inst.train.y[idx], method="real"))
    n_images = sum(len(p) for p in proxy)
    print(f"  {contributors} adapters ({train_steps} training steps each) in {time.perf_counter() - t0:.0f} s; "
          f"proxy: {n_images} images ({per_class} per class per contributor)", flush=True)
    rows = []
    for strategy in (name for name, spec in SPECS.items() if spec.sequential):
        for mode in ("global", "sequential"):
            mcfg = MergeConfig(budget=budget, search_mode=mode)
            if mode == "global":
                res = merge(strategy, adapters, cfg=mcfg, foundation=foundation, proxy=proxy, seed=0)
                stage_s = [res.merge_s]
                first, best = res.trace[0], min(res.trace)
            else:
                # As the merge actor runs it: one stage per commit, on the distilled sets received so far.
                state, stage_s = start_sequence(strategy), []
                for i, a in enumerate(adapters):
                    t = time.perf_counter()
                    state = merge_step(state, a, foundation=foundation, proxy=proxy[:i + 1], cfg=mcfg, seed=i)
                    stage_s.append(time.perf_counter() - t)
                last = state.stages[-1]
                first, best = last["initial_objective"], last["objective"]
            rows.append({"strategy": strategy, "mode": mode, "evals": budget, "max_search_s": max(stage_s),
                         "total_s": sum(stage_s), "objective_first": first, "objective_best": best})
            print(f"  {strategy:<8s} {mode:<10s} longest search {max(stage_s):6.1f} s  all stages {sum(stage_s):6.1f} s"
                  f"  objective {first:.3f} -> {best:.3f}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="N in {10, 20}, 4 contributors, budget 10")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads")
    ap.add_argument("--sizes", help="comma-separated N (default 10,20,30,40,50)")
    ap.add_argument("--strategies", help=f"comma-separated (default: {', '.join(DELTA_SPACE)}, lora_avg, fisher, "
                                         "fusion)")
    ap.add_argument("--skip-latency", action="store_true")
    ap.add_argument("--skip-search", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    default_sizes = [10, 20] if args.quick else [10, 20, 30, 40, 50]
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else default_sizes
    strategies = (args.strategies.split(",") if args.strategies
                  else list(DELTA_SPACE) + ["lora_avg", "fisher", "fusion"])
    for s in strategies:
        get_spec(s)  # fail fast on a typo
    print(f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} cores")
    from sim.merge import kernels
    print(f"compiled kernels ready in {kernels.warm_up():.1f} s (numba; compiled once, then loaded from its cache)")
    if not args.skip_latency:
        print(f"Part 1: merge latency, N rank-{RANK} adapters on {BLOCKS} x Linear({DIM}, {QKV}) (ViT-B/16 qkv)")
        rows = latency_table(sizes, strategies, peft_ties_svd_max_n=10 if args.quick else 20)
        n_max = max(sizes)
        print("\nmethod                 " + "".join(f"   N={n:<3d}" for n in sizes) + f"   peak MB (N={n_max})"
              f"   peft svd/ours   peft ties/ours (N={n_max})")
        for method in dict.fromkeys(r["method"] for r in rows):
            cells = {r["n"]: r for r in rows if r["method"] == method}
            line = f"{method:<22s} " + "".join(f"{cells[n]['s']:8.2f}s" if n in cells else "        -" for n in sizes)
            last = cells.get(n_max)
            if last:
                line += f"   {last['peak_mb']:10.0f}"
                if "vs_peft_svd" in last:
                    line += f"   {last['vs_peft_svd']:13.2f}x   {last['vs_peft_ties']:14.2f}x"
            print(line)
        big = {r["method"]: r for r in rows if r["n"] == n_max}
        checks = [(f"svd <= 2 s at N={n_max}", big["svd"]["s"] <= 2.0 if "svd" in big else None),
                  (f"svd >= 3x faster than peft svd at N={n_max}", big["svd"]["vs_peft_svd"] >= 3.0 if "svd" in big
                   else None)]
        checks += [(f"{m} <= 5 s at N={n_max}", big[m]["s"] <= 5.0) for m in DELTA_SPACE if m in big]
        checks += [(f"{m} <= 5 s per commit at N={n_max}", big[m]["s"] <= 5.0) for m in big if m.endswith(":step")]
        checks += [(f"peak memory <= 4 GB at N={n_max}", max(r["peak_mb"] for r in big.values()) <= 4096)]
        print("\ntargets: " + "; ".join(f"{name}: {'met' if ok else 'MISSED'}"
                                        for name, ok in checks if ok is not None))
    if not args.skip_search:
        contributors, budget = (4, 10) if args.quick else (12, 40)
        print(f"\nPart 2: coefficient search, budget {budget}, {contributors} contributors, default model")
        rows = search_table(contributors, per_class=10, budget=budget, train_steps=10 if args.quick else 30)
        print("targets: " + "; ".join(f"{r['strategy']} {r['mode']} longest search <= 60 s: "
                                      f"{'met' if r['max_search_s'] <= 60 else 'MISSED'}" for r in rows))


if __name__ == "__main__":
    main()
