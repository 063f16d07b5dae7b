"""The bounded proxy (merge.proxy_images): a stratified share of every received set, a flat search cost, the
mixture's probabilities reused across shrinking shares, and 0 = every image as before."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sim.coefficients import prepare_proxy, proxy_loss, proxy_quota, set_key, stratified_order
from sim.config import MergeConfig, SimConfig, apply_overrides
from sim.data.base import DistilledSet
from sim.merge import merge_step, start_sequence
from sim.merge import mixture as mixture_mod
from sim.merge.mixture import ProbabilityCache
from tests.test_batched_search import images, random_adapter

pytestmark = pytest.mark.usefixtures("single_thread")

MODULES = ("blocks.0.attn.qkv", "blocks.1.attn.qkv")


def distilled(foundation, task: str, labels, seed: int) -> DistilledSet:
    y = np.asarray(labels, dtype=np.int64)
    return DistilledSet(task, ("a", "b", "c"), images(len(y), foundation.img_size, seed), y)


def received(foundation, n: int, per_set: int = 9) -> list[DistilledSet]:
    """n sets of ``per_set`` images over three classes (3 per class), of two tasks in turn."""
    return [distilled(foundation, f"t{i % 2}", np.arange(per_set) % 3, 100 + i) for i in range(n)]


# ------------------------------------------------------------------------------------------
# Shares and order
# ------------------------------------------------------------------------------------------
def test_quota_keeps_every_set_whole_within_the_bound_and_splits_it_equally_beyond():
    assert proxy_quota([25, 25, 25], 0) == [25, 25, 25]           # 0: no bound
    assert proxy_quota([25, 25, 25], 75) == [25, 25, 25]          # within the bound
    assert proxy_quota([25, 25, 25], 30) == [10, 10, 10]          # ⌊30 / 3⌋ each
    assert proxy_quota([3, 25, 25], 20) == [3, 6, 6]              # a small set keeps its 3; nothing is handed on
    assert proxy_quota([25] * 50, 20) == [1] * 50                 # at least one row per set
    assert proxy_quota([0, 10, 10], 10) == [0, 5, 5]              # an empty set takes no share
    with pytest.raises(ValueError, match="max_images must be >= 0"):
        proxy_quota([3], -1)


def test_stratified_order_interleaves_the_classes_and_depends_on_the_set_alone(tiny_foundation):
    ds = distilled(tiny_foundation, "t", [0, 0, 0, 0, 1, 1, 2], 7)
    order = stratified_order(ds)
    assert sorted(order.tolist()) == list(range(7))                        # a permutation of the rows
    labels = ds.y[order].tolist()
    assert sorted(labels[:3]) == [0, 1, 2] and sorted(labels[3:5]) == [0, 1]  # one per class in turn, then
    assert labels[5:] == [0, 0]                                              # the classes that remain
    # by hand: the same rng stream, seeded from the content hash
    rng = np.random.default_rng(int(set_key(ds)[:16], 16))
    perms = [rng.permutation(np.flatnonzero(ds.y == c)) for c in (0, 1, 2)]
    shift = int(rng.integers(3))
    perms = perms[shift:] + perms[:shift]
    assert order.tolist() == [p[j] for j in range(4) for p in perms if j < len(p)]
    # the same images give the same order, whatever else was received; other images another one
    assert stratified_order(distilled(tiny_foundation, "t", [0, 0, 0, 0, 1, 1, 2], 7)).tolist() == order.tolist()


def test_a_bounded_proxy_holds_each_sets_stratified_prefix(tiny_foundation):
    sets = received(tiny_foundation, 4)                       # 36 images
    whole = prepare_proxy(tiny_foundation, sets)
    bounded = prepare_proxy(tiny_foundation, sets, max_images=12)          # 3 rows of each set
    assert len(whole) == 36 and len(bounded) == 12
    for ds, s in zip(sets, bounded.sets):
        rows = stratified_order(ds)[:3]
        assert (s.stop - s.start, s.prefix, s.parent) == (3, 3, set_key(ds)) and s.key != s.parent
        assert torch.equal(bounded.x[s.start:s.stop], tiny_foundation.normalize(torch.from_numpy(ds.x[rows])))
        assert s.y.tolist() == ds.y[rows].tolist() and sorted(s.y.tolist()) == [0, 1, 2]
    # within the bound nothing changes: the same tensors and keys as no bound
    same = prepare_proxy(tiny_foundation, sets, max_images=36)
    assert torch.equal(same.x, whole.x) and [s.key for s in same.sets] == [s.key for s in whole.sets]
    assert all(s.prefix is None for s in same.sets)


def test_the_bounded_proxy_stays_within_its_bound_as_sets_arrive(tiny_foundation):
    sizes = [len(prepare_proxy(tiny_foundation, received(tiny_foundation, n), max_images=18)) for n in range(1, 13)]
    assert sizes == [9, 18, 18, 16, 15, 18, 14, 16, 18, 10, 11, 12]      # n · min(9, ⌊18 / n⌋, ≥ 1)
    assert max(sizes) <= 18


def test_the_bounded_objective_is_the_mean_over_sets_of_each_samples_cross_entropy(tiny_foundation):
    # an independent re-derivation: each set's sampled rows scored on their own, then the plain mean
    sets = received(tiny_foundation, 5)
    adapter = random_adapter(tiny_foundation, MODULES, 3)
    got = proxy_loss(tiny_foundation, prepare_proxy(tiny_foundation, sets, max_images=10), adapter)
    weights = tiny_foundation.merged_weights(adapter)
    losses = []
    with torch.inference_mode():
        for ds in sets:
            rows = stratified_order(ds)[:2]
            feats = tiny_foundation.embed(tiny_foundation.normalize(torch.from_numpy(ds.x[rows])), weights)
            logits = tiny_foundation.logits(feats, ds.task, ds.classes, None)
            losses.append(float(F.cross_entropy(logits, torch.from_numpy(ds.y[rows]))))
    assert got == pytest.approx(np.mean(losses), rel=1e-5)


# ------------------------------------------------------------------------------------------
# In the sequential search
# ------------------------------------------------------------------------------------------
def run_sequence(foundation, strategy: str, adapters, sets, cfg: MergeConfig):
    state = start_sequence(strategy)
    for i, a in enumerate(adapters):
        state = merge_step(state, a, foundation=foundation, proxy=sets[:i + 1], cfg=cfg, seed=0)
    return state


@pytest.mark.parametrize("strategy", ["fusion", "mixture"])
def test_a_bound_above_every_proxy_changes_nothing(strategy, tiny_foundation):
    adapters = [random_adapter(tiny_foundation, MODULES, 10 + i) for i in range(4)]
    sets = received(tiny_foundation, 4)
    a = run_sequence(tiny_foundation, strategy, adapters, sets, MergeConfig(budget=6))
    b = run_sequence(tiny_foundation, strategy, adapters, sets, MergeConfig(budget=6, proxy_images=36))
    assert np.array_equal(a.coefficients, b.coefficients)
    assert [s["objective"] for s in a.stages[1:]] == [s["objective"] for s in b.stages[1:]]


@pytest.mark.parametrize("strategy", ["fusion", "mixture"])
def test_the_sequential_search_runs_on_the_bounded_proxy(strategy, tiny_foundation, monkeypatch):
    adapters = [random_adapter(tiny_foundation, MODULES, 10 + i) for i in range(5)]
    sets = received(tiny_foundation, 5)
    seen = []
    real = prepare_proxy

    def spy(foundation, proxy, max_images=0):
        data = real(foundation, proxy, max_images)
        seen.append(len(data))
        return data

    monkeypatch.setattr("sim.merge.api.prepare_proxy", spy)
    state = run_sequence(tiny_foundation, strategy, adapters, sets, MergeConfig(budget=4, proxy_images=12))
    assert seen == [12, 12, 12, 10]        # stages 1..4 see 2..5 sets of 9: shares of 6, 4, 3 and 2 rows
    assert len(state.stages) == 5 and np.isfinite(state.coefficients).all()


def test_the_mixture_reuses_probabilities_of_a_longer_prefix(tiny_foundation, monkeypatch):
    # Prepare: three adapters; their probabilities on 2 sets (a share of 6 each), then on 3 (a share of 4 each)
    adapters = [random_adapter(tiny_foundation, MODULES, 20 + i) for i in range(3)]
    sets = received(tiny_foundation, 3)
    scored = []
    real = mixture_mod.adapter_features

    def counting(foundation, members, x):
        scored.append((len(members), x.shape[0]))
        return real(foundation, members, x)

    monkeypatch.setattr(mixture_mod, "adapter_features", counting)
    cache = ProbabilityCache()
    cache.probabilities(tiny_foundation, adapters[:2], prepare_proxy(tiny_foundation, sets[:2], max_images=12))
    scored.clear()
    # Execute
    data = prepare_proxy(tiny_foundation, sets, max_images=12)
    probs = cache.probabilities(tiny_foundation, adapters, data)
    # Assert: only the new adapter on the old sets and everyone on the new set are scored, 4 rows each
    assert scored == [(1, 4), (1, 4), (3, 4)]
    fresh = ProbabilityCache().probabilities(tiny_foundation, adapters, data)
    for p, q in zip(probs, fresh):
        assert p.shape == q.shape == (3, 4, 3) and torch.allclose(p, q, atol=1e-6)


def test_a_negative_bound_is_refused_naming_the_field():
    with pytest.raises(ValueError, match="merge.proxy_images"):
        apply_overrides(SimConfig(), ["merge.proxy_images=-1"])
    with pytest.raises(ValueError, match="merge.proxy_images"):
        apply_overrides(SimConfig(), ["merge.proxy_images=2.5"])
