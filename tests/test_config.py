import json

import pytest
import yaml

from sim.config import (DataConfig, LoraConfig, SimConfig, apply_overrides, config_from_dict, config_to_dict,
                        load_config)


@pytest.mark.parametrize("override, field", [
    ("lora.rank=0", "lora.rank"),
    ("lora.dropout=1.5", "lora.dropout"),
    ("lora.target_modules=[qkv,nope]", "lora.target_modules"),
    ("train.lr=-1", "train.lr"),
    ("train.optimizer=adagrad", "train.optimizer"),
    ("data.name=imagenet", "data.name"),
    ("data.institutions=2", "data.institutions"),
    ("data.rare_prevalence=0.7", "data.rare_prevalence"),
    ("model.num_heads=5", "model.num_heads"),
    ("model.head=mlp", "model.head"),
    ("model.pretrain_data=imagenet", "model.pretrain_data"),
    ("merge.density=0", "merge.density"),
    ("merge.granularity=block", "merge.granularity"),
    ("distill.ipc=0", "distill.ipc"),
    ("schedule.init_from=nowhere", "schedule.init_from"),
    ("runtime.clock=sundial", "runtime.clock"),
    ("runtime.device=tpu", "runtime.device"),
    ("lora.rank=abc", "lora.rank"),
    ("seed=-3", "seed"),
])
def test_invalid_value_names_the_field(override, field):
    with pytest.raises(ValueError) as err:
        apply_overrides(SimConfig(), [override])
    assert str(err.value).startswith(field), str(err.value)


@pytest.mark.parametrize("overrides, field", [
    (["schedule.protocol=rounds"], "schedule.protocol"),
    (["schedule.protocol=sync_rounds", "runtime.clock=wall"], "runtime.clock"),
    (["schedule.protocol=sync_rounds", "schedule.staleness_weighting=true"], "schedule.staleness_weighting"),
    (["schedule.protocol=sync_rounds", "schedule.max_staleness=3"], "schedule.max_staleness"),
    (["runtime.eval_tasks=some"], "runtime.eval_tasks"),
    (["runtime.eval_tasks=all", "model.head=linear"], "runtime.eval_tasks"),
])
def test_protocol_and_evaluation_errors_name_the_field(overrides, field):
    with pytest.raises(ValueError) as err:
        apply_overrides(SimConfig(), overrides)
    assert str(err.value).startswith(field), str(err.value)


def test_sync_rounds_and_all_tasks_are_accepted():
    # Execute
    cfg = apply_overrides(SimConfig(), ["schedule.protocol=sync_rounds", "schedule.init_from=main",
                                        "runtime.eval_tasks=all"])
    # Assert: the defaults are the behaviour before these fields existed
    assert (cfg.schedule.protocol, cfg.runtime.eval_tasks) == ("sync_rounds", "all")
    assert (SimConfig().schedule.protocol, SimConfig().runtime.eval_tasks) == ("async", "seen")


def test_choice_error_lists_choices():
    with pytest.raises(ValueError, match="one of adamw, sgd"):
        apply_overrides(SimConfig(), ["train.optimizer=adagrad"])


def test_unknown_field_and_section_are_named():
    with pytest.raises(ValueError, match=r"^lora\.rnk is not a field"):
        config_from_dict({"lora": {"rnk": 3}})
    with pytest.raises(ValueError, match="^loras is not a config section"):
        config_from_dict({"loras": {}})
    with pytest.raises(ValueError, match="must look like section.field=value"):
        apply_overrides(SimConfig(), ["lora.rank"])


def test_overrides_coerce_types():
    cfg = apply_overrides(SimConfig(), ["lora.rank=4", "lora.target_modules=qkv,fc1", "train.augment=false",
                                        "data.tasks=[xray, fundus]", "model.checkpoint=none", "seed=7"])
    assert cfg.lora.rank == 4 and cfg.lora.target_modules == ("qkv", "fc1")
    assert cfg.train.augment is False and cfg.data.tasks == ("xray", "fundus")
    assert cfg.model.checkpoint is None and cfg.seed == 7
    assert cfg.lora.scaling == cfg.lora.alpha / 4


