"""``forgesim train``: train one adapter on one task's training data, evaluate it and the bare foundation."""
from __future__ import annotations

import argparse
import json
import time

import torch

from experiments.cli import COMMON_FLAGS, add_config_args, add_data_args, prepare_out_dir, resolve_config
from sim.config import SimConfig, config_to_dict
from sim.data import Cohort, build_cohort
from sim.metrics import chance_accuracy, evaluate
from sim.model import Adapter, Foundation, load_foundation, save_adapter
from sim.train import train_adapter

HELP = "train one LoRA adapter on one task; writes a peft adapter dir and metrics.json"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_data_args(p)
    p.add_argument("--task", help="task name (default: the dataset's first task)")
    p.add_argument("--rank", type=int, help="LoRA rank (lora.rank)")
    p.add_argument("--steps", type=int, help="optimizer steps (train.steps)")
    add_config_args(p)
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (new or empty)")
    p.add_argument("--overwrite", action="store_true", help="allow a non-empty --out")


def train_task(cfg: SimConfig, cohort: Cohort, foundation: Foundation, task: str) -> tuple[Adapter, dict]:
    """Train on the union of ``task``'s training splits; score on its test set, the base, and other tasks."""
    classes = cohort.task_classes[task]
    result = train_adapter(foundation, cohort.task_split(task, "train"), task, classes, cfg.lora, cfg.train,
                           seed=cfg.seed, head=cfg.model.head)
    test = cohort.task_split(task, "test")
    t0 = time.perf_counter()
    own = evaluate(foundation, result.adapter, test, task, classes)
    eval_s = time.perf_counter() - t0
    base = evaluate(foundation, None, test, task, classes)
    cross = {}
    if cfg.model.head == "prototype":  # a linear head only scores its own task's classes
        cross = {other: evaluate(foundation, result.adapter, cohort.task_split(other, "test"), other,
                                 cohort.task_classes[other])["acc"] for other in cohort.tasks if other != task}
    metrics = {
        "task": task, "classes": list(classes), "acc": own["acc"], "auc": own["auc"],
        "base_acc": base["acc"], "base_auc": base["auc"], "chance": chance_accuracy(len(classes)),
        "train_s": result.stats["train_s"], "train_images_per_s": result.stats["images_per_s"],
        "test_images_per_s": own["n"] / eval_s, "n_train": len(cohort.task_split(task, "train")),
        "n_test": own["n"], "cross_task_acc": cross, "loss_first": result.stats["loss_first"],
        "loss_last": result.stats["loss_last"], "rank": cfg.lora.rank, "steps": cfg.train.steps,
        "seed": cfg.seed, "base_fingerprint": foundation.fingerprint, "storage_bytes": result.adapter.num_bytes(),
    }
    result.adapter.meta.update({"seed": cfg.seed, "steps": cfg.train.steps})
    return result.adapter, metrics


def run(args: argparse.Namespace) -> int:
    cfg = resolve_config(args, COMMON_FLAGS | {"rank": "lora.rank", "steps": "train.steps"})
    out = prepare_out_dir(args.out, args.overwrite)
    t0 = time.perf_counter()
    cohort = build_cohort(cfg.data, cfg.seed)
    task = args.task or cohort.tasks[0]
    if task not in cohort.task_classes:
        raise ValueError(f"--task {task!r} is not a task of data.name={cfg.data.name}; "
                         f"tasks: {', '.join(cohort.tasks)}")
    foundation = load_foundation(cfg.model, cfg.data.img_size, cfg.runtime.device)
    adapter, metrics = train_task(cfg, cohort, foundation, task)
    save_adapter(adapter, out)
    metrics["total_s"] = time.perf_counter() - t0
    metrics["torch_threads"] = torch.get_num_threads()
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2))
    print(f"{task}: acc {metrics['acc']:.3f} auc {metrics['auc']:.3f} | base acc {metrics['base_acc']:.3f} "
          f"(chance {metrics['chance']:.3f}) | train {metrics['train_s']:.1f}s -> {out}")
    return 0
