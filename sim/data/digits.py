"""``digits``: scikit-learn's bundled 8x8 handwritten digits (real images, no download).

The ten digits are split into tasks of consecutive classes (default 5 tasks x 2 classes: 0/1, 2/3, ...),
and each task's images into train/val/test (60/10/30, stratified, seeded).
"""
from __future__ import annotations

import numpy as np

from sim.data.base import Split, TaskPool, derive_rng, resize_uint8, to_rgb_uint8

MAX_TASKS = 5


def _stratified(y: np.ndarray, rng: np.random.Generator, fractions=(0.6, 0.1)) -> tuple[np.ndarray, ...]:
    parts: list[list[np.ndarray]] = [[], [], []]
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        a, b = int(round(fractions[0] * len(idx))), int(round((fractions[0] + fractions[1]) * len(idx)))
        for k, piece in enumerate((idx[:a], idx[a:b], idx[b:])):
            parts[k].append(piece)
    return tuple(np.sort(np.concatenate(p)) for p in parts)


def load_digits_tasks(cfg, seed: int) -> list[TaskPool]:
    from sklearn.datasets import load_digits

    n_tasks = len(cfg.tasks) if cfg.tasks else cfg.n_tasks
    if not 1 <= n_tasks <= MAX_TASKS:
        raise ValueError(f"data.n_tasks must be in [1, {MAX_TASKS}] for digits, got {n_tasks}")
    per_task = 10 // n_tasks
    raw = load_digits()
    images = to_rgb_uint8(raw.images * (255.0 / 16.0), "digits")            # (1797, 3, 8, 8)
    images = resize_uint8(images, cfg.img_size, cfg.interpolation)
    names = [f"digits_{'_'.join(str(d) for d in range(t * per_task, (t + 1) * per_task))}" for t in range(n_tasks)]
    if cfg.tasks:
        unknown = [n for n in cfg.tasks if n not in names]
        if unknown:
            raise ValueError(f"data.tasks: unknown digits task {unknown[0]!r} for n_tasks={n_tasks}; "
                             f"known: {', '.join(names)}")
    pools = []
    for t, name in enumerate(names):
        digits = list(range(t * per_task, (t + 1) * per_task))
        keep = np.isin(raw.target, digits)
        x, y = images[keep], np.searchsorted(digits, raw.target[keep]).astype(np.int64)
        splits = [Split(x[i], y[i]) for i in _stratified(y, derive_rng(seed, "digits", name))]
        if cfg.train_per_class:
            splits[0] = _cap(splits[0], cfg.train_per_class, derive_rng(seed, "digits-cap", name))
        pools.append(TaskPool(name, tuple(f"digit{d}" for d in digits), *splits))
    return pools


def _cap(split: Split, per_class: int, rng: np.random.Generator) -> Split:
    """At most ``per_class`` images of each class (a cap, not a target)."""
    idx = [rng.permutation(np.flatnonzero(split.y == c))[:per_class] for c in np.unique(split.y)]
    return split.take(np.sort(np.concatenate(idx)))
