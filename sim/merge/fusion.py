"""MedForge's Fusion (Tan et al., "MedForge", arXiv 2502.16055; official code ``model_fusion.py``), space: A and B
factors, LoraHub-style (Huang et al., arXiv 2307.13269).

The merged adapter is ``A = Σ w_i A_i``, ``B = Σ w_i B_i`` with coefficients w searched on the distilled data.
MedForge merges *sequentially as commits arrive*: at each new commit it searches two coefficients (a, b),
``merged ← a · merged + b · new`` (on A and B alike, init 0.5 each, NGOpt, budget 40, bounds ±1.5) on the distilled
sets received so far. Because A and B are both linear in the coefficients, the sequential result equals the
one-shot combination with weights ``w ← [a · w_prev, b]`` over the original contributors, which is what
``fusion_weights_after`` tracks. The ``global`` mode searches all N coefficients at once from 1/N.

Per-layer granularity: one coefficient per contributor and module, (N, M) — stage coefficients are (2, M).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from sim.coefficients import ProxyData, proxy_loss
from sim.merge.base import Weights, check_compatible, resolve_weights
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


def fusion_weights_after(previous: np.ndarray, stage: np.ndarray) -> np.ndarray:
    """Weights over all contributors after a stage (a, b): ``[a · previous, b]``; shapes (N-1[, M]) and (2[, M])."""
    return np.concatenate([stage[0] * previous, stage[1:2]], axis=0)
