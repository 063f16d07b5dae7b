"""Torch work as Ray tasks on pooled workers: one contribution, one evaluation.

Each worker process keeps the foundation (``sim.model.load_foundation`` caches per process) and the evaluation
cohort (``_cohort``, cached per config) between tasks, so a task pays only for its own work. Tasks run inside the
run's placement group (``actors.runner``), whose bundles are the worker pool: ``runtime.workers`` bundles of
``runtime.num_cpus`` CPUs and ``runtime.num_gpus`` GPUs each.

On a GPU (``runtime.device=cuda``): the foundation lives on the worker's device; what a task returns through Ray
(commits, records, replay rows) is on the CPU, so the object store and the merge actor never hold CUDA tensors; and
every task hands the CUDA memory it cached back when it ends (``_releases_device_memory``), so that an idle worker
does not hold memory the other workers sharing its GPU (fractional ``runtime.num_gpus``) need.
"""
from __future__ import annotations

import functools
import time
from functools import lru_cache

import ray

from sim.config import SimConfig, config_from_dict, config_to_dict


def _releases_device_memory(fn):
    """Run a pooled task, check that its result holds no tensor off the CPU, then release the CUDA memory the task
    left cached (``sim.accelerator.release_device_memory``).

    The task's own references (its frame: activations, the training copy of the backbone, optimizer state) are
    gone once it returns, so the caching allocator's blocks can go back to the driver before the worker idles;
    otherwise an idle worker keeps them and a worker sharing the GPU runs out of memory (Flower's simulation workers
    did, flwr issues #1383 and #5855). A no-op on the CPU. A result with a CUDA tensor is a bug (it would pin this
    worker's memory in the object store and not load in the merge actor, which has no GPU): it raises, naming where.
    """
    @functools.wraps(fn)
    def task(*args, **kwargs):
        from sim.accelerator import off_cpu_tensors, release_device_memory

        try:
            result = fn(*args, **kwargs)
            off = off_cpu_tensors(result, fn.__name__)
            if off:
                raise RuntimeError(f"{fn.__name__} returned tensors off the CPU: {', '.join(off)}")
            return result
        finally:
            release_device_memory()
    return task


@lru_cache(maxsize=4)
def _config(blob: str) -> SimConfig:
    import json

    return config_from_dict(json.loads(blob))


def _setup(cfg: SimConfig):
    """The foundation of ``cfg`` on this process (loaded once), torch threads as configured."""
    import torch

    from sim.model import load_foundation

    torch.set_num_threads(cfg.runtime.threads)
    return load_foundation(cfg.model, cfg.data.img_size, cfg.runtime.device, cfg.runtime.precision)


def _cohort(blob: str):
    """The cohort of ``blob``'s config, kept in this worker (``sim.data.cached_cohort``)."""
    from sim.data import cached_cohort

    cfg = _config(blob)
    return cached_cohort(cfg.data, cfg.seed)


@ray.remote(max_retries=2, num_returns=2)
@_releases_device_memory
def contribute_task(cfg_blob: str, inst, contribution, pulled: tuple | None, key: bytes | None = None):
    """Train + distil one contribution (``sim.contribute.contribute``); returns ``(commit, corrupted)``: the
    ``Commit``, signed with the institution's ``key`` (``sim.commit.sign_commit``) when one is given, and with
    ``faults.corrupt`` drawn for this contribution a corrupted copy of it (``sim.faults.corrupt_commit``), else
    ``None`` (made in the same task, which holds the commit already; no second task is needed for it).

    ``pulled`` = ``(version, adapter)`` from the merge actor with ``init_from: main``, else ``None``.
    """
    from sim.cache import cached_contribution
    from sim.contribute import contribute
    from sim.faults import corrupt_commit, corrupt_kind, slow_seconds
    from sim.commit import sign_commit

    t0 = time.perf_counter()
    cfg = _config(cfg_blob)
    slowed = slow_seconds(cfg.faults, cfg.seed, contribution.id)
    if slowed:                           # fault injection (faults.slow): this task is late, nothing else changes
        time.sleep(slowed)
    foundation = _setup(cfg)
    version, adapter = pulled if pulled is not None else (0, None)

    def make():
        return contribute(foundation, inst, cfg, contribution, adapter, version)

    # runtime.commit_cache: a contribution trained before with the same training-relevant config is loaded
    commit = (cached_contribution(cfg.runtime.commit_cache, cfg, contribution, adapter, version, make)
              if cfg.runtime.commit_cache else make())
    commit.meta["task_s"] = time.perf_counter() - t0
    commit.meta["worker_pid"] = __import__("os").getpid()
    if slowed:
        commit.meta["slowed_s"] = slowed
    commit = sign_commit(commit, key) if key is not None else commit
    kind = corrupt_kind(cfg.faults, cfg.seed, contribution.id)
    return commit, (corrupt_commit(commit, kind, key) if kind is not None else None)


