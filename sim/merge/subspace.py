"""Merges in shared and task singular subspaces, space ΔW: per module, contributor i's ``ΔW_i = s_i B_i A_i`` (out, in).

* ``tsv`` — TSV-M, Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging", CVPR 2025
  (arXiv 2412.00081): each task keeps its top 1/N of singular triplets; the stacked left and right singular
  vectors are orthogonalised (their polar factors) and recombined with every kept singular value.
* ``iso_c`` — Iso-C, Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific
  Subspaces", ICML 2025 (arXiv 2502.04959): the task-arithmetic sum with a flat spectrum.
* ``iso_cts`` — Iso-CTS, same paper: the sum's top singular directions (common subspace) plus each task's top
  directions outside it (task-specific subspaces), orthogonalised, with a flat spectrum.
* ``knots`` — KnOTS, Stoica et al., "Model merging with SVD to tie the KnOTS", ICLR 2025 (arXiv 2410.19735):
  the SVD of the concatenated ``[ΔW_1 … ΔW_N] = U Σ [V_1ᵀ … V_Nᵀ]`` gives one basis U shared by all tasks; a base
  merge (TIES, or task arithmetic) combines the per-task coordinates ``Σ V_iᵀ = Uᵀ ΔW_i`` and ``U`` maps back.

The definitions are FusionBench's (``tanganke/fusion_bench``: ``fusion_bench/method/task_singular_vector/utils/
TSVM_utils.py``, ``fusion_bench/method/isotropic_merging/iso_utils.py``) and, for KnOTS, whose FusionBench module
(``fusion_bench/method/knots/knots_utils.py``) holds only the shared-basis step, the authors' (``gstoica27/KnOTS``,
``task_merger.py`` ``SVDMerger``, ``masking_ops.py``). Their defaults live in ``sim.merge.specs``.

FusionBench wrote these for full fine-tuning, where every ΔW_i and their sum are full rank. A LoRA update is not: a
rank-r ΔW_i has min(out, in) - r zero singular values, whose singular vectors are whatever completion LAPACK returns,
and FusionBench's code would stack, orthogonalise and (Iso) give the mean singular value to those arbitrary
directions, so its result on low-rank inputs is not a function of the inputs. Here every SVD is taken at its
numerical rank (``base.rank_tolerance``): a task keeps ``min(its share, its rank)`` triplets, a mean runs over the
singular values that are not zero, and Iso-CTS splits the sum's rank instead of min(out, in). On full-rank
inputs TSV-M, Iso-C and Iso-CTS are FusionBench's computation exactly (``tests/test_subspace_merges.py`` checks them
against a numpy transcription of it).

Everything works from the factors (QR of the stacked factors, Gram eigendecompositions of the short side in float64,
as ``sim.merge.svd`` does), so no N dense ΔW_i are held at once. Results are stored at the number K of directions
they keep (``B`` (out, K), ``A`` (K, in), scaling 1), or in the identity form when K exceeds min(out, in).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from sim.merge.base import Weights, build_adapter, check_compatible, check_density, rank_tolerance, resolve_weights
from sim.merge.specs import (ISO_CTS_COMMON_FRACTION, ISO_SCALE, KNOTS_BASES, KNOTS_SCALE, TIES_DENSITY, TIES_SCOPES,
                             TSV_SCALE)
from sim.merge.streamed import stack_module, trimmed_merge
from sim.merge.svd import stacked_factors
from sim.model import Adapter

WELL_CONDITIONED = 30.0   # κ(xᵀx) up to which a polar factor is computed in float32 (relative error ~ eps32 · κ)


# ------------------------------------------------------------------------------------------
# Linear algebra on factors
# ------------------------------------------------------------------------------------------
def factored_svd(b: torch.Tensor, a: torch.Tensor, floor: float | None = None,
                 left: Callable[[int], int] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of ``M = b @ a`` at its numerical rank ρ: (U (out, ρ), S (ρ,), V (in, ρ)), float64, S descending.

    Singular values at or below ``floor`` (default: ``rank_tolerance`` of M's largest) count as zero and are dropped
    with their vectors. With R = b.shape[1] < min(out, in): thin QR of b and aᵀ and the SVD of the R×R core;
    otherwise the eigendecomposition of M's Gram matrix on its shorter side, the other side's vectors M V / S.
    Float64: the polar factors built from these vectors amplify their errors by the inverse of the stack's smallest
    singular value, which nearly parallel task directions make small. ``left(ρ)``: how many leading left singular
    vectors are needed, given the rank (U then has that many columns; S and V are whole; default all ρ).
    """
    out_f, r = b.shape
    in_f = a.shape[1]
    if r < min(out_f, in_f):
        u, s, v = batched_svd(b[None], a[None])
        k = _kept(s[0], floor, (out_f, in_f))
        return u[0, :, :k if left is None else left(k)], s[0, :k], v[0, :, :k]
    m = (b @ a).double()                                                    # (out, in), float32 products
    wide = in_f > out_f
    lam, vec = torch.linalg.eigh(m @ m.T if wide else m.T @ m)              # shorter side, ascending
    s = lam.flip(0).clamp_min(0).sqrt()
    k = _kept(s, floor, (out_f, in_f))
    vec, s = vec.flip(1)[:, :k], s[:k]
    n_left = k if left is None else left(k)
    if wide:
        return vec[:, :n_left], s, (m.T @ vec) / s                          # the longer side's singular vectors
    return (m @ vec[:, :n_left]) / s[:n_left], s, vec


