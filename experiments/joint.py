"""The ``joint`` reference: one multi-task LoRA trained centrally with Ray Train on every institution's data.

The upper bound merging papers compare to (it needs the private data in one place): one adapter trained on the
union of every institution's training data — with ``model.head=linear`` together with one linear head per task,
which score it (as a merge is scored: shared backbone update, each task's head).

``train_joint(cfg)`` runs a ``ray.train.torch.TorchTrainer`` (``train_joint_many(cfgs)`` one for several configs): ``ScalingConfig(num_workers=runtime.workers,
use_gpu=runtime.num_gpus > 0 or runtime.device is cuda)``, each worker ``runtime.num_cpus`` CPUs (and
``runtime.num_gpus`` GPUs). Every worker builds the seeded cohort itself, keeps its shard of each task's union, and
trains ``sim.train.train_joint_adapter`` with gradients averaged by ``torch.distributed.all_reduce`` (gloo on CPU,
nccl on GPU). Rank 0 reports the adapter as a checkpoint. ``add_joint_reference`` evaluates it on the run's tasks
and adds it to the run dir: ``summary.json`` ``references.joint``, rows ``strategy == "joint"`` in
``metrics.parquet``, the adapter in ``joint/``.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from sim.config import SimConfig, config_from_dict, config_to_dict


def joint_parts(cohort) -> list:
    """``(split, task, classes)`` per task: the union of the training splits of every institution holding it."""
    return [(cohort.task_split(task, "train"), task, cohort.task_classes[task]) for task in cohort.tasks]


def _train_worker(config: dict) -> None:
    """One Ray Train worker: for each config in turn, its shard of the union, gradients all-reduced each step; rank 0
    reports every adapter (``<i>/`` of one checkpoint)."""
    import ray.train
    import torch
    import torch.distributed as dist

    from sim.data import build_cohort
    from sim.model import load_foundation, save_adapter
    from sim.train import train_joint_adapter

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()

    def sync(grads: list) -> None:   # the mean gradient over ranks, as DDP computes it
        for g in grads:
            dist.all_reduce(g)
            g /= world

    with tempfile.TemporaryDirectory() as tmp:
        for i, cfg_dict in enumerate(config["cfgs"]):
            t0 = time.perf_counter()
            cfg = config_from_dict(cfg_dict)
            torch.set_num_threads(cfg.runtime.threads)
            device = str(ray.train.torch.get_device()) if cfg.runtime.device.startswith("cuda") else "cpu"
            foundation = load_foundation(cfg.model, cfg.data.img_size, device, cfg.runtime.precision)
            parts = joint_parts(build_cohort(cfg.data, cfg.seed))
            steps = cfg.train.joint_steps or cfg.train.steps * len(parts)
            result = train_joint_adapter(foundation, parts, cfg.lora, cfg.train, cfg.seed, steps, rank, world,
                                         sync if world > 1 else None, head=cfg.model.head)
            metrics = {k: float(v) for k, v in result.stats.items()} | {"world": world,
                                                                        "train_s": time.perf_counter() - t0}
            if rank == 0:
                save_adapter(result.adapter, Path(tmp) / str(i))
                (Path(tmp) / str(i) / "stats.json").write_text(json.dumps(metrics))
        checkpoint = ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None
        ray.train.report({"configs": len(config["cfgs"])}, checkpoint=checkpoint)


def joint_resources(cfg: SimConfig) -> tuple:
    """What a joint job reserves: configs alike here train in one job."""
    use_gpu = cfg.runtime.num_gpus > 0 or cfg.runtime.device.startswith("cuda")
    return cfg.runtime.workers, cfg.runtime.num_cpus, (cfg.runtime.num_gpus or 1.0) if use_gpu else 0.0


def train_joint_many(cfgs: list[SimConfig], storage: str | Path, name: str = "joint") -> list[tuple]:
    """Train the joint references of ``cfgs`` (the same ``runtime`` resources) in one Ray Train job, one after another
    on the same workers: each config's adapter is the one ``train_joint`` gives it alone (seeded by its own config),
    without a job's start-up (worker processes, imports, process group) per config. Ray must be initialised.

    Returns ``[(adapter, stats)]`` in order; ``stats["fit_s"]`` is the whole job's wall time with one config, and
    that config's training (on rank 0) with several, ``stats["job_s"]`` the job's, ``stats["batched"]`` the count."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from sim.model import load_adapter

    if not cfgs:
        return []
    if len({joint_resources(c) for c in cfgs}) > 1:
        raise ValueError("train_joint_many: the configs reserve different runtime resources; train them apart")
    workers, cpus, gpus = joint_resources(cfgs[0])
    resources = {"CPU": cpus} | ({"GPU": gpus} if gpus else {})
    trainer = TorchTrainer(
        _train_worker, train_loop_config={"cfgs": [config_to_dict(c) for c in cfgs]},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=bool(gpus), resources_per_worker=resources),
        run_config=RunConfig(name=name, storage_path=str(Path(storage).resolve())))
    t0 = time.perf_counter()
    result = trainer.fit()
    job_s = time.perf_counter() - t0
    if result.checkpoint is None:
        raise RuntimeError(f"joint training reported no checkpoint (error: {result.error})")
    out = []
    with result.checkpoint.as_directory() as d:
        for i in range(len(cfgs)):
            stats = json.loads((Path(d) / str(i) / "stats.json").read_text())
            fit_s = job_s if len(cfgs) == 1 else stats["train_s"]
            out.append((load_adapter(Path(d) / str(i)), stats | {"fit_s": fit_s, "job_s": job_s,
                                                                 "batched": len(cfgs), "workers": workers,
                                                                 "use_gpu": bool(gpus)}))
    return out


