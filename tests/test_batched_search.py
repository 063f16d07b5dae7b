"""The batched coefficient search (merge.search_batch): stacked forward, cached prefix, rounds of asks, batch 1 as before."""
from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch

from sim.coefficients import (ProxyData, prepare_proxy, proxy_features, proxy_loss,
                              search_coefficients)
from sim.config import MergeConfig, config_from_dict
from sim.data.base import DistilledSet
from sim.merge import merge, merge_step, start_sequence
from sim.merge.fusion import fusion, fusion_batch_loss, fusion_loss
from sim.model import PEFT_PREFIX, Adapter
from sim.stacked_forward import (CandidateUpdates, PrefixCache, first_adapted_block, prefix_tokens, proxy_tokens,
                                 stacked_features)
from sim.train import train_adapter

pytestmark = pytest.mark.usefixtures("single_thread")


def random_adapter(foundation, modules, seed: int, rank: int = 4, scale: float = 0.3, alpha: float = 8.0) -> Adapter:
    """An adapter of random factors on ``modules`` of ``foundation`` (large enough to change the features)."""
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for m in modules:
        out_f, in_f = foundation.weight(m).shape
        weights[f"{PEFT_PREFIX}{m}.lora_A.weight"] = torch.randn(rank, in_f, generator=g) * scale
        weights[f"{PEFT_PREFIX}{m}.lora_B.weight"] = torch.randn(out_f, rank, generator=g) * scale
    return Adapter(weights, alpha, foundation.fingerprint)


def images(n: int, size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 3, size, size), dtype=np.float32)


def proxy_of(foundation, sizes=(5, 3), seed: int = 0) -> ProxyData:
    """Two distilled sets of random images, as ``prepare_proxy`` builds them (content keys)."""
    sets = [DistilledSet(f"t{i}", ("a", "b"), images(n, foundation.img_size, seed + i), np.arange(n) % 2)
            for i, n in enumerate(sizes)]
    return prepare_proxy(foundation, sets)


def updates_of(adapters: list[Adapter]) -> CandidateUpdates:
    """The adapters' own factors stacked as candidates (same modules and ranks)."""
    mods = adapters[0].modules()
    return CandidateUpdates({m: (torch.stack([a.factors(m)[0] for a in adapters]),
                                 torch.stack([a.factors(m)[1] for a in adapters]), adapters[0].scaling(m))
                             for m in mods})


# ------------------------------------------------------------------------------------------
# The stacked forward and the cached prefix
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("modules", [("blocks.0.attn.qkv",), ("blocks.1.attn.qkv", "blocks.1.mlp.fc1"),
                                     ("blocks.0.attn.proj", "blocks.1.mlp.fc2")])
