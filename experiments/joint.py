"""The ``joint`` reference: one multi-task LoRA trained centrally with Ray Train on every institution's data.

The upper bound merging papers compare to (it needs the private data in one place): one adapter trained on the
union of every institution's training data — with ``model.head=linear`` together with one linear head per task,
which score it (as a merge is scored: shared backbone update, each task's head).

``train_joint(cfg)`` runs a ``ray.train.torch.TorchTrainer``: ``ScalingConfig(num_workers=runtime.workers,
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
    """One Ray Train worker: its shard of the union, gradients all-reduced each step; rank 0 reports the adapter."""
    import ray.train
    import torch
    import torch.distributed as dist

    from sim.data import build_cohort
    from sim.model import load_foundation, save_adapter
    from sim.train import train_joint_adapter

    cfg = config_from_dict(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.runtime.threads)
    device = str(ray.train.torch.get_device()) if cfg.runtime.device.startswith("cuda") else "cpu"
    foundation = load_foundation(cfg.model, cfg.data.img_size, device, cfg.runtime.precision)
    parts = joint_parts(build_cohort(cfg.data, cfg.seed))
    steps = cfg.train.joint_steps or cfg.train.steps * len(parts)

    def sync(grads: list) -> None:   # the mean gradient over ranks, as DDP computes it
        for g in grads:
            dist.all_reduce(g)
            g /= world

    result = train_joint_adapter(foundation, parts, cfg.lora, cfg.train, cfg.seed, steps, rank, world,
                                 sync if world > 1 else None, head=cfg.model.head)
    metrics = {k: float(v) for k, v in result.stats.items()} | {"world": world}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            save_adapter(result.adapter, tmp)
            (Path(tmp) / "stats.json").write_text(json.dumps(metrics))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)


def train_joint(cfg: SimConfig, storage: str | Path, name: str = "joint"):
    """Train the joint reference with Ray Train (Ray must be initialised). Returns ``(adapter, stats)``."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from sim.model import load_adapter

    use_gpu = cfg.runtime.num_gpus > 0 or cfg.runtime.device.startswith("cuda")
    resources = {"CPU": cfg.runtime.num_cpus} | ({"GPU": cfg.runtime.num_gpus or 1.0} if use_gpu else {})
    trainer = TorchTrainer(
        _train_worker, train_loop_config={"cfg": config_to_dict(cfg)},
        scaling_config=ScalingConfig(num_workers=cfg.runtime.workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=name, storage_path=str(Path(storage).resolve())))
    t0 = time.perf_counter()
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"joint training reported no checkpoint (error: {result.error})")
    with result.checkpoint.as_directory() as d:
        adapter = load_adapter(d)
        stats = json.loads((Path(d) / "stats.json").read_text())
    return adapter, stats | {"fit_s": time.perf_counter() - t0, "workers": cfg.runtime.workers, "use_gpu": use_gpu}


def evaluate_joint(cfg: SimConfig, adapter, tasks: list[str] | None = None) -> list[dict]:
    """Per-task records ``{task, acc, auc, n, infer_s}`` of the joint adapter (every task of the cohort by default)."""
    import torch

    from sim.data import build_cohort
    from sim.evaluation import evaluate_predictor
    from sim.model import load_foundation

    torch.set_num_threads(cfg.runtime.threads)
    cohort = build_cohort(cfg.data, cfg.seed)
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
