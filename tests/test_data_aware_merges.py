"""RegMean and Fisher merging (``sim.merge.data_aware``) against independent re-derivations.

The merges are checked against the papers' closed forms written directly in numpy on tiny hand-built adapters
(in = 6, out = 5, rank 2); the statistics against inputs captured by a manual forward pass and against per-example
gradients taken one by one with ``torch.autograd``, on the tiny foundation.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sim.data.base import DistilledSet
from sim.merge.data_aware import LayerGrams, fisher, layer_grams, lora_fisher, regmean
from sim.model import PEFT_PREFIX, PIXEL_MEAN, PIXEL_STD, Adapter, new_adapter, pack_heads, prototypes

IN, OUT, R = 6, 5, 2
MODULES = ("blocks.0.attn.qkv", "blocks.1.attn.qkv")


# ------------------------------------------------------------------------------------------
# Tiny hand-built adapters and their numpy view
# ------------------------------------------------------------------------------------------
def make_adapter(seed: int, rank: int = R, alpha: float = 4.0, modules=MODULES) -> Adapter:
    rng = np.random.default_rng(seed)
    weights = {}
    for m in modules:
        weights[f"{PEFT_PREFIX}{m}.lora_A.weight"] = torch.tensor(rng.normal(size=(rank, IN)), dtype=torch.float32)
        weights[f"{PEFT_PREFIX}{m}.lora_B.weight"] = torch.tensor(rng.normal(size=(OUT, rank)), dtype=torch.float32)
    return Adapter(weights, alpha, "base")


def np_delta(adapter: Adapter, m: str) -> np.ndarray:
    """ΔW = B A · alpha / r, (out, in), from the raw factors."""
    a = adapter.weights[f"{PEFT_PREFIX}{m}.lora_A.weight"].double().numpy()
    b = adapter.weights[f"{PEFT_PREFIX}{m}.lora_B.weight"].double().numpy()
    return b @ a * adapter.alpha / a.shape[0]


def merged_delta(adapter: Adapter, m: str) -> np.ndarray:
    a, b = adapter.factors(m)
    return (b.double() @ a.double()).numpy() * adapter.scaling(m)


def random_gram(rng: np.random.Generator, n_tokens: int = 40) -> np.ndarray:
    x = rng.normal(size=(n_tokens, IN)) * rng.uniform(0.5, 2.0, size=IN)
    return x.T @ x / n_tokens


def np_regmean(deltas, grams, alpha, weights=None) -> np.ndarray:
    """Jin et al.'s closed form for y = x Wᵀ: Wᵀ = (Σ G̃_i)⁻¹ Σ G̃_i W_iᵀ, G̃ = off-diagonals times alpha."""
    weights = np.ones(len(deltas)) if weights is None else np.asarray(weights, dtype=np.float64)
    reduced = []
    for g, w in zip(grams, weights):
        off = g - np.diag(np.diag(g))
        reduced.append(w * (np.diag(np.diag(g)) + alpha * off))
    wt = np.linalg.solve(sum(reduced), sum(g @ d.T for g, d in zip(reduced, deltas)))    # (in, out)
    return wt.T


def gram_sets(seed: int, n: int):
    rng = np.random.default_rng(seed)
    return [{m: random_gram(rng) for m in MODULES} for _ in range(n)]


def as_torch(grams):
    return [{m: torch.tensor(g) for m, g in gs.items()} for gs in grams]


# ------------------------------------------------------------------------------------------
# RegMean
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [1.0, 0.95, 0.3, 0.0])
def test_regmean_equals_closed_form(alpha):
    # Prepare: three contributors of ranks 2, 2, 1 with their own Grams
    adapters = [make_adapter(0), make_adapter(1), make_adapter(2, rank=1, alpha=2.0)]
    grams = gram_sets(10, 3)
    # Execute
    merged = regmean(adapters, grams=as_torch(grams), alpha=alpha)
    # Assert
    for m in MODULES:
        expected = np_regmean([np_delta(a, m) for a in adapters], [g[m] for g in grams], alpha)
        np.testing.assert_allclose(merged_delta(merged, m), expected, rtol=1e-4, atol=1e-5)
    assert merged.meta["merge_strategy"] == "regmean" and merged.meta["n_contributors"] == 3


