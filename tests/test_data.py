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
    assert set(DATASETS) == {"synthetic", "digits", "medmnist"}


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
