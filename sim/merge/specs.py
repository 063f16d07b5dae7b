"""The strategy registry: name → ``StrategySpec``, the one place that says what each merge strategy is.

timm's ``register_model`` keeps a model's pretrained config beside its constructor and callers read it through
``get_pretrained_cfg_value``; here a strategy's function, the space it merges in, whether its coefficients are
searched, whether it is merged commit by commit, its default weights, what it needs and what it accepts live in
its spec, and callers read the spec instead of comparing names. ``tests/test_strategy_specs.py`` checks every
spec's claims against an independent re-derivation on tiny adapters.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from sim.registry import lookup, resolve

# This module imports neither torch nor the strategies' modules: configs validate strategy names against it, and
# an institution actor (which builds a config but never merges) must stay free of torch. Functions are named by
# "module:attr" and imported on first use.
# Published defaults, read by ``sim.merge.delta`` and ``sim.merge.subspace`` (their functions' ``None`` options) and
# by the specs below. The scales are FusionBench's defaults for CLIP ViT-B/32 on its eight tasks
# (``tanganke/fusion_bench``, ``config/method/*.yaml``; KnOTS': its authors' ViT-B/32 config); a scale is the weight of
# every contributor when none are given.
TA_SCALE = 0.3            # task arithmetic λ: FusionBench config/method/task_arithmetic.yaml scaling_factor
TIES_SCALE = 0.3          # TIES λ: FusionBench config/method/ties_merging.yaml scaling_factor
TIES_DENSITY = 0.2        # TIES keeps the top k = 20 %: Yadav et al. 2023; FusionBench ties_merging.yaml threshold 20
DARE_DENSITY = 0.5        # DARE drop rate p = 0.5 (density 1 - p): FusionBench config/method/dare/*.yaml sparsity_ratio
DARE_LINEAR_SCALE = 0.3   # DARE + task arithmetic λ: FusionBench config/method/dare/task_arithmetic.yaml
DARE_TIES_SCALE = 0.5     # DARE + TIES λ: FusionBench config/method/dare/ties_merging.yaml
MAGMAX_SCALE = 0.5        # MagMax λ: FusionBench config/method/magmax/magmax.yaml (= MagMax's merge_8datasets.py 0.5)
PRUNE_DENSITY = 0.5       # magnitude_prune is no paper's method: no published default; half the entries
TSV_SCALE = 1.0           # TSV-M α: FusionBench config/method/task_singular_vector/TaskSingularVectorMerging.yaml
ISO_SCALE = 1.0           # Iso-C, Iso-CTS: FusionBench config/method/isotropic_merging/iso_c{,ts}.yaml scaling_factor
ISO_CTS_COMMON_FRACTION = 0.8   # Iso-CTS: FusionBench iso_cts.yaml common_space_fraction (= danielm1405/iso-merging's)
KNOTS_SCALE = 0.6         # KnOTS-TIES λ for rank-16 ViT-B/32 LoRAs: gstoica27/KnOTS configs/vitB_r16_knots_ties.py
REGMEAN_ALPHA = 0.95      # RegMean off-diagonal scale: FusionBench config/method/regmean/clip_regmean.yaml
FISHER_FLOOR = 1e-6       # Fisher merging: FusionBench config/method/fisher_merging/clip_fisher_merging.yaml
OPCM_ALPHA = 0.5                 # FusionBench config/method/opcm/opcm.yaml alpha: share of the protected spectrum
CONTINUAL_TA_SCALE = 0.3         # FusionBench config/method/opcm/task_arithmetic.yaml scaling_factor
CONTINUAL_TIES_SCALE = 0.5       # FusionBench config/method/opcm/ties_merging.yaml scaling_factor (one-shot: 0.3)
CONTINUAL_TIES_DENSITY = 0.2     # FusionBench config/method/opcm/ties_merging.yaml threshold 20 (percent kept)
CONTINUAL_MAGMAX_SCALE = 0.5     # FusionBench config/method/magmax/magmax.yaml scaling_factor
ROBUST_SCALE = 1.0        # median, trimmed_mean: a weight scales an update before the order statistic; 1 = Yin et al.'s
TRIM_FRACTION = 0.1       # trimmed_mean β: Yin et al. 2018 need β >= the Byzantine share; 0.1 guards up to 10 %
# The routers' training (``sim.merge.router``, whose module doc says where each comes from)
ROUTER_TOP_K = 2          # FedKIM's Top2Gating (gate_mode "top2_gate", the only one its MoeLoraConfig accepts)
ROUTER_STEPS = 100        # forgesim's: bounded AdamW steps on a few hundred distilled images
ROUTER_LR = 1e-2          # forgesim's (FedKIM's 5e-4 is for 20 000 steps of an LLM-scale model)
ROUTER_BATCH = 16         # FedKIM config FedMEKI_train.yaml: train_batch_size 16
KNOTS_BASES = ("ties", "ta")         # KnOTS' base merge of the shared-basis coordinates: TIES (the paper's) or TA
TIES_SCOPES = ("global", "module")   # TIES trims each contributor's whole task vector (the paper's) or each module
TIES_DISJOINT = ("sum", "mean")      # TIES' disjoint merge: FusionBench's default sum (with λ 0.3) or the paper's mean

SPACES = ("factors", "delta", "output")


@dataclass(frozen=True)
class StrategySpec:
    """What callers need to know about one merge strategy.

    ``fn(adapters, weights=None, **options)`` is the pure merge (``impl``: where it lives, ``module:attr``); ``space``: "factors" (A and B combined
    separately), "delta" (ΔW = s B A combined), "output" (a ``Mixture`` of predictions). ``searched``: its
    coefficients are searched on proxy data by default; ``sequential``: a branch merges it commit by commit
    (``merge_step``), so arrival order matters by design. ``default_weight``: weight per contributor when none are
    given (``None`` = 1/N). ``needs_proxy``: needs the distilled sets to merge as specified. ``mixed_ranks``:
    accepts contributors of different ranks per module; ``same_modules``: needs every contributor to adapt the
    same modules. ``order_invariant``: ``fn``'s result does not depend on the contributors' order (weights
    permuted with them); ``seeded``: ``fn`` draws random numbers from its ``seed`` option. ``continual``: a branch
    merges it as commits arrive with ``sim.merge.continual.step``, keeping only the strategy's small state (no
    search; ``fn`` folds ``step`` over the adapters in the order given, with one weight per adapter). ``exact_options``:
    options under which nothing is pruned or truncated, so one contributor at weight 1 comes back unchanged;
    ``one_is_identity``: that holds at all (``False`` for a merge that reshapes even a single update, as Iso-C and
    Iso-CTS flatten its spectrum).
    ``default_options``: the published value of each option ``fn`` takes as ``None`` (e.g. TIES' density 0.2),
    which a ``null`` config field (``merge.density``) leaves in force.
    ``search_loss(foundation, data, adapters) -> loss(w)`` (``loss_impl``): a faster equivalent of the generic search objective
    (``None``: cross-entropy of ``fn(adapters, w)`` on the proxy data).
    ``search_batch_loss(foundation, data, adapters) -> loss(W)`` (``batch_loss_impl``): the same objective of C
    candidates at once, W (C, *shape(w)) → (C,), in one stacked forward; a search with ``merge.search_batch`` > 1
    asks that many candidates together only for a strategy that has one (``None``: one-at-a-time asks, whatever
    ``merge.search_batch`` says).
    ``statistic`` (``statistic_impl``): ``(foundation, adapter, distilled set) -> statistic`` of one contributor on
    the distilled set it arrived with (RegMean's input Grams, Fisher merging's diagonal Fisher), passed to ``fn`` as
    the list ``statistic_option=[...]``, one per contributor (``sim.merge.api`` computes each once per adapter).
    ``fitted``: ``fn`` trains a predictor on the distilled sets (the routers' gate or task classifier): it takes no
    weights (its weights over the contributors are per image) and is called as ``fn(adapters, None,
    foundation=..., proxy=[the set each adapter arrived with], seed=..., cache=...)``; a branch fits it again on
    every commit, on every set received so far.
    """

    name: str
    impl: str
    space: str
    searched: bool
    sequential: bool
    default_weight: float | None
    needs_proxy: bool
    mixed_ranks: bool
    same_modules: bool
    citation: str
    order_invariant: bool = True
    seeded: bool = False
    exact_options: tuple[tuple[str, float], ...] = ()
    one_is_identity: bool = True
    default_options: tuple[tuple[str, float], ...] = ()
    loss_impl: str | None = None
    batch_loss_impl: str | None = None
    statistic_impl: str | None = None
    statistic_option: str = ""
    continual: bool = False
    fitted: bool = False

    @property
    def statistic(self) -> Callable | None:
        """``statistic_impl`` imported (``None`` for a strategy that needs no per-contributor statistic)."""
        return None if self.statistic_impl is None else resolve(self.statistic_impl)

    @property
    def fn(self) -> Callable:
        """The merge function, ``impl`` imported."""
        return resolve(self.impl)

    @property
    def search_loss(self) -> Callable | None:
        """``loss_impl`` imported (``None`` without one)."""
        return None if self.loss_impl is None else resolve(self.loss_impl)

    @property
    def search_batch_loss(self) -> Callable | None:
        """``batch_loss_impl`` imported (``None`` without one)."""
        return None if self.batch_loss_impl is None else resolve(self.batch_loss_impl)

    def __post_init__(self) -> None:
        if self.space not in SPACES:
            raise ValueError(f"strategy {self.name}: space must be one of {', '.join(SPACES)}, got {self.space!r}")
        if (self.statistic_impl is None) != (not self.statistic_option) or (self.statistic_impl and not self.needs_proxy):
            raise ValueError(f"strategy {self.name}: a statistic needs its option name and needs_proxy")
        if self.continual and (self.sequential or self.searched or self.space != "delta"):
            raise ValueError(f"strategy {self.name}: a continual merge is a ΔW-space fold, neither searched nor "
                             f"sequential")
        if self.fitted and (self.space != "output" or not self.needs_proxy or self.searched or self.sequential
                            or self.default_weight is not None):
            raise ValueError(f"strategy {self.name}: a fitted predictor is output-space, trained on the distilled sets "
                             f"(needs_proxy), neither searched nor sequential, and takes no weights")

    def default_weights(self, n: int) -> np.ndarray:
        """The weights (N,) ``fn`` uses when given none."""
        if n == 0:
            return np.zeros(0)
        return np.full(n, 1.0 / n if self.default_weight is None else self.default_weight)


_TRIM = (("density", 1.0),)
_SPECS = (
    StrategySpec("lora_avg", "sim.merge.factors:lora_avg", "factors", searched=False, sequential=False, default_weight=None,
                 needs_proxy=False, mixed_ranks=False, same_modules=True,
                 citation="Zhu et al., Med-LEGO, MICCAI 2025 (arXiv 2503.01164), eq. 2 pre-merge baseline"),
    StrategySpec("fusion", "sim.merge.fusion:fusion", "factors", searched=True, sequential=True, default_weight=None,
                 needs_proxy=True, mixed_ranks=False, same_modules=True, loss_impl="sim.merge.fusion:fusion_loss",
                 batch_loss_impl="sim.merge.fusion:fusion_batch_loss",
                 citation="Tan et al., MedForge (arXiv 2502.16055), official model_fusion.py; LoraHub, Huang et al. "
                          "(arXiv 2307.13269)"),
    StrategySpec("mixture", "sim.merge.mixture:mixture", "output", searched=True, sequential=True, default_weight=None,
                 needs_proxy=True, mixed_ranks=True, same_modules=False, loss_impl="sim.merge.mixture:mixture_search_loss",
                 citation="Tan et al., MedForge (arXiv 2502.16055), official model_mixture.py"),
    StrategySpec("task_arithmetic", "sim.merge.delta:task_arithmetic", "delta", searched=False, sequential=False,
                 default_weight=TA_SCALE, needs_proxy=False, mixed_ranks=True, same_modules=True,
                 citation="Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023 (arXiv 2212.04089); "
                          "λ = 0.3: FusionBench (tanganke/fusion_bench) config/method/task_arithmetic.yaml"),
    StrategySpec("ties", "sim.merge.delta:ties", "delta", searched=False, sequential=False, default_weight=TIES_SCALE,
                 needs_proxy=False, mixed_ranks=True, same_modules=True, exact_options=_TRIM,
                 default_options=(("density", TIES_DENSITY),),
                 citation="Yadav et al., TIES-Merging, NeurIPS 2023 (arXiv 2306.01708); k = 20 %, λ = 0.3: "
                          "FusionBench config/method/ties_merging.yaml"),
    StrategySpec("dare_linear", "sim.merge.delta:dare_linear", "delta", searched=False, sequential=False,
                 default_weight=DARE_LINEAR_SCALE, needs_proxy=False, mixed_ranks=True, same_modules=True,
                 order_invariant=False, seeded=True, exact_options=_TRIM, default_options=(("density", DARE_DENSITY),),
                 citation="Yu et al., Language Models are Super Mario (DARE), ICML 2024 (arXiv 2311.03099); "
                          "peft.utils.merge_utils; p = 0.5, λ = 0.3: FusionBench "
                          "config/method/dare/task_arithmetic.yaml"),
    StrategySpec("dare_ties", "sim.merge.delta:dare_ties", "delta", searched=False, sequential=False,
                 default_weight=DARE_TIES_SCALE, needs_proxy=False, mixed_ranks=True, same_modules=True,
                 order_invariant=False, seeded=True, exact_options=_TRIM, default_options=(("density", DARE_DENSITY),),
                 citation="Yu et al., DARE, ICML 2024 (arXiv 2311.03099) + Yadav et al., TIES-Merging, NeurIPS 2023 "
                          "(arXiv 2306.01708); peft.utils.merge_utils; p = 0.5, λ = 0.5: FusionBench "
                          "config/method/dare/ties_merging.yaml"),
    StrategySpec("magnitude_prune", "sim.merge.delta:magnitude_prune", "delta", searched=False, sequential=False,
                 default_weight=None, needs_proxy=False, mixed_ranks=True, same_modules=True, exact_options=_TRIM,
                 default_options=(("density", PRUNE_DENSITY),),
                 citation="magnitude pruning of each task vector, then the weighted sum; peft.utils.merge_utils"),
    StrategySpec("magmax", "sim.merge.delta:magmax", "delta", searched=False, sequential=False,
                 default_weight=MAGMAX_SCALE, needs_proxy=False, mixed_ranks=True, same_modules=True,
                 citation="Marczak et al., MagMax, ECCV 2024 (arXiv 2407.06322), danielm1405/magmax; λ = 0.5: "
                          "FusionBench config/method/magmax/magmax.yaml"),
    # Robust aggregation (``sim.merge.robust``): what a few malicious contributors can do to main is bounded
    StrategySpec("median", "sim.merge.robust:median", "delta", searched=False, sequential=False,
                 default_weight=ROBUST_SCALE, needs_proxy=False, mixed_ranks=True, same_modules=True,
                 citation="Yin et al., Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates, ICML "
                          "2018 (arXiv 1803.01498): coordinate-wise median (even N: mean of the two middle values)"),
    StrategySpec("trimmed_mean", "sim.merge.robust:trimmed_mean", "delta", searched=False, sequential=False,
                 default_weight=ROBUST_SCALE, needs_proxy=False, mixed_ranks=True, same_modules=True,
                 exact_options=(("trim", 0.0),), default_options=(("trim", TRIM_FRACTION),),
                 citation="Yin et al., Byzantine-Robust Distributed Learning, ICML 2018 (arXiv 1803.01498): "
                          "coordinate-wise β-trimmed mean, ⌊β N⌋ removed at each end, β = 0.1 (forgesim's: guards "
                          "a 10 % Byzantine share)"),
    StrategySpec("clipped_mean", "sim.merge.robust:clipped_mean", "delta", searched=False, sequential=False,
                 default_weight=None, needs_proxy=False, mixed_ranks=True, same_modules=True,
                 citation="Sun et al., Can You Really Backdoor Federated Learning?, arXiv 1911.07963 (2019): each "
                          "update's norm clipped to τ, then averaged; τ = the median of the contributors' norms "
                          "unless merge.clip_norm is set"),
    StrategySpec("svd", "sim.merge.svd:svd", "delta", searched=False, sequential=False, default_weight=None, needs_proxy=False,
                 mixed_ranks=True, same_modules=True, exact_options=(("threshold", 1.0),),
                 citation="Zhu et al., Med-LEGO, MICCAI 2025 (arXiv 2503.01164), eq. 5-6"),
    StrategySpec("tsv", "sim.merge.subspace:tsv", "delta", searched=False, sequential=False, default_weight=TSV_SCALE,
                 needs_proxy=False, mixed_ranks=True, same_modules=True,
                 citation="Gargiulo et al., Task Singular Vectors (TSV-M), CVPR 2025 (arXiv 2412.00081); FusionBench "
                          "fusion_bench/method/task_singular_vector/utils/TSVM_utils.py, α = 1: config/method/"
                          "task_singular_vector/TaskSingularVectorMerging.yaml"),
    StrategySpec("iso_c", "sim.merge.subspace:iso_c", "delta", searched=False, sequential=False,
                 default_weight=ISO_SCALE, needs_proxy=False, mixed_ranks=True, same_modules=True,
                 one_is_identity=False,
                 citation="Marczak et al., No Task Left Behind (Iso-C), ICML 2025 (arXiv 2502.04959); FusionBench "
                          "fusion_bench/method/isotropic_merging/iso_utils.py, scaling 1: config/method/"
                          "isotropic_merging/iso_c.yaml"),
    StrategySpec("iso_cts", "sim.merge.subspace:iso_cts", "delta", searched=False, sequential=False,
                 default_weight=ISO_SCALE, needs_proxy=False, mixed_ranks=True, same_modules=True,
                 one_is_identity=False, default_options=(("common_space_fraction", ISO_CTS_COMMON_FRACTION),),
                 citation="Marczak et al., No Task Left Behind (Iso-CTS), ICML 2025 (arXiv 2502.04959); FusionBench "
                          "fusion_bench/method/isotropic_merging/iso_utils.py, scaling 1, common fraction 0.8: "
                          "config/method/isotropic_merging/iso_cts.yaml"),
    StrategySpec("knots", "sim.merge.subspace:knots", "delta", searched=False, sequential=False,
                 default_weight=KNOTS_SCALE, needs_proxy=False, mixed_ranks=True, same_modules=True,
                 exact_options=_TRIM, default_options=(("density", TIES_DENSITY),),
                 citation="Stoica et al., Model merging with SVD to tie the KnOTS, ICLR 2025 (arXiv 2410.19735); "
                          "gstoica27/KnOTS task_merger.py (SVDMerger), k = 20 %, λ = 0.6: configs/"
                          "vitB_r16_knots_ties.py; FusionBench fusion_bench/method/knots/knots_utils.py"),
    StrategySpec("regmean", "sim.merge.data_aware:regmean", "delta", searched=False, sequential=False,
                 default_weight=None, needs_proxy=True, mixed_ranks=True, same_modules=True,
                 default_options=(("alpha", REGMEAN_ALPHA),),
                 statistic_impl="sim.merge.data_aware:layer_grams", statistic_option="grams",
                 citation="Jin et al., Dataless Knowledge Fusion by Merging Weights of Language Models (RegMean), "
                          "ICLR 2023 (arXiv 2212.09849); FusionBench fusion_bench/method/regmean/regmean.py, "
                          "off-diagonals × 0.95: config/method/regmean/clip_regmean.yaml; Grams on the distilled sets"),
    StrategySpec("fisher", "sim.merge.data_aware:fisher", "factors", searched=False, sequential=False,
                 default_weight=None, needs_proxy=True, mixed_ranks=False, same_modules=True,
                 statistic_impl="sim.merge.data_aware:lora_fisher", statistic_option="fishers",
                 citation="Matena & Raffel, Merging Models with Fisher-Weighted Averaging, NeurIPS 2022 (arXiv "
                          "2111.09832); FusionBench fusion_bench/method/fisher_merging/fisher_merging.py, floor 1e-6 and "
                          "normalised Fishers: config/method/fisher_merging/clip_fisher_merging.yaml; the diagonal "
                          "Fisher of the LoRA factors on the distilled sets"),
    # Routed output-space predictors (``sim.merge.router``): the gate or task classifier is trained on the sets
    StrategySpec("router", "sim.merge.router:fit_router", "output", searched=False, sequential=False,
                 default_weight=None, needs_proxy=True, mixed_ranks=True, same_modules=False, order_invariant=False,
                 seeded=True, fitted=True, default_options=(("top_k", ROUTER_TOP_K), ("steps", ROUTER_STEPS),
                                                            ("lr", ROUTER_LR), ("batch_size", ROUTER_BATCH)),
                 citation="Wang et al., FedKIM, EMNLP 2024 (arXiv 2408.10276): a top-2 gate over LoRA experts "
                          "(XiaochenWang-PSU/FedKIM Top2Gating; Shazeer et al., ICLR 2017), trained on the union of "
                          "the distilled sets received"),
    StrategySpec("task_route", "sim.merge.router:fit_task_route", "output", searched=False, sequential=False,
                 default_weight=None, needs_proxy=True, mixed_ranks=True, same_modules=False, order_invariant=False,
                 seeded=True, fitted=True, default_options=(("steps", ROUTER_STEPS), ("lr", ROUTER_LR),
                                                            ("batch_size", ROUTER_BATCH)),
                 citation="Li et al., Low-Rank Knowledge Decomposition for Medical Foundation Models (LoRKD), CVPR "
                          "2024 (arXiv 2404.17184): the experts of the task predicted by a classifier trained on the "
                          "distilled sets"),
    # Continual merges (FusionBench's OPCM study): a branch steps them commit by commit, arrival order matters by design
    StrategySpec("opcm", "sim.merge.continual:opcm", "delta", searched=False, sequential=False, default_weight=1.0,
                 needs_proxy=False, mixed_ranks=True, same_modules=True, order_invariant=False, continual=True,
                 default_options=(("alpha", OPCM_ALPHA),),
                 citation="Tang et al., Merging Models on the Fly Without Retraining (OPCM), NeurIPS 2025 (arXiv "
                          "2501.09522); FusionBench fusion_bench/method/opcm/opcm.py, alpha 0.5: config/method/opcm/"
                          "opcm.yaml"),
    StrategySpec("continual_task_arithmetic", "sim.merge.continual:continual_task_arithmetic", "delta",
                 searched=False, sequential=False, default_weight=CONTINUAL_TA_SCALE, needs_proxy=False,
                 mixed_ranks=True, same_modules=True, continual=True,
                 citation="Ilharco et al., Task Arithmetic, ICLR 2023, merged as commits arrive; FusionBench "
                          "fusion_bench/method/opcm/task_arithmetic.py, λ 0.3: config/method/opcm/task_arithmetic.yaml"),
    StrategySpec("continual_ties", "sim.merge.continual:continual_ties", "delta", searched=False, sequential=False,
                 default_weight=CONTINUAL_TIES_SCALE, needs_proxy=False, mixed_ranks=True, same_modules=True,
                 order_invariant=False, continual=True, default_options=(("density", CONTINUAL_TIES_DENSITY),),
                 citation="Yadav et al., TIES-Merging, NeurIPS 2023, of [merged so far, new] as commits arrive; "
                          "FusionBench fusion_bench/method/opcm/ties_merging.py, λ 0.5, k = 20 %: config/method/opcm/"
                          "ties_merging.yaml"),
    StrategySpec("continual_weight_average", "sim.merge.continual:continual_weight_average", "delta",
                 searched=False, sequential=False, default_weight=None, needs_proxy=False, mixed_ranks=True,
                 same_modules=True, continual=True,
                 citation="the running mean of the updates as commits arrive; FusionBench fusion_bench/method/opcm/"
                          "weight_average.py"),
    StrategySpec("continual_magmax", "sim.merge.continual:continual_magmax", "delta", searched=False,
                 sequential=False, default_weight=CONTINUAL_MAGMAX_SCALE, needs_proxy=False, mixed_ranks=True,
                 same_modules=True, continual=True,
                 citation="Marczak et al., MagMax, ECCV 2024 (arXiv 2407.06322), merged as commits arrive; FusionBench "
                          "fusion_bench/method/magmax/magmax.py, λ 0.5: config/method/magmax/magmax.yaml"),
)

SPECS: dict[str, StrategySpec] = {s.name: s for s in _SPECS}


def get_spec(name: str) -> StrategySpec:
    """Look a merge strategy's spec up by name; a typo lists the known names."""
    return lookup(SPECS, name, "merge strategy")


def default_weights(strategy: str, n: int) -> np.ndarray:
    """The weights (N,) ``strategy`` uses when given none (its spec's ``default_weight``; 1/N when ``None``)."""
    return get_spec(strategy).default_weights(n)
