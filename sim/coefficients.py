"""Gradient-free search of merge coefficients on proxy data (the distilled sets the merge actor received).

MedForge (arXiv 2502.16055, official code) searches its Fusion/Mixture coefficients with nevergrad's ``NGOpt``,
budget 40, bounds ±1.5, init 0.5, minimising ``loss on distilled data + 0.05 · mean |w|`` (LoraHub's recipe,
Huang et al., arXiv 2307.13269); its paper names Shiwa and Cobyla. Here:

* ``search_coefficients(loss, init, ...)`` — nevergrad minimisation of ``loss(w) + l1 · mean|w|`` over a box,
  seeded through the parametrization's ``random_state``. The initial point is evaluated first (it counts towards
  the budget), so the result is never worse than the start; the best *evaluated* point is returned (the
  objective is deterministic) with the objective trace.
* ``batch`` (``merge.search_batch``) > 1 — the same search with nevergrad's ``num_workers=batch``: rounds of
  ``batch`` asks scored together (``batch_loss``, e.g. fusion's stacked forward, ``sim.stacked_forward``) and told in
  ask order. Deterministic per seed, but another trajectory than one-at-a-time asks (``batch`` 1, unchanged).
* ``prepare_proxy`` / ``proxy_loss`` — the cross-entropy objective: the union of distilled sets, each scored on
  its own task's classes, mean CE per set, then the mean over sets (as MedForge's ``get_loss`` does). Images are
  normalised and concatenated once, so one evaluation is one batched forward pass. With linear heads each set
  is scored with the scored adapter's head of the set's task (a candidate merge carries its pool's heads), so
  the proxy data holds no head of its own.
* ``max_images`` (``merge.proxy_images``) > 0 — a bounded proxy: when the received sets hold more images than that,
  each set contributes an equal share of them (``proxy_quota``), the first rows of one seeded, class-interleaved order
  of its images (``stratified_order``, drawn from the set's content hash alone). The objective is then a stratified
  estimate of the same mean over sets (every set still weighs 1 / n_sets, every class of a set is drawn in turn), so
  a stage's cost stops growing with the number of contributors; a set's sample only shrinks as more sets arrive (a
  prefix of the same order), which lets per-set caches (the mixture's probabilities) serve every later stage.
"""
from __future__ import annotations

import hashlib
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from sim.data.base import DistilledSet
from sim.model import Adapter, Foundation
from sim.optimizers import OPTIMIZERS, get_optimizer, parallel_problem  # noqa: F401 - re-exported

def l1_penalty(w: np.ndarray, l1: float) -> float:
    """``l1 · mean |w|`` — MedForge's ``get_regular`` (0.05 · mean of absolute coefficients)."""
    return float(l1 * np.mean(np.abs(w))) if np.size(w) else 0.0


@dataclass
class SearchResult:
    """Best coefficients found, their objective, and the objective of every evaluation in order."""

    coefficients: np.ndarray
    objective: float
    initial_objective: float
    trace: list[float]
    optimizer: str
    budget: int
    seed: int
    search_s: float

    def record(self) -> dict:
        return {"optimizer": self.optimizer, "budget": self.budget, "evaluations": len(self.trace),
                "objective": self.objective, "initial_objective": self.initial_objective, "search_s": self.search_s}


