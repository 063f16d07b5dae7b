"""Shared pieces of the merge strategies: input checks, weights, and turning merged factors into an ``Adapter``.

Every strategy works module by module. For module ``m`` of contributor ``i``:
``A_i`` (r_i, in), ``B_i`` (out, r_i), scaling ``s_i = alpha_i / r_i`` and ``ΔW_i = s_i B_i A_i`` (out, in).
Weights are either one per adapter, shape (N,), or one per adapter and module, shape (N, M) with the
modules in ``adapters[0].modules()`` order ("per-layer" granularity).
"""
from __future__ import annotations

import math

from collections import Counter
from typing import Sequence, Union

import numpy as np
import torch

from sim.model import PEFT_PREFIX, Adapter, pack_heads

Weights = Union[None, Sequence[float], np.ndarray, torch.Tensor]

def merge_heads(adapters: Sequence[Adapter]) -> tuple[dict[str, torch.Tensor] | None, dict[str, int]]:
    """Per-task linear heads of a merge: ``(head in the per-task layout or None, {task: contributors})``.

    Med-LEGO (Zhu et al., arXiv 2503.01164) merges the backbone update and keeps each task's own head; with one
    contributor per task that is exactly that task's head. When several contributors hold a task, their heads
    are averaged, weight and bias alike — FedAvg of the classifier (McMahan et al., 2017) with equal client
    weights: every head reads the same backbone feature space, and the merge coefficients weigh backbone
    updates, not classifiers. An already merged contributor counts as the number of heads it averaged
    (``Adapter.head_counts``), so folding ``[merged so far, new]`` gives the same average as merging all
    contributors at once. ``(None, {})`` when no contributor has a linear head (prototype heads).
    """
    sums: dict[str, list] = {}                                   # task -> [Σ c·W, Σ c·b, Σ c]
    for a in adapters:
        counts = a.head_counts()
        for task, head in a.task_heads().items():
            c = counts[task]
            w, b = head["weight"].detach().double() * c, head["bias"].detach().double() * c
            if task not in sums:
                sums[task] = [w, b, c]
                continue
            if sums[task][0].shape != w.shape:
                raise ValueError(f"linear heads of task {task!r} have shapes {tuple(sums[task][0].shape)} and "
                                 f"{tuple(w.shape)}; contributors of one task must share its classes")
            sums[task] = [sums[task][0] + w, sums[task][1] + b, sums[task][2] + c]
    if not sums:
        return None, {}
    heads = {t: {"weight": (w / c).float().contiguous(), "bias": (b / c).float().contiguous()}
             for t, (w, b, c) in sums.items()}
    return pack_heads(heads), {t: int(c) for t, (_, _, c) in sums.items()}


def collect_heads(adapters: Sequence[Adapter]) -> dict[str, dict[str, torch.Tensor]]:
    """task → the average linear head of that task's contributors (``merge_heads``); {} with prototype heads."""
    head, _ = merge_heads(adapters)
    return {} if head is None else Adapter({}, 1.0, head=head).task_heads()


def base_reference(adapters: Sequence[Adapter]) -> Adapter | None:
    """The ``base`` reference's predictor: the frozen backbone (no LoRA update) with each task's contributors'
    average head (``merge_heads``), so ``base`` differs from a merge only by the backbone update. ``None`` — the
    bare foundation and its prototype head — when no contributor has a linear head: the foundation has no
    trained classifier of its own."""
    head, counts = merge_heads(adapters)
    if head is None:
        return None
    return Adapter({}, 1.0, common_base(adapters), head=head,
                   meta={"merge_strategy": "base", "head_counts": counts, "n_contributors": len(adapters)})


