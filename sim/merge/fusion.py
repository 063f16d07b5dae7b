"""MedForge's Fusion (Tan et al., "MedForge", arXiv 2502.16055; official code ``model_fusion.py``), space: A and B
factors, LoraHub-style (Huang et al., arXiv 2307.13269).

The merged adapter is ``A = Σ w_i A_i``, ``B = Σ w_i B_i`` with coefficients w searched on the distilled data.
MedForge merges *sequentially as commits arrive*: at each new commit it searches two coefficients (a, b),
``merged ← a · merged + b · new`` (on A and B alike, init 0.5 each, NGOpt, budget 40, bounds ±1.5) on the distilled
sets received so far. Because A and B are both linear in the coefficients, the sequential result equals the
one-shot combination with weights ``w ← [a · w_prev, b]`` over the original contributors, which is what
``fusion_weights_after`` tracks. The ``global`` mode searches all N coefficients at once from 1/N.

Per-layer granularity: one coefficient per contributor and module, (N, M) — stage coefficients are (2, M).

``fusion_batch_loss`` scores C candidate coefficient vectors at once (``merge.search_batch`` > 1): the candidates'
merged factors stacked per module, all candidates through the foundation in one stacked forward over the cached
frozen prefix (``sim.stacked_forward``). Its numbers equal ``fusion_loss``'s up to float round-off.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from sim.coefficients import ProxyData, features_cross_entropy, proxy_loss
from sim.merge.base import Weights, base_reference, check_compatible, resolve_weights
from sim.merge.factors import combine_factors
from sim.model import Adapter, Foundation


def fusion(adapters: Sequence[Adapter], weights: Weights = None) -> Adapter:
    """LoraHub/MedForge Fusion with given coefficients, space A and B: A = Σ w_i A_i, B = Σ w_i B_i.

    Args:
        adapters: N adapters with the same modules and ranks.
        weights: the (searched) coefficients, (N,) or (N, M); default 1/N (then identical to ``lora_avg``).
    Returns:
        One adapter of the contributors' rank.
    """
    check_compatible(adapters, same_ranks=True)
    w = resolve_weights(weights, len(adapters), len(adapters[0].modules()))
    return combine_factors(adapters, w, "fusion")


def fusion_loss(foundation: Foundation, data: ProxyData, adapters: Sequence[Adapter]) -> Callable[[np.ndarray], float]:
    """Cross-entropy on the proxy data of ``fusion(adapters, w)``, as a function of w ((N,) or (N, M))."""
    check_compatible(adapters, same_ranks=True)
    n, n_modules = len(adapters), len(adapters[0].modules())

    def loss(w: np.ndarray) -> float:
        return proxy_loss(foundation, data, combine_factors(adapters, resolve_weights(w, n, n_modules), "fusion"))
    return loss


def fusion_batch_loss(foundation: Foundation, data: ProxyData,
                      adapters: Sequence[Adapter]) -> Callable[[np.ndarray], np.ndarray]:
    """``fusion_loss`` of C candidates at once: w (C, N) or (C, N, M) → cross-entropies (C,).

    Per module, candidate c's factors are ``A_c = Σ_i w_ci A_i`` and ``B_c = Σ_i w_ci (s_i / s) B_i`` with scaling
    ``s`` (``combine_factors``, as a contraction over the contributors); every candidate carries the pool's heads
    (``merge_heads``: they do not depend on w). The proxy's prefix tokens are taken from the foundation's cache once
    here, so each call runs only the adapted blocks, all candidates in one stacked forward."""
    from sim.stacked_forward import CandidateUpdates, first_adapted_block, proxy_tokens, stacked_features

    check_compatible(adapters, same_ranks=True)
    for a in adapters:
        a.check_base(foundation)
    n, mods = len(adapters), adapters[0].modules()
    stacked = {}
    for m in mods:
        scalings = [a.scaling(m) for a in adapters]
        s_out = scalings[0] if len(set(scalings)) == 1 else 1.0
        a_stack = torch.stack([a.factors(m)[0].float() for a in adapters]).to(foundation.device)        # (N, r, in)
        b_stack = torch.stack([(s / s_out) * a.factors(m)[1].float()                                    # (N, out, r)
                               for s, a in zip(scalings, adapters)]).to(foundation.device)
        stacked[m] = (a_stack, b_stack, s_out)
    heads = base_reference(adapters)                  # the candidates' heads (None: the prototype head)
    k = first_adapted_block(mods)
    tokens = proxy_tokens(foundation, data, k)        # (n_images, T, D), computed once per set for the run

    def loss(ws: np.ndarray) -> np.ndarray:
        ws = np.asarray(ws, dtype=np.float64)
        w = torch.stack([resolve_weights(wc, n, len(mods)) for wc in ws]).to(foundation.device)   # (C, N, M)
        factors = {m: (torch.einsum("cn,nri->cri", w[:, :, j], a_stack),
                       torch.einsum("cn,nor->cor", w[:, :, j], b_stack), s_out)
                   for j, (m, (a_stack, b_stack, s_out)) in enumerate(stacked.items())}
        feats = stacked_features(foundation, tokens, k, CandidateUpdates(factors))                 # (C, n, D)
        return np.array([features_cross_entropy(foundation, data, f, heads) for f in feats])
    return loss


def fusion_weights_after(previous: np.ndarray, stage: np.ndarray) -> np.ndarray:
    """Weights over all contributors after a stage (a, b): ``[a · previous, b]``; shapes (N-1[, M]) and (2[, M])."""
    return np.concatenate([stage[0] * previous, stage[1:2]], axis=0)
