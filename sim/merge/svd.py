"""Med-LEGO's SVD merge (Zhu et al., "Med-LEGO: Editing and Adapting toward Generalist Medical Image
Diagnosis", MICCAI 2025, arXiv 2503.01164, eq. 5–6), space ΔW.

Per module: ``M = Σ w_i ΔW_i`` (default w_i = 1/N), ``M = U S Vᵀ``, keep the top-k singular triplets where k is
the smallest number whose cumulative share of the singular values reaches the threshold v (default 0.9),
optionally capped by ``rank``; the merged adapter is ``B = U_k S_k``, ``A = V_kᵀ`` with scaling 1 (alpha = k).

M is never formed densely when it need not be: ``M = B_cat A_cat`` with the stacked factors
``B_cat = [w_1 s_1 B_1 … w_N s_N B_N]`` (out, R) and ``A_cat = [A_1; …; A_N]`` (R, in), R = Σ r_i, so with
``B_cat = Q_B R_B`` and ``A_catᵀ = Q_A R_A`` (thin QR) ``M = Q_B (R_B R_Aᵀ) Q_Aᵀ`` and the SVD of the small
R×R core gives M's: O((out + in) R²) instead of O(out · in · min(out, in)). When R ≥ min(out, in) (e.g. 50 rank-16
adapters of a 768-wide layer) there is nothing low-rank left to exploit; then the symmetric eigenproblem of the
small Gram matrix (``MᵀM = A_catᵀ (B_catᵀ B_cat) A_cat``, min(out, in) square, formed by GEMMs from the factors)
gives the singular values and the right vectors V, and ``B = M V_k = B_cat (A_cat V_k)``: about 3× faster than a
dense SVD of M on CPU. Its singular values are exact to ~1e-5 · σ_max (fp32), so the kept rank can differ from a
dense SVD's only when the threshold falls within that of a cumulative share; ``B A`` is always the orthogonal
projection of M on the kept right singular vectors. At v = 1 the kept rank is M's numerical rank, so that
path forms M and its Gram matrix in float64 instead: σ² of round-off then sit ~1e-16 σ_max² deep, far below the
rank tolerance (float32 σ_max · max(out, in) · eps, numpy's ``matrix_rank`` rule), where in float32 they would
reach ~1e-3 σ_max and every sum of N ≥ min(out, in) / r adapters would read as full rank.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from sim.merge.base import Weights, build_adapter, check_compatible, rank_tolerance, resolve_weights
from sim.model import Adapter


def stacked_factors(adapters: Sequence[Adapter], module: str, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B_cat (out, R), A_cat (R, in)) with B_cat @ A_cat = Σ w_i ΔW_i of ``module``; ``w`` (N,)."""
    a_cat = torch.cat([a.factors(module)[0].float() for a in adapters], dim=0)
    b_cat = torch.cat([wi * a.scaling(module) * a.factors(module)[1].float()
                       for wi, a in zip(w.tolist(), adapters)], dim=1)
    return b_cat, a_cat


def lowrank_svd(b_cat: torch.Tensor, a_cat: torch.Tensor, keep: Callable[[torch.Tensor], int] | None = None,
                *, precise: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of ``M = b_cat @ a_cat`` in factored form: (left (out, k), S (q,), right (k, in)), S descending.

    ``left @ right`` is the best rank-k approximation of M (``left = U S, right = Vᵀ`` or ``left = U,
    right = Uᵀ M``); k = ``keep(S)``, or all q singular values (then ``left @ right = M``). ``precise``: the
    Gram path works in float64, so that singular values at round-off level come out as such (for a rank decision).
    """
    out_f, r = b_cat.shape
    in_f = a_cat.shape[1]
    if r < min(out_f, in_f):
        q_b, r_b = torch.linalg.qr(b_cat)                        # (out, R), (R, R)
        q_a, r_a = torch.linalg.qr(a_cat.T)                      # (in, R), (R, R)
        u, s, vh = torch.linalg.svd(r_b @ r_a.T)                 # (R, R) each
        k = keep(s) if keep else s.shape[0]
        return q_b @ (u[:, :k] * s[:k]), s, vh[:k] @ q_a.T
    lam, vec = torch.linalg.eigh(_gram(b_cat, a_cat, precise))              # MᵀM (in, in) or M Mᵀ (out, out)
    s = lam.flip(0).clamp_min(0).sqrt().float()
    k = keep(s) if keep else s.shape[0]
    vec = vec.flip(1)[:, :k].float()
    if in_f <= out_f:                                                        # vec = V_k (in, k)
        return b_cat @ (a_cat @ vec), s, vec.T.contiguous()
    return vec.contiguous(), s, (vec.T @ b_cat) @ a_cat                       # vec = U_k (out, k)


def _gram(b_cat: torch.Tensor, a_cat: torch.Tensor, precise: bool) -> torch.Tensor:
    """Gram matrix of M = b_cat a_cat on its shorter side, from the factors (float32) or from M (float64)."""
    wide = a_cat.shape[1] > b_cat.shape[0]
    if precise:
        m = (b_cat @ a_cat).double()
        return m @ m.T if wide else m.T @ m
    return b_cat @ ((a_cat @ a_cat.T) @ b_cat.T) if wide else a_cat.T @ ((b_cat.T @ b_cat) @ a_cat)


def kept_rank(s: torch.Tensor, threshold: float, rank: int = 0, shape: tuple[int, int] | None = None) -> int:
    """Smallest k with Σ_{j<=k} σ_j ≥ threshold · Σ σ, capped by ``rank``; at least 1.

    v = 1: the numerical rank, the σ above ``rank_tolerance`` for a matrix of ``shape`` (default (q, q)).
    """
    s64 = s.double()
    total = float(s64.sum())
    if total <= 0.0:
        k = 1
    elif threshold >= 1.0:
        # every singular value that is not round-off: M is kept exactly (to fp32 precision)
        k = int((s64 > rank_tolerance(float(s64[0]), shape or (s.shape[0], s.shape[0]))).sum())
    else:
        share = torch.cumsum(s64, 0) / total
        k = int(torch.searchsorted(share, torch.tensor(threshold, dtype=torch.float64))) + 1
    k = max(1, min(k, s.shape[0]))
    return min(k, rank) if rank > 0 else k


def svd(adapters: Sequence[Adapter], weights: Weights = None, *, threshold: float = 0.9, rank: int = 0) -> Adapter:
    """Med-LEGO SVD merge, space ΔW: truncated SVD of M = Σ w_i ΔW_i per module.

    Args:
        adapters: N adapters with the same modules and shapes (ranks may differ).
        weights: (N,) or (N, M); default 1/N.
        threshold: v in (0, 1]; keep the fewest singular values whose cumulative share reaches v;
            v = 1.0 keeps M exactly (its numerical rank).
        rank: cap on the kept rank per module; 0 = no cap.
    Returns:
        One adapter, rank k per module (uneven ranks are recorded as peft's rank/alpha patterns), scaling 1.
    """
    check_compatible(adapters)
    modules = adapters[0].modules()
    w = resolve_weights(weights, len(adapters), len(modules), None)
    factors = {}
    for j, m in enumerate(modules):
        b_cat, a_cat = stacked_factors(adapters, m, w[:, j])
        shape = (b_cat.shape[0], a_cat.shape[1])
        left, _, right = lowrank_svd(b_cat, a_cat, keep=lambda s: kept_rank(s, threshold, rank, shape),
                                     precise=threshold >= 1.0)
        factors[m] = (right, left, 1.0)                            # A (k, in), B (out, k), scaling 1
    return build_adapter(factors, adapters, "svd")
