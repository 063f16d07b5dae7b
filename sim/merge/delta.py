"""Merges in ΔW space: each contributor's update ``ΔW_i = B_i A_i · alpha_i / r_i`` (out, in) is formed per module.

* ``task_arithmetic`` — Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023 (arXiv 2212.04089):
  Σ w_i ΔW_i.
* ``ties`` — Yadav et al., "TIES-Merging", NeurIPS 2023 (arXiv 2306.01708): trim, elect sign, disjoint sum (FusionBench) or mean (the paper); the
  trim ranks the whole task vector (all modules) of each contributor, as the paper does, or each module alone.
* ``dare_linear`` / ``dare_ties`` — Yu et al., "Language Models are Super Mario" (DARE), ICML 2024
  (arXiv 2311.03099): random drop with rescaling, then a weighted sum / TIES' sign election and disjoint mean.
* ``magnitude_prune`` — magnitude trimming of each ΔW_i, then the weighted sum.
* ``magmax`` — Marczak et al., "MagMax", ECCV 2024 (arXiv 2407.06322): per entry, the update of largest magnitude.

Default scales and densities are the published ones (``sim.merge.specs``: FusionBench's ViT-B/32 configs); a
``None`` option takes its strategy's default. ``dare_*`` and ``magnitude_prune`` follow the definitions of peft's
``peft.utils.merge_utils`` functions applied to the ΔW_i of each module (peft's ``add_weighted_adapter`` applies
them to the A and B factors instead, except in its ``*_svd`` combination types). TIES, DARE and magnitude pruning
stream ΔW through row blocks of every contributor at once, with exact trims found without sorting
(``sim.merge.streamed``). Results are written back as the smallest exact LoRA factors of their numerical rank
(``base.dense_factors``).
"""
from __future__ import annotations

from typing import Sequence

import torch

from sim.data.base import derive_seed
from sim.merge.base import Weights, build_adapter, check_compatible, check_density, dense_factors, resolve_weights
from sim.merge.specs import (DARE_DENSITY, DARE_LINEAR_SCALE, DARE_TIES_SCALE, MAGMAX_SCALE, PRUNE_DENSITY, TA_SCALE,
                             TIES_DENSITY, TIES_DISJOINT, TIES_SCALE, TIES_SCOPES)
from sim.merge.streamed import dropped_merge, stack_module, trimmed_merge
from sim.model import Adapter

ROWS = 128   # MagMax: output rows of ΔW formed at a time, so N blocks of (ROWS, in) stay small at N = 50


def task_arithmetic(adapters: Sequence[Adapter], weights: Weights = None) -> Adapter:
    """Task arithmetic (Ilharco et al. 2023), space ΔW: Σ w_i ΔW_i, exactly.

    Args:
        adapters: N adapters with the same modules and shapes (ranks may differ).
        weights: (N,) or (N, M); default λ = 0.3 each (FusionBench's ``task_arithmetic.yaml`` scaling_factor for
            ViT-B/32: θ = θ_0 + λ Σ τ_i).
    Returns:
        The exact sum as LoRA factors, scaling 1: the stacked factors ``B = [w_1 s_1 B_1 … w_N s_N B_N]``,
        ``A = [A_1; …; A_N]`` (rank Σ r_i) while Σ r_i < min(out, in), else the sum at its numerical rank.
    """
    check_compatible(adapters)
    w = resolve_weights(weights, len(adapters), len(adapters[0].modules()), TA_SCALE)
    return weighted_sum(adapters, w, "task_arithmetic")


def weighted_sum(adapters: Sequence[Adapter], w: torch.Tensor, strategy: str) -> Adapter:
    """Σ w_ij ΔW_ij per module j exactly, space ΔW (``w`` (N, M) resolved): the stacked factors while the stacked
    rank Σ r_i < min(out, in), else the sum at its numerical rank; ``strategy`` names the result (task arithmetic,
    and ``robust.clipped_mean`` once it has scaled each update)."""
    modules = adapters[0].modules()
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
    return build_adapter(factors, adapters, strategy)


