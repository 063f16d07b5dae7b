"""Datasets and the cohort of institutions.

One registry, ``DATASETS``, maps a dataset name to a loader returning per-task pools (train/val/test).
``build_cohort`` then partitions every task across its sites with Dirichlet label skew and applies a
seeded per-site appearance shift, giving one ``Institution`` per (task, site). Everything is
deterministic from the seed; images are stored as uint8 ``(n, 3, S, S)`` and scaled to [0, 1] at use.
"""
from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import numpy as np

from sim.data.base import (DistilledSet, Split, TaskPool, apply_class_map, derive_rng, derive_seed, resize_uint8,
                           to_rgb_uint8, to_unit_float)
from sim.data.digits import load_digits_tasks
from sim.data.imagefolder import load_imagefolder_tasks
from sim.data.medmnist import load_medmnist_tasks
from sim.data.shift import apply_site_shift, sample_site_shift
from sim.data.synthetic import load_synthetic_tasks
from sim.data.synthetic import render_site as render_synthetic_site
from sim.data.synthetic import task_classes as synthetic_task_classes
from sim.registry import lookup

__all__ = ["DATASETS", "FILE_DATASETS", "get_dataset", "build_cohort", "Cohort", "Institution", "Split", "TaskPool",
           "DistilledSet", "derive_rng", "derive_seed", "resize_uint8", "to_rgb_uint8", "to_unit_float"]

# name -> loader(cfg: DataConfig, seed: int) -> list[TaskPool]
DATASETS: dict[str, Callable] = {
    "synthetic": load_synthetic_tasks,
    "digits": load_digits_tasks,
    "medmnist": load_medmnist_tasks,
    "imagefolder": load_imagefolder_tasks,
}
# The datasets read from ``data.data_dir``: a command checks their files before it starts any work.
FILE_DATASETS = frozenset({"medmnist", "imagefolder"})


# Datasets that render any site's own images on demand (data.partition=per_institution): name ->
# (task_classes(cfg) -> {task: classes}, render_site(cfg, seed, task, site, counts) -> {split: Split}). The others
# are finite pools, dealt out site by site.
SITE_RENDERERS: dict[str, tuple[Callable, Callable]] = {
    "synthetic": (synthetic_task_classes, render_synthetic_site),
}
SPLITS = ("train", "val", "test")


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

    Institution ``i`` holds task ``i % T`` at site ``i // T``, and every site gets its own appearance shift of
    strength ``cfg.site_shift`` (the same for its three splits). How the images are divided follows
    ``cfg.partition``:

    * ``pool``: each task's pools are partitioned over its sites with Dirichlet(``cfg.dirichlet_alpha``) shares of
      every class across the sites, so a larger community splits the same (finite) data more ways;
    * ``per_institution``: see ``_own_sites``; institution i's data depend on ``(seed, i)`` alone, so the first N
      institutions of a larger community *are* the N-institution community.
    """
    if cfg.partition == "per_institution":
        return _per_institution_cohort(cfg, seed)
    pools = _task_pools(cfg, seed)
    n_tasks = len(pools)
    _check_institutions(cfg, n_tasks)
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
    classes = {p.name: p.classes for p in pools}
    return _shifted_cohort(cfg, seed, list(classes), classes, lambda t, site: per_task_sites[t][site])


# This process's cohorts (``cached_cohort``): the last few built, by their data config and seed.
_KEPT: "OrderedDict[str, tuple[str, int, Cohort]]" = OrderedDict()
KEEP_COHORTS = 2


def cached_cohort(cfg, seed: int) -> Cohort:
    """``build_cohort``, kept in this process (the last ``KEEP_COHORTS``). Under ``data.partition:
    per_institution`` a community nested in a kept larger one of the same data is taken from it: its first N
    institutions *are* the N-institution community (``build_cohort``), so a scaling study's smaller communities
    (their replays and evaluations) do not render or deal their sites again."""
    import json

    from sim.config import config_to_dict

    fields = config_to_dict(cfg)
    key = json.dumps([fields, seed], sort_keys=True, default=str)
    family = json.dumps([{k: v for k, v in fields.items() if k != "institutions"}, seed], sort_keys=True, default=str)
    if key in _KEPT:
        _KEPT.move_to_end(key)
        return _KEPT[key][2]
    larger = [c for fam, n, c in _KEPT.values() if cfg.partition == "per_institution" and fam == family
              and n >= cfg.institutions]
    if larger:
        _check_institutions(cfg, len(larger[0].task_classes))
        cohort = Cohort(larger[0].institutions[:cfg.institutions], dict(larger[0].task_classes))
    else:
        cohort = build_cohort(cfg, seed)
        _KEPT[key] = (family, cfg.institutions, cohort)      # a taken one is not kept: its larger one is
        while len(_KEPT) > KEEP_COHORTS:
            _KEPT.popitem(last=False)
    return cohort


def _task_pools(cfg, seed: int) -> list[TaskPool]:
    """The dataset's task pools, in ``cfg.tasks`` order when it names them."""
    pools: list[TaskPool] = get_dataset(cfg.name)(cfg, seed)
    if cfg.tasks:
        by_name = {p.name: p for p in pools}
        pools = [by_name[t] for t in cfg.tasks]
    if cfg.classes:
        names = apply_class_map({p.name: p.classes for p in pools}, cfg.classes)
        pools = [dataclasses.replace(p, classes=names[p.name]) for p in pools]
    return pools


