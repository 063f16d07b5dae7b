"""The ``imagefolder`` dataset: task folders of class subfolders made here with Pillow, loaded, split, refused.

Every fixture image is a flat colour of its class plus seeded noise, so labels can be checked against pixels and a
run can learn the tasks.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from experiments.cli import main
from sim.config import DataConfig, apply_overrides, config_to_dict
from sim.data import build_cohort, get_dataset
from sim.data.imagefolder import read_image

COLOURS = {"blue": (20, 40, 230), "green": (30, 220, 40), "red": (230, 30, 30)}


def write_image(path: Path, colour: tuple[int, int, int], seed: int, size: int = 12, mode: str = "RGB") -> None:
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour) + rng.integers(-20, 21, (size, size, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).convert(mode).save(path)


def make_task(root: Path, classes: dict[str, int], ext: str = ".png", mode: str = "RGB") -> Path:
    """``root/<class>/<k><ext>``: ``classes[name]`` images of each class, coloured by the class's name."""
    for c, (name, n) in enumerate(classes.items()):
        for k in range(n):
            write_image(root / name / f"{k:02d}{ext}", COLOURS[name], seed=100 * c + k, mode=mode)
    return root


def make_split_task(root: Path, counts: dict[str, int], classes=("blue", "red")) -> Path:
    """``root/{train,val,test}/<class>/``: ``counts[split]`` images of each class."""
    for split, n in counts.items():
        make_task(root / split, {c: n for c in classes})
    return root


@pytest.fixture()
def two_tasks(tmp_path) -> tuple[Path, Path]:
    """``xray``: 3 classes × 12 PNGs (one upper-case extension); ``skin``: 2 classes × 12 greyscale JPEGs."""
    xray = make_task(tmp_path / "xray", {"red": 12, "green": 12, "blue": 12})
    (xray / "red" / "00.png").rename(xray / "red" / "00.PNG")
    (xray / "blue" / "notes.txt").write_text("not an image")            # other files are skipped
    skin = make_task(tmp_path / "skin", {"red": 12, "blue": 12}, ext=".jpg", mode="L")
    return xray, skin


def cfg_for(*folders: Path, **kwargs) -> DataConfig:
    return DataConfig(name="imagefolder", data_dir=tuple(str(f) for f in folders), img_size=16,
                      institutions=kwargs.pop("institutions", len(folders)), train_per_class=0, **kwargs)


def load(cfg: DataConfig, seed: int = 0):
    return {p.name: p for p in get_dataset("imagefolder")(cfg, seed)}


# ---------------------------------------------------------------- loading
def test_each_folder_is_a_task_and_each_subfolder_a_class(two_tasks):
    # Execute
    pools = load(cfg_for(*two_tasks))
    # Assert: tasks in the order given, classes sorted, 70/15/15 of 12 images = 8/2/2 per class
    assert list(pools) == ["xray", "skin"]
    assert pools["xray"].classes == ("blue", "green", "red") and pools["skin"].classes == ("blue", "red")
    xray = pools["xray"]
    assert [len(s) for s in (xray.train, xray.val, xray.test)] == [24, 6, 6]
    assert xray.train.x.shape == (24, 3, 16, 16) and xray.train.x.dtype == np.uint8
    assert list(xray.test.class_counts(3)) == [2, 2, 2]
    # labels match pixels: each image's strongest channel is its class's colour (blue=2, green=1, red=0)
    for split in (xray.train, xray.val, xray.test):
        dominant = split.x.astype(float).mean(axis=(2, 3)).argmax(axis=1)
        assert list(dominant) == [{0: 2, 1: 1, 2: 0}[int(y)] for y in split.y]
    # greyscale JPEGs come back as 3 equal channels
    skin = pools["skin"].train.x.astype(int)
    assert np.abs(skin[:, 0] - skin[:, 2]).max() <= 1


def test_seeded_splits_are_reproducible_and_disjoint(two_tasks):
    def fingerprints(split):
        return {split.x[i].tobytes() for i in range(len(split))}

    a, b, other = load(cfg_for(*two_tasks), 0)["xray"], load(cfg_for(*two_tasks), 0)["xray"], \
        load(cfg_for(*two_tasks), 1)["xray"]
    for s in ("train", "val", "test"):
        assert np.array_equal(getattr(a, s).x, getattr(b, s).x) and np.array_equal(getattr(a, s).y, getattr(b, s).y)
    assert fingerprints(a.train) != fingerprints(other.train)
    parts = [fingerprints(getattr(a, s)) for s in ("train", "val", "test")]
    assert sum(map(len, parts)) == len(set().union(*parts)) == 36          # every image once, no overlap