def batched_svd(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVDs of ``b_i @ a_i``, b (N, out, r), a (N, r, in), r <= min(out, in): U (N, out, r), S (N, r), V (N, in, r).

    Float64 thin QR of every b_i and a_iᵀ, then the SVD of each r×r core; S descending, zeros included.
    """
    q_b, r_b = torch.linalg.qr(b.double())                                  # (N, out, r), (N, r, r)
    q_a, r_a = torch.linalg.qr(a.double().transpose(1, 2))                  # (N, in, r), (N, r, r)
    u, s, vh = torch.linalg.svd(r_b @ r_a.transpose(1, 2))                  # (N, r, r) each
    return q_b @ u, s, q_a @ vh.transpose(1, 2)


def task_svds(sb: torch.Tensor, a: torch.Tensor, floors: Sequence[float] | None = None
              ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Each contributor's thin SVD of ``sb_i @ a_i`` (sb (N, out, r), a (N, r, in)) at its numerical rank.

    ``floors[i]``: singular values at or below it are dropped (default: the rank tolerance of the largest)."""
    n, out_f, r = sb.shape
    shape = (out_f, a.shape[2])
    floor = [None] * n if floors is None else floors
    if r >= min(shape):
        return [factored_svd(sb[i], a[i], floor[i]) for i in range(n)]
    u, s, v = batched_svd(sb, a)
    kept = [_kept(s[i], floor[i], shape) for i in range(n)]
    return [(u[i, :, :k], s[i, :k], v[i, :, :k]) for i, k in enumerate(kept)]


def top_singular_values(sb: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """σ_max of each ``sb_i @ a_i`` (sb (N, out, r), a (N, r, in)), float64 (N,), from r × r Gram matrices.

    σ_max² is the largest eigenvalue of (sb_iᵀ sb_i)(a_i a_iᵀ), i.e. of the symmetric G_a^½ G_b G_a^½: the r × r
    products of the factors' float64 Gram matrices, no QR of the (out, r) factors. Its error is round-off of the
    largest eigenvalue (~1e-16 relative), which is what a rank floor needs.
    """
    sb64, a64 = sb.double(), a.double()
    g_b, g_a = sb64.transpose(1, 2) @ sb64, a64 @ a64.transpose(1, 2)          # (N, r, r) each
    lam, vec = torch.linalg.eigh(g_a)
    half = (vec * lam.clamp_min(0).sqrt()[:, None, :]) @ vec.transpose(1, 2)  # G_a^½
    top = torch.linalg.eigvalsh(half @ g_b @ half)[:, -1]
    return top.clamp_min(0).sqrt()


def residual_svds(sb: torch.Tensor, a: torch.Tensor, u_c: torch.Tensor, floors: Sequence[float], n: int
                  ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per contributor, the leading ≤ n singular triplets above ``floors[i]`` of R_i a_i, R_i = (I − U_c U_cᵀ) sb_i:
    its update outside the orthonormal ``u_c`` (out, k). float64 (U (out, k_i), S (k_i,), V (in, k_i)).

    The residual factor R_i is never formed: R_iᵀ R_i = sb_iᵀ sb_i − W_iᵀ W_i with W_i = U_cᵀ sb_i (an r × r Gram
    matrix; its cancellation costs ~eps64 ‖sb_i‖² / σ², far below the floors' ~1e-4 relative), so
    R_i = Q Λ^½ Eᵀ for its eigendecomposition E Λ Eᵀ and some orthonormal Q. With a_iᵀ = Q_a T_a (thin QR),
    R_i a_i = Q (Λ^½ Eᵀ T_aᵀ) Q_aᵀ: the r × r core's SVD u' S v'ᵀ gives V = Q_a v' and U = R_i a_i V / S =
    R_i z, z = T_aᵀ v' / S, formed as sb_i z − U_c (W_i z) for the kept columns only. With r >= min(out, in) the
    residuals are formed and ``task_svds`` takes them.
    """
    n_tasks, out_f, r = sb.shape
    side = sb.transpose(0, 1).reshape(out_f, n_tasks * r)                  # (out, N r)
    if r >= min(out_f, a.shape[2]):
        res = (side - u_c @ (u_c.T @ side)).view(out_f, n_tasks, r).transpose(0, 1)
        return [(u[:, :n], s[:n], v[:, :n]) for u, s, v in task_svds(res, a, floors)]
    wc = (u_c.T @ side).view(-1, n_tasks, r).transpose(0, 1)               # (N, k, r): W_i = U_cᵀ sb_i
    gram = sb.transpose(1, 2) @ sb - wc.transpose(1, 2) @ wc                # R_iᵀ R_i, (N, r, r)
    lam, vec = torch.linalg.eigh((gram + gram.transpose(1, 2)) / 2)
    q_a, t_a = torch.linalg.qr(a.transpose(1, 2))                          # a_iᵀ = Q_a T_a: (N, in, r), (N, r, r)
    core = (lam.clamp_min(0).sqrt()[:, :, None] * vec.transpose(1, 2)) @ t_a.transpose(1, 2)
    _, s, vh = torch.linalg.svd(core)                                       # S descending
    kept = [min(n, int((s[i] > floors[i]).sum())) for i in range(n_tasks)]
    width = max(kept, default=0)
    v = vh[:, :width].transpose(1, 2)                                       # (N, r, width): v'
    z = (t_a.transpose(1, 2) @ v) / s[:, None, :width].clamp_min(torch.finfo(s.dtype).tiny)
    wz = (wc @ z).transpose(0, 1).reshape(u_c.shape[1], n_tasks * width)    # (k, N width): W_i z_i side by side
    u = sb @ z - (u_c @ wz).view(out_f, n_tasks, width).transpose(0, 1)     # (N, out, width): R_i z_i
    vv = q_a @ v
    return [(u[i, :, :k], s[i, :k], vv[i, :, :k]) for i, k in enumerate(kept)]


def _kept(s: torch.Tensor, floor: float | None, shape: tuple[int, int]) -> int:
    """How many of the descending singular values ``s`` exceed ``floor`` (default: the rank tolerance of ``s[0]``)."""
    if s.numel() == 0:
        return 0
    tol = rank_tolerance(float(s[0]), shape) if floor is None else floor
    return int((s > tol).sum())


def polar(x: torch.Tensor, try_float32: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, S): the orthogonal polar factor ``P = x (xᵀx)^(-1/2) = U Vᵀ`` of x (n, K), K <= n, and x's nonzero S.

    P is FusionBench's ``u @ vh`` of an SVD. On directions where x is numerically rank-deficient P is not unique; it
    is taken as 0 there (the partial isometry of the polar decomposition). From the eigendecomposition of the K×K
    Gram matrix in float64; ``try_float32`` (for stacks that are usually well conditioned, as TSV's left vectors in
    a wide output space) tries float32 first and keeps it when κ(xᵀx) <= ``WELL_CONDITIONED``, where it costs at
    most ~eps32 · κ relative. Returned in float64.
    """
    if try_float32:
        x32 = x.float()
        lam, w = torch.linalg.eigh(x32.T @ x32)                             # ascending
        if lam[0] > 0 and lam[-1] <= WELL_CONDITIONED * lam[0]:
            sigma = lam.sqrt()
            return (x32 @ ((w / sigma) @ w.T)).double(), sigma.double()
    x = x.double()
    lam, w = torch.linalg.eigh(x.T @ x)                                     # ascending
    sigma = lam.clamp_min(0).sqrt()
    keep = sigma > rank_tolerance(float(sigma[-1]), tuple(x.shape))
    w, sigma = w[:, keep], sigma[keep]
    return x @ ((w / sigma) @ w.T), sigma


def _factors(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(A, B, 1.0)`` for ``build_adapter`` of ΔW = b @ a (b (out, K), a (K, in)), float32.

    K <= min(out, in): the factors as they are (at K = min(out, in) the same size as the identity form of a dense
    ΔW). K > min(out, in): the identity form (``base.dense_factors``' full-rank layout): in <= out: A = I, B = ΔW;
    else A = ΔW, B = I. K = 0 (nothing kept): one zero factor.
    """
    out_f, in_f = b.shape[0], a.shape[1]
    if b.shape[1] == 0:
        return torch.zeros(1, in_f), torch.zeros(out_f, 1), 1.0
    if b.shape[1] <= min(out_f, in_f):
        return a.float().contiguous(), b.float().contiguous(), 1.0
    delta = (b @ a).float()
    if in_f <= out_f:
        return torch.eye(in_f), delta, 1.0
    return delta, torch.eye(out_f), 1.0


# ------------------------------------------------------------------------------------------
# TSV-M
# ------------------------------------------------------------------------------------------
def tsv(adapters: Sequence[Adapter], weights: Weights = None) -> Adapter:
    """Task Singular Vectors merge, TSV-M (Gargiulo et al., CVPR 2025), space ΔW.

    Per module, FusionBench's ``compute_and_sum_svd_mem_reduction`` (``fusion_bench/method/task_singular_vector/
    utils/TSVM_utils.py``): with q = min(out, in) and k = q // N, task i keeps its top ``min(k, rank(w_i ΔW_i))``
    singular triplets (U_i, S_i, V_i) of w_i ΔW_i (FusionBench: ``int(q * (1 / N))``, the same for every q and N
    where float round-off does not push q/N below an integer, e.g. q = N = 49, where it keeps none; the rank cap
    only drops singular values that are zero); ``X = [U_1 … U_N]`` (out, K) and ``Y = [V_1 … V_N]`` (in, K) are
    replaced by their polar factors (``u @ vh`` of their SVDs), and ``ΔW = polar(X) diag(S_1 … S_N) polar(Y)ᵀ``.

    Args:
        adapters: N adapters with the same modules and shapes (ranks may differ).
        weights: (N,) or (N, M), each multiplying its ΔW_i before the SVDs (FusionBench's per-task ``alpha`` list);
            default 1.0 each: FusionBench's ``config/method/task_singular_vector/TaskSingularVectorMerging.yaml``
            alpha 1, a scale of the merged update, which is the same as scaling every weight (the merge is
            positively homogeneous: TSV(c · τ) = c · TSV(τ)).
    Returns:
        One adapter, scaling 1, rank K = Σ kept triplets <= min(out, in) per module.
    """
    check_compatible(adapters)
    modules = adapters[0].modules()
    w = resolve_weights(weights, len(adapters), len(modules), TSV_SCALE)
    factors = {}
    for j, m in enumerate(modules):
        sb, a = stack_module(adapters, m, w[:, j], torch.float64)                        # (N, out, r), (N, r, in)
        k = min(sb.shape[1], a.shape[2]) // len(adapters)
        parts = [(u[:, :k], s[:k], v[:, :k]) for u, s, v in task_svds(sb, a)]
        x, s, y = (torch.cat(p, -1) for p in zip(*parts))                  # (out, K), (K,), (in, K)
        if s.numel() == 0:
            factors[m] = _factors(x, y.T)
            continue
        factors[m] = _factors(polar(x, try_float32=True)[0] * s, polar(y)[0].T)
    return build_adapter(factors, adapters, "tsv")


# ------------------------------------------------------------------------------------------
# Iso-C and Iso-CTS
# ------------------------------------------------------------------------------------------
def iso_c(adapters: Sequence[Adapter], weights: Weights = None) -> Adapter:
    """Isotropic merging in the common subspace, Iso-C (Marczak et al., ICML 2025), space ΔW.

    Per module, FusionBench's ``iso_c`` (``fusion_bench/method/isotropic_merging/iso_utils.py``): the sum
    ``M = Σ w_i ΔW_i = U S Vᵀ`` with every singular value replaced by their mean, ``ΔW = mean(S) U Vᵀ``. The mean
    and the directions are those of M's ρ nonzero singular values (FusionBench's ``S.mean()`` runs over all
    min(out, in); they agree when M is full rank, e.g. 50 rank-16 updates of a 768-wide layer). One contributor
    does not come back unchanged: its spectrum is flattened too.

    Args:
        adapters: N adapters with the same modules and shapes (ranks may differ).
        weights: (N,) or (N, M), multiplying each ΔW_i in the sum; default 1.0 each: FusionBench's
            ``config/method/isotropic_merging/iso_c.yaml`` scaling_factor 1.0 (a scale of the result, the same as
            scaling every weight: the merge is positively homogeneous).
    Returns:
        One adapter, scaling 1, rank ρ per module; once the stacked rank R = Σ r_i reaches min(out, in), the dense
        result in the identity form (rank min(out, in)).
    """
    check_compatible(adapters)
    modules = adapters[0].modules()
    w = resolve_weights(weights, len(adapters), len(modules), ISO_SCALE)
    factors = {}
    for j, m in enumerate(modules):
        b_cat, a_cat = stacked_factors(adapters, m, w[:, j])                # [w_i s_i B_i] (out, R), [A_i] (R, in)
        (out_f, r), in_f = b_cat.shape, a_cat.shape[1]
        if r < min(out_f, in_f):
            u, s, v = factored_svd(b_cat, a_cat)                            # (out, ρ), (ρ,), (in, ρ)
            factors[m] = _factors(u * s.mean() if s.numel() else u, v.T)
            continue
        # R >= min(out, in): mean(S) U Vᵀ = mean(S) · polar(M), from M's Gram matrix on the shorter side
        delta = (b_cat @ a_cat).double()
        p, s = polar(delta.T if in_f > out_f else delta)
        p = p.T if in_f > out_f else p                                      # (out, in)
        flat = p * s.mean() if s.numel() else p
        factors[m] = _factors(flat, torch.eye(in_f)) if in_f <= out_f else _factors(torch.eye(out_f), flat)
    return build_adapter(factors, adapters, "iso_c")


def common_split(rho: int, n: int, fraction: float) -> tuple[int, int]:
    """(common directions k_c, task-specific directions per task) of Iso-CTS for a sum of rank ρ and N tasks.

    FusionBench's ``iso_cts``: k_c = int(ρ · fraction), then the remainder is rounded (Python's ``round``, half to
    even) to a multiple of N and k_c takes the rest, so k_c + N · n_per = ρ. The per-task count is capped at ρ // N,
    which only a fraction below 0.5 can reach (FusionBench's k_c would turn negative there).
    """
    k_c = int(rho * fraction)
    n_per = min(round((rho - k_c) / n), rho // n)
    return rho - n_per * n, n_per


def iso_cts(adapters: Sequence[Adapter], weights: Weights = None, *,
            common_space_fraction: float | None = None) -> Adapter:
    """Isotropic merging in common and task-specific subspaces, Iso-CTS (Marczak et al., ICML 2025), space ΔW.

    Per module, FusionBench's ``iso_cts`` (``fusion_bench/method/isotropic_merging/iso_utils.py``):
      1. ``M = Σ w_i ΔW_i = U S Vᵀ``; the common subspace is its top k_c triplets (``common_split``: the fraction
         ``common_space_fraction`` of M's rank ρ, the rest shared equally by the N tasks, n_per each).
      2. Task i's residual ``(I - U_c U_cᵀ) w_i ΔW_i`` (its update outside the common left subspace) gives its top
         ``min(n_per, rank)`` triplets (a residual's rank is read against w_i ΔW_i's own largest singular value).
      3. The stacked left vectors ``[U_1 … U_N U_c]`` and right vectors ``[V_1 … V_N V_c]`` are replaced by their
         polar factors, and every singular value by the mean of the kept ones: ``ΔW = mean(S) polar(X) polar(Y)ᵀ``.
    FusionBench splits min(out, in) instead of ρ; the two agree when M is full rank (e.g. 50 rank-16 updates of a
    768-wide layer). Splitting ρ keeps every stacked direction inside the span of the updates, where the q-based
    split would give the common space the whole of it whenever ρ <= 0.8 min(out, in) (Iso-CTS would then be Iso-C).
    With fewer than ~1 / (1 - fraction) tasks per remaining direction, n_per = 0 and the result is Iso-C's.

    Args:
        adapters: N adapters with the same modules and shapes (ranks may differ).
        weights: (N,) or (N, M), multiplying each ΔW_i before step 1; default 1.0 each: FusionBench's
            ``config/method/isotropic_merging/iso_cts.yaml`` scaling_factor 1.0 (positively homogeneous, as iso_c).
        common_space_fraction: share of the sum's directions kept as common, in [0, 1]; default 0.8 (FusionBench's
            ``iso_cts.yaml`` and the authors' ``danielm1405/iso-merging`` ``config/method/iso_cts.yaml``).
    Returns:
        One adapter, scaling 1, rank ρ per module.
    """
    fraction = ISO_CTS_COMMON_FRACTION if common_space_fraction is None else float(common_space_fraction)
    if not 0 <= fraction <= 1:
        raise ValueError(f"iso_cts common_space_fraction must be a number in [0, 1], got {common_space_fraction!r}")
    check_compatible(adapters)
    modules = adapters[0].modules()
    w = resolve_weights(weights, len(adapters), len(modules), ISO_SCALE)
    factors = {}
    for j, m in enumerate(modules):
        b_cat, a_cat = stacked_factors(adapters, m, w[:, j])                # [w_i s_i B_i] (out, R), [A_i] (R, in)
        u_c, s, v = factored_svd(b_cat, a_cat,                              # step 1: U_c (out, k_c), (ρ,), (in, ρ)
                                 left=lambda rho: common_split(rho, len(adapters), fraction)[0])
        k_c, n_per = common_split(s.numel(), len(adapters), fraction)
        us, ss, vs = [], [s[:k_c]], [v[:, :k_c]]
        if n_per:                                                           # step 2
            sb, a = stack_module(adapters, m, w[:, j], torch.float64)                    # (N, out, r), (N, r, in)
            shape = (sb.shape[1], a.shape[2])
            floors = [rank_tolerance(s_max, shape) if s_max > 0 else math.inf
                      for s_max in top_singular_values(sb, a).tolist()]      # read against w_i ΔW_i's σ_max
            for ut, st, vt in residual_svds(sb, a, u_c, floors, n_per):
                us.append(ut), ss.append(st), vs.append(vt)
        s, x_t = torch.cat(ss), torch.cat([u_c[:, :0]] + us, 1)             # step 3: (K,), (out, N n_per)
        if s.numel() == 0:
            factors[m] = _factors(u_c, v[:, :0].T)
            continue
        # The task directions lie outside the common left subspace, so [U_t U_c]'s polar factor is [polar(U_t) U_c]
        x = torch.cat([polar(x_t)[0], u_c], 1) if x_t.shape[1] else u_c    # (out, K): task columns, then common
        y = polar(torch.cat(vs[1:] + vs[:1], 1))[0]                         # (in, K), in the same order
        factors[m] = _factors(x * s.mean(), y.T)
    return build_adapter(factors, adapters, "iso_cts")


# ------------------------------------------------------------------------------------------
# KnOTS
# ------------------------------------------------------------------------------------------
def shared_basis(sb: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """U (out, ρ), float32: the left singular vectors of ``[ΔW_1 … ΔW_N]`` (out, N · in) at its numerical rank.

    ``sb`` (N, out, r), ``a`` (N, r, in): ΔW_i = sb_i a_i. With a_iᵀ = Q_i R_i, ``[ΔW_1 … ΔW_N] = C blockdiag(Q_iᵀ)``
    where ``C = [sb_1 R_1ᵀ … sb_N R_Nᵀ]`` (out, N r) and blockdiag(Q_iᵀ) has orthonormal rows, so C has the same
    left singular vectors and values; they come from C's thin QR and the float64 Gram matrix of its triangle (or of
    C itself, out × out, when N r >= out).
    """
    n, out_f, r = sb.shape
    r_a = torch.linalg.qr(a.transpose(1, 2))[1]                            # (N, r, r)
    c = (sb @ r_a.transpose(1, 2)).transpose(0, 1).reshape(out_f, n * r).float()     # (out, N r)
    if c.shape[1] < out_f:
        q_c, r_c = torch.linalg.qr(c)                                       # (out, N r), (N r, N r)
        r64 = r_c.double()
        lam, vec = torch.linalg.eigh(r64 @ r64.T)
        vec = q_c @ vec.float()
    else:
        c64 = c.double()
        lam, vec = torch.linalg.eigh(c64 @ c64.T)
        vec = vec.float()
    s = lam.flip(0).clamp_min(0).sqrt()
    return vec.flip(1)[:, :_kept(s, None, (out_f, n * a.shape[2]))].contiguous()


def knots(adapters: Sequence[Adapter], weights: Weights = None, *, density: float | None = None,
          scope: str = "global", base: str = "ties") -> Adapter:
    """KnOTS (Stoica et al., ICLR 2025), space ΔW: a base merge of the tasks' coordinates in one shared basis.

    Per module (the authors' ``SVDMerger`` in ``gstoica27/KnOTS`` ``task_merger.py``, ``concat_across_output``;
    FusionBench's ``subspace_alignment`` in ``fusion_bench/method/knots/knots_utils.py`` is the same step 1):
      1. ``[ΔW_1 … ΔW_N] = U Σ [V_1ᵀ … V_Nᵀ]`` (out, N · in), kept at its numerical rank (the authors keep σ > 1e-5
         and FusionBench σ > 1e-4, absolute thresholds; here ``rank_tolerance``, relative to σ_max), so that task
         i's coordinates ``Z_i = Σ V_iᵀ = Uᵀ ΔW_i`` (ρ, in) give ``ΔW_i = U Z_i`` exactly.
      2. ``base="ties"``: TIES on the Z_i (the authors' ``ties_masking`` + ``masked_merge``): each contributor keeps
         the top ``density`` of its coordinates by magnitude, over all modules (``scope="global"``, the authors'
         flattened vector) or per module; the sign of the summed trimmed coordinates is elected per entry; the
         agreeing coordinates, times w_i, are averaged over the contributors that agree (``merging_type: mean``).
         ``base="ta"``: ``Σ w_i Z_i``, which makes KnOTS exactly task arithmetic (U Uᵀ ΔW_i = ΔW_i).
      3. ``ΔW = U Z``.
    The weights act in step 2, as the authors' ``masked_merge(weights=...)`` and ``sim.merge.delta.ties`` apply
    them (trim and election see the unweighted coordinates); the basis is the contributors' own.

    Args:
        adapters: N adapters with the same modules and shapes (ranks may differ).
        weights: (N,) or (N, M); default 0.6 each: the authors' ``configs/vitB_r16_knots_ties.py`` scaling_coeffs
            for rank-16 ViT-B/32 LoRAs (KnOTS-TIES; pass weights with ``base="ta"``).
        density: TIES' kept fraction in (0, 1]; default 0.2 (the same config's topK 20, TIES' published k).
        scope: "global" or "module", as ``sim.merge.delta.ties``.
        base: "ties" (the paper's KnOTS-TIES) or "ta".
    Returns:
        One adapter, scaling 1, rank ρ per module (identity form if ρ > min(out, in)).
    """
    if base not in KNOTS_BASES:
        raise ValueError(f"knots base merge must be one of {', '.join(KNOTS_BASES)}, got {base!r}")
    if scope not in TIES_SCOPES:
        raise ValueError(f"knots scope (merge.ties_scope) must be one of {', '.join(TIES_SCOPES)}, got {scope!r}")
    d = check_density(density, TIES_DENSITY)
    check_compatible(adapters)
    modules = adapters[0].modules()
    w = resolve_weights(weights, len(adapters), len(modules), KNOTS_SCALE)
    # Step 1: each module's shared basis U and every task's coordinate factor P_i = Uᵀ s B_i: Z_i = P_i A_i
    coords, bases = [], []
    for m in modules:
        sb, a = stack_module(adapters, m, dtype=torch.float64)     # (N, out, r), (N, r, in)
        u = shared_basis(sb, a)                                             # (out, ρ)
        bases.append(u)
        n, out_f, r = sb.shape
        p = (u.T @ sb.transpose(0, 1).reshape(out_f, n * r).float()).view(-1, n, r).transpose(0, 1)
        coords.append((p.contiguous(), a.float()))                          # (N, ρ, r), (N, r, in)
    # Step 2: merge the coordinates (TIES: the streamed exact trim of sim.merge.streamed, disjoint mean);
    # step 3: ΔW = U Z
    merged = trimmed_merge(coords, w, d, scope, "ties_mean") if base == "ties" else None
    factors = {}
    for j, (m, u, (p, a)) in enumerate(zip(modules, bases, coords)):
        if base == "ties":
            z = merged[j]                                                   # (ρ, in)
        else:
            z = (w[:, j, None, None] * p).transpose(0, 1).reshape(p.shape[1], -1) @ a.reshape(-1, a.shape[2])
        factors[m] = _factors(u, z)
    return build_adapter(factors, adapters, "knots")