def train_joint(cfg: SimConfig, storage: str | Path, name: str = "joint"):
    """Train the joint reference with Ray Train (Ray must be initialised). Returns ``(adapter, stats)``."""
    return train_joint_many([cfg], storage, name)[0]


def evaluate_joint(cfg: SimConfig, adapter, tasks: list[str] | None = None) -> list[dict]:
    """Per-task records ``{task, acc, auc, n, infer_s}`` of the joint adapter (every task of the cohort by default)."""
    import torch

    from sim.data import cached_cohort
    from sim.evaluation import evaluate_predictor
    from sim.model import load_foundation

    torch.set_num_threads(cfg.runtime.threads)
    cohort = cached_cohort(cfg.data, cfg.seed)
    foundation = load_foundation(cfg.model, cfg.data.img_size, cfg.runtime.device, cfg.runtime.precision)
    return evaluate_predictor(foundation, adapter, cohort, list(tasks or cohort.tasks))


def add_joint_reference(cfg: SimConfig, run_dir: str | Path) -> dict:
    """Train, evaluate and record the joint reference of a finished run dir; returns the updated summary."""
    import pandas as pd
    import ray

    from actors.runner import connect
    from sim.evaluation import summarise_reference
    from sim.model import save_adapter
    from sim.records import json_safe

    run_dir = Path(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    tasks = list(dict.fromkeys(t for s in summary.get("strategies", {}).values() for t in s.get("per_task", {})))
    started = connect(cfg)
    try:
        adapter, stats = train_joint(cfg, run_dir / "joint_train")
    finally:
        if started:
            ray.shutdown()
    save_adapter(adapter, run_dir / "joint")
    records = evaluate_joint(cfg, adapter, tasks or None)
    summary["references"]["joint"] = summarise_reference(records) | {
        "train_s": stats["fit_s"], "workers": stats["workers"], "steps": stats["steps"]}
    metrics_path = run_dir / "metrics.parquet"
    rows = [{"run_id": summary["run_id"], "event": "eval", "version": -1, "strategy": "joint"} | r for r in records]
    metrics = pd.read_parquet(metrics_path) if metrics_path.exists() else pd.DataFrame()
    metrics = metrics[metrics["strategy"] != "joint"] if "strategy" in metrics else metrics
    pd.concat([metrics, pd.DataFrame(rows)], ignore_index=True).to_parquet(metrics_path, index=False)
    (run_dir / "summary.json").write_text(json.dumps(json_safe(summary), indent=2))
    return summary
