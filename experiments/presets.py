"""Study presets: functions returning a ``SimConfig`` (ml_collections' ``get_config(variant)`` habit).

``PRESETS`` is the one registry; ``get_preset(name)`` lists the known names on a typo. A preset is the starting
point; ``--config``, flags and ``--set`` apply on top of it.
"""
from __future__ import annotations

import dataclasses
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
