"""Shared fixtures: a tiny model and cohort so the suite runs in minutes on 2 cores."""
from __future__ import annotations

import os

import pytest
import torch

from sim.config import DataConfig, LoraConfig, ModelConfig, SimConfig, TrainConfig

# Tests must not depend on (or fill) the user's cache by accident.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_cfg(tmp_path_factory) -> SimConfig:
    """A 2-block, width-32 ViT on 16 px images, pretrained for 30 steps into a private cache dir."""
    cache = tmp_path_factory.mktemp("foundation-cache")
    return SimConfig(
        data=DataConfig(n_tasks=2, institutions=4, img_size=16, train_per_class=24, val_per_class=4,
                        test_per_class=8),
        model=ModelConfig(patch_size=4, embed_dim=32, depth=2, num_heads=2, pretrain_steps=30, pretrain_batch=32,
                          cache_dir=str(cache)),
        lora=LoraConfig(rank=4, alpha=8.0),
        train=TrainConfig(steps=20, batch_size=16),
    )


@pytest.fixture(scope="session")
def tiny_foundation(tiny_cfg):
    from sim.model import load_foundation

    return load_foundation(tiny_cfg.model, tiny_cfg.data.img_size)


@pytest.fixture(scope="session")
def tiny_cohort(tiny_cfg):
    from sim.data import build_cohort

    return build_cohort(tiny_cfg.data, tiny_cfg.seed)
