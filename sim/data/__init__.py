"""Datasets and the cohort of institutions.

One registry, ``DATASETS``, maps a dataset name to a loader returning per-task pools (train/val/test).
``build_cohort`` then partitions every task across its sites with Dirichlet label skew and applies a
seeded per-site appearance shift, giving one ``Institution`` per (task, site). Everything is
deterministic from the seed; images are stored as uint8 ``(n, 3, S, S)`` and scaled to [0, 1] at use.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from sim.data.base import DistilledSet, Split, TaskPool, derive_rng, derive_seed, resize_uint8, to_rgb_uint8, to_unit_float
from sim.data.digits import load_digits_tasks
from sim.data.medmnist import load_medmnist_tasks
from sim.data.shift import apply_site_shift, sample_site_shift
from sim.data.synthetic import load_synthetic_tasks
from sim.registry import lookup

__all__ = ["DATASETS", "get_dataset", "build_cohort", "Cohort", "Institution", "Split", "TaskPool",
           "DistilledSet", "derive_rng", "derive_seed", "resize_uint8", "to_rgb_uint8", "to_unit_float"]

# name -> loader(cfg: DataConfig, seed: int) -> list[TaskPool]
DATASETS: dict[str, Callable] = {
    "synthetic": load_synthetic_tasks,
    "digits": load_digits_tasks,
    "medmnist": load_medmnist_tasks,
}


def get_dataset(name: str) -> Callable:
    """Look a dataset loader up by name; a typo lists the known names."""
    return lookup(DATASETS, name, "dataset")


@dataclass(frozen=True)
class Institution:
    """One hospital: one task seen at one site, with its private splits."""

    id: int
    task: str
    site: int
    classes: tuple[str, ...]
    train: Split
    val: Split
    test: Split

    @property
    def name(self) -> str:
        return f"inst{self.id:03d}"


@dataclass(frozen=True)
class Cohort:
    """All institutions of a run, plus each task's class names (in label order)."""

    institutions: tuple[Institution, ...]
    task_classes: dict[str, tuple[str, ...]]

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.task_classes)

    def task_split(self, task: str, split: str) -> Split:
        """The union of one split over all institutions holding ``task`` (e.g. the task's test set)."""
        parts = [getattr(inst, split) for inst in self.institutions if inst.task == task]
        if not parts:
            raise ValueError(f"no institution holds task {task!r}; tasks: {', '.join(self.tasks)}")
        return Split.concat(parts)


def _dirichlet_shares(rng: np.random.Generator, n_classes: int, n_sites: int, alpha: float) -> np.ndarray:
    """(n_classes, n_sites) shares of each class's images per site; alpha = 0 means an even split."""
    if alpha == 0 or n_sites == 1:
        return np.full((n_classes, n_sites), 1.0 / n_sites)
    shares = rng.dirichlet(np.full(n_sites, alpha), size=n_classes)
    # Keep every site usable: at least a small floor of each class before renormalising.
    shares = np.maximum(shares, 0.02)
    return shares / shares.sum(axis=1, keepdims=True)


def _partition(split: Split, shares: np.ndarray, rng: np.random.Generator) -> list[Split]:
    """Split ``split`` across sites, class by class, following ``shares`` (n_classes, n_sites)."""
    n_sites = shares.shape[1]
    site_idx: list[list[np.ndarray]] = [[] for _ in range(n_sites)]
    for c in range(shares.shape[0]):
        idx = rng.permutation(np.flatnonzero(split.y == c))
        cuts = np.round(np.cumsum(shares[c])[:-1] * len(idx)).astype(int)
        for s, part in enumerate(np.split(idx, cuts)):
            site_idx[s].append(part)
    return [split.take(np.sort(np.concatenate(parts))) for parts in site_idx]


def _subsample_rare(split: Split, rare_class: int, prevalence: float, rng: np.random.Generator) -> Split:
    """Keep only enough images of ``rare_class`` for it to make up ``prevalence`` of the split."""
    rare = np.flatnonzero(split.y == rare_class)
    others = np.flatnonzero(split.y != rare_class)
    keep = max(1, int(round(prevalence * len(others) / (1 - prevalence))))
    kept = rng.choice(rare, size=min(keep, len(rare)), replace=False)
    return split.take(np.sort(np.concatenate([others, kept])))


def build_cohort(cfg, seed: int) -> Cohort:
    """Load the dataset named in ``cfg`` (a ``DataConfig``) and split it into institutions.

    Institution ``i`` holds task ``i % T`` at site ``i // T``; each task's pools are partitioned over
    its sites with Dirichlet(``cfg.dirichlet_alpha``) label skew, then every site gets its own
    appearance shift of strength ``cfg.site_shift``.
    """
    pools: list[TaskPool] = get_dataset(cfg.name)(cfg, seed)
    if cfg.tasks:
        by_name = {p.name: p for p in pools}
        pools = [by_name[t] for t in cfg.tasks]
    n_tasks = len(pools)
    if cfg.institutions < n_tasks:
        raise ValueError(f"data.institutions must be at least the number of tasks ({n_tasks}), "
                         f"got {cfg.institutions}")
    sites_of = [len(range(t, cfg.institutions, n_tasks)) for t in range(n_tasks)]
    per_task_sites: dict[int, list[tuple[Split, Split, Split]]] = {}
    for t, pool in enumerate(pools):
        rng = derive_rng(seed, "partition", pool.name)
        splits = [pool.train, pool.val, pool.test]
        if cfg.rare_prevalence > 0:
            splits = [_subsample_rare(s, len(pool.classes) - 1, cfg.rare_prevalence, rng) for s in splits]
        shares = _dirichlet_shares(rng, len(pool.classes), sites_of[t], cfg.dirichlet_alpha)
        parts = [_partition(s, shares, rng) for s in splits]
        per_task_sites[t] = list(zip(*parts))
    institutions = []
    for i in range(cfg.institutions):
        t, site = i % n_tasks, i // n_tasks
        pool = pools[t]
        # One scanner per site: the same shift for its train, val and test images; fresh noise per split.
        shift = sample_site_shift(derive_rng(seed, "site", pool.name, site), cfg.site_shift)
        shifted = [apply_site_shift(s, shift, derive_rng(seed, "noise", pool.name, site, k))
                   for k, s in enumerate(per_task_sites[t][site])]
        institutions.append(Institution(i, pool.name, site, pool.classes, *shifted))
    return Cohort(tuple(institutions), {p.name: p.classes for p in pools})
