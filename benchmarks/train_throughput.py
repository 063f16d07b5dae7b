"""Training and inference throughput of the default model, foundation pretraining time, `forgesim train` time.

    .venv/bin/python benchmarks/train_throughput.py [--threads 1] [--skip-pretrain]

Pretraining is timed into a fresh temporary cache (so it is really measured); `forgesim train` is timed
as a subprocess on the default task against the user's cache (built first if missing), as a user runs it.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sim.config import SimConfig  # noqa: E402
from sim.data import build_cohort  # noqa: E402
from sim.metrics import predict_proba  # noqa: E402
from sim.model import load_foundation, pretrain_foundation  # noqa: E402
from sim.train import train_adapter  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the throughput numbers")
    ap.add_argument("--skip-pretrain", action="store_true")
    args = ap.parse_args()
    cfg = SimConfig()
    print(f"default model: {cfg.model.name} img {cfg.data.img_size} patch {cfg.model.patch_size} "
          f"dim {cfg.model.embed_dim} depth {cfg.model.depth} heads {cfg.model.num_heads}; "
          f"LoRA r={cfg.lora.rank} on {','.join(cfg.lora.target_modules)}; cores {os.cpu_count()}")
    rows = []
    if not args.skip_pretrain:
        with tempfile.TemporaryDirectory() as tmp:
            torch.set_num_threads(os.cpu_count() or 1)
            t0 = time.perf_counter()
            pretrain_foundation(replace(cfg.model, cache_dir=tmp), cfg.data.img_size)
            rows.append(("foundation pretraining (one-time)", f"{time.perf_counter() - t0:.1f} s",
                         f"target <= 180 s, {torch.get_num_threads()} threads"))
    foundation = load_foundation(cfg.model, cfg.data.img_size)
    cohort = build_cohort(cfg.data, cfg.seed)
    task = cohort.tasks[0]
    split = cohort.task_split(task, "train")
    torch.set_num_threads(args.threads)
    res = train_adapter(foundation, split, task, cohort.task_classes[task], cfg.lora, cfg.train, seed=0)
    rows.append(("LoRA training", f"{res.stats['images_per_s']:.0f} images/s", f"{args.threads} thread(s)"))
    test = cohort.task_split(task, "test")
    x = test.x[:1024] if len(test) >= 1024 else test.x
    predict_proba(foundation, res.adapter, x[:64], task, cohort.task_classes[task])  # warm-up
    t0 = time.perf_counter()
    reps = 3
    for _ in range(reps):
        predict_proba(foundation, res.adapter, x, task, cohort.task_classes[task])
    rows.append(("inference (adapter merged)", f"{reps * len(x) / (time.perf_counter() - t0):.0f} images/s",
                 f"{args.threads} thread(s)"))
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "experiments.cli", "train", "--out", out, "--overwrite"], cwd=ROOT,
                       check=True, capture_output=True)
        rows.append(("`forgesim train` (default task, cache present)", f"{time.perf_counter() - t0:.1f} s",
                     "target <= 30 s, whole process"))
    width = max(len(r[0]) for r in rows)
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>16}  ({note})")


if __name__ == "__main__":
    main()
