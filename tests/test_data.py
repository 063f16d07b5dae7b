import dataclasses

import numpy as np
import pytest

from sim.config import DataConfig
from sim.data import DATASETS, build_cohort, get_dataset
from sim.data.synthetic import TASKS, make_pretraining_corpus

SMALL = dict(img_size=16, train_per_class=12, val_per_class=3, test_per_class=5)


def _digest(cohort):
    return [(i.task, i.site, i.train.x.tobytes(), i.train.y.tobytes(), i.test.x.tobytes()) for i in cohort.institutions]


@pytest.mark.parametrize("name", ["synthetic", "digits"])
def test_cohort_is_deterministic_per_seed(name):
    cfg = DataConfig(name=name, n_tasks=2, institutions=4, **SMALL)
    assert _digest(build_cohort(cfg, 3)) == _digest(build_cohort(cfg, 3))
    assert _digest(build_cohort(cfg, 3)) != _digest(build_cohort(cfg, 4))


def test_institutions_hold_task_at_site_with_all_splits():
    cfg = DataConfig(n_tasks=3, institutions=7, **SMALL)
    cohort = build_cohort(cfg, 0)
    assert [(i.task, i.site) for i in cohort.institutions][:4] == [
        ("histology", 0), ("xray", 0), ("dermoscopy", 0), ("histology", 1)]
    for inst in cohort.institutions:
        assert inst.train.x.shape[1:] == (3, 16, 16) and inst.train.x.dtype == np.uint8
        assert len(inst.train) > 0 and len(inst.test) > 0
        assert inst.train.y.max() < len(inst.classes)
    # partitioning loses nothing: the task's sites together hold the whole generated pool
    n_sites = 3  # histology sits at institutions 0, 3, 6
    total = sum(len(i.train) for i in cohort.institutions if i.task == "histology")
    assert total == len(TASKS["histology"][0]) * SMALL["train_per_class"] * n_sites


def test_dirichlet_skew_and_no_skew():
    skewed = build_cohort(DataConfig(n_tasks=1, institutions=3, dirichlet_alpha=0.3, **SMALL), 0)
    even = build_cohort(DataConfig(n_tasks=1, institutions=3, dirichlet_alpha=0.0, **SMALL), 0)
    share = lambda inst: inst.train.class_counts(len(inst.classes)) / len(inst.train)  # noqa: E731
    assert max(np.abs(share(i) - 1 / 3).max() for i in skewed.institutions) > 0.15
    assert max(np.abs(share(i) - 1 / 3).max() for i in even.institutions) < 0.05


def test_site_shift_changes_appearance_not_labels():
    a = build_cohort(DataConfig(n_tasks=1, institutions=2, site_shift=0.0, dirichlet_alpha=0, **SMALL), 0)
    b = build_cohort(DataConfig(n_tasks=1, institutions=2, site_shift=1.0, dirichlet_alpha=0, **SMALL), 0)
    assert np.array_equal(a.institutions[1].train.y, b.institutions[1].train.y)
    assert not np.array_equal(a.institutions[1].train.x, b.institutions[1].train.x)


def test_rare_class_prevalence():
    cohort = build_cohort(DataConfig(n_tasks=1, institutions=1, rare_prevalence=0.05, img_size=16,
                                     train_per_class=200, val_per_class=5, test_per_class=20), 0)
    train = cohort.task_split("histology", "train")
    assert train.class_counts(3)[2] / len(train) == pytest.approx(0.05, abs=0.01)
    assert cohort.task_split("histology", "val").class_counts(3)[2] >= 1


def test_digits_tasks_are_pairs_of_digits():
    cohort = build_cohort(DataConfig(name="digits", n_tasks=5, institutions=5, img_size=16, train_per_class=0), 0)
    assert cohort.tasks == ("digits_0_1", "digits_2_3", "digits_4_5", "digits_6_7", "digits_8_9")
    assert cohort.task_classes["digits_8_9"] == ("digit8", "digit9")
    total = sum(len(i.train) + len(i.val) + len(i.test) for i in cohort.institutions)
    assert total == 1797


def test_pretraining_corpus_is_balanced_and_disjoint():
    corpus = make_pretraining_corpus(50, 16, seed=0)
    assert np.bincount(corpus.y).tolist() == [5] * 10
    from sim.data.synthetic import SHAPE_CLASSES

    task_classes = {c for classes, _ in TASKS.values() for c in classes}
    assert not task_classes & set(SHAPE_CLASSES)


