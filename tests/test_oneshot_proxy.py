"""One-shot sequential merges see only the distilled sets received so far, exactly as a run's branches do."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from sim.branches import MainBranches
from sim.coefficients import prepare_proxy
from sim.commit import Commit
from sim.data.base import DistilledSet, derive_seed
from sim.merge import STRATEGIES, merge
from sim.metrics import predict_proba
from sim.train import train_adapter

pytestmark = pytest.mark.usefixtures("single_thread")


def distilled(inst, offset: int = 0, per_class: int = 4) -> DistilledSet:
    """Real images of one institution as its distilled set (``offset``: a later, different set)."""
    idx = np.concatenate([np.flatnonzero(inst.train.y == c)[offset:offset + per_class]
                          for c in range(len(inst.classes))])
    return DistilledSet(inst.task, inst.classes, inst.train.x[idx].astype(np.float32) / 255.0, inst.train.y[idx],
                        method="real")


@pytest.fixture(scope="module")
def arrivals(tiny_cfg, tiny_foundation, tiny_cohort):
    """Four commits in arrival order: institutions 0, 1, 2 and 0 again (a new adapter and a new set)."""
    out = []
    for k, (inst, offset) in enumerate([(tiny_cohort.institutions[i], o) for i, o in ((0, 0), (1, 0), (2, 0),
                                                                                       (0, 8))]):
        adapter = train_adapter(tiny_foundation, inst.train, inst.task, inst.classes, tiny_cfg.lora,
                                dataclasses.replace(tiny_cfg.train, steps=8), seed=10 + k).adapter
        out.append(Commit(f"inst{inst.id:03d}-{k:02d}", inst.id, inst.task, tuple(inst.classes), adapter,
                          distilled(inst, offset)))
    return out


def stage_start_ce(strategy: str, foundation, adapters, sets) -> float:
    """CE, mean over ``sets``, of stage 1's start (a, b) = (0.5, 0.5), from per-model probabilities (numpy)."""
    per_set = []
    for ds in sets:
        if strategy == "fusion":
            p = predict_proba(foundation, STRATEGIES["fusion"](adapters, [0.5, 0.5]), ds.x, ds.task, ds.classes)
        else:   # MedForge's mixture: softmax of Σ w_i p_i with w = [0.5 · 1, 0.5]
            z = sum(0.5 * predict_proba(foundation, a, ds.x, ds.task, ds.classes) for a in adapters)
            p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
        per_set.append(-np.mean(np.log(p[np.arange(len(ds)), ds.y])))
    return float(np.mean(per_set))


@pytest.mark.parametrize("strategy", ["fusion", "mixture"])
def test_stage_one_cannot_see_the_third_set(strategy, tiny_cfg, tiny_foundation, arrivals):
    # Prepare: three adapters, each with the set it arrived with
    adapters, sets = [c.adapter for c in arrivals[:3]], [c.distilled for c in arrivals[:3]]
    cfg = dataclasses.replace(tiny_cfg.merge, budget=3)
    # Execute
    result = merge(strategy, adapters, cfg=cfg, foundation=tiny_foundation, proxy=sets, seed=0)
    # Assert: stage 1 starts at the CE on sets 0 and 1 only (+ L1 of the weights 0.5, 0.5)
    start = result.stages[1]["initial_objective"] - 0.5 * cfg.l1
    seen = stage_start_ce(strategy, tiny_foundation, adapters[:2], sets[:2])
    everything = stage_start_ce(strategy, tiny_foundation, adapters[:2], sets)
    assert abs(seen - everything) > 1e-3                              # the third set would change the number
    assert start == pytest.approx(seen, rel=1e-4)


