"""Per-task linear heads (model.head=linear): every merge, the mixture, the search and the references use them."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from sim.coefficients import prepare_proxy
from sim.config import MergeConfig, TrainConfig
from sim.data.base import DistilledSet
from sim.merge import SPECS, merge, merge_step, mixture_proba, start_sequence
from sim.merge.mixture import ProbabilityCache, combine_probabilities, mixture
from sim.metrics import predict_proba
from sim.model import Adapter, load_adapter, new_adapter, save_adapter
from sim.train import train_adapter, train_joint_adapter

PARAMETER_SPACE = [name for name, spec in SPECS.items() if spec.space != "output"]


def data_inputs(strategy: str, foundation, insts) -> dict:
    """What a data-aware strategy (``spec.statistic``) merges with besides the adapters: the foundation and one
    distilled set per adapter (here 4 real training images per class of its institution); nothing for the others."""
    if SPECS[strategy].statistic_impl is None:
        return {}
    sets = []
    for inst in insts:
        idx = np.concatenate([np.flatnonzero(inst.train.y == c)[:4] for c in range(len(inst.classes))])
        sets.append(DistilledSet(inst.task, inst.classes, inst.train.x[idx].astype(np.float32) / 255.0,
                                 inst.train.y[idx]))
    return {"foundation": foundation, "proxy": sets}

pytestmark = pytest.mark.usefixtures("single_thread")


def headed_adapter(foundation, lora, inst, seed: int) -> Adapter:
    """A LoRA with a non-zero random update and a random linear head of ``inst``'s task (as training leaves it)."""
    base = new_adapter(foundation, lora, seed)
    g = torch.Generator().manual_seed(1000 + seed)
    weights = {k: (torch.randn(v.shape, generator=g) * 0.05 if k.endswith("lora_B.weight") else v)
               for k, v in base.weights.items()}
    k, d = len(inst.classes), foundation.dim
    head = {"weight": torch.randn(k, d, generator=g), "bias": torch.randn(k, generator=g)}
    return Adapter(weights, base.alpha, base.base_fingerprint, head=head,
                   meta={"task": inst.task, "classes": list(inst.classes)})


@pytest.fixture(scope="module")
def contributors(tiny_cfg, tiny_foundation, tiny_cohort):
    """Institutions 0 and 2 hold task 0, institution 1 task 1; one headed adapter each, in arrival order 0, 1, 2."""
    insts = [tiny_cohort.institutions[i] for i in (0, 1, 2)]
    assert insts[0].task == insts[2].task != insts[1].task
    return insts, [headed_adapter(tiny_foundation, tiny_cfg.lora, inst, i) for i, inst in enumerate(insts)]


def np_head(adapters, task) -> tuple[np.ndarray, np.ndarray]:
    """The unweighted mean (weight, bias) of the heads of ``task``'s contributors, in numpy."""
    mine = [a for a in adapters if a.meta["task"] == task]
    return (np.mean([a.head["weight"].numpy().astype(np.float64) for a in mine], axis=0),
            np.mean([a.head["bias"].numpy().astype(np.float64) for a in mine], axis=0))


def np_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def features(foundation, adapter, x) -> np.ndarray:
    """Pooled features of uint8/float images under ``adapter``'s backbone update (None: the frozen backbone)."""
    weights = foundation.merged_weights(adapter) if adapter is not None else None
    with torch.no_grad():
        return foundation.features(torch.from_numpy(x), weights).numpy().astype(np.float64)


def np_proba(foundation, adapter, x, head) -> np.ndarray:
    w, b = head
    return np_softmax(features(foundation, adapter, x) @ w.T + b)


def as_distilled(inst, per_class: int = 3) -> DistilledSet:
    idx = np.concatenate([np.flatnonzero(inst.train.y == c)[:per_class] for c in range(len(inst.classes))])
    return DistilledSet(inst.task, inst.classes, inst.train.x[idx].astype(np.float32) / 255.0, inst.train.y[idx],
                        method="real")


