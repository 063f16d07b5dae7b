"""Every strategy's spec, checked against an independent re-derivation on tiny hand-made adapters.

One test per claim, parametrised over the registry (timm's ``tests/test_models.py``): the space it merges in,
one contributor ⇒ identity, permutation behaviour, default weights, mixed ranks, same modules, sequential merging,
finite output. The expected results are computed here with numpy from the adapters' factors, not with sim.merge.
"""
from __future__ import annotations

import dataclasses
import inspect

import numpy as np
import pytest
import torch

from sim.config import MergeConfig, ScheduleConfig, SimConfig
from sim.merge import (SPECS, STRATEGIES, Mixture, StrategySpec, default_weights, get_spec, get_strategy, merge_step,
                       start_sequence)
from sim.model import PEFT_PREFIX, Adapter
from test_continual_merges import np_opcm, np_ties_pair
from test_subspace_merges import np_iso_c, np_iso_cts, np_knots, np_tsv

MODULES = ("blocks.0.attn.qkv", "blocks.1.attn.qkv")
W = np.array([0.5, 0.3, 0.2])
# The fitted predictors (the routers) take no weights and need a foundation: tests/test_router.py checks their claims
NAMES = [n for n, sp in SPECS.items() if not sp.fitted]

pytestmark = pytest.mark.usefixtures("single_thread")


def make_adapter(seed: int, r: int = 3, out_f: int = 6, in_f: int = 5, alpha: float = 6.0,
                 modules: tuple[str, ...] = MODULES) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    w = {}
    for m in modules:
        w[f"{PEFT_PREFIX}{m}.lora_A.weight"] = torch.randn(r, in_f, generator=g)
        w[f"{PEFT_PREFIX}{m}.lora_B.weight"] = torch.randn(out_f, r, generator=g)
    return Adapter(w, alpha, "base0")


def np_delta(a: Adapter, m: str) -> np.ndarray:
    """ΔW = (alpha / r) B A (out, in), from the raw factors."""
    fa = a.weights[f"{PEFT_PREFIX}{m}.lora_A.weight"].double().numpy()
    fb = a.weights[f"{PEFT_PREFIX}{m}.lora_B.weight"].double().numpy()
    return a.alpha / fa.shape[0] * fb @ fa


# ------------------------------------------------------------------------------------------
# Independent ΔW-space re-derivations: (ΔW_i list, w (N,)) → merged ΔW
# ------------------------------------------------------------------------------------------
def np_prune(d: np.ndarray, density: float) -> np.ndarray:
    """Keep the int(density · numel) entries of largest magnitude."""
    if density >= 1:
        return d
    k = int(density * d.size)
    keep = np.zeros(d.size, bool)
    keep[np.argsort(-np.abs(d).reshape(-1), kind="stable")[:k]] = True
    return d * keep.reshape(d.shape)


def np_ties(deltas: list[np.ndarray], w: np.ndarray, density: float) -> np.ndarray:
    """Trim each ΔW_i, elect the sign of the total mass per entry, average the weighted agreeing entries."""
    p = np.stack([np_prune(d, density) for d in deltas])                        # (N, out, in)
    elected = np.where(p.sum(0) >= 0, 1.0, -1.0)
    agree = np.sign(p) == elected
    return (w[:, None, None] * p * agree).sum(0) / np.maximum(agree.sum(0), 1)


def np_magmax(deltas: list[np.ndarray], w: np.ndarray) -> np.ndarray:
    """Per entry the weighted update of largest magnitude; the later contributor wins exact ties."""
    stacked = w[:, None, None] * np.stack(deltas)
    pick = len(deltas) - 1 - np.abs(stacked[::-1]).argmax(0)          # argmax takes the first: search from the end
    return np.take_along_axis(stacked, pick[None], 0)[0]


def np_svd(deltas: list[np.ndarray], w: np.ndarray, threshold: float) -> np.ndarray:
    m = np.tensordot(w, np.stack(deltas), 1)
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    k = int(np.searchsorted(np.cumsum(s) / s.sum(), threshold)) + 1
    return (u[:, :k] * s[:k]) @ vt[:k]


def np_sum(deltas: list[np.ndarray], w: np.ndarray) -> np.ndarray:
    return np.tensordot(w, np.stack(deltas), 1)


