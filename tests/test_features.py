"""Test-split features kept and reused (``sim.features``): what is read back is what was computed, and the mixture
and individual references scored from them are the definitions, re-derived here with plain forward passes."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def adapters(tiny_foundation, tiny_cohort):
    """Three adapters with random LoRA factors (B ≠ 0) and linear heads: two of the first task, one of the second."""
    from sim.config import LoraConfig
    from sim.model import Adapter, new_adapter

    tasks = tiny_cohort.tasks
    out = []
    for seed, task in enumerate((tasks[0], tasks[0], tasks[1])):
        g = torch.Generator().manual_seed(100 + seed)
        fresh = new_adapter(tiny_foundation, LoraConfig(rank=4, alpha=8.0), seed)
        weights = {k: torch.randn(v.shape, generator=g) * 0.3 for k, v in fresh.weights.items()}
        k = len(tiny_cohort.task_classes[task])
        head = {"weight": torch.randn(k, tiny_foundation.dim, generator=g), "bias": torch.randn(k, generator=g)}
        out.append(Adapter(weights, fresh.alpha, fresh.base_fingerprint, head=head, meta={"task": task}))
    return out


def test_features_read_back_are_the_ones_computed(tiny_foundation, tiny_cohort, adapters, tmp_path):
    from sim.features import FeatureStore

    x = tiny_cohort.institutions[0].test.x
    first = FeatureStore(tmp_path)
    feats, seconds = first.features(tiny_foundation, adapters[0], x)
    assert (first.computed, first.read) == (1, 0) and seconds > 0
    # the definition: the pooled features of the foundation with W + ΔW (one forward pass)
    want = tiny_foundation.features(torch.from_numpy(x), tiny_foundation.merged_weights(adapters[0]))
    torch.testing.assert_close(feats, want, rtol=1e-5, atol=1e-6)
    # another store on the same directory (another worker) reads them: the same bits and the seconds they cost
    second = FeatureStore(tmp_path)
    again, billed = second.features(tiny_foundation, adapters[0], x)
    assert (second.computed, second.read) == (0, 1) and torch.equal(again, feats) and billed == seconds
    # another adapter, another split, the foundation alone: other entries
    for adapter, images in ((adapters[1], x), (adapters[0], tiny_cohort.institutions[1].test.x), (None, x)):
        second.features(tiny_foundation, adapter, images)
    assert second.computed == 3
    # the head is not part of the key: a head changed after the fact reads the same features
    changed = dataclasses.replace(adapters[0], head={k: v + 1 for k, v in adapters[0].head.items()})
    second.features(tiny_foundation, changed, x)
    assert second.computed == 3


def test_memory_is_bounded(tiny_foundation, tiny_cohort, adapters):
    from sim.features import FeatureStore

    store = FeatureStore(max_bytes=1)           # keeps only the last entry
    x0, x1 = tiny_cohort.institutions[0].test.x, tiny_cohort.institutions[1].test.x
    store.features(tiny_foundation, adapters[0], x0)
    store.features(tiny_foundation, adapters[0], x1)
    store.features(tiny_foundation, adapters[0], x0)
    assert store.computed == 3 and len(store._mem) == 1


def test_a_mixture_scored_from_features_is_the_mixture(tiny_foundation, tiny_cohort, adapters):
    """Σ w_i softmax(head_i(f_i(x))), clamped and normalised, by hand from each member's own forward pass on the
    pooled test set; a member without a head of the task uses the task's contributors' average head."""
    from sim.evaluation import evaluate_predictor, test_splits
    from sim.features import FeatureStore, mixture_task_proba
    from sim.merge.mixture import mixture
    from sim.metrics import accuracy

    task = tiny_cohort.tasks[0]
    test, classes = tiny_cohort.task_split(task, "test"), tiny_cohort.task_classes[task]
    weights = np.array([0.5, 0.3, -0.1])
    mix = mixture(adapters, weights)
    got, seconds = mixture_task_proba(tiny_foundation, FeatureStore(), mix, test_splits(tiny_cohort, task), task,
                                      classes)
    avg = {k: (adapters[0].head[k] + adapters[1].head[k]) / 2 for k in adapters[0].head}
    scores = 0
    for a, w, head in zip(adapters, weights, (adapters[0].head, adapters[1].head, avg)):
        f = tiny_foundation.features(torch.from_numpy(test.x), tiny_foundation.merged_weights(a))
        p = torch.softmax(f @ head["weight"].T + head["bias"], dim=1).numpy()
        scores = scores + w * p
    scores = np.maximum(scores, 0)
    want = scores / scores.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    assert got.shape == (len(test), len(classes)) and seconds > 0
    # evaluate_predictor scores a mixture this way
    rec = evaluate_predictor(tiny_foundation, mix, tiny_cohort, [task], FeatureStore())[0]
    assert rec["acc"] == accuracy(test.y, got) and rec["n"] == len(test)


def test_billed_seconds_are_the_forward_passes(tiny_foundation, tiny_cohort, adapters, tmp_path):
    """A mixture read from another store's features bills at least those features' stored seconds."""
    from sim.evaluation import test_splits
    from sim.features import FeatureStore, mixture_task_proba
    from sim.merge.mixture import mixture

    task = tiny_cohort.tasks[0]
    splits, classes = test_splits(tiny_cohort, task), tiny_cohort.task_classes[task]
    mix = mixture(adapters)
    mixture_task_proba(tiny_foundation, FeatureStore(tmp_path), mix, splits, task, classes)
    reader = FeatureStore(tmp_path)
    _, seconds = mixture_task_proba(tiny_foundation, reader, mix, splits, task, classes)
    stored = sum(float(np.load(p)["seconds"]) for p in tmp_path.rglob("*.npz"))
    assert reader.computed == 0 and reader.read == len(adapters) * len(splits)
    assert seconds >= stored
