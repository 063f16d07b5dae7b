"""Evaluation: class probabilities of (foundation + adapter) on a split, accuracy and macro AUC."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from sim.data.base import Split
from sim.model import Adapter, Foundation


def accuracy(y: np.ndarray, proba: np.ndarray) -> float:
    return float(np.mean(proba.argmax(axis=1) == y)) if len(y) else math.nan


def macro_auc(y: np.ndarray, proba: np.ndarray) -> float:
    """Macro one-vs-rest ROC AUC over the classes present (binary: AUC of the positive class).

    A class absent from ``y`` (or the only class present) has no AUC and is left out; NaN if none remain.
    """
    from sklearn.metrics import roc_auc_score

    k = proba.shape[1]
    if k == 2:
        return float(roc_auc_score(y, proba[:, 1])) if len(np.unique(y)) == 2 else math.nan
    scores = [roc_auc_score(y == c, proba[:, c]) for c in range(k) if 0 < np.sum(y == c) < len(y)]
    return float(np.mean(scores)) if scores else math.nan


def chance_accuracy(n_classes: int) -> float:
    """Expected accuracy of guessing uniformly at random."""
    return 1.0 / n_classes


@torch.no_grad()
def predict_proba(foundation: Foundation, adapter: Adapter | None, x: np.ndarray, task: str,
                  classes: Sequence[str], batch_size: int = 512) -> np.ndarray:
    """Softmax probabilities (n, K) of ``task``'s classes for uint8 images ``x`` (n, 3, S, S).

    ``adapter`` may also be a ``sim.merge.Mixture`` (output-level merge of N adapters, evaluated batched) or a
    ``sim.merge.Router`` (per-image weights over N adapters; only the routed ones run). With
    linear heads, ``task`` is scored with the adapter's head of that task (``Adapter.head_for``: a merge carries
    every contributor task's head); without them, with the prototype head.
    """
    from sim.merge.mixture import Mixture, mixture_proba
    from sim.merge.router import Router, router_proba

    if isinstance(adapter, Mixture):
        return mixture_proba(foundation, adapter, x, task, classes, batch_size=max(1, batch_size // 2))
    if isinstance(adapter, Router):
        return router_proba(foundation, adapter, x, task, classes, batch_size=max(1, batch_size // 2))
    weights = foundation.merged_weights(adapter) if adapter is not None else None
    head = adapter.head_for(task) if adapter is not None else None
    out = []
    for start in range(0, len(x), batch_size):
        feats = foundation.features(torch.from_numpy(x[start:start + batch_size]), weights)
        out.append(torch.softmax(foundation.logits(feats, task, classes, head), dim=1))
    return torch.cat(out).cpu().numpy() if out else np.zeros((0, len(classes)), np.float32)


def evaluate(foundation: Foundation, adapter: Adapter | None, split: Split, task: str,
             classes: Sequence[str]) -> dict[str, float]:
    """``{acc, auc, n}`` of the foundation (+ adapter) on one split of one task."""
    proba = predict_proba(foundation, adapter, split.x, task, classes)
    return {"acc": accuracy(split.y, proba), "auc": macro_auc(split.y, proba), "n": int(len(split))}