def np_cross_entropy(foundation, adapter, sets, heads) -> float:
    """Mean over sets of the mean CE of each set on its task's head (``heads[task]``), foundation + ``adapter``."""
    losses = []
    for ds in sets:
        p = np_proba(foundation, adapter, ds.x, heads[ds.task])
        losses.append(-np.mean(np.log(p[np.arange(len(ds.y)), ds.y])))
    return float(np.mean(losses))


# ------------------------------------------------------------------------------------------
# Parameter-space merges carry every task's head
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", PARAMETER_SPACE)
def test_every_parameter_space_merge_scores_each_task_with_its_head(strategy, tiny_foundation, tiny_cohort,
                                                                      contributors):
    insts, adapters = contributors
    merged = merge(strategy, adapters, cfg=MergeConfig(), **data_inputs(strategy, tiny_foundation, insts)).merged
    for task in (insts[0].task, insts[1].task):
        test, classes = tiny_cohort.task_split(task, "test"), tiny_cohort.task_classes[task]
        expected = np_proba(tiny_foundation, merged, test.x, np_head(adapters, task))
        got = predict_proba(tiny_foundation, merged, test.x, task, classes)
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_sequential_fold_gives_the_all_at_once_head_average(tiny_foundation, contributors):
    insts, adapters = contributors
    state = start_sequence("fusion")
    for a in adapters:                      # no foundation/proxy: (a, b) is the running mean
        state = merge_step(state, a)
    once = merge("lora_avg", adapters).merged
    for merged in (state.merged, once):
        assert merged.head_counts() == {insts[0].task: 2, insts[1].task: 1}
        for task in (insts[0].task, insts[1].task):
            w, b = np_head(adapters, task)
            np.testing.assert_allclose(merged.head_for(task)["weight"].numpy(), w, atol=1e-6)
            np.testing.assert_allclose(merged.head_for(task)["bias"].numpy(), b, atol=1e-6)


def test_multi_task_heads_round_trip_and_old_single_head_dirs_load(tmp_path, tiny_foundation, tiny_cohort,
                                                                     contributors):
    insts, adapters = contributors
    merged = merge("svd", adapters[:2]).merged
    loaded = load_adapter(save_adapter(merged, tmp_path / "merged"))
    assert loaded.head_counts() == merged.head_counts()
    # a later fold with the reloaded merge still weighs task 0's first head as one contributor of two
    refolded = merge("task_arithmetic", [loaded, adapters[2]]).merged
    w, b = np_head(adapters, insts[0].task)
    np.testing.assert_allclose(refolded.head_for(insts[0].task)["weight"].numpy(), w, atol=1e-6)
    single = load_adapter(save_adapter(adapters[1], tmp_path / "single"))   # the layout training writes
    assert set(single.head) == {"weight", "bias"}
    test = tiny_cohort.task_split(insts[1].task, "test")
    np.testing.assert_allclose(predict_proba(tiny_foundation, single, test.x, insts[1].task, insts[1].classes),
                               np_proba(tiny_foundation, adapters[1], test.x, np_head(adapters, insts[1].task)),
                               atol=1e-5)


def test_an_adapter_without_a_head_for_the_task_is_an_error(tiny_foundation, tiny_cohort, contributors):
    insts, adapters = contributors
    test = tiny_cohort.task_split(insts[1].task, "test")
    with pytest.raises(ValueError, match=f"none for task '{insts[1].task}'"):
        predict_proba(tiny_foundation, adapters[0], test.x, insts[1].task, insts[1].classes)


def test_prototype_merges_carry_no_head(tiny_cfg, tiny_foundation, tiny_cohort):
    from sim.merge.base import base_reference

    adapters = [new_adapter(tiny_foundation, tiny_cfg.lora, s) for s in (0, 1)]
    for strategy in PARAMETER_SPACE:
        inputs = data_inputs(strategy, tiny_foundation, tiny_cohort.institutions[:2])
        merged = merge(strategy, adapters, **inputs).merged
        assert merged.head is None and "head_counts" not in merged.meta
    assert base_reference(adapters) is None