def np_continual_ties(deltas: list[np.ndarray], w: np.ndarray, density: float) -> np.ndarray:
    """M_0 = w_0 τ_0, then M_t = M_{t-1} + w_t · TIES([M_{t-1}, τ_t]) (disjoint sum), one module's task vectors."""
    merged = w[0] * deltas[0]
    for wt, tau in zip(w[1:], deltas[1:]):
        merged = merged + wt * np_ties_pair(np.stack([merged.ravel(), tau.ravel()]), density, "sum").reshape(tau.shape)
    return merged


def np_trimmed(deltas: list[np.ndarray], w: np.ndarray, k: int) -> np.ndarray:
    """Per entry of the w_i ΔW_i: sorted, k dropped at each end, the rest averaged (k = (N-1)//2: numpy's median)."""
    stacked = np.sort(w[:, None, None] * np.stack(deltas), axis=0)
    return stacked[k:len(deltas) - k].mean(0)


def np_clipped(taus: list[dict], w: np.ndarray, tau: float | None = None) -> dict:
    """Σ w_i min(1, τ / ‖τ_i‖) τ_i per module, ‖·‖ over all modules, τ = numpy's median of the norms by default."""
    norms = np.array([np.sqrt(sum((t ** 2).sum() for t in x.values())) for x in taus])
    bound = np.median(norms) if tau is None else tau
    c = np.minimum(1.0, bound / norms)
    return {m: sum(wi * ci * x[m] for wi, ci, x in zip(w, c, taus)) for m in taus[0]}


# name → (options passed to spec.fn, expected ΔW of one module). DARE is checked here at density 1 (no drop); its
# random drop is checked by test_dare_drop_keeps_or_rescales_each_entry. TIES is checked module by module here (its
# default trims the whole task vector: tests/test_ties_defaults.py re-derives that scope over all modules).
DELTA_CASES = {
    "task_arithmetic": ({}, np_sum),
    "ties": ({"density": 0.5, "scope": "module", "disjoint": "mean"}, lambda d, w: np_ties(d, w, 0.5)),
    "dare_linear": ({"density": 1.0, "seed": 3}, np_sum),
    "dare_ties": ({"density": 1.0, "seed": 3}, lambda d, w: np_ties(d, w, 1.0)),
    "magnitude_prune": ({"density": 0.5}, lambda d, w: np_sum([np_prune(x, 0.5) for x in d], w)),
    "magmax": ({}, np_magmax),
    "svd": ({"threshold": 0.9}, lambda d, w: np_svd(d, w, 0.9)),
    "tsv": ({}, np_tsv),
    "iso_c": ({}, np_iso_c),
    "iso_cts": ({}, np_iso_cts),
    "knots": ({"density": 0.5, "scope": "module"}, lambda d, w: np_knots([d], w[:, None], 0.5, "module")[0]),
    "regmean": ({}, lambda d, w: np_sum(d, w / w.sum())),        # with the identity Grams of ``statistics``
    "median": ({}, lambda d, w: np.median(w[:, None, None] * np.stack(d), axis=0)),
    "trimmed_mean": ({"trim": 0.34}, lambda d, w: np_trimmed(d, w, 1)),         # ⌊0.34 · 3⌋ = 1 of 3 at each end
    "continual_task_arithmetic": ({}, np_sum),
    "continual_weight_average": ({}, lambda d, w: np_sum(d, w / w.sum())),
    "continual_magmax": ({}, np_magmax),
    "continual_ties": ({"density": 0.5, "scope": "module"}, lambda d, w: np_continual_ties(d, w, 0.5)),
}
# name → (options, expected ΔW of every module from every contributor's task vectors {module: ΔW}, w) for merges whose
# modules interact (OPCM rescales by whole-task-vector norms; a commit's weight scales its task vector first)
WHOLE_CASES = {
    "clipped_mean": ({}, np_clipped),
    "opcm": ({}, lambda taus, w: np_opcm([{m: wi * t for m, t in tau.items()} for wi, tau in zip(w, taus)],
                                         diagonal_to_rank=True)),
}


def statistics(spec: StrategySpec, adapters: list[Adapter]) -> dict:
    """Per-contributor statistics for a data-aware spec, made here without data: identity input Grams (RegMean is
    then the weighted mean of the ΔW_i, normalised by Σ w) and unit Fishers (Fisher merging with normalised Fishers
    is then the weighted mean of the factors, normalised likewise); ``tests/test_data_aware_merges.py`` checks both
    against their closed forms on real statistics."""
    if spec.statistic_impl is None:
        return {}
    if spec.name == "regmean":
        return {"grams": [{m: torch.eye(a.factors(m)[0].shape[1], dtype=torch.float64) for m in a.modules()}
                          for a in adapters]}
    if spec.name == "fisher":
        return {"fishers": [{k: torch.ones_like(v) for k, v in a.weights.items()} for a in adapters]}
    raise AssertionError(f"give {spec.name}'s statistic a hand-made value here")


