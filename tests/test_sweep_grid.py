"""``forgesim sweep --set AXIS=[...]``: a ``--set`` naming a study's grid axis replaces that axis (the scaling study
to 100 and 200 contributors), validated as the config field it is, before any sweep dir exists."""
from __future__ import annotations

import pytest

from experiments.cmd_sweep import grid_values, split_grid_overrides
from experiments.common import CLIError
from experiments.presets import get_study
from experiments.sweep import write_plan


def test_a_set_of_a_grid_axis_replaces_the_axis_and_the_rest_sets_the_base():
    study = get_study("scaling")
    axes, rest = split_grid_overrides(study.grid, ["data.institutions=[10, 50, 100, 200]", "train.steps=5",
                                                   "seed=3"])
    assert axes == {"data.institutions": (10, 50, 100, 200), "seed": (3,)} and rest == ["train.steps=5"]
    with pytest.raises(CLIError, match="data.institutions needs one or more distinct values"):
        split_grid_overrides(study.grid, ["data.institutions=[10, 10]"])
    with pytest.raises(CLIError, match="needs one or more distinct values"):
        split_grid_overrides(study.grid, ["data.institutions=[]"])
    with pytest.raises(ValueError, match="data.institutions"):
        grid_values(study.base, {"data.institutions": (10, -1)})


def test_the_scaling_grid_extended_to_200_trains_only_the_200_community_per_seed(tmp_path):
    # Prepare: the full scaling study with its contributor axis replaced as `--set data.institutions=[...]` does
    study = get_study("scaling")
    axes, _ = split_grid_overrides(study.grid, ["data.institutions=[10,50,100,200]", "seed=[0,1]"])
    study.grid.update(grid_values(study.base, axes))
    # Execute
    plan = write_plan(study, study.base, tmp_path, 0)
    # Assert: 4 sizes × 2 seeds; per seed the 200 community is the one trial and the others are built from its log
    points = plan["points"]
    assert sorted({p["values"]["data.institutions"] for p in points}) == [10, 50, 100, 200] and len(points) == 8
    trained = [p for p in points if not p.get("subset_of")]
    assert sorted((p["values"]["seed"], p["values"]["data.institutions"]) for p in trained) == [(0, 200), (1, 200)]
    by_name = {p["name"]: p for p in points}
    assert all(by_name[p["subset_of"]]["values"]["seed"] == p["values"]["seed"] for p in points if p.get("subset_of"))


def test_forgesim_sweep_exits_2_on_a_bad_grid_axis_value_before_making_the_sweep_dir(tmp_path, capsys):
    from experiments.cli import main

    code = main(["sweep", "scaling", "--smoke", "--set", "data.institutions=[4,0]", "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "data.institutions" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "s").exists()
