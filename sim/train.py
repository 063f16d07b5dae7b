"""Seeded local LoRA training of one institution's adapter (peft on the frozen timm ViT)."""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from sim.config import LoraConfig, TrainConfig
from sim.data.base import Split, to_unit_float
from sim.model import Adapter, Foundation, augment, logits_from_features, new_adapter


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
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    if len(split) == 0:
        raise ValueError(f"task {task!r}: no training images")
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
        linear = None
        if head == "linear":
            linear = torch.nn.Linear(foundation.dim, len(classes)).to(foundation.device)
            if init is not None and init.head is not None and init.head["weight"].shape[0] == len(classes):
                linear.load_state_dict(init.head)
            params += list(linear.parameters())
        opt = _optimizer(params, cfg)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / cfg.steps)))
        g = torch.Generator().manual_seed(seed)
        x_all, y_all = torch.from_numpy(split.x), torch.from_numpy(split.y)
        losses = []
        for _ in range(cfg.steps):
            idx = torch.randint(len(y_all), (cfg.batch_size,), generator=g)
            xb = to_unit_float(x_all[idx])                                   # (B, 3, S, S) in [0, 1]
            if cfg.augment:
                xb = augment(xb, g)
            feats = model(foundation.normalize(xb))                          # (B, D)
            head_w = dict(linear.named_parameters()) if linear is not None else None
            loss = F.cross_entropy(logits_from_features(feats, task, classes, foundation.cfg.tau, head_w),
                                   y_all[idx].to(foundation.device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        weights = {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}
    head_state = {k: v.detach().cpu().clone() for k, v in linear.state_dict().items()} if linear else None
    train_s = time.perf_counter() - t0
    adapter = Adapter(weights, start.alpha, foundation.fingerprint, dict(start.alpha_pattern), head_state,
                      meta={"task": task, "classes": list(classes)})
    stats = {"train_s": train_s, "steps": cfg.steps, "images": cfg.steps * cfg.batch_size,
             "images_per_s": cfg.steps * cfg.batch_size / train_s,
             "loss_first": float(np.mean(losses[:10])), "loss_last": float(np.mean(losses[-10:]))}
    return TrainResult(adapter, stats)
