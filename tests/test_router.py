"""Routed output-space predictors (``sim.merge.router``: ``router``, ``task_route``) against independent re-derivations.

The gate is checked against a numpy top-k softmax on hand-set logits and gate tensors; predictions against
``Σ_i r_i(x) p_i(x)`` built from each adapter's own ``sim.metrics.predict_proba`` and base features taken by a manual
forward pass of the frozen backbone. The routing toys use hand-made experts on the tiny foundation: fresh LoRAs (B = 0)
whose per-task linear heads are solved by least squares to be right (or wrong) on chosen sets.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import re

import numpy as np
import pytest
import torch

from sim.config import LoraConfig
from sim.data.base import DistilledSet
from sim.merge import SPECS, get_spec, merge
from sim.merge.router import (GATE_FILE, ROUTER_FILE, Router, fit_router, fit_task_route, load_router, route_weights,
                              router_proba, save_router, top_k_gate, train_gate)
from sim.metrics import predict_proba
from sim.model import PIXEL_MEAN, PIXEL_STD, Adapter, new_adapter, pack_heads

pytestmark = pytest.mark.usefixtures("single_thread")

CLASSES = ("a", "b", "c")
LABELS = np.array([0, 1, 2, 0, 1, 2])


# ------------------------------------------------------------------------------------------
# Independent pieces: numpy gate, base features, per-adapter probabilities
# ------------------------------------------------------------------------------------------
def np_top_k(logits: np.ndarray, k: int) -> np.ndarray:
    """Per row: softmax over the k largest logits (ties: lowest index first), 0 elsewhere."""
    out = np.zeros_like(logits, dtype=np.float64)
    for r, row in enumerate(np.asarray(logits, dtype=np.float64)):
        keep = np.argsort(-row, kind="stable")[:min(k, len(row))]
        e = np.exp(row[keep] - row[keep].max())
        out[r, keep] = e / e.sum()
    return out


def np_features(foundation, x: np.ndarray) -> np.ndarray:
    """The frozen backbone's pooled features of float images in [0, 1], normalised by hand."""
    with torch.no_grad():
        return foundation.backbone((torch.from_numpy(x).float() - PIXEL_MEAN) / PIXEL_STD).double().numpy()


def np_gate(features: np.ndarray, gate: dict, k: int) -> np.ndarray:
    w, b = gate["weight"].double().numpy(), gate["bias"].double().numpy()
    return np_top_k(features @ w.T + b, k)


def per_adapter(foundation, adapters, x, task, classes=CLASSES) -> np.ndarray:
    """(N, n, K) each adapter's own probabilities (``predict_proba``, one adapter at a time)."""
    return np.stack([predict_proba(foundation, a, x, task, classes) for a in adapters]).astype(np.float64)


def images(rng: np.random.Generator, n: int, lo: float, hi: float, size: int = 16) -> np.ndarray:
    return rng.uniform(lo, hi, size=(n, 3, size, size)).astype(np.float32)


def solved_head(foundation, x: np.ndarray, targets: np.ndarray, margin: float = 10.0) -> dict[str, torch.Tensor]:
    """A linear head whose logits on ``x`` are ``margin · onehot(targets)`` (least squares, exact for n <= D)."""
    h = np.hstack([np_features(foundation, x), np.ones((len(x), 1))])
    sol = np.linalg.lstsq(h, margin * np.eye(len(CLASSES))[targets], rcond=None)[0]              # (D + 1, K)
    # contiguous, as a loaded head is: a transposed (strided) weight takes another matmul path, off by round-off
    return {"weight": torch.tensor(np.ascontiguousarray(sol[:-1].T), dtype=torch.float32),
            "bias": torch.tensor(sol[-1], dtype=torch.float32)}


def zero_head(foundation) -> dict[str, torch.Tensor]:
    return {"weight": torch.zeros(len(CLASSES), foundation.dim), "bias": torch.zeros(len(CLASSES))}


