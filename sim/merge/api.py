"""The entry points the merge actor and the CLI call: ``merge`` (one shot) and ``merge_step`` (as commits arrive)."""
from __future__ import annotations

import dataclasses
import inspect
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable, Hashable, Sequence

import numpy as np

from sim.coefficients import ProxyData, SearchResult, get_optimizer, prepare_proxy, proxy_loss, search_coefficients
from sim.config import MergeConfig
from sim.data.base import DistilledSet, derive_seed
from sim.merge.base import Weights, check_compatible
from sim.merge.fusion import fusion_weights_after
from sim.merge.mixture import Mixture, ProbabilityCache, mixture_loss
from sim.merge.router import Router
from sim.merge.specs import SPECS, StrategySpec, get_spec
from sim.model import Adapter, Foundation

# The strategies merged commit by commit, for messages (derived from the specs).
SEQUENTIAL = tuple(name for name, spec in SPECS.items() if spec.sequential)
# A view of the specs for callers that only need the function.
STRATEGIES: dict[str, Callable] = {name: spec.fn for name, spec in SPECS.items()}


def get_strategy(name: str) -> Callable:
    """Look a merge strategy's function up by name; a typo lists the known names."""
    return get_spec(name).fn


@dataclass(frozen=True)
class ArrivedProxy:
    """Distilled sets in the order they arrived: ``sets[i]`` came with adapter i, from ``sources[i]``.

    A run's merge actor holds the latest set of every institution received so far (``sim.branches.MainBranches``;
    MedForge's Fusion searches stage t on ``syndatalist[:t+2]``, the sets of the contributors merged so far).
    ``seen(i)`` is that list after adapter i: the latest set of each source among 0..i, in first-arrival order.
    ``sources`` (e.g. institution ids) default to one per adapter; a source that sends again replaces its set.
    """

    sets: tuple[DistilledSet, ...]
    sources: tuple[Hashable, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "sets", tuple(self.sets))
        if self.sources is not None:
            object.__setattr__(self, "sources", tuple(self.sources))
            if len(self.sources) != len(self.sets):
                raise ValueError(f"ArrivedProxy: {len(self.sources)} sources for {len(self.sets)} distilled sets")

    def __len__(self) -> int:
        return len(self.sets)

    def seen(self, i: int) -> list[DistilledSet]:
        """The sets a run's merge actor holds once adapters 0..i have arrived."""
        sources = self.sources if self.sources is not None else range(len(self.sets))
        latest: dict = {}
        for source, ds in zip(list(sources)[:i + 1], self.sets[:i + 1]):
            latest[source] = ds                  # a later set of a known source keeps that source's place
        return list(latest.values())


Proxy = Sequence[DistilledSet] | ArrivedProxy | ProxyData | None


def arrived_proxy(proxy: Proxy, n: int) -> ArrivedProxy:
    """``proxy`` as one set per adapter, for a sequential search of ``n`` adapters; anything else is an error."""
    if isinstance(proxy, ProxyData):
        raise ValueError("a sequential search needs the distilled set each adapter arrived with (a list of one "
                         "DistilledSet per adapter, or ArrivedProxy); prepared ProxyData cannot say which is whose")
    arrived = proxy if isinstance(proxy, ArrivedProxy) else ArrivedProxy(tuple(proxy or ()))
    if len(arrived) != n:
        raise ValueError(f"a sequential search (merge.search_mode: sequential) needs one distilled set per adapter, "
                         f"in arrival order (stage i sees the sets of adapters 0..i, as in a run); got "
                         f"{len(arrived)} sets for {n} adapters")
    return arrived


