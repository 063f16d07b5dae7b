"""MedForge's Mixture (Tan et al., "MedForge", arXiv 2502.16055; official code ``model_mixture.py``), space: output.

A ``Mixture`` keeps all N adapters; its class scores are ``z = Σ w_i softmax(logits of adapter i)``.

Search objective (``mixture_loss``): MedForge's ``get_mixture_loss`` passes the *unnormalised* sum z to
``nn.CrossEntropyLoss``, which applies ``log_softmax`` to its input: z is scored as logits, ``-log softmax(z)_y``,
so negative or zero mass needs no clipping. This is not invariant to the scale of w (Σ|w| sets how sharp
softmax(z) is), so the L1 term ``0.05 · mean|w|`` (``sim.coefficients.l1_penalty``, MedForge's ``get_regular``)
trades fit against weight size. A renormalised Σ w_i p_i would make CE(c · w) = CE(w), and the L1 term would then
only shrink the weights (and let each sequential start (0.5, 0.5) hand the newest commit most of the weight).

Prediction (``combine_probabilities``, used by ``mixture_proba`` for evaluation): ``q ∝ max(0, z)`` per row
(uniform where no mass is left): for w ≥ 0 the weighted average Σ w_i p_i / Σ w_i of the members' distributions,
so a prediction does not depend on the scale of w and one adapter with any positive weight predicts its own
probabilities. It agrees with what the search optimises where the metrics look: its argmax is argmax z = the
argmax of softmax(z) whenever some z_k > 0, and for two classes with w ≥ 0 it ranks images by z_1 - z_0, as
softmax(z) does, so ACC and AUC equal those of the scored distribution (they can differ only for rows whose mass is
all clipped, i.e. with negative weights, and in the one-vs-rest ranking of 3+ classes).

MedForge searches the weights sequentially: at each new commit two coefficients (a, b) give ``w ← [a · w_prev, b]``
(it rescales the previous weights every stage); the ``global`` mode searches all N at once.

The N adapters are evaluated one after the other with their merged weights ``W + ΔW_i`` (inference costs N
forward passes per image: the price of an output-space merge). During a search the per-adapter
probabilities on the proxy data do not depend on w, so they are computed once (``ProbabilityCache``) and each
evaluation is a weighted sum.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from sim.coefficients import ProxyData
from sim.merge.base import Weights, check_compatible, collect_heads, common_base
from sim.model import Adapter, Foundation, load_adapter, save_adapter

MIXTURE_FILE = "mixture.json"


@dataclass
class Mixture:
    """Output-level predictor: N adapters and their weights (N,)."""

    adapters: list[Adapter]
    weights: np.ndarray
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.weights = np.asarray(self.weights, dtype=np.float64).reshape(-1)
        if len(self.adapters) == 0 or len(self.weights) != len(self.adapters):
            raise ValueError(f"a mixture needs one weight per adapter, got {len(self.weights)} weights for "
                             f"{len(self.adapters)} adapters")
        if not np.isfinite(self.weights).all():
            raise ValueError("mixture weights must be finite")

    @property
    def base_fingerprint(self) -> str | None:
        return common_base(self.adapters)

    def check_base(self, foundation: Foundation) -> None:
        for a in self.adapters:
            a.check_base(foundation)

    def num_bytes(self) -> int:
        return sum(a.num_bytes() for a in self.adapters)

    def member_heads(self, task: str) -> list[dict[str, torch.Tensor] | None]:
        """The head each adapter scores ``task`` with (``member_heads``)."""
        return member_heads(self.adapters, task)


def member_heads(adapters: Sequence[Adapter], task: str) -> list[dict[str, torch.Tensor] | None]:
    """Per adapter, the linear head it scores ``task`` with: an output-space merge is Σ w_i softmax(head_i(f_i)),
    each adapter with its *own* head of ``task``. An adapter that has none (it was trained on another task) uses
    the task's contributors' average head (``sim.merge.base.merge_heads``, what a parameter-space merge carries).
    All ``None`` without linear heads (prototype head); an error when no adapter has a head for ``task``."""
    own = [a.task_heads().get(task) for a in adapters]
    if all(h is not None for h in own):
        return own
    shared = collect_heads(adapters).get(task)
    if shared is None and any(a.head is not None for a in adapters):
        raise ValueError(f"no adapter of the mixture has a linear head for task {task!r} "
                         f"(model.head=linear scores a task only with a head trained on it)")
    return [h if h is not None else shared for h in own]


def mixture(adapters: Sequence[Adapter], weights: Weights = None) -> Mixture:
    """MedForge Mixture with given weights, space output: Σ w_i softmax(logits_i); default w_i = 1/N.

    Adapters may target different modules; their bases must agree. Per-layer weights are not defined here.
    """
    check_compatible(adapters, same_modules=False)
    n = len(adapters)
    w = np.full(n, 1.0 / n) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) != n:
        raise ValueError(f"mixture weights must have {n} entries (one per adapter), got shape {w.shape}")
    return Mixture(list(adapters), w, {"merge_strategy": "mixture", "n_contributors": n})


def mixture_scores(probs: torch.Tensor, weights: torch.Tensor | np.ndarray) -> torch.Tensor:
    """(N, n, K) per-adapter probabilities and (N,) weights → (n, K) unnormalised class scores ``z = Σ w_i p_i``."""
    w = torch.as_tensor(np.asarray(weights, dtype=np.float32), device=probs.device)
    return torch.einsum("i,ink->nk", w, probs)


def combine_probabilities(probs: torch.Tensor, weights: torch.Tensor | np.ndarray) -> torch.Tensor:
    """(N, n, K) per-adapter probabilities and (N,) weights → (n, K) predicted distribution ``max(0, z) / Σ``
    (uniform where no mass is left); scale-free in w, unlike the search objective (module doc)."""
    mixed = mixture_scores(probs, weights).clamp_min(0.0)                        # (n, K)
    total = mixed.sum(dim=1, keepdim=True)
    uniform = torch.full_like(mixed, 1.0 / mixed.shape[1])
    return torch.where(total > 1e-12, mixed / total.clamp_min(1e-12), uniform)


# ------------------------------------------------------------------------------------------
# Batched evaluation of N adapters
# ------------------------------------------------------------------------------------------
@torch.inference_mode()
def adapter_features(foundation: Foundation, adapters: Sequence[Adapter], x: torch.Tensor, *,
                     batch_size: int = 512) -> torch.Tensor:
    """Pooled features (N, n, D) of normalised images ``x`` (n, 3, S, S) under each adapter.

    One adapter at a time with its merged weights ``W + ΔW_i`` and the fused attention kernel: on CPU this is
    ≈1.7× faster than stacking the N weight sets under ``torch.vmap`` (which needs unfused attention).
    """
    out = []
    for a in adapters:
        weights = foundation.merged_weights(a)
        out.append(torch.cat([foundation.embed(x[i:i + batch_size], weights)
                              for i in range(0, x.shape[0], batch_size)]))
    return torch.stack(out)


def adapter_probabilities(foundation: Foundation, feats: torch.Tensor, task: str, classes: Sequence[str],
                          head: dict[str, torch.Tensor] | Sequence[dict[str, torch.Tensor] | None] | None = None
                          ) -> torch.Tensor:
    """(N, n, D) features → (N, n, K) class probabilities on ``task``'s classes.

    ``head``: one linear head for all N, or one per adapter (``member_heads``); ``None`` = prototype head.
    """
    n_adapters, n, d = feats.shape
    heads = list(head) if isinstance(head, (list, tuple)) else None
    if heads is not None and len(heads) != n_adapters:
        raise ValueError(f"{len(heads)} heads for {n_adapters} adapters' features")
    if heads is not None and all(h is None for h in heads):
        head, heads = None, None
    if heads is None:
        logits = foundation.logits(feats.reshape(n_adapters * n, d), task, classes, head)
        return torch.softmax(logits, dim=1).reshape(n_adapters, n, -1)
    return torch.stack([torch.softmax(foundation.logits(f, task, classes, h), dim=1)
                        for f, h in zip(feats, heads)])


@torch.inference_mode()
def mixture_proba(foundation: Foundation, mix: Mixture, x: np.ndarray, task: str, classes: Sequence[str],
                  batch_size: int = 256) -> np.ndarray:
    """Mixture class probabilities (n, K) for images ``x`` (n, 3, S, S), uint8 or float in [0, 1]; each adapter
    scores ``task`` with its own head (``member_heads``)."""
    heads = mix.member_heads(task)
    out = []
    for start in range(0, len(x), batch_size):
        xb = foundation.normalize(torch.from_numpy(np.ascontiguousarray(x[start:start + batch_size])))
        probs = adapter_probabilities(foundation, adapter_features(foundation, mix.adapters, xb), task, classes, heads)
        out.append(combine_probabilities(probs, mix.weights))
    return torch.cat(out).cpu().numpy() if out else np.zeros((0, len(classes)), np.float32)


class ProbabilityCache:
    """Per-(adapter, proxy set) probabilities, computed batched and kept across search stages.

    Entries are keyed by the adapter's identity and the set's content hash, and remember the content of the head
    they were scored with (``member_heads`` of the adapters asked for): an adapter without its own head of a set's
    task borrows the task's average head, which changes when another contributor of the task arrives, and is
    then scored again. The cache holds a reference to each adapter so that identities stay unique.
    """

    def __init__(self) -> None:
        self._store: dict[tuple[int, str], tuple[Adapter, str | None, torch.Tensor]] = {}

    def probabilities(self, foundation: Foundation, adapters: Sequence[Adapter], data: ProxyData) -> list[torch.Tensor]:
        """For each proxy set, (N, n_s, K_s) probabilities of the N adapters (missing ones computed in one pass)."""
        out = []
        for s in data.sets:
            heads = dict(zip(map(id, adapters), member_heads(adapters, s.task)))
            digests = {i: _head_digest(h) for i, h in heads.items()}
            # a bounded proxy's sample is a prefix of its set's stratified order: probabilities of a longer prefix
            # (an earlier stage's larger share) serve it, sliced
            key, rows = (s.key, None) if s.prefix is None else (s.parent + ":prefix", s.prefix)

            def held(a: Adapter) -> bool:
                entry = self._store.get((id(a), key))
                return (entry is not None and entry[1] == digests[id(a)]
                        and (rows is None or entry[2].shape[0] >= rows))

            missing = [a for a in adapters if not held(a)]
            if missing:
                feats = adapter_features(foundation, missing, data.x[s.start:s.stop])
                probs = adapter_probabilities(foundation, feats, s.task, s.classes, [heads[id(a)] for a in missing])
                for a, p in zip(missing, probs):
                    self._store[(id(a), key)] = (a, digests[id(a)], p)
            out.append(torch.stack([self._store[(id(a), key)][2][:rows] for a in adapters]))
        return out


def _head_digest(head: dict[str, torch.Tensor] | None) -> str | None:
    """Content hash of a linear head (``None`` for the prototype head): what a cached probability was scored with."""
    if head is None:
        return None
    h = hashlib.blake2b(digest_size=12)
    for part in ("weight", "bias"):
        h.update(head[part].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def mixture_loss(probs: list[torch.Tensor], data: ProxyData,
                 to_weights: Callable[[np.ndarray], np.ndarray] = lambda w: w) -> Callable[[np.ndarray], float]:
    """MedForge's mixture objective as a function of the searched coefficients: per proxy set the mean
    cross-entropy of ``softmax(Σ w_i p_i)`` (the weighted sum as logits, ``get_mixture_loss``), then the mean over
    sets. Not scale-free: ``loss(c · w) != loss(w)`` in general (module doc).

    ``to_weights`` maps searched coefficients to weights over all N adapters (sequential: ``[a · w_prev, b]``).
    """
    def loss(c: np.ndarray) -> float:
        w = to_weights(np.asarray(c, dtype=np.float64))
        losses = [F.cross_entropy(mixture_scores(p, w), s.y) for p, s in zip(probs, data.sets)]
        return float(torch.stack(losses).mean())
    return loss


# ------------------------------------------------------------------------------------------
# Files: a dir of adapters plus mixture.json
# ------------------------------------------------------------------------------------------
def mixture_search_loss(foundation: Foundation, data: ProxyData,
                        adapters: Sequence[Adapter]) -> Callable[[np.ndarray], float]:
    """The mixture's search objective of w (``mixture_loss``): per-adapter probabilities do not depend on w, so one
    batched pass, then weighted sums (the numbers the adapters' own predictions give for each w)."""
    return mixture_loss(ProbabilityCache().probabilities(foundation, adapters, data), data)


def save_members(adapters: Sequence[Adapter], out: Path) -> list[str]:
    """Write an output-space predictor's adapters as ``out/adapter_000/ … adapter_{N-1}/`` (peft adapter dirs);
    returns their names, in order (the mixture's and the router's files list them)."""
    names = [f"adapter_{i:03d}" for i in range(len(adapters))]
    for name, a in zip(names, adapters):
        save_adapter(a, out / name)
    return names


def save_mixture(mix: Mixture, out_dir: str | Path) -> Path:
    """Write ``adapter_000/ … adapter_{N-1}/`` (peft adapter dirs) and ``mixture.json`` with the weights."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = save_members(mix.adapters, out)
    doc = {"format": "forgesim-mixture", "strategy": "mixture", "adapters": names,
           "weights": [float(w) for w in mix.weights], "base_fingerprint": mix.base_fingerprint, "meta": mix.meta}
    (out / MIXTURE_FILE).write_text(json.dumps(doc, indent=2, default=str))
    return out


def load_mixture(path: str | Path) -> Mixture:
    """Read a dir written by ``save_mixture``."""
    path = Path(path)
    try:
        doc = json.loads((path / MIXTURE_FILE).read_text())
        names, weights = doc["adapters"], doc["weights"]
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{path} is not a mixture dir (needs a readable {MIXTURE_FILE}): {exc}") from None
    return Mixture([load_adapter(path / n) for n in names], np.asarray(weights), doc.get("meta") or {})