def plain_adapter(foundation, heads: dict, meta: dict | None = None) -> Adapter:
    """A fresh LoRA (B = 0, so the features are the foundation's own) with the given per-task linear heads."""
    fresh = new_adapter(foundation, LoraConfig(rank=1, alpha=1.0), seed=0)
    return Adapter(fresh.weights, fresh.alpha, foundation.fingerprint, head=pack_heads(heads), meta=dict(meta or {}))


@pytest.fixture(scope="module")
def lora_adapters(tiny_foundation):
    """Three adapters of the tiny foundation with non-zero B (prototype heads): distinct predictions."""
    out = []
    for seed in range(3):
        a = new_adapter(tiny_foundation, LoraConfig(rank=2, alpha=4.0, target_modules=("qkv", "fc1")), seed=seed)
        g = torch.Generator().manual_seed(100 + seed)
        a.weights = {k: (v if "lora_A" in k else 0.5 * torch.randn(v.shape, generator=g)) for k, v in a.weights.items()}
        out.append(a)
    return out


@pytest.fixture(scope="module")
def two_tasks(tiny_foundation):
    """Set A (bright images, task ta) and set B (dark images, task tb); expert 0 is right on A and wrong on B, expert 1
    the opposite, expert 2 uniform on both."""
    rng = np.random.default_rng(0)
    a = DistilledSet("ta", CLASSES, images(rng, 6, 0.5, 1.0), LABELS)
    b = DistilledSet("tb", CLASSES, images(rng, 6, 0.0, 0.5), LABELS)
    right = {ds.task: solved_head(tiny_foundation, ds.x, ds.y) for ds in (a, b)}
    wrong = {ds.task: solved_head(tiny_foundation, ds.x, (ds.y + 1) % 3) for ds in (a, b)}
    experts = [plain_adapter(tiny_foundation, {"ta": right["ta"], "tb": wrong["tb"]}),
               plain_adapter(tiny_foundation, {"ta": wrong["ta"], "tb": right["tb"]}),
               plain_adapter(tiny_foundation, {"ta": zero_head(tiny_foundation), "tb": zero_head(tiny_foundation)})]
    held_out = {"ta": images(rng, 10, 0.5, 1.0), "tb": images(rng, 10, 0.0, 0.5)}
    return experts, a, b, held_out


# ------------------------------------------------------------------------------------------
# The gate
# ------------------------------------------------------------------------------------------
def test_top_k_gate_on_hand_set_logits():
    # Prepare: ties, a clear winner, and k >= N
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0],
                           [1.0, 3.0, 3.0, 0.0],
                           [2.0, 1.0, 1.0, 5.0]])
    # Execute / Assert: hand-computed rows
    got = top_k_gate(logits, 2).numpy()
    s = 1 / (1 + np.exp(-3.0))                                              # softmax of (5, 2) at the 5
    np.testing.assert_allclose(got, [[0.5, 0.5, 0, 0], [0, 0.5, 0.5, 0], [1 - s, 0, 0, s]], atol=1e-7)
    # k = 3 keeps the lower index of the tie at 1.0 in row 2; k >= N is the dense softmax
    np.testing.assert_allclose(top_k_gate(logits, 3).numpy(), np_top_k(logits.numpy(), 3), atol=1e-7)
    assert top_k_gate(logits, 3)[2, 2] == 0 and top_k_gate(logits, 3)[2, 1] > 0
    dense = torch.softmax(logits, dim=1).numpy()
    for k in (4, 9):
        np.testing.assert_allclose(top_k_gate(logits, k).numpy(), dense, atol=1e-7)


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_top_k_gate_equals_numpy_on_random_logits(k):
    rng = np.random.default_rng(k)
    logits = np.round(rng.normal(size=(20, 5)), 1)                          # rounding makes ties frequent
    got = top_k_gate(torch.tensor(logits, dtype=torch.float32), k).numpy()
    np.testing.assert_allclose(got, np_top_k(logits.astype(np.float32), k), rtol=1e-5, atol=1e-7)
    assert ((got > 0).sum(axis=1) == min(k, 5)).all()
    np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-6)


