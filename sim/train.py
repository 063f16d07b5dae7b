"""Seeded LoRA training (peft on the frozen timm ViT): one institution's adapter, one task's, the joint one."""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from sim.config import LoraConfig, SimConfig, TrainConfig
from sim.data.base import Split, derive_seed, to_unit_float
from sim.merge.base import base_reference
from sim.metrics import chance_accuracy, evaluate
from sim.model import Adapter, Foundation, augment, new_adapter, pack_heads

if TYPE_CHECKING:
    from sim.data import Cohort


@dataclass
class TrainResult:
    adapter: Adapter
    stats: dict[str, Any] = field(default_factory=dict)


def _optimizer(params: list[torch.Tensor], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def train_adapter(foundation: Foundation, split: Split, task: str, classes: Sequence[str], lora: LoraConfig,
                  cfg: TrainConfig, seed: int, init: Adapter | None = None, head: str = "prototype") -> TrainResult:
    """Train LoRA factors (and a linear head if ``head == "linear"``) on ``split`` with a cosine schedule.

    Starts from ``init`` (e.g. a pulled main branch) or a fresh adapter. All randomness (init, batches,
    augmentation, dropout) comes from ``seed``; the global torch RNG is restored afterwards.
    """
    if len(split) == 0:
        raise ValueError(f"task {task!r}: no training images")
    x_all, y_all = torch.from_numpy(split.x), torch.from_numpy(split.y)

    def draw(step: int, g: torch.Generator):
        idx = torch.randint(len(y_all), (cfg.batch_size,), generator=g)
        return x_all[idx], y_all[idx], task, classes

    return _fit(foundation, lora, cfg, seed, cfg.steps, draw, init, {task: len(classes)} if head == "linear" else {},
                meta={"task": task, "classes": list(classes)})


def train_task(cfg: SimConfig, cohort: Cohort, foundation: Foundation, task: str) -> tuple[Adapter, dict]:
    """Train on the union of ``task``'s training splits; score on its test set, the base, and other tasks."""
    classes = cohort.task_classes[task]
    result = train_adapter(foundation, cohort.task_split(task, "train"), task, classes, cfg.lora, cfg.train,
                           seed=cfg.seed, head=cfg.model.head)
    test = cohort.task_split(task, "test")
    t0 = time.perf_counter()
    own = evaluate(foundation, result.adapter, test, task, classes)
    eval_s = time.perf_counter() - t0
    base = evaluate(foundation, base_reference([result.adapter]), test, task, classes)   # linear: the trained head
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


def train_joint_adapter(foundation: Foundation, parts: Sequence[tuple[Split, str, Sequence[str]]], lora: LoraConfig,
                        cfg: TrainConfig, seed: int, steps: int, rank: int = 0, world: int = 1,
                        sync: Callable[[list[torch.Tensor]], None] | None = None,
                        head: str = "prototype") -> TrainResult:
    """The ``joint`` reference: one multi-task adapter on the union of ``parts`` = ``(split, task, classes)`` (every
    institution's training data). With ``head == "linear"`` it trains one linear head per task alongside (the
    multi-task layout of ``Adapter.head``), so it is scored like a merge: shared backbone update, each task's head.

    Step s trains on task ``s % len(parts)`` (tasks in turn, so each gets the same number of steps), a batch drawn
    from that task's union. Data-parallel over ``world`` ranks: rank r keeps every ``world``-th image of each task,
    draws ``batch_size // world`` of each batch, and ``sync(grads)`` averages the LoRA gradients over ranks
    (``torch.distributed.all_reduce``), so every rank holds the same adapter, as with DDP. The LoRA init comes from
    ``seed`` alone (identical on every rank); batches from ``(seed, rank)``.
    """
    if not parts:
        raise ValueError("the joint reference needs at least one task's training data")
    shards = []
    for split, task, classes in parts:
        x, y = torch.from_numpy(split.x[rank::world]), torch.from_numpy(split.y[rank::world])
        if len(y) == 0:
            raise ValueError(f"joint: task {task!r} has no training images for rank {rank} of {world}")
        shards.append((x, y, task, classes))
    per_rank = max(1, cfg.batch_size // world)

    def draw(step: int, g: torch.Generator):
        x, y, task, classes = shards[step % len(shards)]
        idx = torch.randint(len(y), (per_rank,), generator=g)
        return x[idx], y[idx], task, classes

    linear = {t: len(classes) for _, t, classes in parts} if head == "linear" else {}
    return _fit(foundation, lora, cfg, seed, steps, draw, None, linear, sync=sync,
                batch_seed=derive_seed(seed, "rank", rank), meta={"task": "joint", "tasks": [t for _, t, _ in parts]})


def _fit(foundation: Foundation, lora: LoraConfig, cfg: TrainConfig, seed: int, steps: int, draw: Callable,
         init: Adapter | None, linear_classes: dict[str, int], sync: Callable | None = None,
         batch_seed: int | None = None, meta: dict | None = None) -> TrainResult:
    """The training loop: peft model on a copy of the backbone, AdamW/SGD with a cosine schedule over ``steps``;
    ``draw(step, generator)`` gives ``(images uint8 (B, 3, S, S), labels, task, classes)``.

    ``linear_classes``: task → K for a linear head per task (empty: prototype head). A task's head starts from
    ``init``'s head of that task when it has one of that shape (a pulled merge carries every task's), else fresh.
    One task gives the single-head layout of ``Adapter.head``, several the per-task one.

    The forward pass through the backbone runs in the foundation's precision (``Foundation.autocast``,
    ``runtime.precision``); the LoRA factors, heads, their gradients, the optimizer state and the loss stay float32,
    and the adapter comes back float32 on the CPU whatever the device."""
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    t0 = time.perf_counter()
    start = init if init is not None else new_adapter(foundation, lora, seed)
    start.check_base(foundation)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # peft's dropout draws from the global RNG; fork_rng keeps it private
        model = get_peft_model(copy.deepcopy(foundation.backbone), start.to_peft_config(dropout=lora.dropout))
        set_peft_model_state_dict(model, {k: v.clone() for k, v in start.weights.items()})
        model.train()
        params = [p for n, p in model.named_parameters() if "lora_" in n]
        for p in params:
            p.requires_grad_(True)
        linears = _linear_heads(foundation, linear_classes, init)
        for linear in linears.values():
            params += list(linear.parameters())
        opt = _optimizer(params, cfg)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
        g = torch.Generator().manual_seed(seed if batch_seed is None else batch_seed)
        losses, images = [], 0
        for step in range(steps):
            xb, yb, task, classes = draw(step, g)
            xb = to_unit_float(xb)                                           # (B, 3, S, S) in [0, 1]
            if cfg.augment:
                xb = augment(xb, g)
            with foundation.autocast():                                      # runtime.precision
                feats = model(foundation.normalize(xb)).float()              # (B, D), float32
            head_w = dict(linears[task].named_parameters()) if linears else None
            loss = F.cross_entropy(foundation.logits(feats, task, classes, head_w), yb.to(foundation.device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if sync is not None:
                sync([p.grad for p in params if p.grad is not None])   # other tasks' heads: no grad this step
            opt.step()
            sched.step()
            losses.append(loss.item())
            images += len(yb)
        weights = {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}
    states = {t: {k: v.detach().cpu().clone() for k, v in lin.state_dict().items()} for t, lin in linears.items()}
    single = len(states) == 1 and (meta or {}).get("task") in states
    head_state = (states[meta["task"]] if single else pack_heads(states)) if states else None
    train_s = time.perf_counter() - t0
    adapter = Adapter(weights, start.alpha, foundation.fingerprint, dict(start.alpha_pattern), head_state,
                      meta=meta or {})
    stats = {"train_s": train_s, "steps": steps, "images": images, "images_per_s": images / train_s,
             "loss_first": float(np.mean(losses[:10])), "loss_last": float(np.mean(losses[-10:]))}
    return TrainResult(adapter, stats)


def _linear_heads(foundation: Foundation, linear_classes: dict[str, int], init: Adapter | None
                  ) -> dict[str, torch.nn.Linear]:
    """One ``nn.Linear(D, K)`` per task (from the global RNG, in task order), loaded from ``init``'s head of that
    task when it has one of that shape."""
    pulled = init.task_heads() if init is not None else {}
    out = {}
    for task, k in linear_classes.items():
        linear = torch.nn.Linear(foundation.dim, k).to(foundation.device)
        if task in pulled and pulled[task]["weight"].shape[0] == k:
            linear.load_state_dict(pulled[task])
        out[task] = linear
    return out
