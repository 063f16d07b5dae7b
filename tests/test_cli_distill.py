"""``forgesim distill``: round trip on the tiny config, and bad input → one line, exit 2, nothing written."""
from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from experiments.cli import main
from sim.config import config_to_dict
from sim.data import DistilledSet

FAST = ["--set", "distill.iterations=3", "--set", "distill.embed_width=16", "--set", "distill.real_batch=8"]


@pytest.fixture()
def tiny_config_file(tmp_path, tiny_cfg, tiny_foundation):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(tiny_cfg)))
    return str(path)


def test_distill_round_trip(tmp_path, tiny_config_file, tiny_cohort, capsys):
    # Prepare
    out = tmp_path / "out"
    inst = next(i for i in tiny_cohort.institutions if i.task == "histology")
    # Execute
    code = main(["distill", "--config", tiny_config_file, "--task", "histology", "--method", "dm", "--ipc", "2",
                 "--seed", "0", *FAST, "--out", str(out)])
    # Assert
    assert code == 0
    assert {p.name for p in out.iterdir()} == {"distilled.npz", "preview.png", "audit.json", "config.json"}
    ds = DistilledSet.load(out / "distilled.npz")
    present = int((inst.train.class_counts(len(inst.classes)) > 0).sum())
    assert ds.task == "histology" and ds.classes == inst.classes and ds.method == "dm" and len(ds) == 2 * present
    assert ds.x.dtype == np.float32 and ds.x.shape[1:] == (3, 16, 16)
    audit = json.loads((out / "audit.json").read_text())
    for key in ("fidelity", "memorised_fraction", "mia_auc", "flagged", "acc_distilled", "acc_real", "per_class",
                "timings"):
        assert key in audit, key
    assert 0 <= audit["memorised_fraction"] <= 1 and 0 <= audit["mia_auc"] <= 1 and audit["fidelity"] >= 0
    assert audit["institution"] == inst.id and audit["per_class"]["real_counts"] == dict(
        zip(inst.classes, inst.train.class_counts(len(inst.classes)).tolist()))
    import matplotlib.image

    assert matplotlib.image.imread(out / "preview.png").ndim == 3
    printed = capsys.readouterr().out
    assert "fidelity" in printed and "MIA TPR@1%FPR" in printed and "MIA AUC" not in printed


def test_distill_random_is_flagged_without_fidelity(tmp_path, tiny_config_file):
    out = tmp_path / "out"
    assert main(["distill", "--config", tiny_config_file, "--institution", "2", "--method", "random", "--ipc", "5",
                 "--no-fidelity", "--out", str(out)]) == 0
    audit = json.loads((out / "audit.json").read_text())
    assert audit["flagged"] and audit["memorised_fraction"] == 1.0 and audit["fidelity"] is None
    assert audit["institution"] == 2


@pytest.mark.parametrize("args, message", [
    (["--method", "magic"], "distill.method must be one of dm, random, herding, noise"),
    (["--ipc", "0"], "distill.ipc must be an integer >= 1"),
    (["--ipc", "many"], "distill.ipc must be an integer"),
    (["--task", "dermoscopy"], "--task 'dermoscopy' is not a task"),
    (["--institution", "9"], "--institution must be in [0, 3]"),
    (["--set", "distill.dsa_strategy=color_blur"], "distill.dsa_strategy"),
])
def test_distill_bad_input_exits_2_and_writes_nothing(tmp_path, tiny_config_file, capsys, args, message):
    out = tmp_path / "out"
    code = main(["distill", "--config", tiny_config_file, *args, "--no-fidelity", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and not out.exists()
    assert err.startswith("forgesim: error:") and message in err and len(err.splitlines()) == 1


def test_distill_refuses_a_non_empty_out_dir(tmp_path, tiny_config_file, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["distill", "--config", tiny_config_file, "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err and {p.name for p in out.iterdir()} == {"keep.txt"}