def test_stacked_forward_equals_separate_forwards(modules, tiny_foundation):
    # Prepare: three candidates, each an adapter with its own factors
    adapters = [random_adapter(tiny_foundation, modules, seed=s) for s in range(3)]
    data = proxy_of(tiny_foundation)
    k = first_adapted_block(modules)
    # Execute
    feats = stacked_features(tiny_foundation, proxy_tokens(tiny_foundation, data, k, PrefixCache()), k,
                             updates_of(adapters))
    # Assert: candidate c's features are the foundation's with merged weights W + s B_c A_c (functional_call)
    assert feats.shape == (3, len(data), tiny_foundation.dim)
    for c, a in enumerate(adapters):
        separate = proxy_features(tiny_foundation, data, tiny_foundation.merged_weights(a))
        torch.testing.assert_close(feats[c], separate, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(feats[0], feats[1], atol=1e-3)          # the candidates really differ


def test_stacked_forward_chunks_rows_without_changing_them(tiny_foundation, monkeypatch):
    import sim.stacked_forward as sf

    adapters = [random_adapter(tiny_foundation, ("blocks.1.attn.qkv",), seed=s) for s in range(2)]
    tokens = proxy_tokens(tiny_foundation, proxy_of(tiny_foundation, (7, 6)), 1, PrefixCache())
    whole = stacked_features(tiny_foundation, tokens, 1, updates_of(adapters))
    monkeypatch.setattr(sf, "STACK_ROWS", 6)                             # 3 images × 2 candidates per pass
    torch.testing.assert_close(stacked_features(tiny_foundation, tokens, 1, updates_of(adapters)), whole,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k", [0, 1])
def test_cached_prefix_forward_equals_full_forward(k, tiny_foundation):
    # Prepare: a zero update (B = 0) on the blocks from k on: the candidate is the bare foundation
    data = proxy_of(tiny_foundation)
    mods = tuple(f"blocks.{i}.attn.qkv" for i in range(k, tiny_foundation.block_count()))
    zero = random_adapter(tiny_foundation, mods, seed=0)
    zero = Adapter({key: (t * 0 if key.endswith("lora_B.weight") else t) for key, t in zero.weights.items()},
                   zero.alpha)
    # Execute: the prefix through blocks 0..k-1 (cached), the rest stacked
    tokens = proxy_tokens(tiny_foundation, data, k, PrefixCache())
    feats = stacked_features(tiny_foundation, tokens, k, updates_of([zero]))
    # Assert: the full forward of the foundation, and the prefix is the backbone's own intermediate, step by step
    torch.testing.assert_close(feats[0], proxy_features(tiny_foundation, data), rtol=1e-5, atol=1e-6)
    bb = tiny_foundation.backbone
    with torch.inference_mode():
        x = bb.norm_pre(bb.patch_drop(bb._pos_embed(bb.patch_embed(data.x))))
        for blk in bb.blocks[:k]:
            x = blk(x)
    torch.testing.assert_close(tokens, x, rtol=0, atol=0)
    torch.testing.assert_close(prefix_tokens(tiny_foundation, data.x, k), x, rtol=0, atol=0)


def test_prefix_cache_computes_a_set_once(tiny_foundation):
    data = proxy_of(tiny_foundation, (4, 3))
    cache = PrefixCache()
    first = proxy_tokens(tiny_foundation, data, 1, cache)
    again = proxy_tokens(tiny_foundation, data, 1, cache)
    assert (cache.misses, cache.hits) == (2, 2)                        # two sets, each computed once
    assert torch.equal(first, again)
    proxy_tokens(tiny_foundation, data, 0, cache)                      # another prefix depth is another entry
    assert cache.misses == 4
    # a cap smaller than two sets keeps only the most recent one
    small = PrefixCache(max_bytes=first[:4].numel() * 4)
    proxy_tokens(tiny_foundation, data, 1, small)
    assert len(small._tokens) == 1


def test_first_adapted_block():
    assert first_adapted_block(["blocks.3.attn.qkv", "blocks.1.mlp.fc1"]) == 1
    with pytest.raises(ValueError, match="not inside a ViT block"):
        first_adapted_block(["head"])


def test_stacked_forward_refuses_updates_inside_the_prefix(tiny_foundation):
    adapters = [random_adapter(tiny_foundation, ("blocks.0.attn.qkv",), seed=0)]
    tokens = proxy_tokens(tiny_foundation, proxy_of(tiny_foundation), 1, PrefixCache())
    with pytest.raises(ValueError, match="earlier block"):
        stacked_features(tiny_foundation, tokens, 1, updates_of(adapters))


# ------------------------------------------------------------------------------------------
# Fusion's stacked objective
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tiny_cfg, tiny_foundation, tiny_cohort):
    """Two trained adapters and each one's distilled set (real images), with linear heads too."""
    out = {}
    for head in ("prototype", "linear"):
        cfg = tiny_cfg
        pairs = []
        for inst in tiny_cohort.institutions[:2]:
            adapter = train_adapter(tiny_foundation, inst.train, inst.task, inst.classes, cfg.lora,
                                    dataclasses.replace(cfg.train, steps=10), seed=inst.id, head=head).adapter
            idx = np.concatenate([np.flatnonzero(inst.train.y == c)[:4] for c in range(len(inst.classes))])
            pairs.append((adapter, DistilledSet(inst.task, inst.classes, inst.train.x[idx].astype(np.float32) / 255.0,
                                                inst.train.y[idx], method="real")))
        out[head] = pairs
    return out


@pytest.mark.parametrize("head", ["prototype", "linear"])
@pytest.mark.parametrize("per_layer", [False, True])
def test_fusion_batch_loss_equals_fusion_loss(head, per_layer, tiny_foundation, trained):
    # Prepare: candidate coefficient vectors, per adapter (C, 2) or per adapter and module (C, 2, M)
    adapters, sets = zip(*trained[head])
    data = prepare_proxy(tiny_foundation, list(sets))
    n_mod = len(adapters[0].modules())
    rng = np.random.default_rng(3)
    ws = rng.uniform(-1.5, 1.5, size=(5, 2, n_mod) if per_layer else (5, 2))
    # Execute
    stacked = fusion_batch_loss(tiny_foundation, data, list(adapters))(ws)
    # Assert: the one-at-a-time objective of each candidate, and the CE of the merged adapter itself
    one = fusion_loss(tiny_foundation, data, list(adapters))
    np.testing.assert_allclose(stacked, [one(w) for w in ws], rtol=1e-4)
    assert stacked[0] == pytest.approx(proxy_loss(tiny_foundation, data, fusion(list(adapters), ws[0])), rel=1e-4)


# ------------------------------------------------------------------------------------------
# The search: batch 1 is the one-at-a-time search; batch B asks B at a time, deterministically
# ------------------------------------------------------------------------------------------
def quadratic(w: np.ndarray) -> float:
    return float(np.sum((np.asarray(w) - np.array([0.3, -0.6])) ** 2))


def reference_loop(init, budget, seed, batch, l1=0.05, bound=1.5, optimizer="NGOpt") -> list[float]:
    """The search written out with nevergrad directly: the init scored first, then rounds of ``batch`` asks told in
    ask order (batch 1: the plain ask/tell loop)."""
    import nevergrad as ng

    def objective(w):
        return quadratic(w) + l1 * float(np.mean(np.abs(w)))
    trace = [objective(init)]
    param = ng.p.Array(init=init, lower=-bound, upper=bound)
    param.random_state = np.random.RandomState(seed)
    kw = {} if batch == 1 else {"num_workers": batch}
    opt = ng.optimizers.registry[optimizer](parametrization=param, budget=budget - 1, **kw)
    left = budget - 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        while left > 0:
            cands = [opt.ask() for _ in range(min(batch, left))]
            for c in cands:
                value = objective(c.value)
                opt.tell(c, value)
                trace.append(value)
            left -= len(cands)
    return trace


@pytest.mark.parametrize("optimizer, batch", [("NGOpt", 1), ("CMA", 1), ("CMA", 4), ("TwoPointsDE", 4), ("PSO", 3)])
def test_search_follows_the_written_out_loop(optimizer, batch):
    init = np.array([1.0, 1.0])
    stacked_calls = []

    def batch_loss(ws):
        stacked_calls.append(len(ws))
        return [quadratic(w) for w in ws]

    res = search_coefficients(quadratic, init, optimizer=optimizer, budget=15, seed=7, batch=batch,
                              batch_loss=batch_loss)
    expected = reference_loop(init, 15, 7, batch, optimizer=optimizer)
    np.testing.assert_allclose(res.trace, expected, rtol=1e-12)
    assert res.objective == min(res.trace)
    if batch == 1:
        assert stacked_calls == []                                        # batch 1 never takes the stacked path
    else:                                                                 # init + B, then rounds of B: 14 asks in all
        assert stacked_calls == {4: [5, 4, 4, 2], 3: [4, 3, 3, 3, 2]}[batch]


def test_batched_search_is_deterministic_per_seed():
    kw = dict(optimizer="CMA", budget=20, batch=4)
    a = search_coefficients(quadratic, np.ones(2), seed=3, **kw)
    b = search_coefficients(quadratic, np.ones(2), seed=3, **kw)
    c = search_coefficients(quadratic, np.ones(2), seed=4, **kw)
    assert a.trace == b.trace and np.array_equal(a.coefficients, b.coefficients)
    assert a.trace != c.trace


def test_fusion_merge_with_batch_one_is_the_sequential_search(tiny_foundation, trained):
    # Prepare: the stage search written with the unchanged one-at-a-time objective and search
    (a0, d0), (a1, d1) = trained["prototype"]
    cfg = MergeConfig(budget=8, search_batch=1)
    data = prepare_proxy(tiny_foundation, [d0, d1])
    expected = search_coefficients(fusion_loss(tiny_foundation, data, [a0, a1]), np.full(2, 0.5),
                                   optimizer=cfg.optimizer, budget=cfg.budget, bound=cfg.bound, l1=cfg.l1, seed=11)
    # Execute: stage 1 of a fusion branch
    state = merge_step(start_sequence("fusion"), a0, foundation=tiny_foundation, proxy=[d0], cfg=cfg, seed=10)
    state = merge_step(state, a1, foundation=tiny_foundation, proxy=[d0, d1], cfg=cfg, seed=11)
    # Assert: the same numbers bit for bit
    assert state.stages[1]["trace"] == expected.trace
    assert state.stages[1]["coefficients"] == expected.coefficients.tolist()


def test_batched_fusion_search_is_deterministic_and_improves(tiny_foundation, trained):
    (a0, d0), (a1, d1) = trained["prototype"]
    cfg = MergeConfig(budget=13, search_batch=4, optimizer="CMA")
    runs = [merge("fusion", [a0, a1], cfg=cfg, foundation=tiny_foundation, proxy=[d0, d1], seed=2) for _ in range(2)]
    one = merge("fusion", [a0, a1], cfg=dataclasses.replace(cfg, search_batch=1), foundation=tiny_foundation,
                proxy=[d0, d1], seed=2)
    assert runs[0].trace == runs[1].trace
    np.testing.assert_array_equal(runs[0].coefficients, runs[1].coefficients)
    assert len(runs[0].trace) == len(one.trace) == cfg.budget                  # stage 0 has no search
    # the stacked objective scores the init as the one-at-a-time search does, and the search can only improve on it
    assert runs[0].trace[0] == pytest.approx(one.trace[0], rel=1e-5)
    assert runs[0].stages[-1]["objective"] <= runs[0].stages[-1]["initial_objective"]
    data = prepare_proxy(tiny_foundation, [d0, d1])
    best = runs[0].stages[-1]
    assert proxy_loss(tiny_foundation, data, runs[0].merged) + cfg.l1 * np.mean(np.abs(best["coefficients"])) == \
        pytest.approx(best["objective"], rel=1e-4)


def test_mixture_keeps_one_at_a_time_asks_whatever_the_batch(tiny_foundation, trained):
    (a0, d0), (a1, d1) = trained["prototype"]
    runs = [merge("mixture", [a0, a1], cfg=MergeConfig(budget=8, search_batch=b, optimizer="CMA"),
                  foundation=tiny_foundation,
                  proxy=[d0, d1], seed=1) for b in (1, 4)]
    assert runs[0].trace == runs[1].trace


# ------------------------------------------------------------------------------------------
# The config field
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [0, -2, 1.5, "4", True])
def test_bad_search_batch_names_the_field(bad):
    with pytest.raises(ValueError, match="merge.search_batch"):
        MergeConfig(search_batch=bad)
    with pytest.raises(ValueError, match="merge.search_batch"):
        search_coefficients(quadratic, np.ones(2), batch=bad)