def test_route_weights_follow_hand_set_gate_tensors(tiny_foundation, lora_adapters):
    # Prepare: a gate of random (N, D) tensors, centred on the images' mean feature to route them differently
    rng = np.random.default_rng(1)
    d = tiny_foundation.dim
    x = images(rng, 9, 0.0, 1.0)
    w = 30 * rng.normal(size=(3, d))
    gate = {"weight": torch.tensor(w, dtype=torch.float32),
            "bias": torch.tensor(rng.normal(size=3) - w @ np_features(tiny_foundation, x).mean(axis=0),
                                 dtype=torch.float32)}
    router = Router(lora_adapters, gate, "router", top_k=2)
    # Execute
    got = route_weights(tiny_foundation, router, x, batch_size=4).numpy()
    # Assert: numpy gate on hand-computed base features; uint8 images route alike
    np.testing.assert_allclose(got, np_gate(np_features(tiny_foundation, x), gate, 2), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-6)
    assert len({tuple(np.flatnonzero(row)) for row in got}) > 1                 # not every image to the same pair
    x8 = np.round(x * 255).astype(np.uint8)
    np.testing.assert_allclose(route_weights(tiny_foundation, router, x8).numpy(),
                               np_gate(np_features(tiny_foundation, x8.astype(np.float32) / 255), gate, 2),
                               rtol=1e-4, atol=1e-6)
    # a zero gate keeps adapters 0 and 1 (ties: lowest index), equally
    zero = Router(lora_adapters, {"weight": torch.zeros(3, d), "bias": torch.zeros(3)}, "router", top_k=2)
    np.testing.assert_allclose(route_weights(tiny_foundation, zero, x).numpy(), np.tile([0.5, 0.5, 0.0], (9, 1)))


# ------------------------------------------------------------------------------------------
# Predictions
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_router_proba_is_the_gated_sum_of_adapter_probabilities(tiny_foundation, lora_adapters, top_k):
    # Prepare: a hand-set gate centred on these images' mean feature, so that it routes them differently
    rng = np.random.default_rng(2)
    x = images(rng, 7, 0.0, 1.0)
    w = 30 * rng.normal(size=(3, tiny_foundation.dim))
    gate = {"weight": torch.tensor(w, dtype=torch.float32),
            "bias": torch.tensor(-w @ np_features(tiny_foundation, x).mean(axis=0), dtype=torch.float32)}
    router = Router(lora_adapters, gate, "router", top_k=top_k)
    # Execute
    got = router_proba(tiny_foundation, router, x, "toy", CLASSES, batch_size=3)
    # Assert: Σ g_i p_i with p_i from predict_proba of each adapter alone and g from hand-computed features
    g = np_gate(np_features(tiny_foundation, x), gate, top_k)                                    # (n, N)
    expected = np.einsum("ni,ink->nk", g, per_adapter(tiny_foundation, lora_adapters, x, "toy"))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-5)
    assert router_proba(tiny_foundation, router, x[:0], "toy", CLASSES).shape == (0, 3)
    x8 = np.round(x * 255).astype(np.uint8)                                   # uint8 images: the same numbers
    g8 = np_gate(np_features(tiny_foundation, x8.astype(np.float32) / 255), gate, top_k)
    np.testing.assert_allclose(router_proba(tiny_foundation, router, x8, "toy", CLASSES),
                               np.einsum("ni,ink->nk", g8, per_adapter(tiny_foundation, lora_adapters, x8, "toy")),
                               rtol=1e-4, atol=1e-6)
    if top_k < 3:   # some batch of 3 leaves an adapter out (it is not run), another routes to it
        unused = [g[s:s + 3].max(axis=0) == 0 for s in range(0, 7, 3)]
        assert any(u.any() for u in unused) and not np.logical_and.reduce(unused).any()


