"""Merges in ΔW space: each contributor's update ``ΔW_i = B_i A_i · alpha_i / r_i`` (out, in) is formed per module.

* ``task_arithmetic`` — Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023 (arXiv 2212.04089):
  Σ w_i ΔW_i.
* ``ties`` — Yadav et al., "TIES-Merging", NeurIPS 2023 (arXiv 2306.01708): trim, elect sign, disjoint mean.
* ``dare_linear`` / ``dare_ties`` — Yu et al., "Language Models are Super Mario" (DARE), ICML 2024
  (arXiv 2311.03099): random drop with rescaling, then a weighted sum / TIES.
* ``magnitude_prune`` — magnitude trimming of each ΔW_i, then the weighted sum.
* ``magmax`` — Marczak et al., "MagMax", ECCV 2024 (arXiv 2407.06322): per entry, the update of largest magnitude.

``ties``, ``dare_*`` and ``magnitude_prune`` are peft's own ``peft.utils.merge_utils`` functions applied to the
ΔW_i of each module (peft's ``add_weighted_adapter`` applies them to the A and B factors instead, except in its
``*_svd`` combination types). ``density`` is the fraction of entries each ΔW_i keeps, per module.

The dense results are generically of full rank, so they are written back as exact LoRA factors of rank
min(out, in) (``base.dense_factors``: ΔW and an identity factor, scaling 1).
"""
from __future__ import annotations

import warnings
from typing import Callable, Sequence

import torch
from peft.utils import merge_utils

from sim.data.base import derive_seed
from sim.merge.base import Weights, build_adapter, check_compatible, dense_factors, resolve_weights
from sim.merge.specs import PLAIN_WEIGHT  # TIES, DARE-TIES and MagMax's default weight (λ = 1, not 1/N)
from sim.model import Adapter

def _merge_deltas(adapters: Sequence[Adapter], weights: Weights, default: float | None, strategy: str,
                  merge_module: Callable[[list[torch.Tensor], torch.Tensor, str], torch.Tensor]) -> Adapter:
    """Form the ΔW_i of every module, merge them with ``merge_module(deltas, w (N,), module)``, refactor."""
    check_compatible(adapters)
    modules = adapters[0].modules()
    w = resolve_weights(weights, len(adapters), len(modules), default)
    factors = {}
    for j, m in enumerate(modules):
        deltas = [a.delta(m) for a in adapters]                 # N × (out, in)
        merged = merge_module(deltas, w[:, j], m)                # (out, in)
        del deltas
        a, b = dense_factors(merged)
        factors[m] = (a, b, 1.0)
    return build_adapter(factors, adapters, strategy)


def _peft(fn: Callable, density: float, seed: int | None = None) -> Callable:
    """Wrap a ``merge_utils`` function as ``merge_module``; DARE's random drop is seeded per module."""
    def merge_module(deltas: list[torch.Tensor], w: torch.Tensor, module: str) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The density .* no pruning will be performed")
            if seed is None:
                return fn(deltas, w, density)
            # merge_utils.random_pruning draws from the global RNG: fork it so the merge is a pure function of seed
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derive_seed(seed, "dare", module))
                return fn(deltas, w, density)
    return merge_module


def task_arithmetic(adapters: Sequence[Adapter], weights: Weights = None) -> Adapter:
    """Task arithmetic (Ilharco et al. 2023), space ΔW: Σ w_i ΔW_i, exactly.

    Args:
        adapters: N adapters with the same modules and shapes (ranks may differ).
        weights: (N,) or (N, M); default 1/N (the mean update).
    Returns:
        The exact sum as LoRA factors, scaling 1: the stacked factors ``B = [w_1 s_1 B_1 … w_N s_N B_N]``,
        ``A = [A_1; …; A_N]`` (rank Σ r_i) while Σ r_i < min(out, in), else the dense sum (rank min(out, in)).
    """
    check_compatible(adapters)
    modules = adapters[0].modules()
    w = resolve_weights(weights, len(adapters), len(modules), None)
    factors = {}
    for j, m in enumerate(modules):
        a_cat = torch.cat([a.factors(m)[0].float() for a in adapters], dim=0)                     # (R, in)
        b_cat = torch.cat([wi * a.scaling(m) * a.factors(m)[1].float()                            # (out, R)
                           for wi, a in zip(w[:, j].tolist(), adapters)], dim=1)
        if a_cat.shape[0] < min(b_cat.shape[0], a_cat.shape[1]):
            factors[m] = (a_cat, b_cat, 1.0)
        else:
            a, b = dense_factors(b_cat @ a_cat)
            factors[m] = (a, b, 1.0)
    return build_adapter(factors, adapters, "task_arithmetic")


