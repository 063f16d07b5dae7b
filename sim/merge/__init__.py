"""Merge strategies: pure functions from contributors' adapters (+ coefficients) to a merged predictor.

One registry, ``STRATEGIES`` (name → function), one lookup, ``get_strategy``. Every strategy takes
``(adapters, weights=None, **options)`` and returns an ``Adapter`` (parameter space) or a ``Mixture`` (output space).
Nothing here knows about Ray, actors or time.

| name | space | weights w (default) | module |
|---|---|---|---|
| ``lora_avg`` | A and B factors: A = Σ w A_i, B = Σ w B_i | (N,) or (N, M); 1/N | ``factors`` |
| ``fusion`` | A and B factors, LoraHub-style, searched w | (N,) or (N, M); 1/N | ``fusion`` |
| ``mixture`` | output: Σ w_i softmax(logits_i) | (N,); 1/N | ``mixture`` |
| ``task_arithmetic`` | ΔW: Σ w_i ΔW_i | (N,) or (N, M); 1/N | ``delta`` |
| ``ties``, ``dare_ties`` | ΔW, peft ``merge_utils`` | (N,) or (N, M); 1 | ``delta`` |
| ``dare_linear``, ``magnitude_prune`` | ΔW, peft ``merge_utils`` | (N,) or (N, M); 1/N | ``delta`` |
| ``magmax`` | ΔW, per-entry max magnitude | (N,) or (N, M); 1 | ``delta`` |
| ``svd`` | ΔW: truncated SVD of Σ w_i ΔW_i (Med-LEGO) | (N,) or (N, M); 1/N | ``svd`` |

``ΔW_i = B_i A_i · alpha_i / r_i``. Parameter-space results carry the contributors' base fingerprint and are saved
with ``sim.model.save_adapter`` as peft adapter dirs whose rank is what the strategy produced and whose
``lora_alpha``/``alpha_pattern`` give the right scaling (ΔW-space results: scaling 1, alpha = rank). Per-task
linear heads are not merged into parameter-space results; a ``Mixture`` scores a task with that task's head.

Entry points for the merge actor and the CLI:

* ``merge(strategy, adapters, weights=None, *, cfg, foundation=None, proxy=None, seed=0, search=None)
  -> MergeResult(strategy, merged, coefficients, trace, merge_s, stages)`` — one shot; searches coefficients
  (nevergrad, ``sim.coefficients``) for fusion/mixture when given the foundation and proxy data.
* ``start_sequence(strategy) -> SequentialState`` and ``merge_step(state, adapter, *, foundation, proxy, cfg, seed)
  -> SequentialState`` — MedForge's sequential Fusion/Mixture: two coefficients searched per arriving commit on the
  distilled sets received so far; ``state.merged`` / ``state.coefficients`` / ``state.result``.
* ``save_mixture`` / ``load_mixture`` — a mixture as a dir of peft adapter dirs plus ``mixture.json``.
"""
from __future__ import annotations

from typing import Callable

from sim.merge.api import SEQUENTIAL, MergeResult, SequentialState, merge, merge_step, start_sequence
from sim.merge.base import check_compatible, default_weights
from sim.merge.delta import dare_linear, dare_ties, magmax, magnitude_prune, task_arithmetic, ties
from sim.merge.factors import lora_avg
from sim.merge.fusion import fusion
from sim.merge.mixture import Mixture, load_mixture, mixture, mixture_proba, save_mixture
from sim.merge.svd import svd

__all__ = ["STRATEGIES", "get_strategy", "merge", "merge_step", "start_sequence", "MergeResult", "SequentialState",
           "Mixture", "mixture_proba", "save_mixture", "load_mixture", "check_compatible", "default_weights",
           "SEQUENTIAL"]

STRATEGIES: dict[str, Callable] = {
    "lora_avg": lora_avg,
    "fusion": fusion,
    "mixture": mixture,
    "task_arithmetic": task_arithmetic,
    "ties": ties,
    "dare_linear": dare_linear,
    "dare_ties": dare_ties,
    "magnitude_prune": magnitude_prune,
    "magmax": magmax,
    "svd": svd,
}


def get_strategy(name: str) -> Callable:
    """Look a merge strategy up by name; a typo lists the known names."""
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown merge strategy {name!r}; known: {', '.join(STRATEGIES)}") from None
