"""Shared pieces of the merge strategies: input checks, weights, and turning merged factors into an ``Adapter``.

Every strategy works module by module. For module ``m`` of contributor ``i``:
``A_i`` (r_i, in), ``B_i`` (out, r_i), scaling ``s_i = alpha_i / r_i`` and ``ΔW_i = s_i B_i A_i`` (out, in).
Weights are either one per adapter, shape (N,), or one per adapter and module, shape (N, M) with the
modules in ``adapters[0].modules()`` order ("per-layer" granularity).
"""
from __future__ import annotations

from collections import Counter
from typing import Sequence, Union

import numpy as np
import torch

from sim.model import PEFT_PREFIX, Adapter

Weights = Union[None, Sequence[float], np.ndarray, torch.Tensor]

def collect_heads(adapters: Sequence[Adapter]) -> dict[str, dict[str, torch.Tensor]]:
    """task → linear head of the contributors that carry one (Med-LEGO protocol; the latest wins)."""
    return {a.meta["task"]: a.head for a in adapters if a.head is not None and a.meta.get("task")}


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


def dense_factors(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact LoRA factors (A, B) of a dense ΔW (out, in) at rank min(out, in), scaling 1.

    A dense merge (ties, dare, magnitude pruning, magmax) is generically full rank, so no factorisation
    is smaller than rank min(out, in); the identity factor makes it exact at no cost:
    in <= out: A = I (in, in), B = ΔW; otherwise A = ΔW, B = I (out, out).
    """
    out_f, in_f = delta.shape
    if in_f <= out_f:
        return torch.eye(in_f, dtype=delta.dtype), delta.contiguous()
    return delta.contiguous(), torch.eye(out_f, dtype=delta.dtype)


def build_adapter(factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]], adapters: Sequence[Adapter],
                  strategy: str) -> Adapter:
    """An ``Adapter`` from {module: (A, B, scaling)}, with alpha chosen so that alpha / r = scaling per module.

    The most common alpha becomes ``alpha``; modules that differ go to ``alpha_pattern`` (peft's convention,
    which ``Adapter.to_peft_config`` writes next to the matching ``rank_pattern``).
    """
    alphas = {m: float(s) * a.shape[0] for m, (a, _, s) in factors.items()}
    base_alpha = Counter(alphas.values()).most_common(1)[0][0]
    weights = {}
    for m, (a, b, _) in factors.items():
        weights[f"{PEFT_PREFIX}{m}.lora_A.weight"] = a.detach().to(torch.float32).contiguous()
        weights[f"{PEFT_PREFIX}{m}.lora_B.weight"] = b.detach().to(torch.float32).contiguous()
    pattern = {m: a for m, a in alphas.items() if a != base_alpha}
    return Adapter(weights, base_alpha, common_base(adapters), pattern,
                   meta={"merge_strategy": strategy, "n_contributors": len(adapters)})