def test_train_val_test_folders_are_used_as_given(tmp_path):
    # Prepare: one task with its own splits, whatever the seed
    task = make_split_task(tmp_path / "fundus", {"train": 5, "val": 1, "test": 3})
    # Execute
    pools = [load(cfg_for(task), seed)["fundus"] for seed in (0, 7)]
    # Assert
    for pool in pools:
        assert pool.classes == ("blue", "red")
        assert [list(s.class_counts(2)) for s in (pool.train, pool.val, pool.test)] == [[5, 5], [1, 1], [3, 3]]
    assert np.array_equal(pools[0].test.x, pools[1].test.x)


def test_train_per_class_caps_the_training_images(two_tasks):
    pool = load(dataclasses.replace(cfg_for(*two_tasks), train_per_class=3))["xray"]
    assert list(pool.train.class_counts(3)) == [3, 3, 3] and len(pool.test) == 6


def test_data_tasks_picks_folders_by_name(two_tasks):
    pools = get_dataset("imagefolder")(cfg_for(*two_tasks, tasks=("skin",)), 0)
    assert [p.name for p in pools] == ["skin"]
    with pytest.raises(ValueError, match="'chest' is not one of the data.data_dir folders"):
        get_dataset("imagefolder")(cfg_for(*two_tasks, tasks=("chest",)), 0)


def test_the_cohort_deals_a_folder_pool_out_per_institution(two_tasks):
    # per_institution: institution i's images from (seed, i) alone, as for the other finite pools
    cfg = DataConfig(name="imagefolder", data_dir=tuple(map(str, two_tasks)), img_size=16, institutions=4,
                     partition="per_institution", train_per_class=3, val_per_class=1, test_per_class=1,
                     dirichlet_alpha=0.0)
    cohort = build_cohort(cfg, 0)
    assert cohort.tasks == ("xray", "skin") and [i.task for i in cohort.institutions] == ["xray", "skin"] * 2
    assert [len(i.train) for i in cohort.institutions] == [9, 6, 9, 6]
    assert cohort.task_classes["xray"] == ("blue", "green", "red")


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    # Pillow's own RGB conversion would clip every value above 255 to white
    Image.fromarray(np.full((8, 8), 32896, np.uint16)).save(tmp_path / "ct.png")      # 32896 = 128 × 257
    assert Image.open(tmp_path / "ct.png").mode.startswith("I")
    assert np.all(read_image(tmp_path / "ct.png", 8) == 128)


# ---------------------------------------------------------------- bad folders: exit 2 naming the path
def _garbage(task: Path) -> tuple[Path, Path]:
    (task / "red" / "03.png").write_bytes(b"\x89PNG not really")
    return task, task / "red" / "03.png"


def _truncated(task: Path) -> tuple[Path, Path]:
    path = task / "blue" / "05.png"
    write_image(path, COLOURS["blue"], 0, size=64)
    path.write_bytes(path.read_bytes()[:200])
    return task, path


def _empty_class(task: Path) -> tuple[Path, Path]:
    (task / "green").mkdir()
    (task / "green" / "readme.txt").write_text("no images yet")
    return task, task / "green"


def _single_class(task: Path) -> tuple[Path, Path]:
    for f in (task / "blue").iterdir():
        f.unlink()
    (task / "blue").rmdir()
    return task, task


def _no_images(task: Path) -> tuple[Path, Path]:
    (task.parent / "empty").mkdir()
    return task.parent / "empty", task.parent / "empty"


def _loose_image(task: Path) -> tuple[Path, Path]:
    write_image(task / "stray.png", COLOURS["red"], 0)
    return task, task / "stray.png"


def _too_few_to_split(task: Path) -> tuple[Path, Path]:
    make_task(task, {"green": 2})
    return task, task / "green"


def _missing_split(task: Path) -> tuple[Path, Path]:
    split = make_split_task(task.parent / "split", {"train": 3, "test": 3})
    return split, split


def _split_classes_differ(task: Path) -> tuple[Path, Path]:
    split = make_split_task(task.parent / "split", {"train": 3, "val": 3})
    make_task(split / "test", {"blue": 3, "green": 3})
    return split, split / "test"


def _not_a_dir(task: Path) -> tuple[Path, Path]:
    (task.parent / "file.png").write_bytes(b"")
    return task.parent / "file.png", task.parent / "file.png"


