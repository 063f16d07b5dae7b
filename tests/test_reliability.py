"""Bad input to `forgesim run` / `forgesim merge`: one clear line, exit code 2, and an existing run dir untouched.

Every `run` case points --out (or --resume) at an existing run dir, so each also checks that the error comes before
anything is written there. No Ray: every error must stop the command before Ray starts.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from experiments.cli import main
from sim.config import config_to_dict


def tree(path: Path) -> dict[str, str]:
    """Every file under ``path`` with the hash of its bytes (and every dir), to compare before and after."""
    return {str(p.relative_to(path)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
            for p in sorted(path.rglob("*"))}


@pytest.fixture()
def run_dir(tmp_path, tiny_cfg) -> Path:
    """What a run whose driver died leaves: config, a log with one accepted commit, its commit dir."""
    d = tmp_path / "run"
    (d / "commits" / "00001-inst000").mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump(config_to_dict(tiny_cfg)))
    (d / "log.jsonl").write_text(json.dumps({"event": "accepted", "id": "inst000-00", "seq": 1,
                                             "dir": "commits/00001-inst000"}) + "\n")
    (d / "commits" / "00001-inst000" / "meta.json").write_text("{}")
    return d


@pytest.fixture()
def bad_data(tmp_path) -> dict[str, Path]:
    """MedMNIST dirs: one with a truncated .npz, one with a file of garbage bytes."""
    rng = np.random.default_rng(0)
    arrays = {f"{s}_{k}": (rng.integers(0, 255, (20, 28, 28), dtype=np.uint8) if k == "images"
                           else rng.integers(0, 2, (20, 1))) for s in ("train", "val", "test") for k in ("images", "labels")}
    good = tmp_path / "good.npz"
    np.savez(good, **arrays)
    out = {}
    for name, content in (("truncated", good.read_bytes()[: good.stat().st_size // 2]),
                          ("corrupted", b"\x00garbage" * 100)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "pathmnist.npz").write_bytes(content)
        out[name] = tmp_path / name
    return out


RUN_CASES = {
    "malformed value": (["--set", "lora.rank=abc"], "lora.rank"),
    "out-of-range value": (["--set", "faults.corrupt=2"], "faults.corrupt"),
    "unknown field": (["--set", "train.speed=3"], "train.speed"),
    "unknown strategy": (["--strategies", "svd,frankenmerge"], "frankenmerge"),
    "unknown dataset": (["--set", "data.name=imagenet"], "data.name"),
    "unknown preset": (["--preset", "huge"], "huge"),
    "missing data dir": (["--data", "medmnist", "--data-dir", "/nonexistent/medmnist"], "/nonexistent/medmnist"),
    "truncated npz": (["--data", "medmnist", "--data-dir", "{truncated}"], "pathmnist.npz"),
    "corrupted npz": (["--data", "medmnist", "--data-dir", "{corrupted}"], "pathmnist.npz"),
    "config file is not YAML": (["--config", "{bad_yaml}"], "not valid YAML"),
    "existing run dir without --resume": ([], "--resume"),
}


@pytest.mark.parametrize("case", RUN_CASES)
def test_bad_run_input_is_one_line_exit_2_and_changes_nothing(case, run_dir, bad_data, tmp_path, capsys):
    # Prepare
    args, words = RUN_CASES[case]
    (tmp_path / "bad.yaml").write_text("lora: {rank: [1, 2\n")
    paths = {k: str(v) for k, v in bad_data.items()} | {"bad_yaml": str(tmp_path / "bad.yaml")}
    before = tree(run_dir)
    # Execute
    code = main(["run", *[a.format(**paths) for a in args], "--out", str(run_dir)])
    # Assert
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("forgesim: error: ") and words in err[0], err
    assert tree(run_dir) == before


RESUME_CASES = {
    "not a dir": (lambda d: ["--resume", str(d / "nope")], "not a directory"),
    "not a run dir": (lambda d: ["--resume", str(d / "commits")], "no config.yaml"),
    "config flags": (lambda d: ["--resume", str(d), "--seed", "3", "--set", "lora.rank=2"], "drop --seed, --set"),
    "another --out": (lambda d: ["--resume", str(d), "--out", str(d.parent / "other")], "drop --out"),
    "corrupted log": (lambda d: _corrupt_log(d) or ["--resume", str(d)], "line 1 is corrupted"),
    "complete run": (lambda d: (d / "summary.json").write_text("{}") and ["--resume", str(d)], "complete"),
    "corrupted config": (lambda d: (d / "config.yaml").write_text("lora: {rank: -1}\n") and ["--resume", str(d)],
                         "lora.rank"),
}


def _corrupt_log(d: Path) -> None:
    (d / "log.jsonl").write_text("{garbage\n" + (d / "log.jsonl").read_text())


@pytest.mark.parametrize("case", RESUME_CASES)
def test_bad_resume_is_one_line_exit_2_and_changes_nothing(case, run_dir, capsys):
    make, words = RESUME_CASES[case]
    args = make(run_dir)
    before = tree(run_dir)
    code = main(["run", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and words in err[0], err
    assert tree(run_dir) == before


@pytest.fixture()
def adapter_dirs(tmp_path, tiny_foundation, tiny_cfg) -> dict[str, Path]:
    """A good peft adapter dir, one whose tensors have non-LoRA keys, and one missing every lora_B."""
    from safetensors.torch import load_file, save_file

    from sim.model import new_adapter, save_adapter

    good = save_adapter(new_adapter(tiny_foundation, tiny_cfg.lora, seed=0), tmp_path / "good") or tmp_path / "good"
    weights = load_file(str(good / "adapter_model.safetensors"))
    out = {"good": good}
    for name, tensors in (("wrong_keys", {k.replace("lora_A", "lora_down").replace("lora_B", "lora_up"): v
                                          for k, v in weights.items()}),
                          ("no_lora_B", {k: v for k, v in weights.items() if "lora_B" not in k})):
        d = tmp_path / name
        d.mkdir()
        (d / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
        save_file(tensors, str(d / "adapter_model.safetensors"))
        out[name] = d
    return out


@pytest.mark.parametrize("bad, words", [("wrong_keys", "wrong_keys"), ("no_lora_B", "no_lora_B")])
def test_merge_of_adapter_dirs_with_wrong_keys_is_exit_2(bad, words, adapter_dirs, tmp_path, capsys):
    out = tmp_path / "merged"
    code = main(["merge", "--strategy", "svd", "--adapters", str(adapter_dirs["good"]), str(adapter_dirs[bad]),
                 "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and words in err[0], err
    assert not out.exists()


def test_merge_with_a_truncated_proxy_npz_is_exit_2(adapter_dirs, tmp_path, capsys):
    (tmp_path / "proxy.npz").write_bytes(b"PK\x03\x04" + b"\x00" * 40)
    code = main(["merge", "--strategy", "fusion", "--adapters", str(adapter_dirs["good"]), str(adapter_dirs["good"]),
                 "--proxy", str(tmp_path / "proxy.npz"), "--out", str(tmp_path / "merged")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "proxy.npz" in err[0], err
    assert not (tmp_path / "merged").exists()