def search_coefficients(loss: Callable[[np.ndarray], float], init: np.ndarray, *, optimizer: str = "NGOpt",
                        budget: int = 40, bound: float = 1.5, l1: float = 0.05, seed: int = 0,
                        penalised: Callable[[np.ndarray], np.ndarray] | None = None, batch: int = 1,
                        batch_loss: Callable[[np.ndarray], Sequence[float]] | None = None) -> SearchResult:
    """Minimise ``loss(w) + l1 · mean|w|`` over w in [-bound, bound]^shape(init), ``budget`` evaluations.

    Args:
        loss: data loss of coefficients shaped like ``init`` (e.g. cross-entropy on proxy data).
        init: start point (MedForge: 0.5 each); clipped into the box and evaluated first.
        optimizer: nevergrad optimizer name (``get_optimizer``).
        budget: total evaluations, the initial point included.
        bound: half-width of the search box.
        l1: weight of the L1 penalty.
        seed: seeds the optimizer (``parametrization.random_state``).
        penalised: maps w to the coefficients the L1 penalty is taken on (default w itself; MedForge's
            sequential Mixture penalises the weights over all contributors, ``[a · w_prev, b]``).
        batch: candidates asked together (``merge.search_batch``). 1: one ``ask`` / ``tell`` at a time. B > 1: the
            optimizer is built with ``num_workers=B`` (nevergrad's setting for B evaluations in flight), B candidates
            are asked, scored together and told in ask order; the initial point is scored with the first ones.
        batch_loss: ``loss`` of C candidates at once, W (C, *shape(init)) → (C,) (e.g. one stacked forward);
            default: ``loss`` on each. Used only with ``batch`` > 1.
    Returns:
        ``SearchResult`` with the best evaluated coefficients (shaped like ``init``) and the objective trace.
    """
    import nevergrad as ng

    if budget < 1:
        raise ValueError(f"merge.budget must be an integer >= 1, got {budget!r}")
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
        raise ValueError(f"merge.search_batch must be an integer >= 1, got {batch!r}")
    opt_cls = get_optimizer(optimizer)
    t0 = time.perf_counter()
    init = np.clip(np.asarray(init, dtype=np.float64), -bound, bound)

    def objective(w: np.ndarray) -> float:
        value = float(loss(w)) + l1_penalty(penalised(w) if penalised is not None else w, l1)
        return value if np.isfinite(value) else float("inf")

    if batch != 1:
        return _search_batched(objective, loss, batch_loss, init, opt_cls, optimizer, budget, bound, l1, seed,
                               penalised, batch, t0)
    best_w, best = init.copy(), objective(init)
    trace = [best]
    if budget > 1:
        param = ng.p.Array(init=init, lower=-bound, upper=bound)
        param.random_state = np.random.RandomState(seed % 2**32)
        opt = opt_cls(parametrization=param, budget=budget - 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # nevergrad/scipy chatter about bounds and injected points
            for _ in range(budget - 1):
                cand = opt.ask()
                value = objective(cand.value)
                opt.tell(cand, value)
                trace.append(value)
                if value < best:
                    best, best_w = value, np.array(cand.value, dtype=np.float64)
    return SearchResult(best_w, best, trace[0], trace, optimizer, budget, seed, time.perf_counter() - t0)


def _search_batched(objective: Callable[[np.ndarray], float], loss: Callable[[np.ndarray], float],
                    batch_loss: Callable[[np.ndarray], Sequence[float]] | None, init: np.ndarray, opt_cls: type,
                    optimizer: str, budget: int, bound: float, l1: float, seed: int,
                    penalised: Callable[[np.ndarray], np.ndarray] | None, batch: int, t0: float) -> SearchResult:
    """``search_coefficients`` with ``batch`` > 1: rounds of ``batch`` asks (the first round also scores the initial
    point), each round scored together (``batch_loss``) and told in ask order. The budget counts evaluations as in
    the one-at-a-time search; the last round holds what is left of it."""
    import nevergrad as ng

    def objectives(points: list[np.ndarray]) -> list[float]:
        stack = np.stack(points)
        data = batch_loss(stack) if batch_loss is not None else [loss(w) for w in stack]
        out = []
        for w, value in zip(stack, data):
            value = float(value) + l1_penalty(penalised(w) if penalised is not None else w, l1)
            out.append(value if np.isfinite(value) else float("inf"))
        return out

    best_w, best, trace = init.copy(), float("inf"), []
    param = ng.p.Array(init=init, lower=-bound, upper=bound)
    param.random_state = np.random.RandomState(seed % 2**32)
    opt = opt_cls(parametrization=param, budget=max(budget - 1, 1), num_workers=batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nevergrad/scipy chatter about bounds and injected points
        left = budget - 1
        while not trace or left > 0:
            cands = [opt.ask() for _ in range(min(batch, left))]
            points = ([init] if not trace else []) + [np.asarray(c.value, dtype=np.float64) for c in cands]
            values = objectives(points)
            if not trace:
                best = values[0]
                trace.append(best)
                values = values[1:]
            for cand, w, value in zip(cands, points[-len(cands):] if cands else [], values):
                opt.tell(cand, value)
                trace.append(value)
                if value < best:
                    best, best_w = value, w.copy()
            left -= len(cands)
    return SearchResult(best_w, best, trace[0], trace, optimizer, budget, seed, time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------
# Proxy data and the cross-entropy objective
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProxySet:
    """One distilled set inside ``ProxyData``: rows ``start:stop`` of its images, scored on ``classes``.

    ``key`` names the rows held (a sample's key differs from its whole set's); ``parent`` is the whole set's content
    hash (``set_key``); ``prefix``, for a bounded proxy's sample, the number of rows held: the first ``prefix`` rows
    of the set's ``stratified_order`` (``None``: the whole set in its own order)."""

    task: str
    classes: tuple[str, ...]
    start: int
    stop: int
    y: torch.Tensor
    key: str
    parent: str = ""
    prefix: int | None = None


@dataclass
class ProxyData:
    """The union of distilled sets, normalised for the foundation and concatenated: x (n, 3, S, S)."""

    x: torch.Tensor
    sets: list[ProxySet] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.x.shape[0])


def set_key(ds: DistilledSet) -> str:
    """Content hash of a distilled set (task, classes, images, labels): caches per-set results."""
    h = hashlib.blake2b(digest_size=12)
    h.update(repr((ds.task, ds.classes, ds.x.shape)).encode())
    h.update(np.ascontiguousarray(ds.x).tobytes())
    h.update(np.ascontiguousarray(ds.y).tobytes())
    return h.hexdigest()


def stratified_order(ds: DistilledSet, key: str | None = None) -> np.ndarray:
    """The rows of ``ds`` in the order a bounded proxy takes them: each class's rows in a seeded random order, the
    classes interleaved (one row of each class in turn, from a seeded first class; a class that runs out drops
    out), so every prefix is as class-balanced as the set allows. Drawn from the set's content hash (``key``,
    default ``set_key(ds)``) alone: the same set gives the same order in every run, stage and contributor order."""
    key = key or set_key(ds)
    rng = np.random.default_rng(int(key[:16], 16))
    classes = np.unique(ds.y)
    per_class = [rng.permutation(np.flatnonzero(ds.y == c)) for c in classes]
    shift = int(rng.integers(len(per_class))) if per_class else 0
    per_class = per_class[shift:] + per_class[:shift]
    longest = max((len(p) for p in per_class), default=0)
    return np.array([p[j] for j in range(longest) for p in per_class if j < len(p)], dtype=np.int64)


def proxy_quota(sizes: Sequence[int], max_images: int) -> list[int]:
    """Rows each set contributes to a proxy of at most ``max_images`` images (``0``: every row of every set).

    Within the bound every set is kept whole; beyond it, each set gets an equal share ⌊max_images / n_sets⌋ (at
    least one row; a set smaller than its share keeps all its rows, and what it leaves is not handed to others, so
    a set's share depends only on how many sets there are)."""
    if max_images < 0:
        raise ValueError(f"max_images must be >= 0, got {max_images}")
    nonempty = [s for s in sizes if s > 0]
    if max_images == 0 or sum(nonempty) <= max_images:
        return list(sizes)
    share = max(1, max_images // len(nonempty))
    return [min(s, share) for s in sizes]


def prepare_proxy(foundation: Foundation, proxy: Sequence[DistilledSet], max_images: int = 0) -> ProxyData:
    """Check, normalise and concatenate the distilled sets once (scored with whichever adapter is evaluated);
    ``max_images`` > 0 bounds the proxy by a stratified sample of every set (module doc, ``proxy_quota``)."""
    if len(proxy) == 0:
        raise ValueError("coefficient search needs proxy data (at least one distilled set)")
    for ds in proxy:
        if ds.x.shape[-1] != foundation.img_size or ds.x.shape[-2] != foundation.img_size:
            raise ValueError(f"proxy set of task {ds.task!r} has {ds.x.shape[-1]} px images; "
                             f"the foundation takes {foundation.img_size} px")
    quota = proxy_quota([len(ds) for ds in proxy], max_images)
    xs, sets, start = [], [], 0
    for ds, q in zip(proxy, quota):
        if len(ds) == 0:
            continue
        key = set_key(ds)
        if q < len(ds):
            rows = stratified_order(ds, key)[:q]
            x, y_np, parent, held = ds.x[rows], ds.y[rows], key, q
            key = f"{key}:{q}"
        else:
            x, y_np, parent, held = ds.x, ds.y, key, None
        xs.append(foundation.normalize(torch.from_numpy(np.ascontiguousarray(x))))
        y = torch.from_numpy(y_np.astype(np.int64)).to(foundation.device)
        sets.append(ProxySet(ds.task, tuple(ds.classes), start, start + len(y_np), y, key, parent, held))
        start += len(y_np)
    if not sets:
        raise ValueError("coefficient search needs proxy data; all distilled sets are empty")
    return ProxyData(torch.cat(xs), sets)


@torch.inference_mode()
def proxy_features(foundation: Foundation, data: ProxyData, weights: dict[str, torch.Tensor] | None = None,
                   batch_size: int = 512) -> torch.Tensor:
    """Pooled features (n, D) of all proxy images; ``weights`` replace frozen ones (``Foundation.merged_weights``)."""
    out = []
    for i in range(0, len(data), batch_size):
        xb = data.x[i:i + batch_size]                                            # (b, 3, S, S), normalised
        out.append(foundation.embed(xb, weights))
    return torch.cat(out)


def features_cross_entropy(foundation: Foundation, data: ProxyData, feats: torch.Tensor,
                           adapter: Adapter | None = None) -> float:
    """Mean over sets of the mean cross-entropy of each set's images on its own task's classes, scored with
    ``adapter``'s linear head of the set's task (``Adapter.head_for``) or, without linear heads, the prototypes."""
    losses = []
    for s in data.sets:
        head = adapter.head_for(s.task) if adapter is not None else None
        logits = foundation.logits(feats[s.start:s.stop], s.task, s.classes, head)
        losses.append(F.cross_entropy(logits, s.y))
    return float(torch.stack(losses).mean())


def proxy_loss(foundation: Foundation, data: ProxyData, adapter: Adapter | None) -> float:
    """Cross-entropy on the proxy data of foundation + ``adapter`` (one batched forward pass), with its heads."""
    weights = foundation.merged_weights(adapter) if adapter is not None else None
    return features_cross_entropy(foundation, data, proxy_features(foundation, data, weights), adapter)


def probabilities_cross_entropy(probs: Sequence[torch.Tensor], data: ProxyData, eps: float = 1e-8) -> float:
    """Mean over sets of ``-mean log q_y`` for class probabilities ``probs[k]`` (n_k, K_k) of set k."""
    losses = [-torch.log(p.gather(1, s.y[:, None]).clamp_min(eps)).mean() for p, s in zip(probs, data.sets)]
    return float(torch.stack(losses).mean())