def test_regmean_alpha_scales_only_off_diagonals():
    adapters = [make_adapter(3), make_adapter(4)]
    grams = gram_sets(11, 2)
    reduced = [{m: 0.4 * g + 0.6 * np.diag(np.diag(g)) for m, g in gs.items()} for gs in grams]
    for gs, rs in zip(grams, reduced):                   # the hand-reduced Grams: same diagonal, off-diagonal × 0.4
        for m in MODULES:
            np.testing.assert_allclose(np.diag(rs[m]), np.diag(gs[m]))
            off = ~np.eye(IN, dtype=bool)
            np.testing.assert_allclose(rs[m][off], 0.4 * gs[m][off])
    with_alpha = regmean(adapters, grams=as_torch(grams), alpha=0.4)
    pre_reduced = regmean(adapters, grams=as_torch(reduced), alpha=1.0)
    for m in MODULES:
        np.testing.assert_allclose(merged_delta(with_alpha, m), merged_delta(pre_reduced, m), rtol=1e-4, atol=1e-5)


def test_regmean_with_equal_grams_is_the_plain_average():
    adapters = [make_adapter(5), make_adapter(6), make_adapter(7)]
    shared = gram_sets(12, 1)[0]
    merged = regmean(adapters, grams=as_torch([shared] * 3), alpha=0.95)
    for m in MODULES:
        mean = np.mean([np_delta(a, m) for a in adapters], axis=0)
        np.testing.assert_allclose(merged_delta(merged, m), mean, rtol=1e-4, atol=1e-5)


def test_regmean_weights_scale_each_gram():
    adapters = [make_adapter(8), make_adapter(9)]
    grams = gram_sets(13, 2)
    merged = regmean(adapters, [0.2, 0.8], grams=as_torch(grams), alpha=0.95)
    for m in MODULES:
        expected = np_regmean([np_delta(a, m) for a in adapters], [g[m] for g in grams], 0.95, [0.2, 0.8])
        np.testing.assert_allclose(merged_delta(merged, m), expected, rtol=1e-4, atol=1e-5)


def test_regmean_rank_is_the_rank_of_the_merged_update():
    # two rank-2 contributors: rank 4 < min(out, in) = 5; two identical ones: rank 2, not 4
    distinct = [make_adapter(14), make_adapter(15)]
    twins = [make_adapter(16), make_adapter(16)]
    grams = as_torch(gram_sets(17, 2))
    for adapters, rank in ((distinct, 4), (twins, 2)):
        merged = regmean(adapters, grams=grams, alpha=0.95)
        for m in MODULES:
            expected = np_regmean([np_delta(a, m) for a in adapters], [g[m].numpy() for g in grams], 0.95)
            assert np.linalg.matrix_rank(expected) == rank
            assert merged.rank(m) == rank


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_regmean_of_one_contributor_is_its_update(alpha):
    adapter = make_adapter(18)
    merged = regmean([adapter], grams=as_torch(gram_sets(19, 1)), alpha=alpha)
    for m in MODULES:
        np.testing.assert_allclose(merged_delta(merged, m), np_delta(adapter, m), rtol=1e-4, atol=1e-5)


def test_regmean_singular_gram_gives_the_smallest_update():
    # 3 tokens in a 6-wide input: G is singular at alpha = 1; the least-squares solution of least norm is ΔW P,
    # P the projector on the span of the tokens (numpy's pinv), i.e. ΔW restricted to the inputs the data reached
    rng = np.random.default_rng(20)
    x = rng.normal(size=(3, IN))
    adapter = make_adapter(21)
    gram = {m: x.T @ x / 3 for m in MODULES}
    merged = regmean([adapter], grams=as_torch([gram]), alpha=1.0)
    projector = np.linalg.pinv(gram[MODULES[0]]) @ gram[MODULES[0]]
    for m in MODULES:
        np.testing.assert_allclose(merged_delta(merged, m), np_delta(adapter, m) @ projector, rtol=1e-4, atol=1e-5)