@dataclass
class MergeResult:
    """A merged predictor and how it was obtained.

    ``coefficients``: the weights over the contributors, (N,) or (N, M), or ``None`` for the strategy's documented
    default. ``trace``: the search objective (CE + L1) of every evaluation, all stages in order ([] without search).
    ``stages``: one dict per search (``SearchResult.record()`` + the stage's coefficients).
    """

    strategy: str
    merged: Adapter | Mixture | Router
    coefficients: np.ndarray | None
    trace: list[float] = field(default_factory=list)
    merge_s: float = 0.0
    stages: list[dict] = field(default_factory=list)

    def record(self) -> dict:
        """Flat summary for logs and records."""
        rec = {"strategy": self.strategy, "merge_s": self.merge_s, "evaluations": len(self.trace),
               "n_contributors": (len(self.merged.adapters) if not isinstance(self.merged, Adapter)
                                  else self.merged.meta.get("n_contributors", 1)),
               "storage_bytes": self.merged.num_bytes()}
        if self.trace:
            last = self.stages[-1]
            rec |= {"objective": last["objective"], "initial_objective": last["initial_objective"]}
        if isinstance(self.merged, Adapter):
            rec["max_rank"] = self.merged.max_rank
        return rec


def save_predictor(predictor: Adapter | Mixture | Router, out) -> None:
    """Write a merged predictor to the dir ``out``: a peft adapter dir, a mixture dir (``save_mixture``) or a router
    dir (``save_router``)."""
    from sim.merge.mixture import save_mixture
    from sim.merge.router import save_router
    from sim.model import save_adapter

    if isinstance(predictor, Mixture):
        save_mixture(predictor, out)
    elif isinstance(predictor, Router):
        save_router(predictor, out)
    else:
        save_adapter(predictor, out)


def _strategy_options(fn: Callable, cfg: MergeConfig, seed: int) -> dict:
    """The config values a strategy function takes, by its keyword names."""
    values = {"density": cfg.density, "threshold": cfg.svd_threshold, "rank": cfg.svd_rank, "seed": seed,
              "scope": cfg.ties_scope, "disjoint": cfg.ties_disjoint, "trim": cfg.trim, "clip_norm": cfg.clip_norm}
    params = inspect.signature(fn).parameters
    return {k: v for k, v in values.items() if k in params}


def per_adapter_sets(proxy: Proxy, n: int, strategy: str,
                     use: str = "computes each contributor's statistics on") -> list[DistilledSet]:
    """The distilled set each of the ``n`` adapters arrived with (an ``ArrivedProxy``, or a list of one per adapter),
    for a strategy whose statistics are per contributor or that is trained on the sets (``use``: what it does with
    them, for the message); anything else is an error naming what is missing."""
    if isinstance(proxy, ProxyData):
        raise ValueError(f"{strategy} needs the distilled set each adapter arrived with (a list of one DistilledSet "
                         f"per adapter, or ArrivedProxy); prepared ProxyData cannot say which is whose")
    sets = list(proxy.sets if isinstance(proxy, ArrivedProxy) else (proxy or ()))
    if len(sets) != n:
        raise ValueError(f"{strategy} {use} the distilled set each adapter arrived with: "
                         f"it needs one distilled set per adapter, in the adapters' order; got {len(sets)} for {n}")
    return sets


# Per-contributor statistics (RegMean's Grams, Fisher diagonals), computed once per (statistic, foundation, adapter,
# distilled set) and dropped with the adapter: a branch re-merges every adapter it holds at each commit.
_STATISTICS: dict[tuple, object] = {}


def _statistic(spec: StrategySpec, foundation: Foundation, adapter: Adapter, ds: DistilledSet):
    from sim.coefficients import set_key

    key = (spec.statistic_impl, id(foundation), id(adapter), set_key(ds))
    if key not in _STATISTICS:
        _STATISTICS[key] = spec.statistic(foundation, adapter, ds)
        weakref.finalize(adapter, _STATISTICS.pop, key, None)
    return _STATISTICS[key]


def _statistics(spec: StrategySpec, foundation: Foundation | None, adapters: Sequence[Adapter],
                proxy: Proxy) -> dict:
    """``{spec.statistic_option: [one statistic per adapter]}`` for a data-aware strategy, ``{}`` for the others."""
    if spec.statistic_impl is None:
        return {}
    sets = per_adapter_sets(proxy, len(adapters), spec.name)
    if foundation is None:
        raise ValueError(f"{spec.name} needs the foundation to compute its statistics on the distilled sets")
    for a in adapters:
        a.check_base(foundation)
    return {spec.statistic_option: [_statistic(spec, foundation, a, ds) for a, ds in zip(adapters, sets)]}