def test_configs_are_frozen_and_hashable():
    cfg = SimConfig()
    with pytest.raises(Exception):
        cfg.lora.rank = 3  # type: ignore[misc]
    assert hash(cfg) == hash(SimConfig())


def test_yaml_and_json_round_trip(tmp_path):
    cfg = apply_overrides(SimConfig(), ["lora.rank=2", "data.n_tasks=2", "data.institutions=4"])
    (tmp_path / "c.json").write_text(json.dumps(config_to_dict(cfg)))
    import yaml

    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config_to_dict(cfg)))
    assert load_config(tmp_path / "c.json") == cfg
    assert load_config(tmp_path / "c.yaml") == cfg


def test_bad_config_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("lora: [1, 2\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "field.yaml").write_text("lora:\n  rank: -1\n")
    with pytest.raises(ValueError, match=r"^lora\.rank must be an integer >= 1, got -1"):
        load_config(tmp_path / "field.yaml")


def test_sections_validate_directly():
    with pytest.raises(ValueError, match="^data.data_dir"):
        DataConfig(name="medmnist")
    with pytest.raises(ValueError, match="^lora.alpha"):
        LoraConfig(alpha=0)


def test_data_dir_holds_one_or_more_paths():
    # a plain string (a Python caller, or a run dir's config from when data_dir held one path) is one path, not
    # a list of its characters; a null is no path
    assert DataConfig(name="medmnist", data_dir="/data/npz").data_dir == ("/data/npz",)
    assert config_from_dict({"data": {"name": "medmnist", "data_dir": "/data/npz"}}).data.data_dir == ("/data/npz",)
    assert config_from_dict({"data": {"data_dir": None}}).data.data_dir == ()
    assert apply_overrides(SimConfig(), ["data.data_dir=[/a, /b]"]).data.data_dir == ("/a", "/b")
    with pytest.raises(ValueError, match=r"^data.data_dir must be a directory of MedMNIST .npz files .*exactly one"):
        DataConfig(name="medmnist", data_dir=("/a", "/b"))
    # imagefolder has one task per folder, whatever data.n_tasks says
    cfg = config_from_dict({"data": {"name": "imagefolder", "data_dir": ["/a", "/b", "/c"], "institutions": 3}})
    assert cfg.data.task_count == 3
    with pytest.raises(ValueError, match="^data.institutions must be at least the number of tasks \\(3\\)"):
        config_from_dict({"data": {"name": "imagefolder", "data_dir": ["/a", "/b", "/c"], "institutions": 2}})


def test_data_dir_flag_takes_several_folders(capsys):
    from experiments.cli import main

    # paths with spaces, quotes and commas survive the flag -> override -> config path whole
    dirs = ["/data/chest x-ray", "/data/it's, odd", "/data/skin"]
    assert main(["config", "--data", "imagefolder", "--data-dir", *dirs, "--set", "data.institutions=3"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["data"]["data_dir"] == dirs


def test_validating_a_config_does_not_import_torch(fresh_python):
    # Institution actors build the run's config but never touch torch (~350 MB per process); validating strategy,
    # distiller and arrival names against their registries must not import it.
    code = ("import sys; from sim.config import SimConfig; import actors.institution; "
            "cfg = SimConfig(); assert cfg.merge.strategies and cfg.pull_branch is None; "
            "print(sorted(m for m in ('torch', 'peft', 'timm') if m in sys.modules))")
    assert fresh_python(code) == "[]"


def test_a_run_dir_config_with_a_retired_field_still_loads_with_a_warning():
    # a run written before the audit flagged on TPR at 1 % FPR holds distill.audit_max_auc
    from sim.config import config_from_dict, config_to_dict

    doc = config_to_dict(SimConfig())
    doc["distill"]["audit_max_auc"] = 0.6
    with pytest.warns(UserWarning, match="distill.audit_max_auc is no longer a field"):
        cfg = config_from_dict(doc)
    assert cfg == SimConfig()
    doc["distill"]["audit_max_aucc"] = 0.6
    with pytest.raises(ValueError, match="distill.audit_max_aucc is not a field"):
        config_from_dict(doc)