def test_sequential_optimizers_cannot_be_batched():
    with pytest.raises(ValueError, match="merge.search_batch must be 1 with merge.optimizer Cobyla"):
        MergeConfig(search_batch=4, optimizer="Cobyla")
    if np.lib.NumpyVersion(np.__version__) >= "2.4.0":      # NGOpt's parallel pick, MetaModel, fails on this numpy
        with pytest.raises(ValueError, match="merge.optimizer NGOpt .*MetaModel.*nevergrad issue #1612"):
            MergeConfig(search_batch=4, optimizer="NGOpt")
    else:
        assert MergeConfig(search_batch=4, optimizer="NGOpt").search_batch == 4
    assert MergeConfig(search_batch=1, optimizer="Cobyla").search_batch == 1


def test_search_batch_from_a_config_file():
    assert config_from_dict({"merge": {"search_batch": 4, "optimizer": "CMA"}}).merge.search_batch == 4
    with pytest.raises(ValueError, match="merge.search_batch"):
        config_from_dict({"merge": {"search_batch": 0}})


def test_validating_a_batched_search_does_not_import_torch(fresh_python):
    # the parallel-ask check builds the nevergrad optimizer only; institution actors validate configs without torch
    code = ("import sys; from sim.config import MergeConfig; MergeConfig(search_batch=4, optimizer='CMA'); "
            "print(sorted(m for m in ('torch', 'peft', 'timm') if m in sys.modules))")
    assert fresh_python(code) == "[]"


