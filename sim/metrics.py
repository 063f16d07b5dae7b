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

    A class absent from ``y`` (or the only class present) has no AUC and is left out; NaN if none remain. Each
    class's AUC is the Mann-Whitney statistic (``binary_auc``), which is the area under the ROC curve that
    ``sklearn.metrics.roc_auc_score`` integrates (ties score one half), computed without importing scikit-learn:
    every pooled worker that scores a model would otherwise pay its import (about 2 s) on its first evaluation.
    """
    y = np.asarray(y)
    k = proba.shape[1]
    if k == 2:
        return binary_auc(y == 1, proba[:, 1]) if len(np.unique(y)) == 2 else math.nan
    scores = [binary_auc(y == c, proba[:, c]) for c in range(k) if 0 < np.sum(y == c) < len(y)]
    return float(np.mean(scores)) if scores else math.nan


def binary_auc(positive: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC of ``score`` for the boolean labels ``positive``: P(score of a positive > score of a negative), ties
    counted one half (Mann & Whitney 1947; Hanley & McNeil 1982), from the scores' average ranks. NaN unless both
    labels occur."""
    positive = np.asarray(positive, dtype=bool)
    score = np.asarray(score)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(score, kind="stable")
    ranked = score[order]
    # average 1-based rank of each run of equal scores
    starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])
    ends = np.r_[starts[1:], len(ranked)]
    ranks = np.empty(len(ranked), dtype=np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


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
