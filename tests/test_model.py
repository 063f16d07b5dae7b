import copy
import dataclasses

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sim import model as model_mod
from sim.config import LoraConfig, ModelConfig, SimConfig
from sim.model import (PEFT_PREFIX, Adapter, create_backbone, load_adapter, load_foundation, new_adapter,
                       prototypes, save_adapter, target_module_names)


def _random_adapter(foundation, rank=4, seed=0, modules=("qkv",)):
    adapter = new_adapter(foundation, LoraConfig(rank=rank, alpha=2.0 * rank, target_modules=modules), seed)
    g = torch.Generator().manual_seed(seed + 1)
    for k, v in adapter.weights.items():  # a trained-looking adapter: B no longer zero
        adapter.weights[k] = torch.randn(v.shape, generator=g) * 0.05
    return adapter


def test_prototypes_are_fixed_unit_vectors(tiny_foundation):
    p = prototypes("xray", ["normal", "effusion"], 32)
    assert torch.allclose(p.norm(dim=1), torch.ones(2))
    assert torch.equal(p, prototypes("xray", ["normal", "effusion"], 32))
    assert not torch.allclose(p[0], prototypes("fundus", ["normal"], 32)[0])


def test_new_adapter_is_identity_and_seeded(tiny_foundation):
    a = new_adapter(tiny_foundation, LoraConfig(rank=4), seed=1)
    assert all(torch.count_nonzero(a.delta(m)) == 0 for m in a.modules())
    assert torch.equal(a.weights[next(iter(a.weights))], new_adapter(tiny_foundation, LoraConfig(rank=4), 1)
                       .weights[next(iter(a.weights))])
    assert a.modules() == target_module_names(LoraConfig(rank=4), tiny_foundation.block_count())


def test_layers_and_targets_select_modules(tiny_foundation):
    lora = LoraConfig(target_modules=("qkv", "fc2"), layers=(1,))
    assert target_module_names(lora, 2) == ["blocks.1.attn.qkv", "blocks.1.mlp.fc2"]
    with pytest.raises(ValueError, match="lora.layers holds block 5"):
        target_module_names(LoraConfig(layers=(5,)), 2)


def test_adapter_dir_round_trip_and_peft_from_pretrained(tiny_foundation, tmp_path):
    from peft import PeftModel

    adapter = _random_adapter(tiny_foundation, modules=("qkv", "fc1"))
    save_adapter(adapter, tmp_path / "a")
    assert (tmp_path / "a" / "adapter_config.json").is_file()
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()
    back = load_adapter(tmp_path / "a")
    assert back.base_fingerprint == tiny_foundation.fingerprint
    assert set(back.weights) == set(adapter.weights)
    for m in adapter.modules():
        assert torch.allclose(back.delta(m), adapter.delta(m))

    x = torch.rand(5, 3, 16, 16)
    with torch.no_grad():
        ours = tiny_foundation.features(x, tiny_foundation.merged_weights(back))
        peft_model = PeftModel.from_pretrained(copy.deepcopy(tiny_foundation.backbone), str(tmp_path / "a"))
        peft_model.eval()
        theirs = peft_model(tiny_foundation.normalize(x))
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_uneven_ranks_survive_peft(tiny_foundation, tmp_path):
    from peft import PeftModel

    adapter = _random_adapter(tiny_foundation, rank=4)
    first = adapter.modules()[0]
    a, b = adapter.factors(first)
    adapter.weights[f"base_model.model.{first}.lora_A.weight"] = a[:2].clone()
    adapter.weights[f"base_model.model.{first}.lora_B.weight"] = b[:, :2].clone()
    adapter.alpha_pattern[first] = 2.0
    save_adapter(adapter, tmp_path / "u")
    back = load_adapter(tmp_path / "u")
    assert back.rank(first) == 2 and back.scaling(first) == pytest.approx(1.0)
    x = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        peft_model = PeftModel.from_pretrained(copy.deepcopy(tiny_foundation.backbone), str(tmp_path / "u")).eval()
        assert torch.allclose(tiny_foundation.features(x, tiny_foundation.merged_weights(adapter)),
                              peft_model(tiny_foundation.normalize(x)), atol=1e-5)


def test_bad_adapter_dirs(tmp_path, tiny_foundation):
    with pytest.raises(ValueError, match="not a peft adapter dir"):
        load_adapter(tmp_path)
    with pytest.raises(ValueError, match="not a peft LoRA key"):
        Adapter({"blocks.0.attn.qkv.weight": torch.zeros(2, 2)}, 1.0)
    other = _random_adapter(tiny_foundation)
    other.base_fingerprint = "0" * 16
    with pytest.raises(ValueError, match="trained on base 0000000000000000"):
        tiny_foundation.merged_weights(other)