def scaled_factors(adapter: Adapter, module: str, w: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(w s B (out, r), A (r, in)) in float32: w ΔW = (w s B) A."""
    a, b = adapter.factors(module)
    return b.float() * (w * adapter.scaling(module)), a.float()


def check_density(density: float | None, default: float) -> float:
    """``density``, or the strategy's published ``default`` when ``None``; one clear error outside (0, 1]."""
    d = default if density is None else float(density)
    if not 0 < d <= 1:
        raise ValueError(f"density (merge.density) must be a number in (0, 1], got {density!r}")
    return d


def check_compatible(adapters: Sequence[Adapter], *, same_modules: bool = True, same_ranks: bool = False) -> None:
    """Raise one ``ValueError`` unless the adapters can be merged with each other.

    Checks, like fusion_bench's ``state_dict_sub(strict=True)``: at least one adapter; base fingerprints agree
    where present; the same adapted modules (``same_modules``); per module the same ``in``/``out`` shapes; and,
    for strategies that add factors, the same rank per module (``same_ranks``).
    """
    if len(adapters) == 0:
        raise ValueError("merge needs at least one adapter")
    bases = {a.base_fingerprint for a in adapters if a.base_fingerprint}
    if len(bases) > 1:
        raise ValueError(f"adapters were trained on different bases: {', '.join(sorted(bases))}")
    if not same_modules:
        return
    first = adapters[0].modules()
    for i, a in enumerate(adapters[1:], start=1):
        mods = a.modules()
        if mods != first:
            extra = sorted(set(mods) ^ set(first))
            raise ValueError(f"adapter {i} targets different modules than adapter 0 (differ in {extra[0]}"
                             f"{' and more' if len(extra) > 1 else ''})")
    for m in first:
        shapes = {(a.factors(m)[1].shape[0], a.factors(m)[0].shape[1]) for a in adapters}
        if len(shapes) > 1:
            raise ValueError(f"module {m} has different shapes (out, in) across adapters: {sorted(shapes)}")
        if same_ranks:
            ranks = sorted({a.rank(m) for a in adapters})
            if len(ranks) > 1:
                raise ValueError(f"module {m} has ranks {ranks}; averaging A and B factors needs equal ranks")


def common_base(adapters: Sequence[Adapter]) -> str | None:
    """The base fingerprint the adapters share (``None`` if none records one)."""
    return next((a.base_fingerprint for a in adapters if a.base_fingerprint), None)


def resolve_weights(weights: Weights, n: int, n_modules: int, default: float | None = None) -> torch.Tensor:
    """Weights as a float32 (N, M) table; ``None`` → ``default`` everywhere (``None`` default → 1/N).

    (N,) is broadcast over modules (per-adapter granularity); (N, M) is per adapter and module.
    """
    if weights is None:
        return torch.full((n, n_modules), 1.0 / n if default is None else float(default))
    w = torch.as_tensor(np.asarray(weights, dtype=np.float64), dtype=torch.float32)
    if w.ndim == 1 and w.shape[0] == n:
        w = w[:, None].expand(n, n_modules)
    elif not (w.ndim == 2 and tuple(w.shape) == (n, n_modules)):
        raise ValueError(f"weights must have {n} entries (one per adapter) or shape ({n}, {n_modules}) "
                         f"(per adapter and module), got shape {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise ValueError("weights must be finite numbers")
    return w.contiguous()


def rank_tolerance(sigma_max: float, shape: tuple[int, int]) -> float:
    """Singular values at or below this are round-off of a float32 matrix of ``shape``.

    numpy's ``matrix_rank`` default (Press et al., Numerical Recipes, 2nd ed., §2.6): σ_max · max(M, N) · eps,
    with eps of float32, the precision ΔW is stored in.
    """
    return sigma_max * max(shape) * torch.finfo(torch.float32).eps


POWER_STEPS = 30         # power iterations for λ_max's estimate in ``certainly_full_rank`` (any number is exact)
UPPER_FACTORS = (1.01, 1.1, 1.5)   # tried in turn over that estimate until one is proven an upper bound of λ_max


def certainly_full_rank(gram: torch.Tensor, shape: tuple[int, int]) -> bool:
    """Whether the float64 Gram matrix ``gram`` (q, q) of a ΔW of ``shape`` proves ΔW of full numerical rank q: every
    σ_i > ``rank_tolerance``(σ_max), i.e. λ_min > c² λ_max with c = max(shape) · eps(float32).

    Cholesky factorisations, each a small part of an eigensolve's cost: one of U·I − G succeeds only if λ_max < U
    (U: 1 %, else 10 % or 50 %, over a power-iteration estimate of λ_max), one of G − μ I only if λ_min > μ, μ = c² U (1 + 1e-3) plus
    a margin for Cholesky's round-off (~1e-13 λ_max, Higham, Accuracy and Stability of Numerical Algorithms, §10.1).
    ``True`` means the eigenvalues that ``dense_factors`` would compute all clear the tolerance (their error, ~1e-16
    λ_max, is far inside the margins), so the rank is the one the eigensolve gives; ``False`` decides nothing (the
    eigensolve then runs).
    """
    q = gram.shape[0]
    if q == 0:
        return False
    v = gram.abs().sum(dim=1) + 1.0                       # positive start: not orthogonal to the top eigenvector
    for _ in range(POWER_STEPS):
        w = gram @ v
        norm = float(w.norm())
        if not math.isfinite(norm) or norm == 0.0:
            return False
        v = w / norm
    theta = float(v @ (gram @ v)) + 1e-300               # Rayleigh quotient: θ <= λ_max
    eye = torch.eye(q, dtype=gram.dtype)
    upper = next((f * theta for f in UPPER_FACTORS if int(torch.linalg.cholesky_ex(f * theta * eye - gram).info) == 0),
                 None)
    if upper is None:
        return False                                      # no factor gave an upper bound: decide nothing
    c = max(shape) * torch.finfo(torch.float32).eps
    mu = c * c * upper * (1 + 1e-3) + 1e-12 * upper
    return int(torch.linalg.cholesky_ex(gram - mu * eye).info) == 0


def dense_factors(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The smallest exact LoRA factors (A (r, in), B (out, r)) of a dense ΔW (out, in), scaling 1.

    r is ΔW's numerical rank (``rank_tolerance``), so a merge is stored at the rank it has, not the layer's width:
    a LoRA adapter holds r · (in + out) numbers per module and no exact factorisation has fewer. The rank comes
    from the eigenvalues of the float64 Gram matrix of the shorter side (σ² resolved to ~1e-16 σ_max², far below
    the tolerance; an SVD would cost about twice as much). r < min(out, in): A = V_rᵀ, B = ΔW V_r (ΔW projected
    on its r leading right singular vectors: off by at most the dropped round-off). r = min(out, in), what ties,
    DARE and MagMax generically give: the identity form (in <= out: A = I, B = ΔW; else A = ΔW, B = I), bit-exact
    at the same size. Then r · (in + out) exceeds the in · out of a dense ΔW, which a user could ship instead (e.g.
    folded into the base weight); a peft LoRA adapter cannot hold a dense ΔW, so the LoRA form is what is stored.
    An all-zero ΔW keeps one zero factor (peft needs r >= 1).
    """
    delta = delta.float().contiguous()
    out_f, in_f = delta.shape
    wide = in_f > out_f                                   # Gram of the shorter side: (q, q), q = min(out, in)
    d64 = delta.double()
    gram = d64 @ d64.T if wide else d64.T @ d64
    if certainly_full_rank(gram, (out_f, in_f)):          # what a merge of many updates gives: no eigensolve
        r = min(out_f, in_f)
    else:
        sigma = torch.linalg.eigvalsh(gram).flip(0).clamp_min(0).sqrt()      # descending
        r = int((sigma > rank_tolerance(float(sigma[0]), (out_f, in_f))).sum())
    if r == min(out_f, in_f):
        if wide:
            return delta, torch.eye(out_f, dtype=delta.dtype)
        return torch.eye(in_f, dtype=delta.dtype), delta
    v = torch.linalg.eigh(gram)[1].flip(1)[:, :max(r, 1)].float()   # (q, r): leading singular vectors, shorter side
    if wide:                                               # ΔW ≈ U_r (U_rᵀ ΔW)
        return (v.T @ delta).contiguous(), v.contiguous()
    return v.T.contiguous(), (delta @ v).contiguous()      # ΔW ≈ (ΔW V_r) V_rᵀ


def build_adapter(factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]], adapters: Sequence[Adapter],
                  strategy: str) -> Adapter:
    """An ``Adapter`` from {module: (A, B, scaling)}, with alpha chosen so that alpha / r = scaling per module.

    The most common alpha becomes ``alpha``; modules that differ go to ``alpha_pattern`` (peft's convention,
    which ``Adapter.to_peft_config`` writes next to the matching ``rank_pattern``). Every parameter-space
    strategy ends here, so every one carries its contributors' per-task linear heads (``merge_heads``).
    """
    alphas = {m: float(s) * a.shape[0] for m, (a, _, s) in factors.items()}
    base_alpha = Counter(alphas.values()).most_common(1)[0][0]
    weights = {}
    for m, (a, b, _) in factors.items():
        weights[f"{PEFT_PREFIX}{m}.lora_A.weight"] = a.detach().to(torch.float32).contiguous()
        weights[f"{PEFT_PREFIX}{m}.lora_B.weight"] = b.detach().to(torch.float32).contiguous()
    pattern = {m: a for m, a in alphas.items() if a != base_alpha}
    head, counts = merge_heads(adapters)
    meta = {"merge_strategy": strategy, "n_contributors": len(adapters)} | ({"head_counts": counts} if counts else {})
    return Adapter(weights, base_alpha, common_base(adapters), pattern, head, meta)