def ties(adapters: Sequence[Adapter], weights: Weights = None, *, density: float = 0.5) -> Adapter:
    """TIES-Merging (Yadav et al. 2023), space ΔW, via ``peft.utils.merge_utils.ties`` per module.

    Each ΔW_i keeps its ``density`` largest-magnitude entries; the sign with the larger total mass wins per
    entry; entries agreeing with it are weighted by w_i and averaged over the contributors that agree.
    Default weights 1 (the paper's λ = 1; the disjoint mean already averages).
    """
    return _merge_deltas(adapters, weights, PLAIN_WEIGHT, "ties", _peft(merge_utils.ties, density))


def dare_linear(adapters: Sequence[Adapter], weights: Weights = None, *, density: float = 0.5,
                seed: int = 0) -> Adapter:
    """DARE (Yu et al. 2024) + weighted sum, space ΔW, via ``merge_utils.dare_linear`` per module.

    Each entry of ΔW_i is kept with probability ``density`` and rescaled by 1/density (seeded per module
    from ``seed``), then Σ w_i. Default weights 1/N.
    """
    return _merge_deltas(adapters, weights, None, "dare_linear", _peft(merge_utils.dare_linear, density, seed))


def dare_ties(adapters: Sequence[Adapter], weights: Weights = None, *, density: float = 0.5,
              seed: int = 0) -> Adapter:
    """DARE drop-and-rescale, then TIES sign election and disjoint mean, space ΔW, via ``merge_utils.dare_ties``.

    Default weights 1, as for ``ties``.
    """
    return _merge_deltas(adapters, weights, PLAIN_WEIGHT, "dare_ties",
                         _peft(merge_utils.dare_ties, density, seed))


def magnitude_prune(adapters: Sequence[Adapter], weights: Weights = None, *, density: float = 0.5) -> Adapter:
    """Magnitude pruning of each ΔW_i to ``density``, then Σ w_i, via ``merge_utils.magnitude_prune``.

    Default weights 1/N.
    """
    return _merge_deltas(adapters, weights, None, "magnitude_prune", _peft(merge_utils.magnitude_prune, density))


def _magmax_module(adapters: Sequence[Adapter], module: str, w: torch.Tensor, rows: int = 128) -> torch.Tensor:
    """Per entry, the w_i ΔW_i of largest magnitude (the earliest contributor wins exact ties).

    Works through ΔW in blocks of ``rows`` output rows, so each block of every w_i ΔW_i is formed from the factors
    while the running maximum stays in cache (N dense ΔW_i are never held at once).
    """
    factors = [(a.factors(module)[0].float(), a.factors(module)[1].float() * a.scaling(module)) for a in adapters]
    out_f, in_f = factors[0][1].shape[0], factors[0][0].shape[1]
    best_all = torch.empty(out_f, in_f)
    for r0 in range(0, out_f, rows):
        best = best_all[r0:r0 + rows]                                            # (b, in), a view
        a0, b0 = factors[0]
        torch.mm(w[0] * b0[r0:r0 + rows], a0, out=best)
        best_abs = best.abs()
        cur, cur_abs = torch.empty_like(best), torch.empty_like(best)
        take = torch.empty_like(best, dtype=torch.bool)
        for wi, (a, b) in zip(w[1:], factors[1:]):
            torch.mm(wi * b[r0:r0 + rows], a, out=cur)
            torch.abs(cur, out=cur_abs)
            torch.gt(cur_abs, best_abs, out=take)
            best.copy_(torch.where(take, cur, best))
            torch.maximum(cur_abs, best_abs, out=best_abs)
    return best_all


def magmax(adapters: Sequence[Adapter], weights: Weights = None) -> Adapter:
    """MagMax (Marczak et al. 2024), space ΔW: per entry, the w_i ΔW_i of largest magnitude across contributors.

    Weights scale each ΔW_i before the selection (a negative weight flips a task vector); default 1, the
    paper's plain selection. Invariant to the order of contributors except for entries of exactly equal
    magnitude, where the earliest wins.
    """
    check_compatible(adapters)
    modules = adapters[0].modules()
    w = resolve_weights(weights, len(adapters), len(modules), PLAIN_WEIGHT)
    factors = {}
    for j, m in enumerate(modules):
        a, b = dense_factors(_magmax_module(adapters, m, w[:, j]))
        factors[m] = (a, b, 1.0)
    return build_adapter(factors, adapters, "magmax")