@pytest.mark.parametrize("strategy", ["fusion", "mixture"])
def test_one_shot_merge_gives_the_run_branch_coefficients(strategy, tiny_cfg, tiny_foundation, arrivals):
    # Prepare: a run's branches fed the commits in order
    cfg = tiny_cfg.replace(merge=dataclasses.replace(tiny_cfg.merge, strategies=(strategy,), budget=4))
    branches = MainBranches((strategy,), cfg, tiny_foundation)
    for seq, commit in enumerate(arrivals, start=1):
        branches.add(commit, seq, staleness=0)
    from sim.merge.api import ArrivedProxy      # here, so that the tests above run (and fail) on code without it

    # Execute: one shot over the same adapters, each set keyed by its institution (0 sends twice)
    proxy = ArrivedProxy(tuple(c.distilled for c in arrivals), tuple(c.institution for c in arrivals))
    one_shot = merge(strategy, [c.adapter for c in arrivals], cfg=cfg.merge, foundation=tiny_foundation,
                     proxy=proxy, seed=cfg.seed)
    # Assert: identical coefficients, stage by stage; the last stage saw institution 0's newer set only
    run_stages = branches.states[strategy].stages
    assert [st["coefficients"] for st in one_shot.stages] == [st["coefficients"] for st in run_stages]
    np.testing.assert_array_equal(one_shot.coefficients, branches.states[strategy].coefficients)
    assert [len(ds) for ds in proxy.seen(3)] == [len(arrivals[3].distilled), len(arrivals[1].distilled),
                                                 len(arrivals[2].distilled)]
    assert proxy.seen(3)[0] is arrivals[3].distilled and proxy.seen(2)[0] is arrivals[0].distilled


def test_plain_run_order_without_repeats_needs_no_sources(tiny_cfg, tiny_foundation, arrivals):
    # A list of one set per adapter is the run's proxy when every adapter comes from another institution
    cfg = tiny_cfg.replace(merge=dataclasses.replace(tiny_cfg.merge, strategies=("mixture",), budget=4))
    branches = MainBranches(("mixture",), cfg, tiny_foundation)
    for seq, commit in enumerate(arrivals[:3], start=1):
        branches.add(commit, seq, staleness=0)
    one_shot = merge("mixture", [c.adapter for c in arrivals[:3]], cfg=cfg.merge, foundation=tiny_foundation,
                     proxy=[c.distilled for c in arrivals[:3]], seed=cfg.seed)
    np.testing.assert_array_equal(one_shot.coefficients, branches.states["mixture"].coefficients)


def test_a_sequential_search_refuses_sets_it_cannot_pair(tiny_cfg, tiny_foundation, arrivals):
    adapters, sets = [c.adapter for c in arrivals[:3]], [c.distilled for c in arrivals[:3]]
    with pytest.raises(ValueError, match="needs one distilled set per adapter, in arrival order.*got 2 sets for 3"):
        merge("fusion", adapters, cfg=tiny_cfg.merge, foundation=tiny_foundation, proxy=sets[:2], search=True)
    with pytest.raises(ValueError, match="prepared ProxyData cannot say which is whose"):
        merge("mixture", adapters, cfg=tiny_cfg.merge, foundation=tiny_foundation,
              proxy=prepare_proxy(tiny_foundation, sets), search=True)
    # a global search takes any number of sets
    glob = dataclasses.replace(tiny_cfg.merge, search_mode="global", budget=2)
    assert merge("mixture", adapters, cfg=glob, foundation=tiny_foundation, proxy=sets[:1]).coefficients.shape == (3,)


