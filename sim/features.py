"""Test-split features of adapters, computed once and reused: the mixture and the individual references.

A mixture of N adapters scores every test image with every member (N forward passes an image), and the individual
references score every site's adapter on its task's pooled test set. Both are a head on top of one adapter's
pooled features of the images; the heads are cheap, the features are the forward pass. A pooled test set is the
concatenation of its institutions' test splits (``sim.data.Cohort.task_split``), and with
``data.partition: per_institution`` a community nested in a larger one holds the first N institutions' splits,
the same images. So the features of one adapter on one institution's test split serve every community that holds
both: the scaling study's smaller communities (``sim.replay.replay_subset``) read the largest run's instead of
running N forward passes an image again.

``FeatureStore`` keys an entry by the foundation (fingerprint, device kind, precision), the adapter's weights
(``feature_key``: LoRA factors, scalings, base; not its heads, which act after) and the split's pixels, and keeps
it in memory (least recently used first out, ``max_bytes``) and, with a ``root``, on disk (``runtime.feature_cache``,
one ``.npz`` per entry, written atomically, so concurrent workers may share it). Each entry keeps the seconds its
forward pass took, so an evaluation that reads it bills the inference it stands for (``infer_s`` stays the cost of
scoring, not of a lookup).

Features are always computed split by split, in batches that never cross a split's boundary, and heads applied
split by split, so the numbers are the same wherever the features came from (this process, another worker, the
disk): a subset built from a larger run's features equals a fresh run of it bit for bit.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

BATCH = 256          # images per forward pass within a split
MAX_BYTES = 512 << 20


def feature_key(adapter) -> str:
    """What an adapter's features depend on: its scalings, base and LoRA factors (``None``: the foundation alone)."""
    if adapter is None:
        return "foundation"
    h = hashlib.sha256(json.dumps([float(adapter.alpha), sorted(adapter.alpha_pattern.items()),
                                   adapter.base_fingerprint]).encode())
    for k in sorted(adapter.weights):
        t = adapter.weights[k]
        h.update(f"{k}:{tuple(t.shape)}".encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def foundation_key(foundation) -> str:
    """The foundation's part of a key: its fingerprint, device kind and precision."""
    raw = f"{foundation.fingerprint}:{foundation.device.type}:{foundation.precision}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


class FeatureStore:
    """Pooled features (n, D) of (foundation, adapter, split), in memory and optionally under ``root`` on disk."""

    def __init__(self, root: str | Path | None = None, max_bytes: int = MAX_BYTES) -> None:
        self.root = Path(root) if root else None
        self.max_bytes = max_bytes
        self._mem: OrderedDict[tuple[str, str, str], tuple[torch.Tensor, float]] = OrderedDict()
        self._bytes = 0
        self._split_keys: dict[tuple[int, int, tuple], tuple[weakref.ref, str]] = {}
        self.computed = self.read = self.hits = 0      # entries computed here, read from disk, found in memory

    def _split_key(self, x: np.ndarray) -> str:
        ident = (id(x), x.__array_interface__["data"][0], x.shape)
        hit = self._split_keys.get(ident)
        if hit is None or hit[0]() is not x:       # a dead array's id may be reused: check it is this one
            h = hashlib.blake2b(f"{x.dtype}:{x.shape}".encode(), digest_size=16)
            h.update(np.ascontiguousarray(x).tobytes())
            if len(self._split_keys) > 4096:
                self._split_keys = {k: v for k, v in self._split_keys.items() if v[0]() is not None}
            hit = (weakref.ref(x), h.hexdigest())
            self._split_keys[ident] = hit
        return hit[1]

    def features(self, foundation, adapter, x: np.ndarray) -> tuple[torch.Tensor, float]:
        """``(features (n, D) float32, seconds of the forward pass that made them)`` of images ``x`` (one split)."""
        key = (foundation_key(foundation), feature_key(adapter), self._split_key(x))
        hit = self._mem.get(key)
        if hit is not None:
            self._mem.move_to_end(key)
            self.hits += 1
            return hit
        path = self.root / key[0] / key[1] / f"{key[2]}.npz" if self.root else None
        if path is not None and path.is_file():
            with np.load(path) as z:
                hit = (torch.from_numpy(z["features"]).to(foundation.device), float(z["seconds"]))
            self.read += 1
        else:
            hit = self._compute(foundation, adapter, x)
            self.computed += 1
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
                np.savez(tmp, features=hit[0].cpu().numpy(), seconds=np.float64(hit[1]))
                os.replace(tmp, path)
        self._keep(key, hit)
        return hit

    @staticmethod
    @torch.inference_mode()
    def _compute(foundation, adapter, x: np.ndarray) -> tuple[torch.Tensor, float]:
        t0 = time.perf_counter()
        weights = foundation.merged_weights(adapter) if adapter is not None else None
        parts = [foundation.embed(foundation.normalize(torch.from_numpy(np.ascontiguousarray(x[i:i + BATCH]))),
                                  weights) for i in range(0, len(x), BATCH)]
        feats = torch.cat(parts) if parts else torch.zeros((0, foundation.dim), device=foundation.device)
        return feats, time.perf_counter() - t0

    def _keep(self, key, hit) -> None:
        self._mem[key] = hit
        self._bytes += hit[0].numel() * 4
        while self._bytes > self.max_bytes and len(self._mem) > 1:
            _, (old, _) = self._mem.popitem(last=False)
            self._bytes -= old.numel() * 4


_SHARED: dict[str | None, FeatureStore] = {}


def shared_store(root: str | Path | None = None) -> FeatureStore:
    """This process's store for ``root`` (``runtime.feature_cache``; ``None``: memory only), made once."""
    key = str(root) if root else None
    if key not in _SHARED:
        _SHARED[key] = FeatureStore(root)
    return _SHARED[key]


def split_probabilities(foundation, store: FeatureStore, adapter, x: np.ndarray, task: str, classes: Sequence[str],
                        head) -> tuple[torch.Tensor, float]:
    """``(probabilities (n, K), seconds)`` of one adapter with ``head`` (``None``: prototype head) on one split; the
    seconds are the forward pass's (``FeatureStore``) plus the head's."""
    from sim.merge.mixture import adapter_probabilities

    feats, seconds = store.features(foundation, adapter, x)
    t0 = time.perf_counter()
    with torch.inference_mode():
        probs = adapter_probabilities(foundation, feats[None], task, classes, [head])[0]
    return probs, seconds + time.perf_counter() - t0


def model_proba(foundation, store: FeatureStore, adapter, splits: Sequence[np.ndarray], task: str,
                classes: Sequence[str]) -> tuple[np.ndarray, float]:
    """``(probabilities, seconds)`` of one adapter (``None``: the foundation alone) on the concatenation of
    ``splits``, scored with its head of ``task`` (``Adapter.head_for``), split by split."""
    head = adapter.head_for(task) if adapter is not None else None
    parts = [split_probabilities(foundation, store, adapter, x, task, classes, head) for x in splits]
    if not parts:
        return np.zeros((0, len(classes)), np.float32), 0.0
    return torch.cat([p for p, _ in parts]).cpu().numpy(), sum(s for _, s in parts)


def mixture_task_proba(foundation, store: FeatureStore, mix, splits: Sequence[np.ndarray], task: str,
                       classes: Sequence[str]) -> tuple[np.ndarray, float]:
    """``(probabilities, seconds)`` of a ``sim.merge.Mixture`` on the concatenation of ``splits``: per split, every
    member's probabilities with its own head of ``task`` (``Mixture.member_heads``), combined with the mixture's
    weights (``combine_probabilities``), as ``mixture_proba`` scores them."""
    from sim.merge.mixture import combine_probabilities

    heads = mix.member_heads(task)
    out, seconds = [], 0.0
    for x in splits:
        parts = [split_probabilities(foundation, store, a, x, task, classes, h) for a, h in zip(mix.adapters, heads)]
        t0 = time.perf_counter()
        with torch.inference_mode():
            out.append(combine_probabilities(torch.stack([p for p, _ in parts]), mix.weights))
        seconds += sum(s for _, s in parts) + time.perf_counter() - t0
    if not out:
        return np.zeros((0, len(classes)), np.float32), 0.0
    return torch.cat(out).cpu().numpy(), seconds