def test_checkpoint_loading_from_saved_files(tiny_cfg, tmp_path):
    torch.manual_seed(5)
    backbone = create_backbone(tiny_cfg.model, 16)
    state = backbone.state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "w.pt")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    for name in ("w.pt", "w.safetensors"):
        cfg = ModelConfig(**{**tiny_cfg.model.__dict__, "checkpoint": str(tmp_path / name)})
        f = load_foundation(cfg, 16)
        assert all(torch.equal(f.backbone.state_dict()[k], v) for k, v in state.items())
        assert not any(p.requires_grad for p in f.backbone.parameters())
    wrong = ModelConfig(**{**tiny_cfg.model.__dict__, "embed_dim": 64, "checkpoint": str(tmp_path / "w.pt")})
    with pytest.raises(ValueError, match="does not fit model"):
        load_foundation(wrong, 16)
    with pytest.raises(ValueError, match="does not exist"):
        load_foundation(ModelConfig(**{**tiny_cfg.model.__dict__, "checkpoint": str(tmp_path / "x.pt")}), 16)


def test_foundation_cache_is_reused(tiny_cfg, tiny_foundation, monkeypatch):
    path = model_mod.foundation_path(tiny_cfg.model, 16)
    assert path.is_file()
    model_mod._LOADED.clear()  # forget the in-process copy: the next load must come from disk

    def no_pretraining(*args, **kwargs):
        raise AssertionError("pretrained again although the cache exists")

    monkeypatch.setattr(model_mod, "pretrain_foundation", no_pretraining)
    again = load_foundation(tiny_cfg.model, 16)
    assert again.fingerprint == tiny_foundation.fingerprint
    # a different architecture is a different cache entry
    assert model_mod.foundation_path(ModelConfig(**{**tiny_cfg.model.__dict__, "depth": 3}), 16) != path


def test_fingerprint_tracks_weights(tiny_foundation):
    state = {k: v.clone() for k, v in tiny_foundation.backbone.state_dict().items()}
    assert model_mod.fingerprint_state(state) == tiny_foundation.fingerprint
    first = next(iter(state))
    state[first] = state[first] + 1e-3
    assert model_mod.fingerprint_state(state) != tiny_foundation.fingerprint