def test_regmean_errors():
    adapters = [make_adapter(22), make_adapter(23)]
    grams = as_torch(gram_sets(24, 2))
    with pytest.raises(ValueError, match="one set of Gram matrices per adapter"):
        regmean(adapters, grams=grams[:1])
    with pytest.raises(ValueError, match=r"grams\[1\] has no Gram matrix for module blocks.1.attn.qkv"):
        regmean(adapters, grams=[grams[0], {MODULES[0]: grams[1][MODULES[0]]}])
    with pytest.raises(ValueError, match=r"shape \(5, 5\)"):
        regmean(adapters, grams=[grams[0], {m: torch.eye(5) for m in MODULES}])
    with pytest.raises(ValueError, match="alpha"):
        regmean(adapters, grams=grams, alpha=1.5)
    with pytest.raises(ValueError, match=">= 0"):
        regmean(adapters, [1.0, -1.0], grams=grams)


# ------------------------------------------------------------------------------------------
# Fisher merging
# ------------------------------------------------------------------------------------------
def random_fishers(seed: int, adapters):
    rng = np.random.default_rng(seed)
    return [{k: torch.tensor(rng.uniform(0, 2, size=tuple(v.shape)) ** 3) for k, v in a.weights.items()}
            for a in adapters]


def np_fisher(thetas, fishers, weights, floor=1e-6, normalize=True):
    """Matena & Raffel per entry, FusionBench's floor and L2 normalisation: Σ c_i (F_i + ε) θ_i / Σ c_i (F_i + ε)."""
    weights = np.asarray(weights, dtype=np.float64)
    if normalize:
        norms = np.array([np.sqrt(sum(np.sum(np.asarray(v, np.float64) ** 2) for v in f.values())) for f in fishers])
        u = 1.0 / (norms + floor)
        weights = weights * u / u.sum()
    out = {}
    for key in thetas[0]:
        num = sum(w * (f[key] + floor) * t[key] for w, f, t in zip(weights, fishers, thetas))
        den = sum(w * (f[key] + floor) for w, f in zip(weights, fishers))
        out[key] = num / den
    return out


def np_weights(adapter: Adapter) -> dict[str, np.ndarray]:
    return {k: v.double().numpy() for k, v in adapter.weights.items()}


@pytest.mark.parametrize("normalize", [True, False])
def test_fisher_equals_weighted_formula(normalize):
    adapters = [make_adapter(30), make_adapter(31), make_adapter(32)]
    fishers = random_fishers(33, adapters)
    merged = fisher(adapters, [0.5, 0.3, 0.2], fishers=fishers, normalize=normalize)
    expected = np_fisher([np_weights(a) for a in adapters], [{k: v.numpy() for k, v in f.items()} for f in fishers],
                         [0.5, 0.3, 0.2], normalize=normalize)
    assert merged.alpha == adapters[0].alpha                  # the shared scaling is kept
    for key, value in expected.items():
        np.testing.assert_allclose(merged.weights[key].double().numpy(), value, rtol=1e-5, atol=1e-6)
    assert merged.meta["merge_strategy"] == "fisher" and merged.meta["n_contributors"] == 3


def test_fisher_with_equal_fishers_is_the_plain_average_of_factors():
    adapters = [make_adapter(34), make_adapter(35)]
    shared = random_fishers(36, adapters[:1])[0]
    merged = fisher(adapters, fishers=[shared, shared])
    for key in adapters[0].weights:
        mean = np.mean([a.weights[key].double().numpy() for a in adapters], axis=0)
        np.testing.assert_allclose(merged.weights[key].double().numpy(), mean, rtol=1e-5, atol=1e-6)


def test_fisher_folds_differing_scalings_into_b():
    # s = 2 and 1: the entries averaged are s_i B_i (scaling 1), whose Fisher is F_B / s_i²
    adapters = [make_adapter(43, alpha=4.0), make_adapter(44, alpha=2.0)]
    fishers = random_fishers(45, adapters)
    merged = fisher(adapters, fishers=fishers, normalize=False)
    thetas, folded = [], []
    for a, f in zip(adapters, fishers):
        s = a.alpha / R
        thetas.append({k: v * (s if "lora_B" in k else 1.0) for k, v in np_weights(a).items()})
        folded.append({k: v.numpy() / (s**2 if "lora_B" in k else 1.0) for k, v in f.items()})
    expected = np_fisher(thetas, folded, [0.5, 0.5], normalize=False)
    assert merged.scaling(MODULES[0]) == 1.0
    for key, value in expected.items():
        np.testing.assert_allclose(merged.weights[key].double().numpy(), value, rtol=1e-5, atol=1e-6)