def test_unknown_dataset_lists_known():
    with pytest.raises(ValueError, match="known: synthetic, digits, medmnist"):
        get_dataset("cifar")
    assert set(DATASETS) == {"synthetic", "digits", "medmnist", "imagefolder"}


# ---------------------------------------------------------------- medmnist
def _write_npz(path, n=20, size=28, rgb=False, classes=3, drop=None, labels_shape=None):
    rng = np.random.default_rng(0)
    arrays = {}
    for split in ("train", "val", "test"):
        shape = (n, size, size, 3) if rgb else (n, size, size)
        arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, classes, labels_shape or (n, 1))
    if drop:
        arrays.pop(drop)
    np.savez(path, **arrays)


def test_medmnist_loads_each_file_as_a_task(tmp_path):
    _write_npz(tmp_path / "breastmnist.npz", classes=2)
    _write_npz(tmp_path / "pathmnist.npz", rgb=True, size=64)
    cohort = build_cohort(DataConfig(name="medmnist", data_dir=str(tmp_path), n_tasks=2, institutions=2,
                                     img_size=16, train_per_class=0), 0)
    assert cohort.tasks == ("breastmnist", "pathmnist")
    assert cohort.task_classes["breastmnist"] == ("class0", "class1")
    assert cohort.institutions[1].train.x.shape == (20, 3, 16, 16)


@pytest.mark.parametrize("kwargs, message", [
    (dict(drop="val_labels"), "missing key 'val_labels'"),
    (dict(size=30), "H = W in"),
    (dict(labels_shape=(20, 4)), "multi-label"),
])
def test_medmnist_bad_files_are_named(tmp_path, kwargs, message):
    _write_npz(tmp_path / "bad.npz", **kwargs)
    cfg = DataConfig(name="medmnist", data_dir=str(tmp_path), n_tasks=1, institutions=1, img_size=16)
    with pytest.raises(ValueError, match=message) as err:
        build_cohort(cfg, 0)
    assert "bad.npz" in str(err.value)


def test_medmnist_class_names_from_the_file_or_the_map(tmp_path):
    # Prepare: one file naming its classes, one not
    _write_npz(tmp_path / "breastmnist.npz", classes=2)
    arrays = dict(np.load(tmp_path / "breastmnist.npz"))
    np.savez(tmp_path / "breastmnist.npz", **arrays, class_names=np.array(["malignant", "normal"]))
    _write_npz(tmp_path / "pathmnist.npz", classes=3)
    (tmp_path / "names.json").write_text('{"pathmnist": ["adipose", "debris", "mucus"]}')
    cfg = DataConfig(name="medmnist", data_dir=str(tmp_path), n_tasks=2, institutions=2, img_size=16)
    # Execute / Assert: the file's names, class0.. without them, the map's names over either
    assert build_cohort(cfg, 0).task_classes == {"breastmnist": ("malignant", "normal"),
                                                  "pathmnist": ("class0", "class1", "class2")}
    named = build_cohort(dataclasses.replace(cfg, classes=str(tmp_path / "names.json")), 0)
    assert named.task_classes["pathmnist"] == ("adipose", "debris", "mucus")
    assert named.institutions[1].classes == ("adipose", "debris", "mucus")


@pytest.mark.parametrize("content, message", [
    ('{"pathmnist": ["adipose", "debris"]}', "task 'pathmnist' has 3 classes .* the map gives 2 names"),
    ('{"chestmnist": ["a", "b"]}', "'chestmnist' is not a task of this run"),
    ('{"pathmnist": ["a", "a", "b"]}', "names a class twice"),
    ('["a", "b"]', "must map each task to a list of class names"),
    ('{"pathmnist": [1, 2, 3', "is not valid JSON"),
])
def test_a_bad_class_map_is_named(tmp_path, content, message):
    _write_npz(tmp_path / "pathmnist.npz", classes=3)
    (tmp_path / "names.json").write_text(content)
    cfg = DataConfig(name="medmnist", data_dir=str(tmp_path), n_tasks=1, institutions=1, img_size=16,
                     classes=str(tmp_path / "names.json"))
    with pytest.raises(ValueError, match=f"^data.classes {tmp_path / 'names.json'}.*{message}"):
        build_cohort(cfg, 0)