def test_one_adapter_router_predicts_that_adapter(tiny_foundation, lora_adapters):
    rng = np.random.default_rng(3)
    x = images(rng, 5, 0.0, 1.0)
    ds = DistilledSet("toy", CLASSES, x[:3], np.array([0, 1, 2]))
    router = train_gate(tiny_foundation, lora_adapters[:1], [ds], steps=3)
    np.testing.assert_allclose(router_proba(tiny_foundation, router, x, "toy", CLASSES),
                               predict_proba(tiny_foundation, lora_adapters[0], x, "toy", CLASSES),
                               rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------
# Training the gate
# ------------------------------------------------------------------------------------------
def np_training_loss(foundation, router: Router, sets) -> float:
    """Mean over sets of the mean -log Σ_i g_i p_i[y] (each set on its own classes), from independent pieces."""
    losses = []
    for ds in sets:
        p = per_adapter(foundation, router.adapters, ds.x, ds.task, ds.classes)                   # (N, n, K)
        g = np_gate(np_features(foundation, ds.x), router.gate, router.top_k)                    # (n, N)
        q = np.einsum("ni,ink->nk", g, p)[np.arange(len(ds)), ds.y]
        losses.append(-np.mean(np.log(q)))
    return float(np.mean(losses))


def test_training_is_seeded_and_lowers_the_loss(tiny_foundation, lora_adapters):
    # Prepare: three sets of random images, two tasks; batches of 4 from 18 images (so the seed matters)
    rng = np.random.default_rng(4)
    sets = [DistilledSet(t, CLASSES, images(rng, 6, 0.0, 1.0), LABELS) for t in ("t0", "t1", "t0")]
    # Execute
    first = train_gate(tiny_foundation, lora_adapters, sets, steps=40, batch_size=4, seed=0)
    again = train_gate(tiny_foundation, lora_adapters, sets, steps=40, batch_size=4, seed=0)
    other = train_gate(tiny_foundation, lora_adapters, sets, steps=40, batch_size=4, seed=1)
    # Assert: same seed, same gate; another seed, another gate
    for key in ("weight", "bias"):
        assert torch.equal(first.gate[key], again.gate[key])
    assert not torch.equal(first.gate["weight"], other.gate["weight"])
    assert first.gate["weight"].shape == (3, tiny_foundation.dim) and first.gate["bias"].shape == (3,)
    # the recorded losses are the objective re-derived from the adapters' own predictions, and training lowered it
    untrained = Router(lora_adapters, {"weight": torch.zeros(3, tiny_foundation.dim), "bias": torch.zeros(3)})
    assert first.meta["loss_before"] == pytest.approx(np_training_loss(tiny_foundation, untrained, sets), rel=1e-4)
    assert first.meta["loss_after"] == pytest.approx(np_training_loss(tiny_foundation, first, sets), rel=1e-4)
    assert first.meta["loss_after"] < first.meta["loss_before"] - 0.01
    assert first.kind == "router" and first.top_k == 2 and first.meta["steps"] == 40
    # a batch as large as the union is the exact objective: the seed no longer matters
    full = [train_gate(tiny_foundation, lora_adapters, sets, steps=5, batch_size=64, seed=s) for s in (0, 1)]
    assert torch.equal(full[0].gate["weight"], full[1].gate["weight"])


def test_gate_routes_each_set_to_the_expert_that_knows_it(tiny_foundation, two_tasks):
    # Prepare
    experts, a, b, held_out = two_tasks
    # Execute: the defaults (top-2 of 3 experts)
    router = train_gate(tiny_foundation, experts, [a, b])
    # Assert: A's images go to expert 0, B's to expert 1, on the training images and on new ones alike
    for x in (a.x, held_out["ta"]):
        assert route_weights(tiny_foundation, router, x).numpy()[:, 0].mean() > 0.9
    for x in (b.x, held_out["tb"]):
        assert route_weights(tiny_foundation, router, x).numpy()[:, 1].mean() > 0.9
    assert router.meta["loss_before"] == pytest.approx(np.log(2), rel=1e-3)     # uniform over experts 0 and 1
    assert router.meta["loss_after"] < 0.1
    # and the routed prediction is right where the uniform mixture of the experts is not sure
    proba = router_proba(tiny_foundation, router, a.x, a.task, a.classes)
    assert (proba.argmax(axis=1) == a.y).all() and proba[np.arange(6), a.y].min() > 0.9


def test_training_refuses_what_it_cannot_do(tiny_foundation, lora_adapters, two_tasks):
    _, a, b, _ = two_tasks
    with pytest.raises(ValueError, match="top_k must be an integer >= 2"):
        train_gate(tiny_foundation, lora_adapters, [a], top_k=1)
    with pytest.raises(ValueError, match="steps"):
        train_gate(tiny_foundation, lora_adapters, [a], steps=-1)
    with pytest.raises(ValueError, match="takes no weights"):
        fit_router(lora_adapters, [0.2, 0.3, 0.5], foundation=tiny_foundation, proxy=[a])
    with pytest.raises(ValueError, match="takes no weights"):
        fit_task_route(lora_adapters, [1, 1, 1], foundation=tiny_foundation, proxy=[a, b, a])
    with pytest.raises(ValueError, match="one distilled set per adapter.*got 2 sets for 3 adapters"):
        fit_task_route(lora_adapters, foundation=tiny_foundation, proxy=[a, b])


# ------------------------------------------------------------------------------------------
# Task routing
# ------------------------------------------------------------------------------------------
def test_task_route_sends_each_task_to_its_adapters(tiny_foundation, two_tasks):
    # Prepare: four adapters; 0 and 1 say their task, 2 does not (its set's task ta counts), 3 says tb but arrived
    # with a set of ta (its own task wins); the sets are A-like for ta, B-like for tb
    experts, a, b, held_out = two_tasks
    adapters = [plain_adapter(tiny_foundation, e.task_heads(), m)           # distinct heads for each task's pair
                for e, m in zip([experts[0], experts[1], experts[2], experts[0]],
                                [{"task": "ta"}, {"task": "tb"}, {}, {"task": "tb"}])]
    rng = np.random.default_rng(5)
    sets = [a, b, DistilledSet("ta", CLASSES, images(rng, 6, 0.5, 1.0), LABELS),
            DistilledSet("ta", CLASSES, images(rng, 6, 0.5, 1.0), LABELS)]
    # Execute
    router = fit_task_route(adapters, foundation=tiny_foundation, proxy=sets)
    # Assert: the recorded tasks, and each task's images routed uniformly to its adapters
    assert router.kind == "task_route" and router.tasks == ("ta", "tb")
    assert router.adapter_tasks == ("ta", "tb", "ta", "tb")
    assert router.gate["weight"].shape == (2, tiny_foundation.dim)
    assert router.meta["loss_after"] < router.meta["loss_before"]
    for x, expected in ((a.x, [.5, 0, .5, 0]), (held_out["ta"], [.5, 0, .5, 0]),
                        (b.x, [0, .5, 0, .5]), (held_out["tb"], [0, .5, 0, .5])):
        np.testing.assert_allclose(route_weights(tiny_foundation, router, x).numpy(), np.tile(expected, (len(x), 1)))
    # the prediction is the mean of those adapters' own probabilities
    for x, task, members in ((a.x, "ta", [0, 2]), (held_out["tb"], "tb", [1, 3])):
        expected = per_adapter(tiny_foundation, [adapters[i] for i in members], x, task).mean(axis=0)
        np.testing.assert_allclose(router_proba(tiny_foundation, router, x, task, CLASSES), expected,
                                   rtol=1e-5, atol=1e-7)


def test_task_route_falls_back_to_all_adapters(tiny_foundation, lora_adapters):
    # Prepare: a hand-set classifier over (ta, tb); no adapter holds tb
    d = tiny_foundation.dim
    x = images(np.random.default_rng(6), 4, 0.0, 1.0)

    def routed(bias):
        router = Router(lora_adapters, {"weight": torch.zeros(2, d), "bias": torch.tensor(bias)}, "task_route",
                        tasks=("ta", "tb"), adapter_tasks=("ta", "ta", "tc"))
        return route_weights(tiny_foundation, router, x).numpy()
    # Execute / Assert: ta → adapters 0 and 1; tb → everyone; a tie → the first task
    np.testing.assert_allclose(routed([1.0, 0.0]), np.tile([.5, .5, 0], (4, 1)))
    np.testing.assert_allclose(routed([0.0, 1.0]), np.full((4, 3), 1 / 3), rtol=1e-6)
    np.testing.assert_allclose(routed([0.0, 0.0]), np.tile([.5, .5, 0], (4, 1)))


# ------------------------------------------------------------------------------------------
# The predictor object and its files
# ------------------------------------------------------------------------------------------
def test_num_bytes_and_base_checks(tiny_foundation, lora_adapters):
    d = tiny_foundation.dim
    router = Router(lora_adapters, {"weight": torch.zeros(3, d), "bias": torch.zeros(3)})
    assert router.num_bytes() == sum(a.num_bytes() for a in lora_adapters) + (3 * d + 3) * 4
    router.check_base(tiny_foundation)
    with pytest.raises(ValueError, match="trained on base"):
        router.check_base(dataclasses.replace(tiny_foundation, fingerprint="another"))
    wide = Router(lora_adapters, {"weight": torch.zeros(3, d + 1), "bias": torch.zeros(3)})
    with pytest.raises(ValueError, match=f"reads {d + 1}-wide features"):
        wide.check_base(tiny_foundation)
    with pytest.raises(ValueError, match="2 rows for 3 adapters"):
        Router(lora_adapters, {"weight": torch.zeros(2, d), "bias": torch.zeros(2)})
    with pytest.raises(ValueError, match="kind"):
        Router(lora_adapters, {"weight": torch.zeros(3, d), "bias": torch.zeros(3)}, "mixture")


@pytest.mark.parametrize("kind", ["router", "task_route"])
def test_save_load_round_trip(tmp_path, tiny_foundation, two_tasks, kind):
    experts, a, b, held_out = two_tasks
    fit = fit_router if kind == "router" else fit_task_route
    router = fit(experts[:2], foundation=tiny_foundation, proxy=[a, b], steps=20)
    # Execute
    loaded = load_router(save_router(router, tmp_path / kind))
    # Assert: same tensors, settings and predictions
    assert (loaded.kind, loaded.top_k, loaded.tasks, loaded.adapter_tasks) == \
        (router.kind, router.top_k, router.tasks, router.adapter_tasks)
    for key in ("weight", "bias"):
        assert torch.equal(loaded.gate[key], router.gate[key])
    assert loaded.meta == json.loads(json.dumps(router.meta))
    for x, task in ((held_out["ta"], "ta"), (b.x, "tb")):
        np.testing.assert_array_equal(router_proba(tiny_foundation, loaded, x, task, CLASSES),
                                      router_proba(tiny_foundation, router, x, task, CLASSES))


def test_corrupt_or_missing_files_are_named(tmp_path, tiny_foundation, two_tasks):
    experts, a, b, _ = two_tasks
    out = save_router(train_gate(tiny_foundation, experts[:2], [a, b], steps=2), tmp_path / "r")
    doc = json.loads((out / ROUTER_FILE).read_text())
    # a missing dir
    with pytest.raises(ValueError, match=f"{ROUTER_FILE}: not a readable router file"):
        load_router(tmp_path / "absent")
    # a gate of the wrong kind for its tensors
    (out / ROUTER_FILE).write_text(json.dumps(doc | {"kind": "task_route"}))
    with pytest.raises(ValueError, match=f"{ROUTER_FILE} and .*{GATE_FILE} do not form a router"):
        load_router(out)
    # a truncated router.json
    (out / ROUTER_FILE).write_text(json.dumps(doc)[:40])
    with pytest.raises(ValueError, match=re.escape(f"{out / ROUTER_FILE}: not a readable router file")):
        load_router(out)
    # a missing gate file
    (out / ROUTER_FILE).write_text(json.dumps(doc))
    (out / GATE_FILE).unlink()
    with pytest.raises(ValueError, match=re.escape(f"{out / GATE_FILE}: not a readable router gate")):
        load_router(out)


# ------------------------------------------------------------------------------------------
# The registry's claims about the fitted strategies (tests/test_strategy_specs.py checks the weighted ones)
# ------------------------------------------------------------------------------------------
FITTED = [n for n, sp in SPECS.items() if sp.fitted]


def test_the_fitted_strategies_are_the_routers():
    assert FITTED == ["router", "task_route"]


@pytest.mark.parametrize("name", FITTED)
def test_fitted_spec_claims_hold(name, tiny_foundation, two_tasks):
    # Prepare: three experts, one distilled set each (the set each arrived with)
    spec = get_spec(name)
    experts, a, b, _ = two_tasks
    sets = [a, b, a]
    fit = lambda adapters, s, seed=0, **kw: merge(name, adapters, foundation=tiny_foundation, proxy=s,  # noqa: E731
                                                    seed=seed, **kw).merged
    # Execute
    merged = fit(experts, sets)
    permuted = fit([experts[i] for i in (2, 0, 1)], [sets[i] for i in (2, 0, 1)])
    # Assert: an output-space predictor over the same adapters, no weights, no search, not sequential
    assert spec.space == "output" and spec.needs_proxy and not spec.searched and not spec.sequential
    assert isinstance(merged, Router) and merged.kind == name and all(x is y for x, y in zip(merged.adapters, experts))
    assert spec.default_weight is None and not spec.order_invariant and spec.seeded
    with pytest.raises(ValueError, match=f"{name} takes no weights"):
        merge(name, experts, [1 / 3] * 3, foundation=tiny_foundation, proxy=sets)
    # seeded: the same seed repeats exactly; the gate is trained on batches the seed draws
    again = fit(experts, sets)
    assert all(torch.equal(merged.gate[k], again.gate[k]) for k in ("weight", "bias"))
    other = fit(experts, sets, seed=1)
    assert any(not torch.equal(merged.gate[k], other.gate[k]) for k in ("weight", "bias"))
    # not order invariant: the adapters' order is the order of the gate's rows and of the union's images
    assert [id(x) for x in permuted.adapters] == [id(experts[i]) for i in (2, 0, 1)]
    # the None options are the spec's published defaults
    params = inspect.signature(spec.fn).parameters
    assert {k for k, p in params.items() if p.kind is p.KEYWORD_ONLY and p.default is None} - {"cache"} == \
        set(dict(spec.default_options))
    explicit = spec.fn(experts, None, foundation=tiny_foundation, proxy=sets, **dict(spec.default_options))
    assert all(torch.equal(merged.gate[k], explicit.gate[k]) for k in ("weight", "bias"))


@pytest.mark.parametrize("name", FITTED)
def test_fitted_strategies_take_mixed_ranks_and_modules(name, tiny_foundation, two_tasks):
    # Prepare: a rank-2 qkv adapter and a rank-4 fc1 adapter (mixed_ranks, not same_modules)
    spec = get_spec(name)
    _, a, b, _ = two_tasks
    mixed = [new_adapter(tiny_foundation, LoraConfig(rank=2, alpha=4.0, target_modules=("qkv",)), seed=0),
             new_adapter(tiny_foundation, LoraConfig(rank=4, alpha=8.0, target_modules=("fc1",)), seed=1)]
    for x in mixed:
        x.meta["task"] = None
    # Execute
    merged = merge(name, mixed, foundation=tiny_foundation, proxy=[a, b]).merged
    # Assert
    assert spec.mixed_ranks and not spec.same_modules and len(merged.adapters) == 2
    assert predict_proba(tiny_foundation, merged, a.x, a.task, a.classes).shape == (len(a), len(a.classes))