def _proxy_data(foundation: Foundation | None, proxy: Proxy, adapters: Sequence[Adapter],
                max_images: int = 0) -> ProxyData:
    """The search's proxy, bounded to ``max_images`` (``merge.proxy_images``); prepared ``ProxyData`` is used as
    given."""
    if foundation is None or proxy is None or (not isinstance(proxy, ProxyData) and len(proxy) == 0):
        raise ValueError("a coefficient search needs the foundation and proxy data (distilled sets)")
    for a in adapters:
        a.check_base(foundation)
    # No heads here: each candidate is scored with its own (the merged pool's) heads, see ``proxy_loss``.
    return proxy if isinstance(proxy, ProxyData) else prepare_proxy(foundation, proxy, max_images)


def _search(loss: Callable, init: np.ndarray, cfg: MergeConfig, seed: int, batch_loss: Callable | None = None,
            **kw) -> SearchResult:
    """``search_coefficients`` with the config's settings; ``merge.search_batch`` applies where the objective has a
    stacked ``batch_loss`` (one-at-a-time asks otherwise: batching a cheap objective would only change the
    trajectory)."""
    batch = cfg.search_batch if batch_loss is not None else 1
    return search_coefficients(loss, init, optimizer=cfg.optimizer, budget=cfg.budget, bound=cfg.bound, l1=cfg.l1,
                               seed=seed, batch=batch, batch_loss=batch_loss if batch > 1 else None, **kw)


def _batch_objective(spec: StrategySpec, foundation: Foundation, data: ProxyData, adapters: Sequence[Adapter],
                     cfg: MergeConfig) -> Callable | None:
    """The spec's stacked objective of C candidates (``search_batch_loss``) when ``merge.search_batch`` > 1, else
    ``None`` (built only when used: it takes the proxy's prefix tokens)."""
    if cfg.search_batch == 1 or spec.batch_loss_impl is None:
        return None
    return spec.search_batch_loss(foundation, data, adapters)


def merge(strategy: str, adapters: Sequence[Adapter], weights: Weights = None, *, cfg: MergeConfig | None = None,
          foundation: Foundation | None = None, proxy: Proxy = None, seed: int = 0,
          search: bool | None = None, cache: ProbabilityCache | None = None) -> MergeResult:
    """Merge ``adapters`` with ``strategy`` in one call.

    Args:
        strategy: a key of ``SPECS``.
        adapters: the contributors, in arrival order.
        weights: explicit coefficients, (N,) or (N, M); ``None`` = searched (if searching) or the default.
        cfg: density, svd threshold/rank and the search settings (optimizer, budget, bound, l1, granularity,
            search_mode, search_batch: candidates asked together where the spec has a stacked objective).
        foundation, proxy: needed to search coefficients (cross-entropy on the distilled sets). A sequential
            search needs one set per adapter in arrival order (a list, or ``ArrivedProxy`` with the sources);
            stage i sees only the sets of adapters 0..i (``ArrivedProxy.seen``), as it does in a run. Global
            searches use every set (an ``ArrivedProxy``: the latest of each source).
        seed: seeds DARE's random drop and the search (a sequential stage i as a run seeds commit i + 1).
        search: search coefficients; default: yes for a ``searched`` strategy (fusion, mixture) when no
            ``weights`` are given and foundation and proxy are. A ``sequential`` strategy follows
            ``cfg.search_mode`` (sequential = fold ``merge_step`` over the adapters; global = all N at once);
            any other strategy searches its N (or N × M) weights globally.
        cache: the adapters' proxy probabilities, kept across calls by a caller that fits the same adapters again
            (a branch of a ``fitted`` strategy, the routers).

    A ``fitted`` strategy (the routers) is trained on the distilled set each adapter arrived with (one per adapter,
    or an ``ArrivedProxy``: every set received), seeded ``seed``; it takes no ``weights``.
    """
    cfg = cfg or MergeConfig()
    spec = get_spec(strategy)
    t0 = time.perf_counter()
    if spec.fitted:
        return _fit(spec, adapters, weights, foundation, proxy, seed, cache, t0)
    if search is None:
        search = spec.searched and weights is None and foundation is not None and bool(proxy)
    statistics = _statistics(spec, foundation, adapters, proxy)
    if not search:
        merged = spec.fn(adapters, weights, **_strategy_options(spec.fn, cfg, seed), **statistics)
        coeffs = None if weights is None else np.asarray(weights, dtype=np.float64)
        return MergeResult(strategy, merged, coeffs, merge_s=time.perf_counter() - t0)
    # Check everything before the first evaluation: optimizer name, compatibility, bases, proxy images.
    get_optimizer(cfg.optimizer)
    check_compatible(adapters, same_modules=spec.same_modules, same_ranks=not spec.mixed_ranks)
    if spec.sequential and cfg.search_mode == "sequential":
        arrived = arrived_proxy(proxy, len(adapters))
        _proxy_data(foundation, arrived.seen(len(adapters) - 1), adapters)
        result = _merge_sequentially(strategy, adapters, foundation, arrived, cfg, seed)
    else:
        every = proxy.seen(len(proxy) - 1) if isinstance(proxy, ArrivedProxy) else proxy
        result = _merge_global(spec, adapters, foundation, _proxy_data(foundation, every, adapters, cfg.proxy_images),
                               cfg, seed, statistics)
    result.merge_s = time.perf_counter() - t0
    return result


