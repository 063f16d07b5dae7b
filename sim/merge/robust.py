"""Robust aggregation in ΔW space: merges that bound what a few contributors can do to main.

* ``median`` — Yin et al., "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates", ICML 2018
  (arXiv 1803.01498): per entry, the median of the contributors' ΔW_i.
* ``trimmed_mean`` — Yin et al. 2018, the coordinate-wise β-trimmed mean: per entry, the ⌊β N⌋ largest and the
  ⌊β N⌋ smallest values removed, the rest averaged.
* ``clipped_mean`` — norm clipping, Sun et al., "Can You Really Backdoor Federated Learning?", arXiv 1911.07963
  (2019): each contributor's whole update (every module) scaled to a norm at most τ, then averaged.

The median and the trimmed mean are order statistics of every entry over the N contributors, which no low-rank
shortcut gives: they are formed through row blocks of every ΔW_i at once (``streamed.row_blocks``), so a module
needs one buffer of N × ``streamed.ROWS`` rows, never N dense updates (N = 50 at ViT-B/16's qkv: 5 MB instead of
50 × 7 MB), and each block is ordered per entry by a selection network of elementwise min/max (``trimmed_block``, compiled
in ``kernels``).
The clipped mean is a weighted sum with one factor per contributor, exact in the stacked factors
(``delta.weighted_sum``), and its norms come from the factors (no dense ΔW). Results are the smallest exact LoRA
factors of their numerical rank (``base.dense_factors``), as the other ΔW-space merges.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import numpy as np
import torch

from sim.merge.base import Weights, build_adapter, check_compatible, dense_factors, resolve_weights
from sim.merge.delta import weighted_sum
from sim.merge.specs import ROBUST_SCALE, TRIM_FRACTION
from sim.merge.streamed import row_blocks, stack_module
from sim.model import Adapter


@functools.lru_cache(maxsize=64)
def selection_network(n: int, lo: int, hi: int) -> tuple[tuple[int, int], ...]:
    """Compare-exchange pairs (i, j), i < j, that leave positions lo..hi of n values sorted in place.

    Batcher's odd-even merge sort (Batcher, "Sorting networks and their applications", AFIPS 1968) on the next power
    of two, minus the comparators that touch a padding position (padding is +inf, which never moves) and, read
    backwards, those none of the wanted positions depend on. n = 50, the median: 330 comparators (403 sort all).
    """
    size = 1 << max(n - 1, 0).bit_length()
    pairs: list[tuple[int, int]] = []

    def merge(first: int, last: int, r: int) -> None:          # merge the two sorted halves of first..last, stride r
        step = 2 * r
        if step < last - first:
            merge(first, last, step)
            merge(first + r, last, step)
            pairs.extend((i, i + r) for i in range(first + r, last - r, step))
        else:
            pairs.append((first, first + r))

    def sort(first: int, last: int) -> None:
        if last > first:
            mid = first + (last - first) // 2
            sort(first, mid)
            sort(mid + 1, last)
            merge(first, last, 1)

    sort(0, size - 1)
    need, kept = set(range(lo, hi + 1)), []
    for i, j in reversed([(i, j) for i, j in pairs if j < n]):
        if i in need or j in need:
            kept.append((i, j))
            need |= {i, j}
    return tuple(reversed(kept))


def trimmed_block(x: torch.Tensor, k: int) -> torch.Tensor:
    """The mean over dim 0 of ``x`` (N, rows, in) without its k smallest and k largest values per entry (rows, in).

    Per entry the values are ordered by a selection network of elementwise min/max over the N planes
    (``selection_network``), run by ``kernels.network_block`` on chunks of entries that stay in the core's cache
    (on CPU several times faster than ``torch.sort``/``kthvalue`` along the contributor axis, or than the network
    as torch passes), and exact, ties included. The kept values are then summed in ascending order, so the result
    does not depend on the contributors' order at all and no outlier enters a sum. N − 2k = 2 gives (lo + hi) / 2,
    the even-N median of numpy (``torch.median`` would give lo).
    """
    from sim.merge.kernels import network_block          # numba (~70 MB) only in a process that merges

    n = x.shape[0]
    if k == 0:
        return x.mean(0)
    return network_block(x, _network_pairs(n, k), k)


@functools.lru_cache(maxsize=64)
def _network_pairs(n: int, k: int) -> np.ndarray:
    """``selection_network(n, k, n - 1 - k)`` as a (P, 2) int64 array."""
    return np.array(selection_network(n, k, n - 1 - k), dtype=np.int64).reshape(-1, 2)


def _coordinatewise(adapters: Sequence[Adapter], weights: Weights, k: int, strategy: str) -> Adapter:
    """Per module, ``trimmed_block`` of the weighted updates w_i ΔW_i over every row block, back as LoRA factors."""
    modules = adapters[0].modules()
    w = resolve_weights(weights, len(adapters), len(modules), ROBUST_SCALE)
    factors = {}
    for j, m in enumerate(modules):
        sb, a = stack_module(adapters, m, w[:, j])                   # (N, out, r), (N, r, in): SB_i A_i = w_i ΔW_i
        merged = torch.empty(sb.shape[1], a.shape[2])                # (out, in)
        for r0, x in row_blocks(sb, a):                              # x (N, rows, in), a reused buffer
            merged[r0:r0 + x.shape[1]] = trimmed_block(x, k)
        fa, fb = dense_factors(merged)
        factors[m] = (fa, fb, 1.0)
    return build_adapter(factors, adapters, strategy)


def median(adapters: Sequence[Adapter], weights: Weights = None) -> Adapter:
    """Coordinate-wise median (Yin et al. 2018), space ΔW: per entry the median of the w_i ΔW_i.

    Even N: the mean of the two middle values (numpy's ``median``, the usual definition; ``torch.median`` would
    return the lower one). A weight scales its contributor's update before the median, as MagMax's do; the
    default 1 each is the paper's unweighted median (a branch's staleness weighting then shrinks a stale update
    towards 0 before it is ranked). One contributor: its own update.
    """
    check_compatible(adapters)
    n = len(adapters)
    return _coordinatewise(adapters, weights, (n - 1) // 2, "median")


def check_trim(trim: float | None) -> float:
    """``trim``, or ``TRIM_FRACTION`` when ``None``; one clear error outside [0, 0.5)."""
    b = TRIM_FRACTION if trim is None else float(trim)
    if not 0 <= b < 0.5:
        raise ValueError(f"trim (merge.trim) must be a fraction in [0, 0.5) removed from each end, got {trim!r}")
    return b


def trimmed_mean(adapters: Sequence[Adapter], weights: Weights = None, *, trim: float | None = None) -> Adapter:
    """Coordinate-wise β-trimmed mean (Yin et al. 2018), space ΔW: per entry, of the w_i ΔW_i the ⌊β N⌋ largest
    and ⌊β N⌋ smallest are removed and the other N − 2⌊β N⌋ averaged.

    ``trim`` β (default 0.1, ``specs.TRIM_FRACTION``): Yin et al.'s rate holds when β is at least the share of
    Byzantine contributors; 0.1 guards a community with up to 10 % of them and removes 5 of 50 updates at each end.
    With ⌊β N⌋ = 0 (e.g. N < 10 at 0.1) it is the mean. Weights as in ``median`` (default 1 each: the paper's).
    """
    check_compatible(adapters)
    n = len(adapters)
    k = math.floor(check_trim(trim) * n + 1e-9)            # ⌊β N⌋, robust to 0.29 × 100 = 28.999…
    return _coordinatewise(adapters, weights, k, "trimmed_mean")


def update_norm(adapter: Adapter) -> float:
    """‖ΔW‖ over every module (Frobenius), from the factors: ‖s B A‖² = s² Σ (BᵀB) ⊙ (A Aᵀ), in float64."""
    total = 0.0
    for m in adapter.modules():
        a, b = (t.double() for t in adapter.factors(m))
        total += adapter.scaling(m) ** 2 * float(((b.T @ b) * (a @ a.T)).sum())
    return math.sqrt(max(total, 0.0))


def clipped_mean(adapters: Sequence[Adapter], weights: Weights = None, *, clip_norm: float = 0.0) -> Adapter:
    """Norm clipping (Sun et al. 2019), space ΔW: Σ w_i c_i ΔW_i, c_i = min(1, τ / ‖ΔW_i‖), ‖·‖ over every module.

    Each contributor's whole update is scaled to a norm at most τ (its direction kept), then the weighted sum is
    taken exactly (``delta.weighted_sum``); default weights 1/N, Sun et al.'s mean of the clipped updates (a weight
    applies after the clip, so a large weight is not clipped away). ``clip_norm`` τ > 0 is a fixed bound (Sun et
    al. tune it per task); 0 (the default) takes τ = the median of the contributors' norms (even N: the mean of
    the two middle ones), a common adaptive choice, so that a boosted update cannot move main more than a typical
    one while at least half of the updates pass unchanged. One contributor: τ is its own norm, so it is unchanged.
    """
    check_compatible(adapters)
    if not (isinstance(clip_norm, (int, float)) and math.isfinite(clip_norm) and clip_norm >= 0):
        raise ValueError(f"clip norm (merge.clip_norm) must be a number >= 0 (0: the median of the contributors' "
                         f"norms), got {clip_norm!r}")
    norms = np.array([update_norm(a) for a in adapters])
    tau = float(np.median(norms)) if clip_norm == 0 else float(clip_norm)
    c = np.ones_like(norms)
    np.divide(tau, norms, out=c, where=norms > tau)               # c_i = τ / ‖ΔW_i‖ only where clipped (never 0/0)
    w = resolve_weights(weights, len(adapters), len(adapters[0].modules()), None)
    return weighted_sum(adapters, w * torch.as_tensor(c, dtype=torch.float32)[:, None], "clipped_mean")
