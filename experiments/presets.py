"""Presets: run presets (functions returning a ``SimConfig``, ml_collections' ``get_config(variant)`` habit) and
study presets (functions returning a ``Study``: a base config and a grid, each with a ``smoke`` size for CI).

``PRESETS`` and ``STUDIES`` are the registries; ``get_preset`` / ``get_study`` list the known names on a typo. A
preset is the starting point; ``--config``, flags and ``--set`` apply on top of it.
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Callable

from sim.config import SimConfig


def default() -> SimConfig:
    """All defaults (12 institutions over 4 synthetic tasks, 2 contributions each, fusion/mixture/svd/ties)."""
    return SimConfig()


def demo() -> SimConfig:
    """What ``make demo`` runs: about 12 institutions over 4 tasks, 2 contributions each, strategies fusion, mixture,
    svd and ties, sized to finish in a few minutes on a 2-core laptop (shorter training and distillation, IPC 5,
    a budget-20 coefficient search), with an evaluation every 8 accepted commits for the forgetting curves."""
    cfg = SimConfig()
    return cfg.replace(
        data=dataclasses.replace(cfg.data, n_tasks=4, institutions=12),
        train=dataclasses.replace(cfg.train, steps=50),
        distill=dataclasses.replace(cfg.distill, ipc=5, iterations=30),
        merge=dataclasses.replace(cfg.merge, strategies=("fusion", "mixture", "svd", "ties"), budget=20),
        schedule=dataclasses.replace(cfg.schedule, contributions=2),
        runtime=dataclasses.replace(cfg.runtime, eval_every=8),
    )


PRESETS: dict[str, Callable[[], SimConfig]] = {"default": default, "demo": demo}


def get_preset(name: str) -> SimConfig:
    """The config of preset ``name``; a typo lists the known presets."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None


# ------------------------------------------------------------------------------------------
# Studies (``forgesim sweep``)
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Study:
    """One study: every point of ``grid`` (the product of its values, config field -> values) is one Tune trial
    running one simulation of ``base`` with the point's values. ``strategies`` are kept as branches of every trial
    (training is paid once per point, strategies are compared on identical commits); with ``orders`` > 0 each trial
    also re-merges its commits in that many seeded orders (order 0 = the run's)."""

    name: str
    base: SimConfig
    grid: dict[str, tuple] = field(default_factory=dict)
    orders: int = 0
    description: str = ""

    def points(self) -> list[dict]:
        """The grid's points, in a fixed order (the last field varies fastest)."""
        keys = list(self.grid)
        return [dict(zip(keys, values)) for values in itertools.product(*(self.grid[k] for k in keys))]


def _sized(cfg: SimConfig, smoke: bool) -> SimConfig:
    """The sizes of a study's runs: the demo's (short local training and distillation, a budget-20 search, one
    contribution per institution) or, for ``smoke``, a tiny model and cohort that run in CI in seconds."""
    r = dataclasses.replace
    cfg = cfg.replace(train=r(cfg.train, steps=50), distill=r(cfg.distill, ipc=5, iterations=30),
                      merge=r(cfg.merge, budget=20), schedule=r(cfg.schedule, contributions=1))
    if not smoke:
        return cfg
    return cfg.replace(
        data=r(cfg.data, n_tasks=2, institutions=4, img_size=16, train_per_class=24, val_per_class=4,
               test_per_class=8),
        model=r(cfg.model, patch_size=4, embed_dim=32, depth=2, num_heads=2, pretrain_steps=30, pretrain_batch=32),
        lora=r(cfg.lora, rank=4, alpha=8.0),
        train=r(cfg.train, steps=20, batch_size=16),
        distill=r(cfg.distill, ipc=2, iterations=5, real_batch=8, embed_width=16),
        merge=r(cfg.merge, budget=6),
        runtime=r(cfg.runtime, workers=1))


def _with(cfg: SimConfig, **sections: dict) -> SimConfig:
    return cfg.replace(**{name: dataclasses.replace(getattr(cfg, name), **values) for name, values in sections.items()})


STUDY_STRATEGIES = ("fusion", "mixture", "svd", "ties")


def scaling(smoke: bool = False) -> Study:
    """Accuracy and cost vs contributors (10-50; smoke 4, 8) × seeds, every strategy, with the joint reference."""
    cfg = _with(_sized(SimConfig(), smoke), merge={"strategies": STUDY_STRATEGIES}, train={"joint": True})
    grid = {"data.institutions": (4, 8) if smoke else (10, 20, 30, 40, 50), "seed": (0,) if smoke else (0, 1, 2)}
    return Study("scaling", cfg, grid, description=scaling.__doc__)


def order(smoke: bool = False) -> Study:
    """Merge-order sensitivity: per seed, one 12-institution run (smoke: 4) re-merged in 20 seeded orders (smoke:
    3), every strategy; no retraining (the orders replay the run's commits)."""
    cfg = _with(_sized(SimConfig(), smoke), merge={"strategies": ("fusion", "mixture", "svd")})
    return Study("order", cfg, {"seed": (0,) if smoke else (0, 1, 2)}, orders=3 if smoke else 20,
                 description=order.__doc__)


def forgetting(smoke: bool = False) -> Study:
    """Per-task accuracy after every merge (forgetting, BWT) of 2 contributions per institution, every strategy."""
    cfg = _with(_sized(SimConfig(), smoke), merge={"strategies": STUDY_STRATEGIES},
                schedule={"contributions": 2}, runtime={"eval_every": 1})
    return Study("forgetting", cfg, {"seed": (0,) if smoke else (0, 1, 2)}, description=forgetting.__doc__)


def ipc(smoke: bool = False) -> Study:
    """Distilled images per class 1, 5, 10, 20, 50 (smoke: 1, 2) × seeds, with the fidelity and privacy audit."""
    cfg = _with(_sized(SimConfig(), smoke), merge={"strategies": ("fusion", "mixture")}, distill={"audit": True})
    return Study("ipc", cfg, {"distill.ipc": (1, 2) if smoke else (1, 5, 10, 20, 50),
                              "seed": (0,) if smoke else (0, 1, 2)}, description=ipc.__doc__)


def rank(smoke: bool = False) -> Study:
    """LoRA rank 2, 4, 8, 16, 32 (smoke: 2, 4) × seeds: accuracy and storage."""
    cfg = _with(_sized(SimConfig(), smoke), merge={"strategies": STUDY_STRATEGIES})
    grid = {"lora.rank": (2, 4) if smoke else (2, 4, 8, 16, 32), "seed": (0,) if smoke else (0, 1, 2)}
    return Study("rank", cfg, grid, description=rank.__doc__)


STUDIES: dict[str, Callable[[bool], Study]] = {"scaling": scaling, "order": order, "forgetting": forgetting,
                                               "ipc": ipc, "rank": rank}


def get_study(name: str, smoke: bool = False) -> Study:
    """Study preset ``name`` at full or smoke size; a typo lists the known studies."""
    try:
        return STUDIES[name](smoke)
    except KeyError:
        raise ValueError(f"unknown study {name!r}; known: {', '.join(STUDIES)}") from None