def _fit(spec: StrategySpec, adapters: Sequence[Adapter], weights: Weights, foundation: Foundation | None,
         proxy: Proxy, seed: int, cache: ProbabilityCache | None, t0: float) -> MergeResult:
    """Train a ``fitted`` predictor on the distilled set each adapter arrived with."""
    if weights is not None:
        raise ValueError(f"{spec.name} takes no weights: its weights over the adapters are per image, from what it "
                         f"learns on the distilled sets")
    sets = per_adapter_sets(proxy, len(adapters), spec.name, "is trained on")
    if foundation is None:
        raise ValueError(f"{spec.name} needs the foundation to train on the distilled sets")
    for a in adapters:
        a.check_base(foundation)
    merged = spec.fn(adapters, None, foundation=foundation, proxy=sets, seed=seed, cache=cache)
    return MergeResult(spec.name, merged, None, merge_s=time.perf_counter() - t0)


def _merge_sequentially(strategy: str, adapters: Sequence[Adapter], foundation: Foundation, proxy: ArrivedProxy,
                        cfg: MergeConfig, seed: int) -> MergeResult:
    """Fold ``merge_step`` over the adapters in order, as a run's branch does: stage i searches on the sets of
    adapters 0..i only and is seeded like commit ``seq = i + 1`` of a run with seed ``seed``."""
    state = start_sequence(strategy)
    for i, a in enumerate(adapters):
        state = merge_step(state, a, foundation=foundation, proxy=proxy.seen(i), cfg=cfg,
                           seed=derive_seed(seed, "merge", strategy, i + 1))
    trace = [v for st in state.stages for v in st["trace"]]
    return MergeResult(strategy, state.merged, state.coefficients, trace,
                       stages=[{k: v for k, v in st.items() if k != "trace"} for st in state.stages])


def _objective(spec: StrategySpec, foundation: Foundation, data: ProxyData, adapters: Sequence[Adapter],
               options: dict) -> Callable[[np.ndarray], float]:
    """The search objective of weights w: the spec's ``search_loss`` (same numbers, faster) or CE of ``fn``."""
    if spec.search_loss is not None:
        return spec.search_loss(foundation, data, adapters)
    return lambda w: proxy_loss(foundation, data, spec.fn(adapters, w, **options))