def test_fisher_of_one_contributor_is_itself():
    adapter = make_adapter(37)
    merged = fisher([adapter], fishers=random_fishers(38, [adapter]))
    for key, value in adapter.weights.items():
        np.testing.assert_allclose(merged.weights[key].numpy(), value.numpy(), rtol=1e-6, atol=1e-7)


def test_fisher_errors():
    adapters = [make_adapter(39), make_adapter(40)]
    fishers = random_fishers(41, adapters)
    with pytest.raises(ValueError, match=r"module blocks.0.attn.qkv has ranks \[1, 2\]"):
        fisher([adapters[0], make_adapter(42, rank=1)], fishers=fishers)
    with pytest.raises(ValueError, match="one Fisher per adapter"):
        fisher(adapters, fishers=fishers[:1])
    key = f"{PEFT_PREFIX}{MODULES[1]}.lora_B.weight"
    with pytest.raises(ValueError, match=rf"fishers\[1\] has no entry for {key}"):
        fisher(adapters, fishers=[fishers[0], {k: v for k, v in fishers[1].items() if k != key}])
    with pytest.raises(ValueError, match=">= 0"):
        fisher(adapters, fishers=[fishers[0], {k: -v for k, v in fishers[1].items()}])


# ------------------------------------------------------------------------------------------
# Statistics on the tiny foundation
# ------------------------------------------------------------------------------------------
TASK, CLASSES = "toy", ("a", "b", "c")


@pytest.fixture(scope="module")
def contributor(tiny_foundation):
    """An adapter of the tiny foundation with non-zero B (qkv and fc1 of both blocks) and a 5-image distilled set."""
    from sim.config import LoraConfig

    adapter = new_adapter(tiny_foundation, LoraConfig(rank=2, alpha=4.0, target_modules=("qkv", "fc1")), seed=1)
    g = torch.Generator().manual_seed(2)
    adapter.weights = {k: (v if "lora_A" in k else 0.3 * torch.randn(v.shape, generator=g))
                       for k, v in adapter.weights.items()}
    rng = np.random.default_rng(3)
    s = tiny_foundation.img_size
    ds = DistilledSet(TASK, CLASSES, rng.uniform(0, 1, size=(5, 3, s, s)).astype(np.float32),
                      np.array([0, 1, 2, 0, 1]))
    return adapter, ds


def patched_backbone(foundation, adapter: Adapter):
    """A copy of the backbone whose adapted weights are W0 + s B A, written in place (no functional_call)."""
    model = copy.deepcopy(foundation.backbone)
    with torch.no_grad():
        for m in adapter.modules():
            a = adapter.weights[f"{PEFT_PREFIX}{m}.lora_A.weight"]
            b = adapter.weights[f"{PEFT_PREFIX}{m}.lora_B.weight"]
            model.get_submodule(m).weight += b @ a * (adapter.alpha / a.shape[0])
    return model


def test_layer_grams_equal_inputs_of_the_contributors_model(tiny_foundation, contributor):
    adapter, ds = contributor
    model = patched_backbone(tiny_foundation, adapter)
    # the inputs of qkv and fc1, block by block, written out from timm's Block.forward
    captured = {}
    with torch.no_grad():
        h = (torch.from_numpy(ds.x) - PIXEL_MEAN) / PIXEL_STD
        h = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(h))))
        for i, blk in enumerate(model.blocks):
            captured[f"blocks.{i}.attn.qkv"] = blk.norm1(h)
            mid = h + blk.drop_path1(blk.ls1(blk.attn(blk.norm1(h))))
            captured[f"blocks.{i}.mlp.fc1"] = blk.norm2(mid)
            h = blk(h)
    stats = layer_grams(tiny_foundation, adapter, ds, batch_size=2)
    assert isinstance(stats, LayerGrams) and stats.images == 5
    assert set(stats.grams) == set(adapter.modules()) == set(captured)
    for m, inp in captured.items():
        x = inp.reshape(-1, inp.shape[-1]).double().numpy()                       # (5·T, in)
        assert stats.tokens[m] == x.shape[0]
        np.testing.assert_allclose(stats.grams[m].numpy(), x.T @ x / x.shape[0], rtol=1e-5, atol=1e-6)
    # the second block's inputs are those of the contributor's model, not of the bare foundation
    bare = layer_grams(tiny_foundation, Adapter({k: (v if "lora_A" in k else torch.zeros_like(v))
                                                 for k, v in adapter.weights.items()}, adapter.alpha), ds)
    assert not torch.allclose(bare.grams["blocks.1.attn.qkv"], stats.grams["blocks.1.attn.qkv"])
    # and they feed regmean directly; one contributor at any alpha gives back its update
    merged = regmean([adapter], grams=[stats])
    for m in adapter.modules():
        np.testing.assert_allclose(merged_delta(merged, m), np_delta(adapter, m), rtol=1e-3, atol=1e-5)