# ------------------------------------------------------------------------------------------
# TIES, DARE and magnitude pruning: streamed through row blocks with exact trims (sim.merge.streamed)
# ------------------------------------------------------------------------------------------
def _stacks(adapters: Sequence[Adapter]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [stack_module(adapters, m) for m in adapters[0].modules()]


def _refactor(adapters: Sequence[Adapter], merged: list[torch.Tensor], strategy: str) -> Adapter:
    factors = {}
    for m, delta in zip(adapters[0].modules(), merged):
        a, b = dense_factors(delta)
        factors[m] = (a, b, 1.0)
    return build_adapter(factors, adapters, strategy)


def ties(adapters: Sequence[Adapter], weights: Weights = None, *, density: float | None = None,
         scope: str = "global", disjoint: str = "sum") -> Adapter:
    """TIES-Merging (Yadav et al. 2023), space ΔW.

    Each contributor keeps the ``density`` (default 0.2, the paper's top-k = 20 %) largest-magnitude entries of
    its task vector — every entry with |x| ≥ the k-th largest |x|, k = int(density · size), ties included
    (FusionBench's ``topk_values_mask`` ``>=``) — ranked over all its modules (``scope="global"``, the paper's, and
    FusionBench's ``ties_merging``) or within each module (``"module"``, what peft's ``merge_utils.ties`` does per
    tensor); the sign with the larger total mass wins per entry (0 → +, as peft's
    ``calculate_majority_sign_mask``); the agreeing entries, weighted by w_i, are summed (``disjoint="sum"``,
    FusionBench's ``merge_func: sum`` default, so that the default λ = 0.3 (FusionBench's ViT-B/32
    scaling_factor) means what it means there: θ = θ_0 + 0.3 · Σ agreeing τ_i) or averaged over the contributors
    that agree (``"mean"``, the paper's eq. for τ_m and peft's ``disjoint_merge``; the paper's untuned λ is then 1,
    so pass weights 1 with it). The k-th magnitudes are found exactly without sorting (``sim.merge.streamed``).
    """
    if disjoint not in TIES_DISJOINT:
        raise ValueError(f"ties disjoint merge (merge.ties_disjoint) must be one of {', '.join(TIES_DISJOINT)}, "
                         f"got {disjoint!r}")
    if scope not in TIES_SCOPES:
        raise ValueError(f"ties scope (merge.ties_scope) must be one of {', '.join(TIES_SCOPES)}, got {scope!r}")
    check_compatible(adapters)
    d = check_density(density, TIES_DENSITY)
    w = resolve_weights(weights, len(adapters), len(adapters[0].modules()), TIES_SCALE)
    merged = trimmed_merge(_stacks(adapters), w, d, scope, f"ties_{disjoint}")
    return _refactor(adapters, merged, "ties")


def _dare_seeds(adapters: Sequence[Adapter], seed: int) -> list[int]:
    return [derive_seed(seed, "dare", m) for m in adapters[0].modules()]


def dare_linear(adapters: Sequence[Adapter], weights: Weights = None, *, density: float | None = None,
                seed: int = 0) -> Adapter:
    """DARE (Yu et al. 2024) + weighted sum, space ΔW: ``merge_utils.dare_linear``'s definition on each ΔW_i.

    Each entry of ΔW_i is kept with probability ``density`` (default 0.5: FusionBench's DARE sparsity_ratio 0.5)
    and rescaled by 1/density, then Σ w_i. The drop is an exact Bernoulli(density) per entry, seeded per module from
    ``seed`` (``streamed.dropped_merge``; peft draws the same distribution from torch's global generator, one
    float per entry, which alone took seconds at N = 50). Default weights λ = 0.3 each (FusionBench's
    ``dare/task_arithmetic.yaml``: DARE, then task arithmetic).
    """
    check_compatible(adapters)
    d = check_density(density, DARE_DENSITY)
    w = resolve_weights(weights, len(adapters), len(adapters[0].modules()), DARE_LINEAR_SCALE)
    return _refactor(adapters, dropped_merge(_stacks(adapters), w, d, _dare_seeds(adapters, seed), "sum"),
                     "dare_linear")


def dare_ties(adapters: Sequence[Adapter], weights: Weights = None, *, density: float | None = None,
              seed: int = 0) -> Adapter:
    """DARE drop-and-rescale, then TIES sign election and disjoint mean, space ΔW (``merge_utils.dare_ties``'s
    definition on each ΔW_i: the sign of the rescaled entries' sum, the weighted agreeing entries averaged over
    the contributors that agree).

    Density default 0.5 and weights λ = 0.5 each: FusionBench's ``dare/ties_merging.yaml`` (sparsity_ratio 0.5,
    scaling_factor 0.5). As in peft and mergekit, the random drop replaces TIES' magnitude trim (FusionBench trims
    the dropped vectors to the top 20 % as well, and sums instead of averaging). The drop as in ``dare_linear``.
    """
    check_compatible(adapters)
    d = check_density(density, DARE_DENSITY)
    w = resolve_weights(weights, len(adapters), len(adapters[0].modules()), DARE_TIES_SCALE)
    return _refactor(adapters, dropped_merge(_stacks(adapters), w, d, _dare_seeds(adapters, seed), "ties_mean"),
                     "dare_ties")


def magnitude_prune(adapters: Sequence[Adapter], weights: Weights = None, *, density: float | None = None) -> Adapter:
    """Magnitude pruning of each ΔW_i to ``density`` (default 0.5), then Σ w_i (``merge_utils.magnitude_prune``).

    Per contributor and module, every entry with |x| ≥ the k-th largest |x| (k = int(density · size)) is kept;
    peft's ``torch.topk`` keeps exactly k and breaks exact ties arbitrarily, here they are all kept, as TIES does.
    No paper defines it, so it has no published default; default weights 1/N (the mean of the pruned updates).
    """
    check_compatible(adapters)
    d = check_density(density, PRUNE_DENSITY)
    w = resolve_weights(weights, len(adapters), len(adapters[0].modules()), None)
    return _refactor(adapters, trimmed_merge(_stacks(adapters), w, d, "module", "sum"), "magnitude_prune")


def _magmax_module(adapters: Sequence[Adapter], module: str, w: torch.Tensor) -> torch.Tensor:
    """Per entry, the w_i ΔW_i of largest magnitude; on exact ties the later contributor wins.

    Folds the contributors in order with ``>=``, as MagMax's released ``merge_max_abs`` (danielm1405/magmax) and
    FusionBench's ``_magmax_select`` do. Works through ΔW in blocks of ``ROWS`` output rows, so N dense ΔW_i are
    never held at once.
    """
    factors = [(a.factors(module)[0].float(), a.factors(module)[1].float() * a.scaling(module)) for a in adapters]
    out_f, in_f = factors[0][1].shape[0], factors[0][0].shape[1]
    best_all = torch.empty(out_f, in_f)
    for r0 in range(0, out_f, ROWS):
        best = best_all[r0:r0 + ROWS]                                            # (b, in), a view
        a0, b0 = factors[0]
        torch.mm(w[0] * b0[r0:r0 + ROWS], a0, out=best)
        best_abs = best.abs()
        cur, cur_abs = torch.empty_like(best), torch.empty_like(best)
        take = torch.empty_like(best, dtype=torch.bool)
        for wi, (a, b) in zip(w[1:], factors[1:]):
            torch.mm(wi * b[r0:r0 + ROWS], a, out=cur)
            torch.abs(cur, out=cur_abs)
            torch.ge(cur_abs, best_abs, out=take)
            torch.where(take, cur, best, out=best)                               # in place: no temporary
            torch.maximum(cur_abs, best_abs, out=best_abs)
    return best_all


def magmax(adapters: Sequence[Adapter], weights: Weights = None) -> Adapter:
    """MagMax (Marczak et al. 2024), space ΔW: per entry, the w_i ΔW_i of largest magnitude across contributors.

    Weights scale each ΔW_i before the selection (a negative weight flips a task vector); default λ = 0.5 each,
    so equal weights select as the paper does and scale the selection by 0.5 (FusionBench's ``magmax.yaml``,
    from MagMax's released 8-dataset script). Invariant to the order of contributors except for entries of
    exactly equal magnitude, where the later contributor wins (the reference code's ``>=``).
    """
    check_compatible(adapters)
    modules = adapters[0].modules()
    w = resolve_weights(weights, len(adapters), len(modules), MAGMAX_SCALE)
    factors = {}
    for j, m in enumerate(modules):
        a, b = dense_factors(_magmax_module(adapters, m, w[:, j]))
        factors[m] = (a, b, 1.0)
    return build_adapter(factors, adapters, "magmax")