def test_the_last_block_for_the_class_token_alone_equals_the_full_block(tiny_foundation):
    from sim.stacked_forward import _class_token_block, _class_token_only

    bb = tiny_foundation.backbone
    tokens = proxy_tokens(tiny_foundation, proxy_of(tiny_foundation), bb.blocks.__len__() - 1, PrefixCache())
    assert _class_token_only(bb, bb.blocks[-1])                               # timm ViT, token pooling
    with torch.inference_mode():
        torch.testing.assert_close(_class_token_block(bb.blocks[-1], tokens), bb.blocks[-1](tokens)[:, :1],
                                   rtol=1e-5, atol=1e-6)


def test_other_pooling_runs_the_whole_last_block(tiny_foundation, monkeypatch):
    from sim.stacked_forward import _class_token_only

    bb = tiny_foundation.backbone
    monkeypatch.setattr(bb, "global_pool", "avg")                              # features read every token
    assert not _class_token_only(bb, bb.blocks[-1])
    adapters = [random_adapter(tiny_foundation, ("blocks.1.attn.qkv",), seed=s) for s in range(2)]
    data = proxy_of(tiny_foundation)
    feats = stacked_features(tiny_foundation, proxy_tokens(tiny_foundation, data, 1, PrefixCache()), 1,
                             updates_of(adapters))
    for c, a in enumerate(adapters):
        torch.testing.assert_close(feats[c], proxy_features(tiny_foundation, data, tiny_foundation.merged_weights(a)),
                                   rtol=1e-4, atol=1e-5)