def _merge_global(spec: StrategySpec, adapters: Sequence[Adapter], foundation: Foundation,
                  data: ProxyData, cfg: MergeConfig, seed: int, statistics: dict | None = None) -> MergeResult:
    """Search all N (per-layer: N × M) coefficients at once, starting from the strategy's default weights.

    Output-space weights are one per adapter whatever the granularity. The objective is the spec's
    ``search_loss`` where it has one (the same numbers, computed faster), else the proxy cross-entropy of ``fn``.
    """
    n, n_modules = len(adapters), len(adapters[0].modules())
    init = spec.default_weights(n)
    if cfg.granularity == "layer" and spec.space != "output":
        init = np.repeat(init[:, None], n_modules, axis=1)
    options = _strategy_options(spec.fn, cfg, seed) | (statistics or {})
    res = _search(_objective(spec, foundation, data, adapters, options), init, cfg, seed,
                  _batch_objective(spec, foundation, data, adapters, cfg))
    return MergeResult(spec.name, spec.fn(adapters, res.coefficients, **options), res.coefficients, res.trace,
                       stages=[res.record() | {"coefficients": res.coefficients.tolist()}])


# ------------------------------------------------------------------------------------------
# Continual merging as commits arrive (OPCM and FusionBench's continual baselines)
# ------------------------------------------------------------------------------------------
def continual_step(strategy: str, state, adapter: Adapter, previous: Adapter | None, *,
                   cfg: MergeConfig | None = None, weight: float | None = None) -> tuple[object, MergeResult]:
    """Merge one arriving commit into a continual branch (``spec.continual``): ``(new state, MergeResult)``.

    ``state``: the branch's ``sim.merge.continual.ContinualState`` (``None`` before its first commit; not changed);
    ``previous``: the branch's merged adapter so far (its heads are averaged with the new one's); ``weight``: this
    commit's weight (``None``: the strategy's default). The options a config sets (``merge.density``, TIES' scope and
    disjoint merge) are the fold's. The same commits in the same order give ``spec.fn(adapters, weights)``.
    """
    from sim.merge import continual

    cfg = cfg or MergeConfig()
    spec = get_spec(strategy)
    if not spec.continual:
        raise ValueError(f"continual merging is defined for "
                         f"{', '.join(n for n, sp in SPECS.items() if sp.continual)}, not {strategy!r}")
    t0 = time.perf_counter()
    options = _strategy_options(spec.fn, cfg, seed=0)     # no continual merge draws random numbers: no seed taken
    state = continual.step(state or continual.start(strategy), adapter, weight=weight, **options)
    merged = continual.merged_adapter(state, [adapter] if previous is None else [previous, adapter])
    return state, MergeResult(strategy, merged, None, merge_s=time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------
# Sequential merging as commits arrive (MedForge's Fusion and Mixture)
# ------------------------------------------------------------------------------------------
@dataclass
class SequentialState:
    """One branch merged commit by commit.

    ``merged``: the current predictor; ``coefficients``: its weights over all contributors so far, (N,) or (N, M);
    ``adapters``: the contributors a mixture keeps (fusion keeps only ``merged``); ``stages``: one dict per
    commit (stage coefficients, objective, trace, merge_s). ``cache`` holds the mixture's per-adapter proxy
    probabilities between stages.
    """

    strategy: str
    merged: Adapter | Mixture | None = None
    coefficients: np.ndarray | None = None
    adapters: list[Adapter] = field(default_factory=list)
    stages: list[dict] = field(default_factory=list)
    cache: ProbabilityCache = field(default_factory=ProbabilityCache, repr=False)

    @property
    def n(self) -> int:
        return 0 if self.coefficients is None else len(self.coefficients)

    @property
    def result(self) -> MergeResult:
        """The latest stage as a ``MergeResult`` (its trace and merge time only)."""
        if self.merged is None:
            raise ValueError(f"the {self.strategy} sequence has no commit yet")
        last = self.stages[-1]
        return MergeResult(self.strategy, self.merged, self.coefficients, list(last["trace"]), last["merge_s"],
                           [{k: v for k, v in last.items() if k != "trace"}])


def start_sequence(strategy: str) -> SequentialState:
    """An empty branch for a ``sequential`` strategy (fusion or mixture)."""
    spec = SPECS.get(strategy)
    if spec is None or not spec.sequential:
        raise ValueError(f"sequential merging is defined for {', '.join(SEQUENTIAL)}, not {strategy!r}")
    return SequentialState(strategy)


def merge_step(state: SequentialState, adapter: Adapter, *, foundation: Foundation | None = None, proxy: Proxy = None,
               cfg: MergeConfig | None = None, seed: int = 0) -> SequentialState:
    """Merge one arriving commit into a fusion/mixture branch; returns the new state (``state`` is not changed).

    Stage k (k ≥ 1 contributors already merged) searches two coefficients (a, b), init 0.5 each, on ``proxy`` (the
    distilled sets received so far): fusion ``merged ← a · merged + b · adapter`` on A and B; mixture
    ``w ← [a · w, b]``. Without foundation or proxy there is no search and (a, b) = (k/(k+1), 1/(k+1)), i.e. the
    running mean. The first commit is taken as it is (weight 1).

    A parameter-space spec folds its factors (the branch keeps only ``merged``); an output-space spec keeps every
    adapter and rescales their weights.
    """
    cfg = cfg or MergeConfig()
    spec = get_spec(state.strategy)
    folds = spec.space != "output"
    t0 = time.perf_counter()
    k = state.n
    # Step 1: who takes part, and can they be merged.
    pool = ([adapter] if k == 0 else [state.merged, adapter]) if folds else state.adapters + [adapter]
    check_compatible(pool, same_modules=spec.same_modules, same_ranks=not spec.mixed_ranks)
    # Step 2: the stage coefficients (a, b) and the weights over all contributors.
    per_layer = cfg.granularity == "layer" and folds
    n_modules = len(adapter.modules())
    if k == 0:
        stage, res = np.ones((1, n_modules) if per_layer else (1,)), None
        coefficients = stage.copy()
    else:
        prev = state.coefficients
        if per_layer and prev.ndim == 1:
            prev = np.repeat(prev[:, None], n_modules, axis=1)
        to_weights = lambda ab: fusion_weights_after(prev, np.asarray(ab, dtype=np.float64))  # noqa: E731
        stage, res = _stage_coefficients(state, spec, pool, to_weights, foundation, proxy, cfg, seed, per_layer,
                                         n_modules)
        coefficients = to_weights(stage)
    # Step 3: the merged predictor.
    if folds:
        merged: Adapter | Mixture = adapter if k == 0 else spec.fn(pool, stage)
        if k > 0:
            merged.meta["n_contributors"] = k + 1          # the pool is (merged so far, new) but holds k + 1
        adapters: list[Adapter] = []
    else:
        merged, adapters = spec.fn(pool, coefficients), pool
    record = {"stage": k, "coefficients": np.asarray(stage).tolist(), "trace": res.trace if res else [],
              **(res.record() if res else {}), "merge_s": time.perf_counter() - t0}
    return dataclasses.replace(state, merged=merged, coefficients=coefficients, adapters=adapters,
                               stages=state.stages + [record])


def _stage_coefficients(state: SequentialState, spec: StrategySpec, pool: list[Adapter], to_weights: Callable,
                        foundation: Foundation | None, proxy: Proxy, cfg: MergeConfig, seed: int, per_layer: bool,
                        n_modules: int) -> tuple[np.ndarray, SearchResult | None]:
    """Search (a, b) from MedForge's init 0.5 — or, without foundation or proxy, the running mean (k/(k+1), 1/(k+1))."""
    shape = (2, n_modules) if per_layer else (2,)
    if foundation is None or proxy is None:
        k = state.n
        stage = np.array([k / (k + 1), 1 / (k + 1)])
        return (np.repeat(stage[:, None], n_modules, axis=1) if per_layer else stage), None
    get_optimizer(cfg.optimizer)
    data = _proxy_data(foundation, proxy, pool, cfg.proxy_images)
    if spec.space != "output":       # (a, b) weigh the pool (merged so far, new) directly
        res = _search(_objective(spec, foundation, data, pool, {}), np.full(shape, 0.5), cfg, seed,
                      _batch_objective(spec, foundation, data, pool, cfg))
    else:                            # (a, b) rescale all N weights; the pool's probabilities are cached across stages
        probs = state.cache.probabilities(foundation, pool, data)
        res = _search(mixture_loss(probs, data, to_weights), np.full(shape, 0.5), cfg, seed, penalised=to_weights)
    return res.coefficients, res
