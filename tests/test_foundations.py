"""Foundations by name (``model.pretrained: hub | FILE``) and class embeddings from a file (``model.prototypes``).

The named model is timm's ``test_vit`` (a registered ViT with a real hub config: 160 px, width 64, 6 blocks, 0.4 M
weights), so a pretrained load runs in a second on a CPU; the file is written the way timm's hub files are (a
``model.safetensors`` of the full state dict).
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from sim.class_embeddings import read_class_embeddings
from sim.config import ModelConfig, SimConfig, apply_overrides
from sim.metrics import predict_proba
from sim.model import fingerprint_state, load_foundation

NAME = "test_vit"


def _hub_like_file(path, seed: int) -> dict[str, torch.Tensor]:
    """A full ``test_vit`` state dict (classifier included), perturbed away from any init, saved as safetensors."""
    import timm

    torch.manual_seed(seed)
    state = timm.create_model(NAME).state_dict()
    g = torch.Generator().manual_seed(seed)
    state = {k: (v + 0.02 * torch.randn(v.shape, generator=g)).contiguous() for k, v in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return state


@pytest.fixture(scope="module")
def hub_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("hub") / "model.safetensors"
    return path, _hub_like_file(path, seed=1)


def test_pretrained_file_gives_timm_features_of_the_hand_loaded_weights(hub_file, tmp_path):
    import timm
    from timm.data import resolve_data_config

    # Prepare: the same weights loaded by hand into timm's model, and the input timm's pretrained config asks for
    path, state = hub_file
    hand = timm.create_model(NAME)
    hand.load_state_dict(state)
    hand.reset_classifier(0)
    hand.eval()
    data = resolve_data_config(model=hand)
    mean, std = torch.tensor(data["mean"]).view(1, 3, 1, 1), torch.tensor(data["std"]).view(1, 3, 1, 1)
    # Execute
    with pytest.warns(UserWarning, match="data.img_size 32, data.interpolation bilinear → 160, bicubic"):
        cfg = apply_overrides(SimConfig(), [f"model.name={NAME}", f"model.pretrained={path}"])
    foundation = load_foundation(cfg.model, cfg.data.img_size)
    x = torch.rand(3, 3, 160, 160, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = foundation.features(x), hand((x - mean) / std)
    # Assert: the data follow the model's pretrained input; features and fingerprint are those of the file's weights
    assert (cfg.data.img_size, cfg.data.interpolation) == (160, "bicubic")
    assert foundation.mean == tuple(data["mean"]) and foundation.std == tuple(data["std"])
    assert ours.shape == (3, 64) and foundation.dim == 64
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert foundation.fingerprint == fingerprint_state(hand.state_dict())
    other = tmp_path / "other" / "model.safetensors"
    _hub_like_file(other, seed=2)
    assert load_foundation(dataclasses.replace(cfg.model, pretrained=str(other)), 160).fingerprint != \
        foundation.fingerprint


def test_keep_head_makes_the_pretrained_head_the_features(hub_file):
    path, state = hub_file
    foundation = load_foundation(ModelConfig(name=NAME, pretrained=str(path), keep_head=True), 160)
    x = torch.rand(2, 3, 160, 160)
    with torch.no_grad():
        pooled = load_foundation(ModelConfig(name=NAME, pretrained=str(path)), 160).features(x)
        feats = foundation.features(x)
    assert foundation.dim == 1000 and feats.shape == (2, 1000)
    torch.testing.assert_close(feats, F.linear(pooled, state["head.weight"], state["head.bias"]))


def test_a_file_that_is_not_the_models_weights_is_a_clear_error(hub_file, tmp_path):
    path, state = hub_file
    truncated = tmp_path / "model.safetensors"
    save_file({k: v for k, v in state.items() if not k.startswith("blocks.5.")}, str(truncated))
    with pytest.raises(ValueError, match=r"model.pretrained .*timm could not load .*blocks\.5"):
        load_foundation(ModelConfig(name=NAME, pretrained=str(truncated)), 160)
    with pytest.raises(ValueError, match="model.pretrained .* neither none, hub nor an existing file"):
        load_foundation(ModelConfig(name=NAME, pretrained=str(tmp_path / "missing.safetensors")), 160)
    with pytest.raises(ValueError, match="data.img_size is 32 but model.name test_vit takes 160 px"):
        load_foundation(ModelConfig(name=NAME, pretrained=str(path)), 32)


@pytest.mark.parametrize("fields, message", [
    ({"name": "no_such_vit", "pretrained": "hub"}, "model.name 'no_such_vit' is not a timm model"),
    ({"name": "vit_base_patch16_224.no_tag", "pretrained": "hub"}, "has no pretrained config"),
    ({"pretrained": "hub", "checkpoint": "w.pt"}, "model.checkpoint must be None with model.pretrained=hub"),
    ({"keep_head": True}, "model.keep_head must be false with model.pretrained=none"),
    ({"prototypes": "protos.txt"}, "model.prototypes must be a .safetensors, .npz or .npy file"),
    ({"prototypes": "p.npy", "head": "linear"}, "model.head must be prototype with model.prototypes"),
])
def test_bad_foundation_fields_name_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        SimConfig(model=ModelConfig(**fields))


def test_pretrained_hub_asks_timm_for_its_hub_weights(hub_file, monkeypatch):
    """``hub`` is timm's own pretrained path: ``create_model(pretrained=True)`` with no file overlay, which timm turns
    into a hub download of the model's ``hf_hub_id``; the download is replaced here, nothing else."""
    import timm
    from timm.models import _builder

    path, state = hub_file
    calls, downloads = [], []
    real_create = timm.create_model

    def spy_create(*args, **kwargs):
        calls.append((args, kwargs))
        return real_create(*args, **kwargs)

    def fake_hub(model_id, *args, **kwargs):
        downloads.append(model_id)
        return dict(state)

    monkeypatch.setattr(timm, "create_model", spy_create)
    monkeypatch.setattr(_builder, "load_state_dict_from_hf", fake_hub)
    foundation = load_foundation(ModelConfig(name=NAME, pretrained="hub"), 160)
    assert calls == [((NAME,), {"pretrained": True, "pretrained_cfg_overlay": None})]
    assert downloads == ["timm/test_vit.r160_in1k"]
    by_file = load_foundation(ModelConfig(name=NAME, pretrained=str(path)), 160)
    assert foundation.fingerprint == by_file.fingerprint


