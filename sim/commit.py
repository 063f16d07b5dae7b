"""The commit: what an institution sends to main, how it is signed, and why one must be rejected.

Authentication: a commit carries an HMAC of its content hash under its institution's key (``institution_key``:
derived from the per-run secret; each institution actor gets its own at start), so the merge actor needs only the
secret and no institution can sign for another. Validation (``validate_commit``) looks at content only — NaN/Inf,
modules, shapes and rank, base fingerprint, unknown institution, task/classes, distilled set — so a bad commit is
named for what is wrong with it even when its id was accepted before.
"""
from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch

from sim.config import SimConfig
from sim.data.base import DistilledSet
from sim.model import PEFT_PREFIX, Adapter, Foundation, target_module_names
from sim.records import is_flat

SIGNATURE_KEY = "signature"          # in ``Commit.meta``: HMAC-SHA256 of the content hash (not logged, not hashed)


@dataclass
class Commit:
    """What an institution sends: its adapter, its distilled set, and where in main's history it started.

    ``id``: the contribution id (``instNNN-KK``), the idempotency key. ``pulled_version``: the main version the
    adapter started from (0 with ``init_from: base``); staleness = main version on arrival − ``pulled_version``.
    ``meta``: local numbers (train/distil time, losses, val accuracy); not part of the content hash.
    """

    id: str
    institution: int
    task: str
    classes: tuple[str, ...]
    adapter: Adapter
    distilled: DistilledSet
    pulled_version: int = 0
    t_pull: float = 0.0
    t_commit: float = 0.0
    meta: dict = field(default_factory=dict)

    def record(self) -> dict:
        """Flat description (no tensors): ``meta.json`` and the log line carry it."""
        return {"id": self.id, "institution": self.institution, "task": self.task, "classes": list(self.classes),
                "pulled_version": self.pulled_version, "t_pull": self.t_pull, "t_commit": self.t_commit,
                "adapter_bytes": self.adapter.num_bytes(), "distilled_bytes": self.distilled.num_bytes(),
                "n_distilled": len(self.distilled), "distill_method": self.distilled.method,
                "hash": self.content_hash()} | {k: v for k, v in self.meta.items()
                                                if is_flat(v) and k != SIGNATURE_KEY}

    def content_hash(self) -> str:
        """SHA-256 of what defines the commit: id, institution, task, classes, pulled version, adapter tensors
        (float32, sorted keys), scaling, head, distilled images and labels. Survives a save/load round trip."""
        h = hashlib.sha256()
        h.update(json.dumps([self.id, int(self.institution), self.task, list(self.classes), int(self.pulled_version),
                             float(self.adapter.alpha), sorted(self.adapter.alpha_pattern.items())]).encode())
        self.adapter.update_hash(h)
        h.update(np.ascontiguousarray(self.distilled.x, dtype=np.float32).tobytes())
        h.update(np.ascontiguousarray(self.distilled.y, dtype=np.int64).tobytes())
        return h.hexdigest()


def institution_key(secret: bytes, institution: int) -> bytes:
    """The key institution ``institution`` signs its commits with: HMAC-SHA256 of its id under the run's secret, so
    the merge actor needs only the secret and no institution can sign for another."""
    return hmac.new(secret, f"forgesim-institution:{int(institution)}".encode(), hashlib.sha256).digest()


def sign_commit(commit: Commit, key: bytes) -> Commit:
    """``commit`` carrying its signature: HMAC-SHA256 of its content hash under ``key``."""
    signature = hmac.new(key, commit.content_hash().encode(), hashlib.sha256).hexdigest()
    return dataclasses.replace(commit, meta=dict(commit.meta) | {SIGNATURE_KEY: signature})


def check_signature(commit, secret: bytes, institutions: Mapping[int, object]) -> str | None:
    """Why ``commit`` is not authentic (not a commit, unknown institution, missing or wrong signature), or ``None``."""
    if not isinstance(commit, Commit):
        return f"not a commit: {type(commit).__name__}"
    if commit.institution not in institutions:
        return f"unknown institution {commit.institution!r}"
    signature = commit.meta.get(SIGNATURE_KEY) if isinstance(commit.meta, dict) else None
    if not isinstance(signature, str):
        return f"commit {commit.id} carries no signature"
    expected = hmac.new(institution_key(secret, commit.institution), commit.content_hash().encode(),
                        hashlib.sha256).hexdigest()
    if not hmac.compare_digest(signature, expected):
        return f"commit {commit.id} has an invalid signature for institution {commit.institution}"
    return None


