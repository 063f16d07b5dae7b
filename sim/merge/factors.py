"""Merges in the space of the LoRA factors: A and B are combined separately.

``lora_avg`` is the "pre-merge" baseline of Med-LEGO (Zhu et al., MICCAI 2025, arXiv 2503.01164, eq. 2):
``A = Σ w_i A_i`` and ``B = Σ w_i B_i``. The product of averaged factors is *not* the average of the
products: ``B A = Σ_ij w_i w_j B_i A_j`` carries cross terms, which is why Med-LEGO merges in ΔW space
instead. LoraHub (Huang et al., arXiv 2307.13269) and MedForge's Fusion use the same combination with
searched coefficients (see ``sim.merge.fusion``).
"""
from __future__ import annotations

from typing import Sequence

import torch

from sim.merge.base import Weights, build_adapter, check_compatible, resolve_weights
from sim.model import Adapter


def combine_factors(adapters: Sequence[Adapter], weights: torch.Tensor, strategy: str) -> Adapter:
    """A = Σ w_i A_i, B = Σ w_i (s_i / s) B_i per module; ``weights`` (N, M).

    ``s`` is the contributors' common scaling of the module if they agree (then the result keeps their
    ``alpha``), else 1 with each ``s_i`` folded into its ``B_i``; either way one contributor with weight 1
    gives back its own ΔW.
    """
    check_compatible(adapters, same_ranks=True)
    factors = {}
    for j, m in enumerate(adapters[0].modules()):
        scalings = [a.scaling(m) for a in adapters]
        s_out = scalings[0] if len(set(scalings)) == 1 else 1.0
        a_sum = sum(w * a.factors(m)[0].float() for w, a in zip(weights[:, j].tolist(), adapters))   # (r, in)
        b_sum = sum(w * (s / s_out) * a.factors(m)[1].float()                                        # (out, r)
                    for w, s, a in zip(weights[:, j].tolist(), scalings, adapters))
        factors[m] = (a_sum, b_sum, s_out)
    return build_adapter(factors, adapters, strategy)


def lora_avg(adapters: Sequence[Adapter], weights: Weights = None) -> Adapter:
    """Med-LEGO eq. 2 "pre-merge" (space: A and B factors): A = Σ w_i A_i, B = Σ w_i B_i.

    Args:
        adapters: N adapters with the same modules and ranks.
        weights: (N,) or (N, M); default 1/N (the plain average). The merged ΔW is
            ``s (Σ w_i B_i)(Σ w_i A_i)``, so scaling all weights by c scales ΔW by c².
    Returns:
        One adapter of the contributors' rank.
    """
    check_compatible(adapters, same_ranks=True)
    w = resolve_weights(weights, len(adapters), len(adapters[0].modules()), None)
    return combine_factors(adapters, w, "lora_avg")