@pytest.mark.parametrize("strategy", ["regmean", "fisher"])
def test_data_aware_branch_uses_the_set_each_adapter_arrived_with(strategy, tiny_cfg, tiny_foundation, arrivals):
    # Prepare: a run's branch fed four commits; institution 0 sends twice, with different sets
    from sim.merge import data_aware

    cfg = tiny_cfg.replace(merge=dataclasses.replace(tiny_cfg.merge, strategies=(strategy,)))
    branches = MainBranches((strategy,), cfg, tiny_foundation)
    adapters = [c.adapter for c in arrivals]
    stat, option = (data_aware.layer_grams, "grams") if strategy == "regmean" else (data_aware.lora_fisher, "fishers")
    # Execute
    for seq, commit in enumerate(arrivals, start=1):
        branches.add(commit, seq, staleness=0)
    own = getattr(data_aware, strategy)(adapters, **{option: [stat(tiny_foundation, c.adapter, c.distilled)
                                                              for c in arrivals]})
    latest = [arrivals[3].distilled, *[c.distilled for c in arrivals[1:]]]     # adapter 0 paired with 0's newer set
    wrong = getattr(data_aware, strategy)(adapters, **{option: [stat(tiny_foundation, a, ds)
                                                                for a, ds in zip(adapters, latest)]})
    # Assert: the branch is the merge on each adapter's own set, which differs from pairing by institution
    got = branches.predictor(strategy)
    for m in adapters[0].modules():
        torch.testing.assert_close(got.delta(m), own.delta(m), rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(wrong.delta(m), own.delta(m), rtol=1e-4, atol=1e-6) for m in adapters[0].modules())
    # and a one-shot merge without one set per adapter names what is missing
    with pytest.raises(ValueError, match=f"{strategy} computes each contributor's statistics .* got 3 for 4"):
        merge(strategy, adapters, cfg=cfg.merge, foundation=tiny_foundation, proxy=latest[1:])


@pytest.mark.parametrize("strategy", ["router", "task_route"])
def test_router_branch_is_fitted_on_every_set_received(strategy, tiny_cfg, tiny_foundation, arrivals, tmp_path):
    # Prepare: a run's branch fed four commits (institution 0 twice, with different sets)
    from sim.branches import save_main
    from sim.merge import load_router
    from sim.merge.router import train_gate, train_task_router

    cfg = tiny_cfg.replace(merge=dataclasses.replace(tiny_cfg.merge, strategies=(strategy,)))
    branches = MainBranches((strategy,), cfg, tiny_foundation)
    adapters, sets = [c.adapter for c in arrivals], [c.distilled for c in arrivals]
    # Execute
    for seq, commit in enumerate(arrivals, start=1):
        branches.add(commit, seq, staleness=0)
    got = branches.predictor(strategy)
    fit = train_gate if strategy == "router" else train_task_router
    expected = fit(tiny_foundation, adapters, sets, seed=derive_seed(cfg.seed, "merge", strategy, 4))
    # Assert: the branch is the fit on all four sets (the union received, each adapter's own), trained as one shot
    assert got.kind == strategy and [id(a) for a in got.adapters] == [id(a) for a in adapters]
    assert got.meta["n_sets"] == 4
    # The branch scores its experts set by set as the sets arrive (its ProbabilityCache), the one-shot fit all at
    # once: float32 sums of another blocking, so equal to rounding (1e-4; seen up to 2e-5 under the suite), while
    # a fit that misses the fourth set is off by far more than that.
    other = fit(tiny_foundation, adapters, sets[:3] + sets[:1], seed=derive_seed(cfg.seed, "merge", strategy, 4))
    for k in ("weight", "bias"):
        torch.testing.assert_close(got.gate[k], expected.gate[k], rtol=1e-4, atol=1e-4)
    assert float((other.gate["weight"] - expected.gate["weight"]).abs().max()) > 1e-2
    x, ds = arrivals[1].distilled.x, arrivals[1].distilled
    np.testing.assert_allclose(predict_proba(tiny_foundation, got, x, ds.task, ds.classes),
                               predict_proba(tiny_foundation, expected, x, ds.task, ds.classes), rtol=1e-4, atol=1e-5)
    # main/<strategy>/ is a router dir that loads back to the same predictions
    save_main(branches.snapshot(), tmp_path / "main")
    back = load_router(tmp_path / "main" / strategy)
    np.testing.assert_allclose(predict_proba(tiny_foundation, back, x, ds.task, ds.classes),
                               predict_proba(tiny_foundation, got, x, ds.task, ds.classes), rtol=1e-6, atol=1e-7)
    # weights, or a proxy that does not pair with the adapters, are one clear error
    with pytest.raises(ValueError, match=f"{strategy} takes no weights"):
        merge(strategy, adapters, [0.25] * 4, foundation=tiny_foundation, proxy=sets)
    with pytest.raises(ValueError, match="one distilled set per adapter.* got 3 for 4"):
        merge(strategy, adapters, foundation=tiny_foundation, proxy=sets[1:])
