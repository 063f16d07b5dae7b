"""``medmnist``: MedMNIST ``.npz`` files from ``data.data_dir``, one task per file (named after its stem).

Each file must hold ``train_images``, ``train_labels``, ``val_images``, ``val_labels``, ``test_images``,
``test_labels``; images grayscale (n, H, W) or RGB (n, H, W, 3) at 28/64/128/224 px, labels (n, 1)
single-label classes. An optional ``class_names`` array of strings (label order, one name per class) names the
classes; without it they are ``class0``, ``class1``, … (``data.classes`` can name them either way). Anything else
is rejected with a message naming the file and the key.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from sim.data.base import Split, TaskPool, resize_uint8, to_rgb_uint8

SPLITS = ("train", "val", "test")
SIZES = (28, 64, 128, 224)
NAMES_KEY = "class_names"    # as in a distilled set's .npz


def _load_split(path: Path, arrays, split: str, img_size: int, mode: str) -> tuple[np.ndarray, np.ndarray]:
    for key in (f"{split}_images", f"{split}_labels"):
        if key not in arrays.files:
            raise ValueError(f"{path}: missing key {key!r} (has {', '.join(sorted(arrays.files)) or 'nothing'})")
    try:
        x, y = arrays[f"{split}_images"], arrays[f"{split}_labels"]
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise ValueError(f"{path}: {split} arrays are unreadable (truncated or corrupted file?): {exc}") from None
    if not (x.ndim == 3 or (x.ndim == 4 and x.shape[-1] in (1, 3))) or x.shape[1] != x.shape[2] \
            or x.shape[1] not in SIZES:
        raise ValueError(f"{path}: {split}_images must be (n, H, W) or (n, H, W, 3) with H = W in {SIZES}, "
                         f"got {x.shape}")
    if y.ndim == 2 and y.shape[1] != 1:
        raise ValueError(f"{path}: {split}_labels has shape {y.shape}; multi-label tasks are not supported "
                         f"(labels must be (n, 1))")
    if y.shape not in ((len(x), 1), (len(x),)):
        raise ValueError(f"{path}: {split}_labels must have shape ({len(x)}, 1), got {y.shape}")
    y = y.reshape(-1)
    if not np.issubdtype(y.dtype, np.integer) or (len(y) and y.min() < 0):
        raise ValueError(f"{path}: {split}_labels must be non-negative integers, got {y.dtype}")
    return resize_uint8(to_rgb_uint8(x, f"{path}:{split}_images"), img_size, mode), y.astype(np.int64)


def _class_names(path: Path, arrays, n_classes: int) -> tuple[str, ...]:
    """The file's ``class_names`` when it holds them (one per class, in label order), else class0..class{K-1}."""
    if NAMES_KEY not in arrays.files:
        return tuple(f"class{c}" for c in range(n_classes))
    try:
        names = arrays[NAMES_KEY]
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:   # object arrays need pickle: refused
        raise ValueError(f"{path}: {NAMES_KEY} must be an array of strings: {exc}") from None
    if names.ndim != 1 or names.dtype.kind not in "US":
        raise ValueError(f"{path}: {NAMES_KEY} must be a 1-D array of strings, got {names.dtype} {names.shape}")
    if len(names) != n_classes:
        raise ValueError(f"{path}: {NAMES_KEY} holds {len(names)} names but the labels have {n_classes} classes "
                         f"(0..{n_classes - 1})")
    out = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names.tolist())
    if len(set(out)) != len(out) or not all(out):
        raise ValueError(f"{path}: {NAMES_KEY} must be distinct non-empty names, got {list(out)}")
    return out


def load_npz_task(path: Path, img_size: int, per_class_cap: int = 0, mode: str = "bilinear") -> TaskPool:
    """Load one MedMNIST file as a task pool, resized to ``img_size`` with ``mode`` interpolation."""
    try:
        arrays = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise ValueError(f"{path}: not a readable .npz file: {exc}") from None
    with arrays:
        loaded = {s: _load_split(path, arrays, s, img_size, mode) for s in SPLITS}
        n_classes = int(max(y.max() for _, y in loaded.values() if len(y))) + 1
        classes = _class_names(path, arrays, n_classes)
    splits = [Split(*loaded[s]) for s in SPLITS]
    if per_class_cap:
        rng = np.random.default_rng(0)
        idx = [rng.permutation(np.flatnonzero(splits[0].y == c))[:per_class_cap] for c in range(n_classes)]
        splits[0] = splits[0].take(np.sort(np.concatenate(idx)))
    return TaskPool(path.stem, classes, *splits)


def load_medmnist_tasks(cfg, seed: int) -> list[TaskPool]:
    if len(cfg.data_dir) != 1:
        raise ValueError("data.data_dir must name one directory of MedMNIST .npz files for data.name=medmnist")
    root = Path(cfg.data_dir[0])
    if not root.is_dir():
        raise ValueError(f"data.data_dir {root} is not a directory")
    if cfg.tasks:
        files = [root / f"{t}.npz" for t in cfg.tasks]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"data.tasks: missing file {missing[0]}")
    else:
        files = sorted(root.glob("*.npz"))[: cfg.n_tasks]
        if not files:
            raise ValueError(f"data.data_dir {root} holds no .npz files")
    return [load_npz_task(f, cfg.img_size, cfg.train_per_class if cfg.train_per_class else 0, cfg.interpolation)
            for f in files]
