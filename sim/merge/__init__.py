"""Merge strategies: pure functions from contributors' adapters (+ coefficients) to a merged predictor.

One registry, ``SPECS`` (name → ``StrategySpec``, in ``specs``), one lookup, ``get_spec``. The spec is the single
source of truth about a strategy — its function, space, whether it is searched, sequential, its default weights,
whether it needs proxy data, accepts mixed ranks or needs the same modules, and its paper; callers read the spec and
never compare strategy names. ``STRATEGIES`` (name → function) and ``get_strategy`` are views of it. Every
strategy takes ``(adapters, weights=None, **options)`` and returns an ``Adapter`` (parameter space) or a
``Mixture`` or ``Router`` (output space). Nothing here knows about Ray, actors or time. The table below summarises the specs:

| name | space | weights w (default) | searched, sequential | module |
|---|---|---|---|---|
| ``lora_avg`` | factors: A = Σ w A_i, B = Σ w B_i | (N,) or (N, M); 1/N | no | ``factors`` |
| ``fusion`` | factors, LoraHub-style, searched w | (N,) or (N, M); 1/N | yes | ``fusion`` |
| ``mixture`` | output: Σ w_i softmax(logits_i) | (N,); 1/N | yes | ``mixture`` |
| ``task_arithmetic`` | delta: Σ w_i ΔW_i | (N,) or (N, M); λ 0.3 | no | ``delta`` |
| ``ties`` | delta: trim 20 % of each task vector, elect, disjoint sum | (N,) or (N, M); λ 0.3 | no | ``delta`` |
| ``dare_ties`` | delta, peft ``merge_utils``' definition (drop half, TIES) | (N,) or (N, M); λ 0.5 | no | ``delta`` |
| ``dare_linear`` | delta, peft ``merge_utils``' definition (drop half, sum) | (N,) or (N, M); λ 0.3 | no | ``delta`` |
| ``magnitude_prune`` | delta, peft ``merge_utils``' definition | (N,) or (N, M); 1/N | no | ``delta`` |
| ``magmax`` | delta, per-entry max magnitude | (N,) or (N, M); λ 0.5 | no | ``delta`` |
| ``median`` | delta: per entry the median of the w_i ΔW_i (Yin et al.; even N: mean of the two middle) | (N,) or (N, M); 1 | no | ``robust`` |
| ``trimmed_mean`` | delta: per entry the mean without the ⌊β N⌋ largest and smallest, β 0.1 | (N,) or (N, M); 1 | no | ``robust`` |
| ``clipped_mean`` | delta: Σ w_i min(1, τ/‖ΔW_i‖) ΔW_i, τ the median norm (Sun et al.) | (N,) or (N, M); 1/N | no | ``robust`` |
| ``svd`` | delta: truncated SVD of Σ w_i ΔW_i (Med-LEGO) | (N,) or (N, M); 1/N | no | ``svd`` |
| ``tsv`` | delta: TSV-M, 1/N of each task's singular vectors, orthogonalised | (N,) or (N, M); 1 | no | ``subspace`` |
| ``iso_c`` | delta: Σ w_i ΔW_i with a flat (isotropic) spectrum | (N,) or (N, M); 1 | no | ``subspace`` |
| ``iso_cts`` | delta: Iso-C's common subspace + task-specific ones | (N,) or (N, M); 1 | no | ``subspace`` |
| ``knots`` | delta: TIES on the tasks' coordinates in one shared SVD basis | (N,) or (N, M); λ 0.6 | no | ``subspace`` |
| ``regmean`` | delta: (Σ ΔW_i G̃_i)(Σ G̃_i)⁻¹, G_i the layer's input Gram on set i | (N,) or (N, M); 1/N | no | ``data_aware`` |
| ``fisher`` | factors: Σ w_i F_i θ_i / Σ w_i F_i, F_i the diagonal Fisher on set i | (N,) or (N, M); 1/N | no | ``data_aware`` |

RegMean and Fisher merging are data-aware: their statistics (``spec.statistic``) are computed by the merge actor on
the distilled set each adapter was committed with, once per adapter (``merge(..., foundation, proxy)`` with one set per
adapter, or an ``ArrivedProxy``); their weights are not searched.

| ``router`` | output: Σ r_i(x) softmax(logits_i), r(x) a top-2 gate on the foundation's feature (FedKIM) | per image, trained | no (fitted) | ``router`` |
| ``task_route`` | output: uniform over the adapters of the task a classifier predicts (LoRKD) | per image, trained | no (fitted) | ``router`` |

The routers (``spec.fitted``) are trained, not searched: a bounded, seeded AdamW fit of the gate (or task
classifier) on every distilled set received, which a branch repeats on every commit (the experts' probabilities on
the sets kept in the branch's ``ProbabilityCache``). They are saved as a dir of peft adapter dirs plus
``router.json`` and ``gate.safetensors`` (``save_router`` / ``load_router``).

| ``opcm`` | delta, continual: each new ΔW projected off the merged update's top singular subspace, rescaled | (N,); 1 | no | ``continual`` |
| ``continual_task_arithmetic`` | delta, continual: M += w ΔW_t | (N,); λ 0.3 | no | ``continual`` |
| ``continual_ties`` | delta, continual: M += w TIES(M, ΔW_t) | (N,); λ 0.5 | no | ``continual`` |
| ``continual_weight_average`` | delta, continual: the running mean | (N,); 1/N | no | ``continual`` |
| ``continual_magmax`` | delta, continual: per entry the larger of M and w ΔW_t | (N,); λ 0.5 | no | ``continual`` |

TIES, DARE and magnitude pruning (and KnOTS' TIES step) stream ΔW through row blocks of all contributors with exact
top-k trims found without a sort (``streamed``); the median and the trimmed mean take their order statistics over the
same row blocks (``robust``). The continual merges (FusionBench's OPCM study; ``spec.continual``)
are stepped by a branch as commits arrive (``continual_step``), which keeps only their small state; their one-shot
function folds the steps over the adapters in the order given, so order matters for OPCM and continual TIES.

``ΔW_i = B_i A_i · alpha_i / r_i``. Parameter-space results carry the contributors' base fingerprint and are saved
with ``sim.model.save_adapter`` as peft adapter dirs whose rank is what the strategy produced and whose
``lora_alpha``/``alpha_pattern`` give the right scaling (ΔW-space results: scaling 1, alpha = rank). Per-task
linear heads travel with every result: a parameter-space merge carries each task's contributors' average head;
in a ``Mixture`` each adapter scores with its own.

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

from sim.registry import lazy_exports

# Imported on first use (PEP 562), so that ``sim.merge.specs`` — which config validation reads — never imports torch.
_EXPORTS = {
    "SPECS": "sim.merge.specs:SPECS", "StrategySpec": "sim.merge.specs:StrategySpec",
    "get_spec": "sim.merge.specs:get_spec", "default_weights": "sim.merge.specs:default_weights",
    "STRATEGIES": "sim.merge.api:STRATEGIES", "get_strategy": "sim.merge.api:get_strategy",
    "merge": "sim.merge.api:merge", "merge_step": "sim.merge.api:merge_step",
    "start_sequence": "sim.merge.api:start_sequence", "MergeResult": "sim.merge.api:MergeResult",
    "SequentialState": "sim.merge.api:SequentialState", "check_compatible": "sim.merge.base:check_compatible",
    "Mixture": "sim.merge.mixture:Mixture", "mixture_proba": "sim.merge.mixture:mixture_proba",
    "save_mixture": "sim.merge.mixture:save_mixture", "load_mixture": "sim.merge.mixture:load_mixture",
    "Router": "sim.merge.router:Router", "router_proba": "sim.merge.router:router_proba",
    "save_router": "sim.merge.router:save_router", "load_router": "sim.merge.router:load_router",
    "save_predictor": "sim.merge.api:save_predictor",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
