"""Scaling of one simulation on this machine: N institutions × 2 contributions, default model.

    .venv/bin/python benchmarks/scale.py [--sizes 10,25,50] [--strategies fusion,mixture,svd] [--workers 2]
                                         [--compare-strategies] [--set section.field=value ...]

Per N: wall time, actor start-up time (merge actor + N institution actors until all answer), peak total memory
of all Ray processes and the driver (PSS, and the RSS sum that over-counts shared pages, sampled every 1 s), and parallel efficiency = Σ busy seconds of torch
tasks (training+distillation per contribution, evaluations) ÷ (wall × cores); also with the merge actor's merge
seconds added (its merges and coefficient searches are torch work on the same cores). Runs use the ``demo`` preset's
training/distillation/search sizes with N institutions (4 tasks), a local embedded Ray with ``--workers`` pooled
workers, and one evaluation at the end. ``--compare-strategies`` also times the smallest N with only the first
strategy, for the "3 strategies cost ≤ 1.3× one" check (training is paid once per run either way).
Per N also the wall per accepted commit, each strategy's inference cost per test image and storage in the final
evaluation (the mixture's grows with N: it runs every adapter), and how many actor processes hosted the institutions.
Targets at the largest N (50): peak memory ≤ 8 GB, start-up ≤ 30 s,
efficiency ≥ 0.9, and a wall per commit within 1.3× of the smallest N's (the flat cost per commit; with
``--set merge.proxy_images=K`` the coefficient searches score a bounded share of the received sets).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from actors.runner import run_simulation  # noqa: E402
from experiments.presets import demo  # noqa: E402
from sim.config import apply_overrides  # noqa: E402

from benchmarks.procmem import PeakMemory  # noqa: E402


def ray_processes() -> list[psutil.Process]:
    """The driver and every Ray process on the machine (raylet, GCS, workers, actors)."""
    out = [psutil.Process()]
    for p in psutil.process_iter(["name", "cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            if p.pid != os.getpid() and ("ray::" in cmd or "raylet" in cmd or "gcs_server" in cmd
                                         or "ray/_private" in cmd or "default_worker.py" in cmd
                                         or "dashboard" in cmd or (p.info["name"] or "").startswith("ray::")):
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, TypeError):
            pass
    return out


def one_run(n: int, strategies: tuple[str, ...], workers: int, overrides: list[str]) -> dict:
    cfg = demo()
    cfg = cfg.replace(data=dataclasses.replace(cfg.data, institutions=n),
                      merge=dataclasses.replace(cfg.merge, strategies=strategies),
                      runtime=dataclasses.replace(cfg.runtime, workers=workers, eval_every=0))
    cfg = apply_overrides(cfg, overrides)
    sampler = PeakMemory(ray_processes, period=1.0)
    sampler.start()
    with tempfile.TemporaryDirectory() as out:
        summary = run_simulation(cfg, Path(out) / "run")
    peak_rss, peak_pss = sampler.stop()
    cores = os.cpu_count() or 1
    return {"n": n, "strategies": ",".join(strategies), "wall_s": summary["wall_s"], "startup_s": summary["startup_s"],
            "peak_gb": peak_pss / 2**30, "peak_rss_gb": peak_rss / 2**30, "busy_s": summary["busy_s"], "efficiency": summary["busy_s"] / (summary["wall_s"] * cores),
            "commits": summary["commits_accepted"],
            "merge_busy_s": sum((v.get("merge_s_total") or 0.0) for v in summary["strategies"].values()),
            "acc": {s: round(v["acc"], 3) for s, v in summary["strategies"].items()},
            "infer_ms": {s: round(v["infer_ms_per_image"], 2) for s, v in summary["strategies"].items()},
            "storage_mb": {s: round(v["storage_bytes"] / 2**20, 1) for s, v in summary["strategies"].items()},
            "hosts": summary.get("institution_actors", {})}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10,25,50")
    ap.add_argument("--strategies", default="fusion,mixture,svd")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--compare-strategies", action="store_true")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    strategies = tuple(args.strategies.split(","))
    print(f"{os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB; demo preset sizes, "
          f"{args.workers} workers, strategies {strategies}")
    print("| N | strategies | commits | wall s | wall s per commit | start-up s | peak GB (PSS) | peak GB (RSS sum) | "
          "busy s | efficiency | merge s | efficiency with merges | final acc | inference ms per image | storage MB | "
          "institution actors |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    sizes = [int(s) for s in args.sizes.split(",")]
    runs = [(n, strategies) for n in sizes]
    if args.compare_strategies:
        runs.insert(1, (sizes[0], strategies[:1]))
    results, cores = [], os.cpu_count() or 1
    for n, strats in runs:
        r = one_run(n, strats, args.workers, args.overrides)
        results.append(r)
        print(f"| {r['n']} | {r['strategies']} | {r['commits']} | {r['wall_s']:.1f} | "
              f"{r['wall_s'] / max(1, r['commits']):.2f} | {r['startup_s']:.1f} | "
              f"{r['peak_gb']:.2f} | {r['peak_rss_gb']:.2f} | {r['busy_s']:.1f} | {r['efficiency']:.2f} | "
              f"{r['merge_busy_s']:.1f} | {(r['busy_s'] + r['merge_busy_s']) / (r['wall_s'] * cores):.2f} | "
              f"{r['acc']} | {r['infer_ms']} | {r['storage_mb']} | {r['hosts']} |", flush=True)
    full = [r for r in results if r["strategies"] == ",".join(strategies)]
    big, small = max(full, key=lambda r: r["n"]), min(full, key=lambda r: r["n"])
    per_commit = lambda r: r["wall_s"] / max(1, r["commits"])  # noqa: E731
    verdict = lambda ok: "met" if ok else "MISSED"  # noqa: E731
    print(f"targets at N={big['n']}: peak memory (PSS) <= 8 GB: {verdict(big['peak_gb'] <= 8)} ({big['peak_gb']:.2f}); "
          f"start-up <= 30 s: {verdict(big['startup_s'] <= 30)} ({big['startup_s']:.1f}); "
          f"efficiency >= 0.9: {verdict(big['efficiency'] >= 0.9)} ({big['efficiency']:.2f})")
    if big is not small:
        ratio = per_commit(big) / per_commit(small)
        print(f"wall per commit N={big['n']} vs N={small['n']}: {per_commit(big):.2f} vs {per_commit(small):.2f} s, "
              f"{ratio:.2f}x (target <= 1.3x: {verdict(ratio <= 1.3)})")
    if args.compare_strategies:
        many, one = results[0], results[1]
        ratio = many["wall_s"] / one["wall_s"]
        print(f"{len(strategies)} strategies vs 1 at N={one['n']}: {ratio:.2f}x wall (target <= 1.3x: "
              f"{verdict(ratio <= 1.3)})")


if __name__ == "__main__":
    main()