def expected_shapes(foundation: Foundation, cfg: SimConfig) -> dict[str, tuple[int, int]]:
    """``{peft key: shape}`` every commit's adapter must have: the configured modules at the configured rank."""
    shapes = {}
    for m in target_module_names(cfg.lora, foundation.block_count()):
        out_f, in_f = foundation.weight(m).shape
        shapes[f"{PEFT_PREFIX}{m}.lora_A.weight"] = (cfg.lora.rank, in_f)
        shapes[f"{PEFT_PREFIX}{m}.lora_B.weight"] = (out_f, cfg.lora.rank)
    return shapes


def validate_commit(commit, *, institutions: Mapping[int, tuple[str, Sequence[str]]], fingerprint: str,
                    shapes: Mapping[str, tuple[int, ...]], img_size: int) -> str | None:
    """Why ``commit`` must be rejected, or ``None`` if it is acceptable.

    ``institutions``: ``{id: (task, classes)}`` of the cohort; ``fingerprint``: the foundation's;
    ``shapes``: ``expected_shapes``; ``img_size``: the distilled images' side.
    """
    if not isinstance(commit, Commit):
        return f"not a commit: {type(commit).__name__}"
    if not isinstance(commit.id, str) or not commit.id:
        return f"commit id must be a non-empty string, got {commit.id!r}"
    if commit.institution not in institutions:
        return f"unknown institution {commit.institution!r}"
    task, classes = institutions[commit.institution]
    if commit.task != task or tuple(commit.classes) != tuple(classes):
        return (f"institution {commit.institution} holds task {task!r} with classes {list(classes)}, the commit says "
                f"{commit.task!r} with {list(commit.classes)}")
    adapter = commit.adapter
    if not isinstance(adapter, Adapter):
        return f"adapter is not an Adapter: {type(adapter).__name__}"
    if adapter.base_fingerprint != fingerprint:
        return f"adapter base fingerprint {adapter.base_fingerprint} is not the foundation's {fingerprint}"
    missing = sorted(set(shapes) - set(adapter.weights))
    extra = sorted(set(adapter.weights) - set(shapes))
    if missing or extra:
        return f"adapter modules differ from the configured ones: missing {missing[:3]}, unexpected {extra[:3]}"
    for key, shape in shapes.items():
        if tuple(adapter.weights[key].shape) != tuple(shape):
            return f"adapter tensor {key} has shape {tuple(adapter.weights[key].shape)}, expected {tuple(shape)}"
    for name, tensors in (("adapter tensor", adapter.weights), ("head tensor", adapter.head or {})):
        for key, t in tensors.items():
            if not torch.isfinite(t).all():
                kind = "NaN" if torch.isnan(t).any() else "Inf"
                return f"{name} {key} contains {kind}"
    if not math.isfinite(float(adapter.alpha)) or not all(math.isfinite(v) for v in adapter.alpha_pattern.values()):
        return "adapter alpha is not finite"
    ds = commit.distilled
    if not isinstance(ds, DistilledSet):
        return f"distilled set is not a DistilledSet: {type(ds).__name__}"
    if ds.task != task or tuple(ds.classes) != tuple(classes):
        return f"distilled set is of task {ds.task!r} {list(ds.classes)}, the institution's is {task!r} {list(classes)}"
    if len(ds) == 0:
        return "distilled set is empty"
    if ds.x.ndim != 4 or ds.x.shape[1:] != (3, img_size, img_size):
        return f"distilled images have shape {ds.x.shape[1:]}, expected (3, {img_size}, {img_size})"
    if not np.isfinite(ds.x).all():
        return "distilled images contain NaN or Inf"
    if not isinstance(commit.pulled_version, (int, np.integer)) or commit.pulled_version < 0:
        return f"pulled_version must be an integer >= 0, got {commit.pulled_version!r}"
    return None