@ray.remote(max_retries=2)
@_releases_device_memory
def evaluate_task(cfg_blob: str, snapshot: dict, tasks: list[str], version: int) -> list[dict]:
    """Every strategy of ``snapshot`` on every task in ``tasks`` (``sim.evaluation.evaluate_snapshot``); under a
    backdoor attack each record also has ``asr``, the attack's success (``sim.attacks.attack_success``)."""
    from sim.evaluation import evaluate_snapshot
    from sim.features import shared_store

    t0 = time.perf_counter()
    cfg = _config(cfg_blob)
    foundation, cohort = _setup(cfg), _cohort(cfg_blob)
    records = evaluate_snapshot(foundation, snapshot, cohort, tasks, version,
                                shared_store(cfg.runtime.feature_cache))
    if cfg.attacks.any and cfg.attacks.kind == "backdoor":     # the backdoor's success on every predictor
        from sim.attacks import attack_success

        for r in records:
            r["asr"] = attack_success(foundation, snapshot[r["strategy"]], cohort.task_split(r["task"], "test"),
                                      r["task"], cohort.task_classes[r["task"]], cfg.attacks)
    busy = time.perf_counter() - t0
    return [r | {"busy_s": busy / max(1, len(records))} for r in records]


@ray.remote(max_retries=2)
@_releases_device_memory
def individual_task(cfg_blob: str, adapters: dict, tasks: list[str] | None = None) -> list[dict]:
    """The ``individual`` references: each institution's latest adapter on its task's pooled test set
    (``individual``) and on its own test split (``individual_local``), on ``tasks`` (default: the adapters')."""
    from sim.evaluation import evaluate_individual
    from sim.features import shared_store

    t0 = time.perf_counter()
    cfg = _config(cfg_blob)
    records = evaluate_individual(_setup(cfg), adapters, _cohort(cfg_blob), tasks,
                                  shared_store(cfg.runtime.feature_cache))
    busy = time.perf_counter() - t0
    return [r | {"busy_s": busy / max(1, len(records))} for r in records]


@ray.remote(max_retries=2)
@_releases_device_memory
def replay_task(run_dir: str, orders: list[int], strategies: list[str] | None = None,
                per_step: bool | list[str] = False, merge: dict | None = None) -> tuple[list, list, dict]:
    """Re-merge a run's commits in the given orders (``sim.replay.replay``) with this worker's foundation; ``merge``:
    the merge section to replay with (``config_to_dict`` of a ``MergeConfig``; default: the run's own)."""
    from sim.replay import load_replayable, replay

    import json

    loaded = load_replayable(run_dir)
    if merge is not None:
        loaded = (loaded[0].replace(merge=config_from_dict({"merge": merge}).merge), loaded[1])
    cfg = loaded[0]
    blob = json.dumps(config_to_dict(cfg))
    return replay(run_dir, orders, strategies, foundation=_setup(cfg), cohort=_cohort(blob), loaded=loaded,
                  per_step=per_step)


@ray.remote(max_retries=2)
@_releases_device_memory
def subset_task(source_dir: str, cfg_blob: str, run_dir: str, run_id: str) -> dict:
    """Build the run of ``cfg_blob`` (a smaller community) from the larger run dir ``source_dir``'s log
    (``sim.replay.replay_subset``) with this worker's foundation and cohort; returns its summary."""
    from sim.replay import replay_subset

    cfg = _config(cfg_blob)
    return replay_subset(source_dir, cfg, run_dir, foundation=_setup(cfg), cohort=_cohort(cfg_blob), run_id=run_id)
