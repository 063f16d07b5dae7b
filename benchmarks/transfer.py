"""How well forgesim's own foundations transfer: LoRA at default settings vs a full fine-tune vs pixels, per task.

    .venv/bin/python benchmarks/transfer.py [--quick] [--foundations formula,shapes] [--threads N]

For each foundation (``model.pretrain_data``: ``formula``, the formula-driven corpus, and ``shapes``, the default;
each loads its shipped file, or pretrains once into the cache) and each task, on the task's pooled
training split of the default cohort (every site, ``data.*`` defaults otherwise) and scored on its pooled test split:

* ``base``: the bare foundation with the prototype head (no adapter): near chance when the foundation has not been
  trained on the task's classes, as the prototypes are random;
* ``lora``: ``sim.train.train_adapter`` at the default ``lora`` and ``train`` sections (rank 8 on qkv, 150 steps at
  batch 64), what an institution trains;
* ``full FT``: every backbone weight trained instead, the same prototype head, steps, batch, augmentation, optimizer
  and cosine schedule, at learning rate ``--ft-lr`` (full fine-tuning wants a smaller one than LoRA's 3e-3);
* ``pixels``: scikit-learn's logistic regression on the raw pixels of the same images (one per task, foundation-
  independent): how much of the task a linear model of the input already solves.

Tasks: the default ``synthetic`` cohort's four; ``digits`` (scikit-learn's real 8x8 handwritten digits) as two 5-class
tasks; and ``medmnist``: a MedMNIST-format ``.npz`` (28 px, ``train/val/test_images`` + ``_labels``) written here
from the digits 0-4, read through ``data.name=medmnist`` as a user's file would be. ``--quick`` keeps the digits and
medmnist tasks only (the real images). Prints the table and, per foundation, the mean LoRA − full-FT gap on the
real-image tasks.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sim.config import SimConfig, apply_overrides  # noqa: E402
from sim.data import build_cohort  # noqa: E402
from sim.data.base import Split, derive_rng, to_unit_float  # noqa: E402
from sim.data.digits import _stratified  # noqa: E402
from sim.metrics import chance_accuracy, evaluate  # noqa: E402
from sim.model import Foundation, augment, load_foundation  # noqa: E402
from sim.train import train_adapter  # noqa: E402

REAL = ("digits", "medmnist")


def write_digits_npz(path: Path) -> Path:
    """The digits 0-4 as a MedMNIST file: grayscale (n, 28, 28) uint8, labels (n, 1), stratified 60/10/30 splits."""
    from sklearn.datasets import load_digits

    raw = load_digits()
    keep = raw.target < 5
    x = torch.from_numpy(raw.images[keep] * (255.0 / 16.0)).float()[:, None]
    x = F.interpolate(x, size=(28, 28), mode="bilinear", antialias=True, align_corners=False)
    x = x[:, 0].round().clamp(0, 255).to(torch.uint8).numpy()
    y = raw.target[keep].astype(np.int64)
    train, val, test = _stratified(y, derive_rng(0, "digits-medmnist"))
    np.savez(path, **{f"{name}_images": x[idx] for name, idx in (("train", train), ("val", val), ("test", test))},
             **{f"{name}_labels": y[idx, None] for name, idx in (("train", train), ("val", val), ("test", test))},
             class_names=np.array([f"digit{d}" for d in range(5)]))
    return path


def task_sets(quick: bool, tmp: Path) -> list[tuple[str, str, tuple[str, ...], Split, Split]]:
    """(dataset, task, classes, train, test) for every benchmarked task."""
    sets = {"synthetic": [], "digits": ["data.name=digits", "data.n_tasks=2"],
            "medmnist": ["data.name=medmnist", f"data.data_dir={write_digits_npz(tmp / 'digits5.npz').parent}"]}
    out = []
    for dataset, overrides in sets.items():
        if quick and dataset not in REAL:
            continue
        cfg = apply_overrides(SimConfig(), overrides) if overrides else SimConfig()
        cohort = build_cohort(cfg.data, cfg.seed)
        for task in cohort.tasks:
            out.append((dataset, task, cohort.task_classes[task], cohort.task_split(task, "train"),
                        cohort.task_split(task, "test")))
    return out


def pixel_logreg(train: Split, test: Split) -> float:
    """Accuracy of a logistic regression on the raw pixels (scaled to [0, 1])."""
    from sklearn.linear_model import LogisticRegression

    flat = lambda s: s.x.reshape(len(s), -1).astype(np.float32) / (255.0 if s.x.dtype == np.uint8 else 1.0)  # noqa
    model = LogisticRegression(max_iter=2000).fit(flat(train), train.y)
    return float((model.predict(flat(test)) == test.y).mean())


def full_finetune(foundation: Foundation, split: Split, task: str, classes, cfg: SimConfig, lr: float,
                  seed: int) -> Foundation:
    """Every backbone weight trained with the prototype head, as ``sim.train`` trains LoRA (same steps, batch,
    augmentation, AdamW and cosine schedule); returns the fine-tuned foundation."""
    train = cfg.train
    backbone = copy.deepcopy(foundation.backbone).requires_grad_(True).train()
    opt = torch.optim.AdamW(backbone.parameters(), lr=lr, weight_decay=train.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / train.steps)))
    x_all, y_all = torch.from_numpy(split.x), torch.from_numpy(split.y)
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(train.steps):
            idx = torch.randint(len(y_all), (train.batch_size,), generator=g)
            xb = to_unit_float(x_all[idx])
            if train.augment:
                xb = augment(xb, g)
            loss = F.cross_entropy(foundation.logits(backbone(foundation.normalize(xb)), task, classes), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return replace(foundation, backbone=backbone.requires_grad_(False).eval(), fingerprint="full-finetune")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the real-image tasks only (digits, medmnist)")
    ap.add_argument("--foundations", default="formula,shapes", help="model.pretrain_data values, comma-separated")
    ap.add_argument("--set", action="append", default=[], metavar="model.FIELD=VALUE",
                    help="model overrides of every foundation (e.g. a candidate model.checkpoint)")
    ap.add_argument("--ft-lr", type=float, default=1e-3, help="learning rate of the full fine-tune")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: each row is small, "
                    "and more threads mostly contend on a shared machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base_cfg = SimConfig()
    names = [n for n in args.foundations.split(",") if n]
    foundations = {}
    for name in names:
        cfg = apply_overrides(base_cfg, [f"model.pretrain_data={name}", *args.set])
        foundations[name] = load_foundation(cfg.model, cfg.data.img_size)
    print(f"{os.cpu_count()} CPU cores, {args.threads} torch threads; LoRA r={base_cfg.lora.rank} on "
          f"{','.join(base_cfg.lora.target_modules)} and full FT (lr {args.ft_lr:g}): {base_cfg.train.steps} steps at "
          f"batch {base_cfg.train.batch_size}; prototype head")
    print("foundations: " + "; ".join(f"{n} = {f.fingerprint}" for n, f in foundations.items()))
    head = f"{'dataset':<10} {'task':<18} {'K':>2} {'train':>5} {'test':>5} {'chance':>6} {'pixels':>6}"
    for name in names:
        head += f" | {name + ' base':>13} {'lora':>5} {'full FT':>7}"
    print(head)
    print("-" * len(head))
    gaps: dict[str, list[float]] = {n: [] for n in names}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for dataset, task, classes, train, test in task_sets(args.quick, Path(tmp)):
            row = (f"{dataset:<10} {task[:18]:<18} {len(classes):>2} {len(train):>5} {len(test):>5} "
                   f"{chance_accuracy(len(classes)):>6.2f} {pixel_logreg(train, test):>6.2f}")
            for name, foundation in foundations.items():
                base = evaluate(foundation, None, test, task, classes)["acc"]
                adapter = train_adapter(foundation, train, task, classes, base_cfg.lora, base_cfg.train,
                                        seed=base_cfg.seed).adapter
                lora = evaluate(foundation, adapter, test, task, classes)["acc"]
                tuned = full_finetune(foundation, train, task, classes, base_cfg, args.ft_lr, base_cfg.seed)
                full = evaluate(tuned, None, test, task, classes)["acc"]
                if dataset in REAL:
                    gaps[name].append(lora - full)
                row += f" | {base:>13.2f} {lora:>5.2f} {full:>7.2f}"
            print(row, flush=True)
    for name in names:
        print(f"{name}: mean LoRA - full FT on the real-image tasks {np.mean(gaps[name]):+.3f} "
              f"(per task {', '.join(f'{g:+.2f}' for g in gaps[name])})")
    print(f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