BAD_FOLDERS = {   # case -> (break a good task folder: (folder given, path the message names), words of the message)
    "unreadable image": (_garbage, "not a readable image"),
    "truncated image": (_truncated, "not a readable image"),
    "empty class": (_empty_class, "class folder holds no images"),
    "single class": (_single_class, "a task needs at least two class"),
    "no images at all": (_no_images, "holds no images"),
    "image outside the classes": (_loose_image, "outside the class folders"),
    "too few to split": (_too_few_to_split, "needs at least 3"),
    "incomplete split folders": (_missing_split, "no val/"),
    "split classes differ": (_split_classes_differ, "differ from those of"),
    "missing folder": (lambda task: (task.parent / "nope",) * 2, "is not a directory"),
    "not a directory": (_not_a_dir, "is not a directory"),
}


@pytest.mark.parametrize("case", BAD_FOLDERS)
def test_a_bad_folder_exits_2_naming_the_path(case, tmp_path, capsys):
    # Prepare: a good task folder, broken one way
    make, words = BAD_FOLDERS[case]
    given, named = make(make_task(tmp_path / "data" / "xray", {"red": 4, "blue": 4}))
    out = tmp_path / "run"
    # Execute
    code = main(["run", "--data", "imagefolder", "--data-dir", str(given), "--out", str(out)])
    # Assert: one line, exit 2, naming the path, before anything is written
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("forgesim: error: "), err
    assert str(named) in err[0] and words in err[0], err
    assert not out.exists()


def test_two_folders_with_one_name_are_refused(tmp_path):
    a = make_task(tmp_path / "site_a" / "xray", {"red": 3, "blue": 3})
    b = make_task(tmp_path / "site_b" / "xray", {"red": 3, "blue": 3})
    with pytest.raises(ValueError, match="both named 'xray'") as err:
        build_cohort(cfg_for(a, b), 0)
    assert str(a) in str(err.value) and str(b) in str(err.value)


def test_imagefolder_needs_a_folder():
    with pytest.raises(ValueError, match="^data.data_dir must be one or more task folders"):
        DataConfig(name="imagefolder")


def test_a_class_map_renames_the_folder_classes(two_tasks, tmp_path, capsys):
    # Prepare: names for skin's two classes (blue, red in label order); a second map one name short
    (tmp_path / "names.yaml").write_text("skin: [benign, melanoma]\n")
    (tmp_path / "short.yaml").write_text("xray: [normal, pneumonia]\n")
    # Execute / Assert
    cohort = build_cohort(cfg_for(*two_tasks, classes=str(tmp_path / "names.yaml")), 0)
    assert cohort.task_classes == {"xray": ("blue", "green", "red"), "skin": ("benign", "melanoma")}
    code = main(["run", "--data", "imagefolder", "--data-dir", *map(str, two_tasks), "--classes",
                 str(tmp_path / "short.yaml"), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and f"data.classes {tmp_path / 'short.yaml'}: task 'xray' has 3 classes" in err, err


# ---------------------------------------------------------------- end to end
def test_forgesim_run_on_two_image_folders(ray_session, tiny_run_cfg, two_tasks, tmp_path, capsys, monkeypatch):
    # Prepare: the tiny run's config, one institution per task and one contribution each, one strategy; the folders
    # are given relative to a directory that is not the (already started) Ray workers' own
    cfg = apply_overrides(tiny_run_cfg, ["data.institutions=2", "schedule.contributions=1",
                                         "merge.strategies=[svd]", "runtime.eval_every=2"])
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config_to_dict(cfg)))
    out = tmp_path / "run"
    monkeypatch.chdir(tmp_path)
    # Execute
    code = main(["run", "--config", str(tmp_path / "cfg.yaml"), "--data", "imagefolder",
                 "--data-dir", "xray", "skin", "--out", str(out)])
    # Assert: both folders were tasks of the run, scored on their own test images (6 and 4)
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["commits_accepted"] == 2
    assert set(summary["strategies"]["svd"]["per_task"]) == {"xray", "skin"}
    assert yaml.safe_load((out / "config.yaml").read_text())["data"]["data_dir"] == [str(p) for p in two_tasks]
    metrics = pd.read_parquet(out / "metrics.parquet")
    final = metrics[(metrics.strategy == "svd") & metrics.task.isin(["xray", "skin"])]
    assert dict(final.groupby("task")["n"].max()) == {"skin": 4, "xray": 6}