# ------------------------------------------------------------------------------------------
# Mixture: each adapter with its own head
# ------------------------------------------------------------------------------------------
def mixture_members_np(foundation, adapters, x, task) -> np.ndarray:
    """(N, n, K): each adapter's own head of ``task``, or the task's average head when it has none."""
    out = []
    for a in adapters:
        head = ((a.head["weight"].numpy().astype(np.float64), a.head["bias"].numpy().astype(np.float64))
                if a.meta["task"] == task else np_head(adapters, task))
        out.append(np_proba(foundation, a, x, head))
    return np.stack(out)


def test_mixture_scores_each_adapter_with_its_own_head(tiny_foundation, tiny_cohort, contributors):
    insts, adapters = contributors
    mix = mixture(adapters, [0.5, 0.2, 0.3])
    for task in (insts[0].task, insts[1].task):
        test, classes = tiny_cohort.task_split(task, "test"), tiny_cohort.task_classes[task]
        members = mixture_members_np(tiny_foundation, adapters, test.x, task)
        expected = combine_probabilities(torch.from_numpy(members).float(), mix.weights).numpy()
        np.testing.assert_allclose(mixture_proba(tiny_foundation, mix, test.x, task, classes), expected, atol=1e-5)


def test_probability_cache_uses_own_heads_and_rescores_a_borrowed_head(tiny_foundation, contributors):
    insts, adapters = contributors
    sets = [as_distilled(insts[0])]
    data = prepare_proxy(tiny_foundation, sets)
    cache = ProbabilityCache()
    for pool in (adapters[:2], adapters):    # adapter 1 borrows task 0's head: h0, then mean(h0, h2)
        got = cache.probabilities(tiny_foundation, pool, data)[0].numpy()
        np.testing.assert_allclose(got, mixture_members_np(tiny_foundation, pool, sets[0].x, insts[0].task),
                                   atol=1e-5)


# ------------------------------------------------------------------------------------------
# The search scores candidates with their pool's heads
# ------------------------------------------------------------------------------------------
def test_sequential_fusion_search_uses_every_task_head_at_stage_2(tiny_foundation, contributors):
    insts, adapters = contributors
    sets = [as_distilled(inst) for inst in insts]
    cfg = MergeConfig(budget=1, l1=0.0)                  # one evaluation: the init (0.5, 0.5), no penalty
    state = start_sequence("fusion")
    for i, a in enumerate(adapters):
        state = merge_step(state, a, foundation=tiny_foundation, proxy=sets[:i + 1], cfg=cfg)
    heads = {t: np_head(adapters, t) for t in (insts[0].task, insts[1].task)}
    # the candidate at (0.5, 0.5): the stage-1 merge's factors and the new adapter's, each times 0.5
    assert state.stages[2]["initial_objective"] == pytest.approx(
        np_cross_entropy(tiny_foundation, state.merged, sets, heads), abs=1e-5)


def test_global_search_objective_uses_the_merged_heads(tiny_foundation, contributors):
    insts, adapters = contributors
    sets = [as_distilled(inst) for inst in insts]
    res = merge("task_arithmetic", adapters, cfg=MergeConfig(budget=1, l1=0.0), foundation=tiny_foundation,
                proxy=sets, search=True)
    heads = {t: np_head(adapters, t) for t in (insts[0].task, insts[1].task)}
    assert res.trace[0] == pytest.approx(np_cross_entropy(tiny_foundation, res.merged, sets, heads), abs=1e-5)


