"""Gradient-free coefficient search: the optimizer registry, seeding, the proxy objective, and that it helps."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sim.coefficients import (OPTIMIZERS, get_optimizer, l1_penalty, prepare_proxy, proxy_loss,
                              search_coefficients)
from sim.config import MergeConfig
from sim.data.base import DistilledSet
from sim.merge import STRATEGIES, Mixture, merge
from sim.merge.specs import get_spec
from sim.metrics import predict_proba
from sim.model import Adapter
from sim.train import train_adapter


def as_distilled(inst, per_class: int = 6) -> DistilledSet:
    """Real images of one institution wrapped as a distilled set (float in [0, 1])."""
    idx = np.concatenate([np.flatnonzero(inst.train.y == c)[:per_class] for c in range(len(inst.classes))])
    return DistilledSet(inst.task, inst.classes, inst.train.x[idx].astype(np.float32) / 255.0, inst.train.y[idx],
                        method="real")


def noise_adapter(like: Adapter, seed: int, scale: float) -> Adapter:
    """An adapter of the same shapes whose update is large random noise: merging it in hurts."""
    g = torch.Generator().manual_seed(seed)
    return Adapter({k: torch.randn(v.shape, generator=g) * scale for k, v in like.weights.items()}, like.alpha,
                   like.base_fingerprint)


@pytest.fixture(scope="module")
def trained(tiny_cfg, tiny_foundation, tiny_cohort):
    """Adapters trained on institutions 0 and 1 (two tasks) and their proxy sets."""
    out = []
    for inst in tiny_cohort.institutions[:2]:
        res = train_adapter(tiny_foundation, inst.train, inst.task, inst.classes, tiny_cfg.lora, tiny_cfg.train,
                            seed=inst.id)
        out.append((res.adapter, as_distilled(inst)))
    return out


pytestmark = pytest.mark.usefixtures("single_thread")


# ------------------------------------------------------------------------------------------
# The search itself
# ------------------------------------------------------------------------------------------
def test_unknown_optimizer_lists_known_names():
    with pytest.raises(ValueError, match="unknown optimizer 'NGOpz'.*known: NGOpt, Shiwa, Cobyla, CMA, OnePlusOne"):
        get_optimizer("NGOpz")
    with pytest.raises(ValueError, match="unknown optimizer"):
        search_coefficients(lambda w: 0.0, np.zeros(2), optimizer="nope")


def test_l1_penalty_is_the_mean_absolute_value():
    assert l1_penalty(np.array([1.0, -3.0]), 0.05) == pytest.approx(0.1)


@pytest.mark.parametrize("optimizer", OPTIMIZERS[:5])
def test_search_lowers_a_quadratic_and_is_seeded(optimizer):
    # Prepare: minimum at 0.3 in every coordinate; start at 1.0
    target = np.array([0.3, -0.6, 0.9])

    def loss(w):
        return float(np.sum((w - target) ** 2))

    # Execute
    res = search_coefficients(loss, np.ones(3), optimizer=optimizer, budget=30, l1=0.0, seed=4)
    again = search_coefficients(loss, np.ones(3), optimizer=optimizer, budget=30, l1=0.0, seed=4)
    # Assert: the init is evaluated first, the best is the minimum of the trace, and the run is reproducible
    assert len(res.trace) == 30 and res.trace[0] == pytest.approx(loss(np.ones(3)))
    assert res.objective == min(res.trace) < 0.5 * res.initial_objective
    assert res.objective == pytest.approx(loss(res.coefficients))
    assert res.trace == again.trace
    assert np.all(np.abs(res.coefficients) <= 1.5)


def test_search_keeps_the_shape_and_the_bounds():
    res = search_coefficients(lambda w: float(-np.sum(w)), np.full((2, 3), 0.5), budget=25, bound=0.8, l1=0.0)
    assert res.coefficients.shape == (2, 3)
    assert np.all(np.abs(res.coefficients) <= 0.8 + 1e-12)
    assert res.objective < res.initial_objective


# ------------------------------------------------------------------------------------------
# The proxy objective
# ------------------------------------------------------------------------------------------
def test_proxy_loss_is_the_mean_over_sets_of_cross_entropy(tiny_foundation, trained):
    # Prepare
    adapter = trained[0][0]
    sets = [ds for _, ds in trained]
    # Execute
    data = prepare_proxy(tiny_foundation, sets)
    loss = proxy_loss(tiny_foundation, data, adapter)
    # Assert: the same number from predict_proba, set by set
    per_set = [-np.mean(np.log(predict_proba(tiny_foundation, adapter, ds.x, ds.task, ds.classes)[np.arange(len(ds)),
                                                                                                   ds.y]))
               for ds in sets]
    assert loss == pytest.approx(float(np.mean(per_set)), rel=1e-4)
    assert len(data) == sum(len(ds) for ds in sets)


def test_prepare_proxy_rejects_bad_input(tiny_foundation, trained):
    ds = trained[0][1]
    with pytest.raises(ValueError, match="needs proxy data"):
        prepare_proxy(tiny_foundation, [])
    small = DistilledSet(ds.task, ds.classes, ds.x[:, :, :8, :8].copy(), ds.y)
    with pytest.raises(ValueError, match="has 8 px images; the foundation takes 16 px"):
        prepare_proxy(tiny_foundation, [small])


# ------------------------------------------------------------------------------------------
# Searching merge coefficients helps on a constructed case
# ------------------------------------------------------------------------------------------
def mixture_objective_ce(foundation, adapters, weights, ds) -> float:
    """MedForge's mixture objective from each adapter's own predictions: CE of softmax(Σ w_i p_i) (numpy)."""
    z = sum(w * predict_proba(foundation, a, ds.x, ds.task, ds.classes) for w, a in zip(weights, adapters))
    lse = np.log(np.exp(z).sum(axis=1))
    return float(np.mean(lse - z[np.arange(len(ds)), ds.y]))


@pytest.mark.parametrize("strategy, granularity", [("fusion", "adapter"), ("fusion", "layer"),
                                                   ("mixture", "adapter"), ("task_arithmetic", "adapter")])
def test_global_search_beats_uniform_weights(strategy, granularity, tiny_foundation, trained):
    # Prepare: a useful adapter for the proxy's task, and one whose update is large noise
    good, proxy = trained[0]
    adapters = [good, noise_adapter(good, seed=1, scale=0.5)]
    cfg = MergeConfig(budget=25, search_mode="global", granularity=granularity)
    data = prepare_proxy(tiny_foundation, [proxy])
    uniform = merge(strategy, adapters).merged                   # the default weights, no search
    # Execute
    result = merge(strategy, adapters, cfg=cfg, foundation=tiny_foundation, proxy=[proxy], seed=0, search=True)
    # Assert: the trace starts at the uniform weights, and the search lowers the objective clearly
    if isinstance(uniform, Mixture):
        uniform_ce = mixture_objective_ce(tiny_foundation, adapters, uniform.weights, proxy)
    else:
        uniform_ce = proxy_loss(tiny_foundation, data, uniform)
    start = get_spec(strategy).default_weights(2)                # 1/N, or a published scale (task arithmetic 0.3)
    assert result.trace[0] == pytest.approx(uniform_ce + l1_penalty(start, cfg.l1), rel=1e-4)
    # MedForge's mixture objective scores Σ w p (each term in [0, |w|]) as logits: its CE spans a narrower range
    assert min(result.trace) < result.trace[0] - (0.05 if isinstance(uniform, Mixture) else 0.1)
    coeffs = np.asarray(result.coefficients)
    assert coeffs.shape == ((2, len(good.modules())) if granularity == "layer" and strategy != "mixture" else (2,))
    if get_spec(strategy).default_weight is None:                # from 1/N: the noise adapter is turned down
        assert np.abs(coeffs[1]).mean() < np.abs(coeffs[0]).mean()
    else:                                                        # from a small published scale: the useful one up
        assert np.abs(coeffs[0]).mean() > start[0] + 0.05
    # the merged predictor is what the best coefficients give, and scores their objective
    merged_ce = (proxy_loss(tiny_foundation, data, result.merged) if not isinstance(result.merged, Mixture) else
                 mixture_objective_ce(tiny_foundation, adapters, result.merged.weights, proxy))
    assert merged_ce + l1_penalty(coeffs, cfg.l1) == pytest.approx(min(result.trace), rel=1e-3)


@pytest.mark.parametrize("strategy", ["fusion", "mixture"])
def test_sequential_search_tracks_weights_over_all_contributors(strategy, tiny_foundation, trained):
    # Prepare: two trained adapters then a noisy one, proxy = the set each came with (the noisy one: set 0 again)
    adapters = [trained[0][0], trained[1][0], noise_adapter(trained[0][0], seed=2, scale=0.5)]
    proxy = [ds for _, ds in trained] + [trained[0][1]]
    cfg = MergeConfig(budget=12)
    # Execute
    result = merge(strategy, adapters, cfg=cfg, foundation=tiny_foundation, proxy=proxy, seed=5)
    again = merge(strategy, adapters, cfg=cfg, foundation=tiny_foundation, proxy=proxy, seed=5)
    # Assert: one 2-coefficient search per commit after the first; [a·w_prev, b] reproduces the merged predictor
    assert len(result.stages) == 3 and len(result.trace) == 2 * cfg.budget
    assert all(len(st["coefficients"]) == (1 if i == 0 else 2) for i, st in enumerate(result.stages))
    a2, b2 = result.stages[2]["coefficients"]
    a1, b1 = result.stages[1]["coefficients"]
    np.testing.assert_allclose(result.coefficients, [a2 * a1, a2 * b1, b2])
    rebuilt = STRATEGIES[strategy](adapters, result.coefficients)
    if strategy == "fusion":
        for m in adapters[0].modules():
            torch.testing.assert_close(result.merged.delta(m), rebuilt.delta(m), atol=1e-5, rtol=1e-4)
    else:
        np.testing.assert_allclose(result.merged.weights, rebuilt.weights)
    assert result.trace == again.trace
    assert all(st["objective"] <= st["initial_objective"] for st in result.stages[1:])
    assert result.record()["n_contributors"] == 3