def call(spec: StrategySpec, adapters: list[Adapter], w, **opts):
    """``spec.fn(adapters, w, **opts)``, with the hand-made statistics of a data-aware spec."""
    return spec.fn(adapters, w, **opts, **statistics(spec, adapters))


def options(spec: StrategySpec) -> dict:
    return {**DELTA_CASES, **WHOLE_CASES}[spec.name][0] if spec.name in {**DELTA_CASES, **WHOLE_CASES} else {}


def merged_deltas(merged: Adapter) -> np.ndarray:
    return np.stack([merged.delta(m).double().numpy() for m in MODULES])


# ------------------------------------------------------------------------------------------
# The claims
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(SPECS))
def test_spec_is_well_formed_and_the_views_agree(name):
    spec = get_spec(name)
    assert spec.name == name and spec.space in ("factors", "delta", "output") and spec.citation
    assert STRATEGIES[name] is spec.fn and get_strategy(name) is spec.fn
    assert not spec.searched or spec.needs_proxy              # a searched strategy needs data to search on
    assert not spec.sequential or spec.searched
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.space = "delta"  # type: ignore[misc]


@pytest.mark.parametrize("name", NAMES)
def test_merges_in_the_space_it_claims(name):
    # Prepare: three rank-3 adapters with the same alpha (one common scaling)
    spec = get_spec(name)
    adapters = [make_adapter(i) for i in range(3)]
    # Execute
    merged = call(spec, adapters, W, **options(spec))
    # Assert
    if spec.space == "output":
        assert isinstance(merged, Mixture) and np.allclose(merged.weights, W)
        assert len(merged.adapters) == 3 and all(x is y for x, y in zip(merged.adapters, adapters))
        return
    assert isinstance(merged, Adapter) and np.isfinite(merged_deltas(merged)).all()
    for j, m in enumerate(MODULES):
        if spec.space == "factors":     # A = Σ w A_i, B = Σ w B_i, the contributors' scaling kept
            a, b = merged.factors(m)
            exp_a = sum(wi * x.factors(m)[0].double().numpy() for wi, x in zip(W, adapters))
            exp_b = sum(wi * x.factors(m)[1].double().numpy() for wi, x in zip(W, adapters))
            np.testing.assert_allclose(a.double().numpy(), exp_a, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(b.double().numpy(), exp_b, rtol=1e-5, atol=1e-5)
            assert merged.scaling(m) == pytest.approx(adapters[0].scaling(m))
        elif name in WHOLE_CASES:
            expected = WHOLE_CASES[name][1]([{k: np_delta(x, k) for k in MODULES} for x in adapters], W)[m]
            np.testing.assert_allclose(merged.delta(m).double().numpy(), expected, rtol=1e-4, atol=1e-4)
        else:
            assert name in DELTA_CASES, f"add an independent ΔW re-derivation of {name} to DELTA_CASES"
            expected = DELTA_CASES[name][1]([np_delta(x, m) for x in adapters], W)
            np.testing.assert_allclose(merged.delta(m).double().numpy(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_one_contributor_is_identity(name):
    # Prepare
    spec = get_spec(name)
    adapter = make_adapter(7)
    # Execute: weight 1 (the defaults are published scales, see test_default_weights_are_the_claimed_ones), nothing
    # pruned or truncated
    merged = call(spec, [adapter], [1.0], **dict(spec.exact_options))
    # Assert: unchanged, except for merges that reshape even one update (Iso-C/CTS flatten its spectrum)
    own = np.stack([np_delta(adapter, m) for m in MODULES]) if spec.space != "output" else None
    if spec.space == "output":
        assert len(merged.adapters) == 1 and merged.adapters[0] is adapter and np.allclose(merged.weights, [1.0])
    elif spec.one_is_identity:
        np.testing.assert_allclose(merged_deltas(merged), own, rtol=1e-4, atol=1e-4)
    else:
        assert not np.allclose(merged_deltas(merged), own, rtol=1e-4, atol=1e-4)


def _outcome(merged) -> np.ndarray | dict:
    if isinstance(merged, Mixture):         # the predictor is the multiset of (adapter, weight)
        return {id(a): w for a, w in zip(merged.adapters, merged.weights)}
    return merged_deltas(merged)


@pytest.mark.parametrize("name", NAMES)
def test_permutation_behaviour_is_as_claimed(name):
    # Prepare
    spec = get_spec(name)
    opts = {"density": 0.5, "seed": 3} if spec.seeded else options(spec)
    adapters = [make_adapter(i) for i in range(3)]
    order = [2, 0, 1]
    # Execute
    merged = _outcome(call(spec, adapters, W, **opts))
    permuted = _outcome(call(spec, [adapters[i] for i in order], W[order], **opts))
    again = _outcome(call(spec, adapters, W, **opts))
    # Assert: invariant where claimed; otherwise order matters, but the same seed and order repeat exactly
    if isinstance(merged, dict):
        assert spec.order_invariant and merged.keys() == permuted.keys()
        assert all(merged[k] == pytest.approx(permuted[k]) for k in merged)
    elif spec.order_invariant:
        np.testing.assert_allclose(permuted, merged, rtol=1e-4, atol=1e-5)
    else:
        assert (spec.seeded or spec.continual) and np.array_equal(again, merged)
        assert not np.allclose(permuted, merged)


@pytest.mark.parametrize("name", NAMES)
def test_default_weights_are_the_claimed_ones(name):
    # Prepare
    spec = get_spec(name)
    adapters = [make_adapter(i) for i in range(4)]
    expected = np.full(4, 0.25 if spec.default_weight is None else spec.default_weight)
    # Execute
    implicit = _outcome(call(spec, adapters, None, **options(spec)))
    explicit = _outcome(call(spec, adapters, expected, **options(spec)))
    # Assert
    np.testing.assert_allclose(default_weights(name, 4), expected)
    np.testing.assert_allclose(spec.default_weights(4), expected)
    if isinstance(implicit, dict):
        assert implicit == pytest.approx(explicit)
    else:
        np.testing.assert_allclose(implicit, explicit, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_default_options_are_the_claimed_ones(name):
    # Prepare: the options fn takes as None (its strategy's published default) are those the spec lists
    spec = get_spec(name)
    params = inspect.signature(spec.fn).parameters
    defaulted = {k for k, p in params.items() if p.kind is p.KEYWORD_ONLY and p.default is None}
    adapters = [make_adapter(i) for i in range(3)]
    extra = {"seed": 3} if spec.seeded else {}
    # Execute
    implicit = _outcome(call(spec, adapters, W, **extra))
    explicit = _outcome(call(spec, adapters, W, **extra, **dict(spec.default_options)))
    # Assert
    assert set(dict(spec.default_options)) == defaulted
    if isinstance(implicit, dict):
        assert implicit == pytest.approx(explicit)
    else:
        np.testing.assert_allclose(implicit, explicit, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_mixed_ranks_accepted_iff_claimed(name):
    # Prepare: a rank-2 and a rank-4 adapter of the same modules and shapes
    spec = get_spec(name)
    adapters = [make_adapter(0, r=2, alpha=4.0), make_adapter(1, r=4, alpha=8.0)]
    # Execute / Assert
    if not spec.mixed_ranks:
        with pytest.raises(ValueError, match="ranks"):
            call(spec, adapters, None, **options(spec))
        return
    merged = call(spec, adapters, None, **options(spec))
    if isinstance(merged, Adapter):
        assert np.isfinite(merged_deltas(merged)).all()


@pytest.mark.parametrize("name", NAMES)
def test_different_modules_accepted_iff_claimed(name):
    # Prepare
    spec = get_spec(name)
    adapters = [make_adapter(0), make_adapter(1, modules=("blocks.0.attn.qkv", "blocks.0.attn.proj"))]
    # Execute / Assert
    if spec.same_modules:
        with pytest.raises(ValueError, match="different modules"):
            call(spec, adapters, None, **options(spec))
    else:
        assert call(spec, adapters, None, **options(spec)) is not None


@pytest.mark.parametrize("name", NAMES)
def test_sequential_iff_claimed_and_without_proxy_it_is_the_running_mean(name):
    spec = get_spec(name)
    if not spec.sequential:
        with pytest.raises(ValueError, match="sequential merging is defined for"):
            start_sequence(name)
        return
    # Prepare
    adapters = [make_adapter(i) for i in range(3)]
    state = start_sequence(name)
    # Execute
    for a in adapters:
        state = merge_step(state, a, cfg=MergeConfig())
    # Assert: (a, b) = (k/(k+1), 1/(k+1)) at each stage gives the default 1/N over all contributors
    np.testing.assert_allclose(state.coefficients, spec.default_weights(3))
    expected = _outcome(call(spec, adapters, state.coefficients))
    if isinstance(expected, dict):
        assert _outcome(state.merged) == pytest.approx(expected)
    else:
        np.testing.assert_allclose(_outcome(state.merged), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", [n for n in NAMES if get_spec(n).seeded])
def test_dare_drop_keeps_or_rescales_each_entry(name):
    # Prepare
    adapter = make_adapter(5)
    # Execute
    merged = get_spec(name).fn([adapter], [1.0], density=0.5, seed=1)
    # Assert: each entry is dropped (0) or kept and rescaled by 1 / density
    for m in MODULES:
        got, full = merged.delta(m).double().numpy(), np_delta(adapter, m)
        kept = ~np.isclose(got, 0.0, atol=1e-6)
        np.testing.assert_allclose(got[kept], full[kept] / 0.5, rtol=1e-4, atol=1e-5)
        assert 0 < kept.mean() < 1


# ------------------------------------------------------------------------------------------
# The config reads the registry
# ------------------------------------------------------------------------------------------
def test_merge_config_refuses_an_unknown_strategy_naming_it():
    with pytest.raises(ValueError, match="merge.strategies: unknown merge strategy 'tiess'; known: lora_avg, fusion"):
        MergeConfig(strategies=("ties", "tiess"))


def test_pull_from_main_needs_a_parameter_space_branch():
    with pytest.raises(ValueError, match="schedule.init_from=main needs a parameter-space strategy to pull"):
        SimConfig(merge=MergeConfig(strategies=("mixture",)), schedule=ScheduleConfig(init_from="main"))
    with pytest.raises(ValueError, match="schedule.init_from=main needs a parameter-space strategy to pull"):
        SimConfig(schedule=ScheduleConfig(init_from="main", pull_strategy="mixture"))
    with pytest.raises(ValueError, match=r"schedule.pull_strategy 'lora_avg' is not one of merge.strategies"):
        SimConfig(merge=MergeConfig(strategies=("mixture", "svd")),
                  schedule=ScheduleConfig(init_from="main", pull_strategy="lora_avg"))


def test_pull_branch_is_the_first_parameter_space_strategy_or_the_one_named():
    main = ScheduleConfig(init_from="main")
    assert SimConfig().pull_branch is None
    assert SimConfig(merge=MergeConfig(strategies=("mixture", "svd", "ties")), schedule=main).pull_branch == "svd"
    named = dataclasses.replace(main, pull_strategy="ties")
    assert SimConfig(merge=MergeConfig(strategies=("mixture", "svd", "ties")), schedule=named).pull_branch == "ties"


@pytest.mark.parametrize("name", NAMES)
def test_continual_iff_claimed_and_a_branch_steps_it_as_commits_arrive(name):
    from sim.branches import MainBranches
    from sim.commit import Commit
    from sim.data.base import DistilledSet
    from sim.merge.api import continual_step

    spec = get_spec(name)
    if not spec.continual:
        with pytest.raises(ValueError, match="continual merging is defined for"):
            continual_step(name, None, make_adapter(0), None)
        return
    # Prepare: three commits (institutions 0, 1, 0) with their staleness; a branch with and without its weighting
    adapters = [make_adapter(i) for i in range(3)]
    ds = DistilledSet("toy", ("a", "b"), np.zeros((2, 3, 4, 4), np.float32), np.array([0, 1]))
    commits = [Commit(f"inst{i % 2:03d}-{i:02d}", i % 2, "toy", ("a", "b"), a, ds) for i, a in enumerate(adapters)]
    staleness = [0, 1, 3]
    plain, weighted = (MainBranches((name,), SimConfig(merge=MergeConfig(strategies=(name,)),
                                                       schedule=ScheduleConfig(staleness_weighting=flag)), None)
                       for flag in (False, True))
    # Execute
    for seq, (c, st) in enumerate(zip(commits, staleness), start=1):
        plain.add(c, seq, st)
        weighted.add(c, seq, st)
    # Assert: the branch is the fold over the commits in arrival order, with the default weights or, weighted, each
    # commit's default weight times 1 / (1 + staleness)
    base = spec.default_weights(1)[0]
    np.testing.assert_allclose(_outcome(plain.predictor(name)), _outcome(call(spec, adapters, None)),
                               rtol=1e-5, atol=1e-6)
    expected = call(spec, adapters, np.array([base / (1 + s) for s in staleness]))
    np.testing.assert_allclose(_outcome(weighted.predictor(name)), _outcome(expected), rtol=1e-5, atol=1e-6)
    assert plain.predictor(name).meta["n_contributors"] == 3