def _check_institutions(cfg, n_tasks: int) -> None:
    if cfg.institutions < n_tasks:
        raise ValueError(f"data.institutions must be at least the number of tasks ({n_tasks}), "
                         f"got {cfg.institutions}")


def _shifted_cohort(cfg, seed: int, names: list[str], classes: dict[str, tuple[str, ...]],
                    site_splits: Callable[[int, int], tuple[Split, Split, Split]]) -> Cohort:
    """The institutions, each holding ``site_splits(task index, site)`` under its site's appearance shift."""
    institutions = []
    for i in range(cfg.institutions):
        t, site = i % len(names), i // len(names)
        # One scanner per site: the same shift for its train, val and test images; fresh noise per split.
        shift = sample_site_shift(derive_rng(seed, "site", names[t], site), cfg.site_shift)
        shifted = [apply_site_shift(s, shift, derive_rng(seed, "noise", names[t], site, k))
                   for k, s in enumerate(site_splits(t, site))]
        institutions.append(Institution(i, names[t], site, classes[names[t]], *shifted))
    return Cohort(tuple(institutions), classes)


def site_counts(cfg, seed: int, task: str, n_classes: int, site: int) -> dict[str, np.ndarray]:
    """Images per class of each split at one site under ``data.partition=per_institution``.

    The site's class proportions are p ~ Dirichlet(``dirichlet_alpha``) over the task's classes (the per-client
    label skew of Hsu et al. 2019; even when the concentration is 0), floored at 0.02 and renormalised like the
    pool's shares, drawn from ``(seed, task, site)`` alone; split k holds round(per_class × C × p_c) images of class
    c, at least one. With ``rare_prevalence`` the last class is then cut to that prevalence of the split."""
    rng = derive_rng(seed, "per_institution", "skew", task, site)
    p = _dirichlet_shares(rng, 1, n_classes, cfg.dirichlet_alpha)[0] if n_classes > 1 else np.ones(1)
    out = {}
    for split in SPLITS:
        per_class = getattr(cfg, f"{split}_per_class")
        n = np.maximum(1, np.round(per_class * n_classes * p)).astype(np.int64)
        if cfg.rare_prevalence > 0 and n_classes > 1:
            others = n[:-1].sum()
            n[-1] = min(n[-1], max(1, int(round(cfg.rare_prevalence * others / (1 - cfg.rare_prevalence)))))
        out[split] = n
    return out


def _per_institution_cohort(cfg, seed: int) -> Cohort:
    """``data.partition=per_institution``: every site's images, label skew and shift come from ``(seed, task,
    site)`` alone (the MedForge setting, each new hospital brings its own data).

    A dataset that renders images (``SITE_RENDERERS``: synthetic) draws each site's own images. A finite pool
    (digits, medmnist, imagefolder) is dealt out: each class of each split is shuffled once from ``(seed, task, split,
    class)``, and site s takes the next ``site_counts`` images after those of sites 0..s-1, so no two institutions
    share an image and a site's images never depend on the community's size; a pool too small for the community
    is an error naming the first site it cannot serve.
    """
    if cfg.name in SITE_RENDERERS:
        task_classes, render = SITE_RENDERERS[cfg.name]
        classes = task_classes(cfg)
        if cfg.classes:
            classes = apply_class_map(classes, cfg.classes)
        names = list(classes)
        _check_institutions(cfg, len(names))

        def own(t: int, site: int) -> tuple[Split, ...]:
            counts = site_counts(cfg, seed, names[t], len(classes[names[t]]), site)
            rendered = render(cfg, seed, names[t], site, counts)
            return tuple(rendered[split] for split in SPLITS)

        return _shifted_cohort(cfg, seed, names, classes, own)
    # The whole pool: the loaders' train_per_class cap is pool mode's; here it is the size of each site's share.
    pools = _task_pools(dataclasses.replace(cfg, partition="pool", train_per_class=0), seed)
    _check_institutions(cfg, len(pools))
    names, classes = [p.name for p in pools], {p.name: p.classes for p in pools}
    n_sites = [len(range(t, cfg.institutions, len(pools))) for t in range(len(pools))]
    dealt: dict[int, list[tuple[Split, ...]]] = {}
    for t, pool in enumerate(pools):
        counts = [site_counts(cfg, seed, pool.name, len(pool.classes), s) for s in range(n_sites[t])]
        per_split = []
        for split in SPLITS:
            data: Split = getattr(pool, split)
            offsets = np.zeros(len(pool.classes), dtype=np.int64)
            order = [derive_rng(seed, "per_institution", "deal", pool.name, split, c).permutation(
                np.flatnonzero(data.y == c)) for c in range(len(pool.classes))]
            sites = []
            for s in range(n_sites[t]):
                need = counts[s][split]
                short = [c for c in range(len(pool.classes)) if offsets[c] + need[c] > len(order[c])]
                if short:
                    c = short[0]
                    raise ValueError(
                        f"data.partition=per_institution: {cfg.name} task {pool.name!r} holds {len(order[c])} {split} "
                        f"images of class {pool.classes[c]!r}, too few for institution {t + s * len(pools)} (site "
                        f"{s} needs images {offsets[c]}..{offsets[c] + need[c] - 1}); lower data.{split}_per_class "
                        f"or data.institutions")
                idx = np.concatenate([order[c][offsets[c]:offsets[c] + need[c]] for c in range(len(pool.classes))])
                offsets += need
                sites.append(data.take(np.sort(idx)))
            per_split.append(sites)
        dealt[t] = list(zip(*per_split))
    return _shifted_cohort(cfg, seed, names, classes, lambda t, site: dealt[t][site])
