import json

import pytest

from experiments.cli import build_parser, main


def _tiny_args(tiny_cfg):
    m, d = tiny_cfg.model, tiny_cfg.data
    return ["--set", f"model.cache_dir={m.cache_dir}", "--set", f"model.embed_dim={m.embed_dim}",
            "--set", f"model.depth={m.depth}", "--set", f"model.num_heads={m.num_heads}",
            "--set", f"model.pretrain_steps={m.pretrain_steps}", "--set", f"model.pretrain_batch={m.pretrain_batch}",
            "--set", f"data.img_size={d.img_size}", "--set", "data.n_tasks=2", "--set", "data.institutions=2",
            "--set", "data.train_per_class=24", "--set", "data.test_per_class=8", "--set", "train.batch_size=16"]


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    for cmd in ("train", "demo", "config"):
        assert cmd in out


def test_train_writes_adapter_and_metrics(tiny_cfg, tiny_foundation, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--task", "xray", "--rank", "2", "--steps", "5", "--seed", "1", "--out", str(out)]
                + _tiny_args(tiny_cfg))
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("acc", "auc", "base_acc", "base_auc", "chance", "train_s"):
        assert isinstance(metrics[key], float)
    assert metrics["task"] == "xray" and metrics["rank"] == 2 and metrics["chance"] == pytest.approx(1 / 3)
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 2 and cfg["peft_type"] == "LORA"


@pytest.mark.parametrize("argv, message", [
    (["--task", "nope"], "--task 'nope' is not a task"),
    (["--set", "lora.rank=0"], "lora.rank must be an integer >= 1"),
    (["--set", "lora.rnk=3"], "lora.rnk is not a field"),
    (["--data", "medmnist"], "data.data_dir"),
    (["--data", "medmnist", "--data-dir", "/nonexistent"], "is not a directory"),
])
def test_bad_input_exits_2_with_one_line(tiny_cfg, tmp_path, capsys, argv, message):
    out = tmp_path / "o"
    code = main(["train", "--out", str(out)] + _tiny_args(tiny_cfg) + argv)
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("forgesim: error:") and message in err and err.count("\n") == 1


def test_train_refuses_non_empty_out(tiny_cfg, tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("precious")
    code = main(["train", "--out", str(tmp_path)] + _tiny_args(tiny_cfg))
    assert code == 2 and "is not empty" in capsys.readouterr().err
    assert (tmp_path / "keep.txt").read_text() == "precious"


def test_config_command_prints_yaml_and_fields(capsys):
    assert main(["config", "--set", "lora.rank=3"]) == 0
    assert "rank: 3" in capsys.readouterr().out
    assert main(["config", "--fields"]) == 0
    assert "lora.rank: int = 8" in capsys.readouterr().out


def test_demo_writes_run_dir_with_figure_and_report(tiny_cfg, tiny_foundation, tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--set", "train.steps=3"] + _tiny_args(tiny_cfg)) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["tasks"]) == {"histology", "xray"}
    for name in ("config.yaml", "report.md", "cross_task_acc.png", "cross_task_acc.pdf"):
        assert (out / name).stat().st_size > 0
    assert (out / "adapters" / "xray" / "adapter_model.safetensors").is_file()
    assert "cross_task_acc.png" in (out / "report.md").read_text()


def test_commands_share_helpers_without_importing_the_cli(fresh_python):
    # Execute: every command module in a fresh interpreter
    code = ("import sys, pathlib, importlib; "
            "[importlib.import_module('experiments.' + p.stem) for p in sorted(pathlib.Path('experiments').glob('cmd_*.py'))]; "
            "print('experiments.cli' in sys.modules)")
    # Assert: no command needs the parser module (cli imports the commands, never the other way round)
    assert fresh_python(code) == "False"


def test_data_choices_come_from_the_dataset_registry(capsys):
    from sim.data import DATASETS

    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--data", "nope", "--out", "x"])
    err = capsys.readouterr().err
    assert "invalid choice: 'nope'" in err and all(repr(name) in err for name in DATASETS)


def test_prepare_out_dir_without_create_checks_and_writes_nothing(tmp_path):
    from experiments.common import CLIError, prepare_out_dir

    # Execute / Assert: a new dir passes and is not made; a non-empty one is refused either way
    assert prepare_out_dir(tmp_path / "new", create=False) == tmp_path / "new"
    assert not (tmp_path / "new").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    with pytest.raises(CLIError, match="is not empty"):
        prepare_out_dir(tmp_path / "full", create=False)
    assert prepare_out_dir(tmp_path / "made").is_dir()