# ------------------------------------------------------------------------------------------
# References and training
# ------------------------------------------------------------------------------------------
def test_base_reference_is_the_frozen_backbone_with_each_tasks_average_head(tiny_foundation, tiny_cohort,
                                                                              contributors):
    from sim.merge.base import base_reference

    insts, adapters = contributors
    base = base_reference(adapters)
    for task in (insts[0].task, insts[1].task):
        test, classes = tiny_cohort.task_split(task, "test"), tiny_cohort.task_classes[task]
        np.testing.assert_allclose(predict_proba(tiny_foundation, base, test.x, task, classes),
                                   np_proba(tiny_foundation, None, test.x, np_head(adapters, task)), atol=1e-5)


def test_training_from_a_pulled_merge_starts_from_its_tasks_head(tiny_cfg, tiny_foundation, contributors):
    insts, adapters = contributors
    merged = merge("fusion", adapters).merged
    inst = insts[1]
    res = train_adapter(tiny_foundation, inst.train, inst.task, inst.classes, tiny_cfg.lora,
                        TrainConfig(steps=1, batch_size=4, lr=1e-7), 0, init=merged, head="linear")
    np.testing.assert_allclose(res.adapter.head["weight"].numpy(), np_head(adapters, inst.task)[0], atol=1e-4)


def test_joint_reference_trains_and_is_scored_with_per_task_heads(tiny_cfg, tiny_foundation, tiny_cohort):
    parts = [(tiny_cohort.task_split(t, "train"), t, tiny_cohort.task_classes[t]) for t in tiny_cohort.tasks]
    res = train_joint_adapter(tiny_foundation, parts, tiny_cfg.lora, tiny_cfg.train, 0, steps=4, head="linear")
    joint = res.adapter
    assert sorted(joint.task_heads()) == sorted(tiny_cohort.tasks)
    for task in tiny_cohort.tasks:
        head = joint.head_for(task)
        assert head["weight"].shape == (len(tiny_cohort.task_classes[task]), tiny_foundation.dim)
        test = tiny_cohort.task_split(task, "test")
        np.testing.assert_allclose(
            predict_proba(tiny_foundation, joint, test.x, task, tiny_cohort.task_classes[task]),
            np_proba(tiny_foundation, joint, test.x, (head["weight"].double().numpy(), head["bias"].double().numpy())),
            atol=1e-5)


def test_a_pull_projected_to_the_configured_rank_keeps_its_heads(tiny_cfg, tiny_foundation, contributors):
    # svd's result has another rank than the configured LoRA, so a pull projects it (truncated SVD per module)
    from sim.contribute import project_adapter

    insts, adapters = contributors
    merged = merge("svd", adapters).merged
    pulled = project_adapter(merged, tiny_foundation, dataclasses.replace(tiny_cfg.lora, rank=1))
    for task in (insts[0].task, insts[1].task):
        np.testing.assert_allclose(pulled.head_for(task)["weight"].numpy(), np_head(adapters, task)[0], atol=1e-5)


def test_a_site_without_a_commit_counts_as_base_with_its_tasks_average_head(tiny_foundation, tiny_cohort,
                                                                             contributors):
    # institution 2 (task 0) sends nothing: its individual model is the foundation with task 0's average head
    from sim.evaluation import evaluate_individual
    from sim.metrics import accuracy

    insts, adapters = contributors
    recs = evaluate_individual(tiny_foundation, {0: adapters[0], 1: adapters[1]}, tiny_cohort, [insts[0].task])
    task = insts[0].task
    test = tiny_cohort.task_split(task, "test")
    sites = [i for i in tiny_cohort.institutions if i.task == task]
    fallback = np_head([adapters[0]], task)
    accs = [accuracy(test.y, np_proba(tiny_foundation, adapters[0], test.x, np_head([adapters[0]], task))
                     if i.id == 0 else np_proba(tiny_foundation, None, test.x, fallback)) for i in sites]
    individual = next(r for r in recs if r["strategy"] == "individual")
    assert individual["acc"] == pytest.approx(float(np.mean(accs)), abs=1e-9)
