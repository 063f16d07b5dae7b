"""``forgesim train``: train one adapter on one task's training data, evaluate it and the bare foundation."""
from __future__ import annotations

import argparse
import json
import time

import torch

from experiments.common import COMMON_FLAGS, add_config_args, add_data_args, prepare_out_dir, resolve_config
from sim.config import config_to_dict
from sim.data import build_cohort
from sim.model import load_foundation, save_adapter
from sim.train import train_task

HELP = "train one LoRA adapter on one task; writes a peft adapter dir and metrics.json"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_data_args(p)
    p.add_argument("--task", help="task name (default: the dataset's first task)")
    p.add_argument("--rank", type=int, help="LoRA rank (lora.rank)")
    p.add_argument("--steps", type=int, help="optimizer steps (train.steps)")
    add_config_args(p)
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (new or empty)")
    p.add_argument("--overwrite", action="store_true", help="allow a non-empty --out")


def run(args: argparse.Namespace) -> int:
    cfg = resolve_config(args, COMMON_FLAGS | {"rank": "lora.rank", "steps": "train.steps"})
    out = prepare_out_dir(args.out, args.overwrite)
    t0 = time.perf_counter()
    cohort = build_cohort(cfg.data, cfg.seed)
    task = args.task or cohort.tasks[0]
    if task not in cohort.task_classes:
        raise ValueError(f"--task {task!r} is not a task of data.name={cfg.data.name}; "
                         f"tasks: {', '.join(cohort.tasks)}")
    foundation = load_foundation(cfg.model, cfg.data.img_size, cfg.runtime.device, cfg.runtime.precision)
    foundation.check_tasks(cohort.task_classes)
    adapter, metrics = train_task(cfg, cohort, foundation, task)
    save_adapter(adapter, out)
    metrics["total_s"] = time.perf_counter() - t0
    metrics["torch_threads"] = torch.get_num_threads()
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2))
    print(f"{task}: acc {metrics['acc']:.3f} auc {metrics['auc']:.3f} | base acc {metrics['base_acc']:.3f} "
          f"(chance {metrics['chance']:.3f}) | train {metrics['train_s']:.1f}s -> {out}")
    return 0