def autograd_fisher(foundation, adapter: Adapter, ds: DistilledSet, target: str, head=None) -> dict[str, np.ndarray]:
    """One backward pass per image and class on a copy whose adapted layers compute x (W0 + s B A)ᵀ + bias."""
    model = copy.deepcopy(foundation.backbone)
    params = {k: v.clone().requires_grad_(True) for k, v in adapter.weights.items()}
    for m in adapter.modules():
        layer = model.get_submodule(m)
        a, b = params[f"{PEFT_PREFIX}{m}.lora_A.weight"], params[f"{PEFT_PREFIX}{m}.lora_B.weight"]
        s = adapter.alpha / a.shape[0]
        layer.forward = (lambda x, layer=layer, a=a, b=b, s=s: F.linear(x, layer.weight + s * b @ a, layer.bias))
    protos = prototypes(TASK, CLASSES, foundation.dim)
    keys = list(params)
    out = {k: np.zeros(tuple(params[k].shape)) for k in keys}
    for x, y in zip(torch.from_numpy(ds.x), ds.y):
        feats = model(((x - PIXEL_MEAN) / PIXEL_STD)[None])                       # (1, D)
        logits = (F.linear(feats, head["weight"], head["bias"]) if head is not None
                  else F.normalize(feats, dim=1) @ protos.T / foundation.cfg.tau)
        logp = torch.log_softmax(logits, dim=1)[0]
        classes = range(len(CLASSES)) if target == "predicted" else [int(y)]
        for c in classes:
            grads = torch.autograd.grad(logp[c], [params[k] for k in keys], retain_graph=True)
            weight = logp[c].exp().item() if target == "predicted" else 1.0
            for k, g in zip(keys, grads):
                out[k] += weight * g.double().numpy() ** 2
    return {k: v / len(ds) for k, v in out.items()}


@pytest.mark.parametrize("target,linear", [("predicted", False), ("label", False), ("predicted", True)])
def test_lora_fisher_equals_per_example_squared_gradients(tiny_foundation, contributor, target, linear):
    adapter, ds = contributor
    head = None
    if linear:
        g = torch.Generator().manual_seed(4)
        head = {"weight": torch.randn(len(CLASSES), tiny_foundation.dim, generator=g),
                "bias": torch.randn(len(CLASSES), generator=g)}
        adapter = Adapter(adapter.weights, adapter.alpha, adapter.base_fingerprint, head=pack_heads({TASK: head}))
    got = lora_fisher(tiny_foundation, adapter, ds, target=target, batch_size=2)
    expected = autograd_fisher(tiny_foundation, adapter, ds, target, head)
    assert set(got) == set(adapter.weights)
    for k, v in expected.items():
        assert got[k].shape == adapter.weights[k].shape
        np.testing.assert_allclose(got[k].double().numpy(), v, rtol=2e-4, atol=1e-9 + 1e-5 * np.abs(v).max())
    # and they feed fisher directly; one contributor gives back its factors
    merged = fisher([adapter], fishers=[got])
    for k, v in adapter.weights.items():
        np.testing.assert_allclose(merged.weights[k].numpy(), v.numpy(), rtol=1e-5, atol=1e-6)


def test_lora_fisher_rejects_an_unknown_target(tiny_foundation, contributor):
    adapter, ds = contributor
    with pytest.raises(ValueError, match="target"):
        lora_fisher(tiny_foundation, adapter, ds, target="sampled")
