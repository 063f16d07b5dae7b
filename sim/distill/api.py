"""``distill``: one institution's training split → the ``DistilledSet`` it commits (the method looked up by name)."""
from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np
import torch

from sim.config import DistillConfig
from sim.data.base import DistilledSet, Split, derive_seed, to_unit_float
from sim.distill import DISTILLERS
from sim.registry import lookup

# A class below this share of an institution's training images is reported as rare.
RARE_PREVALENCE = 0.05


def get_distiller(name: str) -> Callable:
    """Look a distiller up by name; a typo lists the known names."""
    return lookup(DISTILLERS, name, "distiller")


def _class_report(classes: Sequence[str], counts: np.ndarray, out_counts: list[int], ipc: int) -> dict:
    prevalence = counts / max(1, counts.sum())
    return {
        "real_counts": {c: int(n) for c, n in zip(classes, counts)},
        "distilled_counts": {c: int(n) for c, n in zip(classes, out_counts)},
        "prevalence": {c: round(float(p), 6) for c, p in zip(classes, prevalence)},
        "short_classes": [c for c, n in zip(classes, counts) if 0 < n < ipc],
        "empty_classes": [c for c, n in zip(classes, counts) if n == 0],
        "rare_classes": [c for c, p in zip(classes, prevalence) if p < RARE_PREVALENCE],
    }


def distill(split: Split, task: str, classes: Sequence[str], cfg: DistillConfig, seed: int,
            foundation=None) -> DistilledSet:
    """Distil one institution's training ``split`` of ``task`` with ``cfg.method`` at ``cfg.ipc`` images per class.

    ``foundation`` is needed by ``herding`` and ``dm`` with ``embed=foundation`` (and gives the device).
    Deterministic in ``seed``; touches no global RNG.
    """
    fn = get_distiller(cfg.method)
    if len(split) == 0:
        raise ValueError(f"task {task!r}: no training images to distil")
    if split.y.max() >= len(classes):
        raise ValueError(f"task {task!r}: labels must index its {len(classes)} classes")
    # Step 1: real pixels per class, (n_c, 3, S, S) in [0, 1] (empty tensors for absent classes).
    x = to_unit_float(split.x)
    real = [x[torch.from_numpy(split.y == c)] for c in range(len(classes))]
    # Step 2: run the method with its own generator.
    gen = torch.Generator().manual_seed(derive_seed(seed, "distill", task, cfg.method))
    t0 = time.perf_counter()
    images, stats = fn(real, cfg, gen, foundation)
    distill_s = time.perf_counter() - t0
    # Step 3: assemble the set and report what happened to every class.
    out_x = torch.cat(images).float().clamp(0.0, 1.0).numpy().astype(np.float32)
    out_y = np.concatenate([np.full(len(im), c, np.int64) for c, im in enumerate(images)])
    meta = {"method": cfg.method, "ipc": cfg.ipc, "seed": seed, "distill_s": distill_s,
            **_class_report(classes, split.class_counts(len(classes)), [len(im) for im in images], cfg.ipc),
            **stats}
    if cfg.method == "dm":
        meta |= {"iterations": cfg.iterations, "lr_img": cfg.lr_img, "real_batch": cfg.real_batch,
                 "embed": cfg.embed, "init": cfg.init, "dsa": cfg.dsa,
                 "dsa_strategy": cfg.dsa_strategy if cfg.dsa else None}
        if cfg.embed == "convnet":
            meta |= {"embed_width": cfg.embed_width, "embed_depth": cfg.embed_depth}
    return DistilledSet(task, tuple(classes), out_x, out_y, cfg.method, meta)