# ------------------------------------------------------------------------------------------
# Class embeddings from a file
# ------------------------------------------------------------------------------------------
def _embedding_file(path, task_classes, dim: int, seed: int = 0, names: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tables = {task: torch.randn(len(classes), dim, generator=g) * 3 for task, classes in task_classes.items()}
    meta = {task: json.dumps(list(classes)) for task, classes in task_classes.items()} if names else None
    save_file(tables, str(path), metadata=meta)
    return tables


def test_prototypes_from_a_file_are_the_heads_rows(tiny_cfg, tiny_foundation, tiny_cohort, tmp_path):
    # Prepare: unnormalised embeddings of every task's classes, at the tiny foundation's width
    path = tmp_path / "protos.safetensors"
    tables = _embedding_file(path, tiny_cohort.task_classes, tiny_foundation.dim)
    model = dataclasses.replace(tiny_cfg.model, prototypes=str(path))
    # Execute
    foundation = load_foundation(model, tiny_cfg.data.img_size)
    foundation.check_tasks(tiny_cohort.task_classes)
    inst = tiny_cohort.institutions[0]
    x = inst.test.x[:6]
    with torch.no_grad():
        feats = foundation.features(torch.from_numpy(x))
        logits = foundation.logits(feats, inst.task, inst.classes)
    proba = predict_proba(foundation, None, x, inst.task, inst.classes)
    # Assert: cosine to the file's rows / tau, in every scoring path; the fingerprint covers the head
    want = F.normalize(feats, dim=1) @ F.normalize(tables[inst.task], dim=1).T / model.tau
    torch.testing.assert_close(logits, want)
    np.testing.assert_allclose(proba, torch.softmax(want, dim=1).numpy(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(logits, tiny_foundation.logits(feats, inst.task, inst.classes))
    assert foundation.fingerprint != tiny_foundation.fingerprint


def test_npy_and_npz_tables(tmp_path):
    rows = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
    np.save(tmp_path / "one.npy", rows)
    np.savez(tmp_path / "two.npz", xray=rows, fundus=rows[:2])
    one = read_class_embeddings(tmp_path / "one.npy", 8)
    one.check({"xray": ("a", "b", "c")})
    np.testing.assert_allclose(one.rows("xray", "abc").norm(dim=1).numpy(), 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match="one .npy table, for a run of one task; this run has 2"):
        one.check({"xray": "abc", "fundus": "ab"})
    read_class_embeddings(tmp_path / "two.npz", 8).check({"xray": "abc", "fundus": "ab"})


@pytest.mark.parametrize("case, message", [
    ("class_count", "task 'xray' has 3 classes .* the file holds 2 rows"),
    ("dim", "has dim 7, the foundation's features have 8"),
    ("missing_task", "has no embeddings for task 'fundus'"),
    ("class_order", "the file names the classes of task 'xray' .*rows must follow the run's label order"),
    ("unreadable", "is not a readable .safetensors file"),
    ("zero_row", "non-finite or all-zero rows"),
])
def test_a_prototype_file_that_does_not_fit_names_the_field(case, message, tmp_path):
    tasks = {"xray": ("normal", "pneumonia", "effusion"), "fundus": ("healthy", "moderate", "severe")}
    path = tmp_path / "protos.safetensors"
    if case == "class_count":
        _embedding_file(path, {"xray": tasks["xray"][:2], "fundus": tasks["fundus"]}, 8, names=False)
    elif case == "dim":
        _embedding_file(path, tasks, 7)
    elif case == "missing_task":
        _embedding_file(path, {"xray": tasks["xray"]}, 8)
    elif case == "class_order":
        _embedding_file(path, {"xray": tasks["xray"][::-1], "fundus": tasks["fundus"]}, 8)
    elif case == "unreadable":
        path.write_bytes(b"not a safetensors file")
    elif case == "zero_row":
        save_file({"xray": torch.zeros(3, 8), "fundus": torch.ones(3, 8)}, str(path))
    with pytest.raises(ValueError, match=f"^model.prototypes {path}.*{message}"):
        read_class_embeddings(path, 8).check(tasks)


def test_a_wrong_prototype_file_exits_2_before_the_run_starts(tiny_cfg, tiny_foundation, tiny_cohort, tmp_path,
                                                              capsys):
    from experiments.cli import main

    one_task = dict(list(tiny_cohort.task_classes.items())[:1])       # the second task has no rows
    path = tmp_path / "protos.safetensors"
    _embedding_file(path, one_task, tiny_foundation.dim)
    out = tmp_path / "run"
    m, d = tiny_cfg.model, tiny_cfg.data
    tiny = [f"model.cache_dir={m.cache_dir}", f"model.embed_dim={m.embed_dim}", f"model.depth={m.depth}",
            f"model.num_heads={m.num_heads}", f"model.pretrain_steps={m.pretrain_steps}",
            f"model.pretrain_batch={m.pretrain_batch}", f"data.img_size={d.img_size}", "data.n_tasks=2",
            "data.institutions=2", "data.train_per_class=24", "data.test_per_class=8", f"model.prototypes={path}"]
    code = main(["run", "--out", str(out)] + [a for field in tiny for a in ("--set", field)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith(f"forgesim: error: model.prototypes {path} has no embeddings for task")
    assert not out.exists()


def test_commit_cache_key_hashes_the_files_a_model_names_and_is_unchanged_without_them(tmp_path):
    from sim.cache import contribution_key

    # the key of the default config as the cache computed it before these fields existed: existing caches stay valid
    assert contribution_key(SimConfig(), "inst000-00", 7) == \
        "899bb617efdd88068ed794eb2ca08a6f021caa72861772f1b1b8fe5bb28d6ef6"
    # a foundation pretrained on the formula corpus is another base: its commits have other keys
    formula = SimConfig(model=ModelConfig(pretrain_data="formula"))
    assert contribution_key(formula, "inst000-00", 7) != contribution_key(SimConfig(), "inst000-00", 7)
    path = tmp_path / "protos.npy"
    np.save(path, np.ones((3, 96), np.float32))
    cfg = SimConfig(model=ModelConfig(prototypes=str(path)))
    key = contribution_key(cfg, "inst000-00", 7)
    np.save(tmp_path / "new.npy", np.full((3, 96), 2.0, np.float32))
    os.replace(tmp_path / "new.npy", path)                    # same name, other embeddings: another commit
    assert contribution_key(cfg, "inst000-00", 7) != key


def test_clip_prototypes_script_helps_and_says_when_open_clip_is_missing(monkeypatch, capsys, tmp_path):
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[1] / "scripts" / "clip_prototypes.py"
    spec = importlib.util.spec_from_file_location("clip_prototypes", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with pytest.raises(SystemExit) as exit_help:
        script.main(["--help"])
    assert exit_help.value.code == 0 and "--template" in capsys.readouterr().out
    monkeypatch.setitem(sys.modules, "open_clip", None)                # as if it were not installed
    assert script.main(["--out", str(tmp_path / "p.safetensors")]) == 2
    assert "needs open_clip" in capsys.readouterr().err
    assert not (tmp_path / "p.safetensors").exists()