def test_augment_is_seeded():
    x = torch.rand(4, 3, 8, 8)
    a = model_mod.augment(x, torch.Generator().manual_seed(0))
    b = model_mod.augment(x, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == x.shape
    np.testing.assert_allclose(a.mean().item(), x.mean().item(), atol=0.1)


def test_the_default_foundation_is_shipped_and_loads_without_pretraining(tmp_path, monkeypatch):
    # Prepare: an empty cache, and pretraining that must not run
    cfg = SimConfig()
    model = ModelConfig(**{**cfg.model.__dict__, "cache_dir": str(tmp_path)})
    shipped = model_mod.SHIPPED_FOUNDATIONS / model_mod.foundation_path(model, cfg.data.img_size).name

    def no_pretraining(*args, **kwargs):
        raise AssertionError("pretrained although forgesim ships this foundation")

    monkeypatch.setattr(model_mod, "pretrain_foundation", no_pretraining)
    model_mod._LOADED.clear()
    # Execute
    foundation = load_foundation(model, cfg.data.img_size)
    # Assert: the shipped file is the default key's (re-run scripts/pretrain_foundation.py when the defaults change),
    # loaded as it is, and the cache is left empty
    assert shipped.is_file(), "no shipped foundation for the default model: run scripts/pretrain_foundation.py"
    with safe_open(str(shipped), "pt") as f:
        assert f.metadata()["key"] == shipped.stem
        assert all(torch.equal(foundation.backbone.state_dict()[k], f.get_tensor(k)) for k in f.keys())
    assert not any(tmp_path.iterdir())
    model_mod._LOADED.clear()


def test_foundation_keys_keep_the_shapes_key_and_name_the_formula_corpus():
    # the shapes foundation's key as it was before model.pretrain_data existed (its shipped file is named by it)
    assert ModelConfig().pretrain_data == "shapes"
    assert model_mod.foundation_key(ModelConfig(), 32) == "6c0adb364313332e"
    formula = ModelConfig(pretrain_data="formula")
    assert model_mod.foundation_key(formula, 32) not in ("6c0adb364313332e", model_mod.foundation_key(formula, 16))


def test_the_formula_foundation_is_shipped_too(tmp_path):
    model = ModelConfig(pretrain_data="formula", cache_dir=str(tmp_path))
    shipped = model_mod.SHIPPED_FOUNDATIONS / model_mod.foundation_path(model, 32).name
    assert shipped.is_file(), "run scripts/pretrain_foundation.py --set model.pretrain_data=formula"
    with safe_open(str(shipped), "pt") as f:
        assert f.metadata()["key"] == shipped.stem


def test_pretraining_corpus_follows_the_option(tiny_cfg):
    import dataclasses

    shapes, k_shapes = model_mod.pretraining_corpus(tiny_cfg.model, 16)
    formula, k_formula = model_mod.pretraining_corpus(dataclasses.replace(tiny_cfg.model, pretrain_data="formula"), 16)
    # 30 steps x batch 32 / 4 < 1,000: the smallest corpus; formula: 10 categories (5 fractal, 5 contour) of 100
    assert (len(shapes), k_shapes) == (1000, 10)
    assert (len(formula), k_formula) == (1000, 10)
    np.testing.assert_array_equal(np.bincount(formula.y), np.full(10, 100))
    assert formula.x.shape == (1000, 3, 16, 16) and formula.x.dtype == np.uint8
    assert not np.array_equal(formula.x, shapes.x)


def test_the_adapter_config_written_without_peft_is_the_config_peft_builds(tiny_foundation, tmp_path):
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftConfig

    # Prepare: uneven ranks and a per-module alpha, so rank_pattern and alpha_pattern are not empty
    adapter = _random_adapter(tiny_foundation, rank=4, modules=("qkv", "fc1"))
    module = adapter.modules()[0]
    for side in ("lora_A", "lora_B"):
        key = f"{PEFT_PREFIX}{module}.{side}.weight"
        adapter.weights[key] = adapter.weights[key][:2] if side == "lora_A" else adapter.weights[key][:, :2]
    adapter.alpha_pattern[module] = 3.0
    # Execute
    save_adapter(adapter, tmp_path / "a")
    read = PeftConfig.from_pretrained(str(tmp_path / "a"))
    # Assert: peft reads the file as the LoraConfig built field by field from the adapter, defaults included
    built = PeftLoraConfig(r=4, lora_alpha=adapter.alpha, lora_dropout=0.0, bias="none",
                           target_modules="^(" + "|".join(m.replace(".", r"\.") for m in adapter.modules()) + ")$",
                           rank_pattern={module: 2}, alpha_pattern={module: 3.0})
    assert isinstance(read, PeftLoraConfig)
    assert read.to_dict() == built.to_dict() == adapter.to_peft_config().to_dict()


def test_a_driver_prepares_a_cached_foundation_without_building_it(tiny_cfg, tiny_foundation, fresh_python, tmp_path,
                                                                   monkeypatch):
    from sim.model import foundation_path, prepare_foundation

    # Prepare: tiny_cfg's foundation is pretrained into its cache dir (the tiny_foundation fixture)
    m = tiny_cfg.model
    shape = (f"patch_size={m.patch_size}, embed_dim={m.embed_dim}, depth={m.depth}, num_heads={m.num_heads}, "
             f"pretrain_steps={m.pretrain_steps}, pretrain_batch={m.pretrain_batch}")
    # Execute / Assert: a fresh driver finds the file, its header names the key: nothing built, timm not imported
    out = fresh_python(f"import sys; from sim.config import ModelConfig; from sim.model import prepare_foundation; "
                       f"prepare_foundation(ModelConfig({shape}, cache_dir={m.cache_dir!r}), 16, {{}}); "
                       f"print('timm' in sys.modules, 'torch' in sys.modules)")
    assert out == "False True"
    # ...while a file of another key, prototypes to check, or no file yet go through load_foundation
    calls = []
    monkeypatch.setattr(model_mod, "load_foundation", lambda cfg, img_size: calls.append(cfg) or tiny_foundation)
    other = dataclasses.replace(m, cache_dir=str(tmp_path))
    prepare_foundation(other, 16, {})                                   # no file: pretrain it
    path = foundation_path(other, 16)
    save_file({"x": torch.zeros(1)}, str(path), metadata={"forgesim": "foundation", "key": "foundation-other"})
    prepare_foundation(other, 16, {})                                   # a file that is not this key's
    save_file({"x": torch.zeros(1)}, str(path), metadata={"forgesim": "foundation", "key": path.stem})
    prepare_foundation(other, 16, {})                                   # this key's file: nothing to do
    prototypes_file = tmp_path / "classes.npz"
    prepare_foundation(dataclasses.replace(other, prototypes=str(prototypes_file)), 16, {})
    assert [c.prototypes for c in calls] == [None, None, str(prototypes_file)]
