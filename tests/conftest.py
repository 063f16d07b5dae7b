"""Shared fixtures: a tiny model and cohort so the suite runs in minutes on 2 cores."""
from __future__ import annotations

import os

import pytest
import torch

from sim.config import DataConfig, LoraConfig, ModelConfig, SimConfig, TrainConfig

# Tests must not depend on (or fill) the user's cache by accident.
# Under pytest-xdist each worker process gets one intra-op thread: the workers already keep the cores busy.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    """The ``slow`` tests first, the rest in collection order: each trains the default model for minutes, which
    under pytest-xdist (``make test``) then overlaps the rest of the suite instead of ending it."""
    items[:] = sorted(items, key=lambda item: 0 if item.get_closest_marker("slow") else 1)


_BROWSER_RUNS: list[str] = []


def pytest_runtest_logreport(report):
    """Note the tests that ran in a real browser (their ``browser`` property; under pytest-xdist the reports,
    properties included, come back to this controller process)."""
    if report.when == "call":
        for name, value in report.user_properties:
            if name == "browser":
                _BROWSER_RUNS.append(f"{report.nodeid} {report.outcome.upper()} in {value}")


def pytest_terminal_summary(terminalreporter):
    """One line per browser test that ran, so a CI log shows the HTML report was rendered (``-rs`` lists the skips)."""
    for line in _BROWSER_RUNS:
        terminalreporter.write_line(f"browser test: {line}")


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


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole suite (never a cluster per test), whose idle pooled workers stay alive between
    runs: Ray otherwise kills an idle worker after 1 s once the session holds more processes than CPUs (the actors
    of a run count), so every run of the suite started its pool again (a torch + timm + peft import, ~10 s of CPU
    per worker). Kept, a later run's first task finds the foundation loaded; what a run computes is unchanged."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 _system_config={"num_workers_soft_limit": 8, "idle_worker_killing_time_threshold_ms": 600_000})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_run_cfg(tiny_cfg):
    """``tiny_cfg`` sized for a whole simulation in seconds: 4 institutions × 2 contributions, 4 strategies."""
    import dataclasses

    return tiny_cfg.replace(
        distill=dataclasses.replace(tiny_cfg.distill, ipc=2, iterations=3, embed_width=8, real_batch=8),
        merge=dataclasses.replace(tiny_cfg.merge, strategies=("fusion", "mixture", "svd", "ties"), budget=3),
        schedule=dataclasses.replace(tiny_cfg.schedule, contributions=2),
        runtime=dataclasses.replace(tiny_cfg.runtime, workers=2, eval_every=4),
    )


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for a module of many tiny forward passes (much faster on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def fresh_python():
    """Run ``code`` in a fresh interpreter (nothing imported yet) and return its stdout, stripped."""
    import subprocess
    import sys

    def run(code: str) -> str:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()

    return run