def test_medmnist_class_names_of_the_wrong_length_are_named(tmp_path):
    _write_npz(tmp_path / "pathmnist.npz", classes=3)
    np.savez(tmp_path / "pathmnist.npz", **dict(np.load(tmp_path / "pathmnist.npz")), class_names=np.array(["a", "b"]))
    cfg = DataConfig(name="medmnist", data_dir=str(tmp_path), n_tasks=1, institutions=1, img_size=16)
    with pytest.raises(ValueError, match="pathmnist.npz: class_names holds 2 names but the labels have 3 classes"):
        build_cohort(cfg, 0)


def test_medmnist_missing_and_corrupt_files(tmp_path):
    cfg = DataConfig(name="medmnist", data_dir=str(tmp_path), n_tasks=1, institutions=1, tasks=("chest",))
    with pytest.raises(ValueError, match="missing file .*chest.npz"):
        build_cohort(cfg, 0)
    _write_npz(tmp_path / "chest.npz")
    data = (tmp_path / "chest.npz").read_bytes()
    (tmp_path / "chest.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="chest.npz"):
        build_cohort(cfg, 0)
    with pytest.raises(ValueError, match="is not a directory"):
        build_cohort(DataConfig(name="medmnist", data_dir=str(tmp_path / "nope"), n_tasks=1, institutions=1), 0)


# ------------------------------------------------------------------------------------------
# data.partition=per_institution: nested communities
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["synthetic", "digits"])
def test_per_institution_first_n_of_a_larger_community_are_the_smaller_community(name):
    # Prepare: the same seed, 4 and 10 institutions (digits: small shares, its pool is finite)
    sizes = dict(img_size=8, train_per_class=6, val_per_class=2, test_per_class=3)
    small = build_cohort(DataConfig(name=name, n_tasks=2, institutions=4, partition="per_institution", **sizes), 1)
    large = build_cohort(DataConfig(name=name, n_tasks=2, institutions=10, partition="per_institution", **sizes), 1)
    pool = build_cohort(DataConfig(name=name, n_tasks=2, institutions=10, **sizes), 1)
    # Assert: institution i's images, labels and site are the same in both; the pool split differs with N
    assert _digest(large)[:4] == _digest(small)
    assert small.task_classes == large.task_classes
    assert _digest(pool)[:4] != _digest(build_cohort(DataConfig(name=name, n_tasks=2, institutions=4, **sizes), 1))


def test_per_institution_images_are_own_skewed_and_sized():
    # Prepare
    cfg = DataConfig(name="digits", n_tasks=5, institutions=25, partition="per_institution", dirichlet_alpha=0.3,
                     img_size=8, train_per_class=8, val_per_class=2, test_per_class=4)
    cohort = build_cohort(cfg, 0)
    # Assert: no image is held by two institutions (finite pools are dealt, not resampled); each site holds about
    # per_class × classes images with its own label skew, and every class at least once
    task = cohort.tasks[0]
    unshifted = build_cohort(dataclasses.replace(cfg, site_shift=0.0), 0)
    keys = [set(map(bytes, i.train.x.reshape(len(i.train), -1))) for i in unshifted.institutions if i.task == task]
    assert len(keys) == 5 and all(not (keys[a] & keys[b]) for a in range(5) for b in range(a + 1, 5))
    for inst in cohort.institutions:
        counts = inst.train.class_counts(2)
        assert counts.min() >= 1 and abs(counts.sum() - 16) <= 1
    shares = [i.train.class_counts(2)[0] / len(i.train) for i in cohort.institutions]
    assert max(shares) - min(shares) > 0.2


def test_per_institution_refuses_a_pool_too_small_naming_the_institution():
    cfg = DataConfig(name="digits", n_tasks=5, institutions=40, partition="per_institution", img_size=8,
                     train_per_class=20, val_per_class=2, test_per_class=4)
    with pytest.raises(ValueError, match=r"per_institution: digits task .* too few for institution \d+"):
        build_cohort(cfg, 0)
    with pytest.raises(ValueError, match="data.train_per_class must be an integer >= 1 with data.partition"):
        DataConfig(name="digits", partition="per_institution", train_per_class=0)
    with pytest.raises(ValueError, match="data.partition must be one of pool, per_institution"):
        DataConfig(partition="nested")
