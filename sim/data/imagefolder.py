"""``imagefolder``: your own images, one task per folder named in ``data.data_dir``.

A task folder holds one subfolder of images per class, or ``train/``, ``val/`` and ``test/`` folders that each
hold the same class subfolders::

    xray/                       xray/
      normal/  a.png b.jpg ...    train/  normal/ ...  pneumonia/ ...
      pneumonia/ ...              val/    normal/ ...  pneumonia/ ...
                                  test/   normal/ ...  pneumonia/ ...

The task is named after its folder and its classes after their subfolders, sorted (label order). Images are the
``.png``, ``.jpg`` and ``.jpeg`` files (any case) anywhere under a class folder; hidden files and folders are
skipped. Each is read with Pillow, converted to RGB (16-bit grey mapped linearly onto 0..255) and resized to
``data.img_size`` squared (bilinear, antialiased; the aspect ratio is not kept). Without split folders each
class's images are split 70/15/15 into train/val/test (at least one of each), seeded from ``(seed, task)``.
``data.train_per_class`` caps the training images of each class (0 = all) before any image is read.

Anything unusable is a ``ValueError`` naming the path: a folder that is missing or not a directory, two task
folders with the same name, a task with fewer than two classes, a class folder without images (or with fewer than
three to split), images outside the class folders, split folders that are incomplete or disagree on the classes,
and an image Pillow cannot read.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from sim.data.base import Split, TaskPool, derive_rng

EXTENSIONS = (".png", ".jpg", ".jpeg")
SPLITS = ("train", "val", "test")
FRACTIONS = {"val": 0.15, "test": 0.15}     # of each class; train keeps the rest (70 %)
GREY16 = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def _visible(path: Path, root: Path) -> bool:
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def _images_under(folder: Path) -> list[Path]:
    """Every image file under ``folder`` (recursively), in path order."""
    return sorted(p for p in folder.rglob("*")
                  if p.suffix.lower() in EXTENSIONS and p.is_file() and _visible(p, folder))


def _check_no_loose_images(folder: Path) -> None:
    loose = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in EXTENSIONS)
    if loose:
        raise ValueError(f"{loose[0]}: image outside the class folders; put each class's images in its own "
                         f"subfolder")


def _class_folders(folder: Path) -> dict[str, list[Path]]:
    """``{class name: image files}`` of a folder holding one subfolder per class, classes sorted."""
    _check_no_loose_images(folder)
    subdirs = sorted(p for p in folder.iterdir() if p.is_dir() and _visible(p, folder))
    classes = {}
    for d in subdirs:
        files = _images_under(d)
        if not files:
            raise ValueError(f"{d}: class folder holds no images ({', '.join(EXTENSIONS)})")
        classes[d.name] = files
    if not classes:
        raise ValueError(f"{folder}: holds no images; expected one subfolder of images per class")
    if len(classes) < 2:
        raise ValueError(f"{folder}: has one class ({next(iter(classes))!r}); a task needs at least two class "
                         f"subfolders")
    return classes


def _split_files(folder: Path, seed: int, task: str) -> tuple[tuple[str, ...], dict[str, list[list[Path]]]]:
    """The class names and, per split, each class's files: from ``train/ val/ test/`` when the folder has them,
    else a seeded 70/15/15 split of each class."""
    subdirs = {p.name for p in folder.iterdir() if p.is_dir() and _visible(p, folder)}
    if subdirs & set(SPLITS):
        missing = [s for s in SPLITS if s not in subdirs]
        if missing:
            raise ValueError(f"{folder}: has split folders but no {missing[0]}/ (give all of train/, val/, test/, "
                             f"or only class folders to split them seeded)")
        other = sorted(subdirs - set(SPLITS))
        if other:
            raise ValueError(f"{folder}: folder {other[0]!r} sits beside train/, val/, test/; class folders go "
                             f"inside each split")
        _check_no_loose_images(folder)
        per_split = {s: _class_folders(folder / s) for s in SPLITS}
        classes = tuple(per_split["train"])
        for s in ("val", "test"):
            if tuple(per_split[s]) != classes:
                raise ValueError(f"{folder / s}: classes {', '.join(per_split[s])} differ from those of "
                                 f"{folder / 'train'}: {', '.join(classes)}")
        return classes, {s: [per_split[s][c] for c in classes] for s in SPLITS}
    by_class = _class_folders(folder)
    rng = derive_rng(seed, "imagefolder", task)
    out: dict[str, list[list[Path]]] = {s: [] for s in SPLITS}
    for name, files in by_class.items():
        if len(files) < 3:
            raise ValueError(f"{folder / name}: {len(files)} image(s); a class needs at least 3 to split into "
                             f"train/val/test (or give train/, val/, test/ folders)")
        order = [files[i] for i in rng.permutation(len(files))]
        n_val, n_test = (max(1, round(FRACTIONS[s] * len(files))) for s in ("val", "test"))
        out["val"].append(sorted(order[:n_val]))
        out["test"].append(sorted(order[n_val:n_val + n_test]))
        out["train"].append(sorted(order[n_val + n_test:]))
    return tuple(by_class), out


def read_image(path: Path, size: int, mode: str = "bilinear") -> np.ndarray:
    """One image file → uint8 (3, size, size), resized with ``mode`` (``data.interpolation``: bilinear or bicubic);
    an unreadable file is a ``ValueError`` naming it."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.mode in GREY16:   # Pillow's RGB conversion clips 16-bit grey at 255: map 0..65535 onto 0..255
                grey = np.asarray(im, dtype=np.float32) / 257.0
                im = Image.fromarray(np.clip(np.round(grey), 0, 255).astype(np.uint8), "L")
            rgb = im.convert("RGB").resize((size, size), getattr(Image.Resampling, mode.upper()))
            return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ValueError(f"{path}: not a readable image: {exc}") from None


def _read_split(files: list[list[Path]], size: int, mode: str) -> Split:
    """``files[c]`` are class c's images → a ``Split`` (n, 3, size, size) uint8, labels in class order."""
    paths = [p for per_class in files for p in per_class]
    x = np.stack([read_image(p, size, mode) for p in paths]) if paths else np.zeros((0, 3, size, size), np.uint8)
    y = np.concatenate([np.full(len(f), c, dtype=np.int64) for c, f in enumerate(files)])
    return Split(x, y)


def load_folder_task(folder: Path, img_size: int, seed: int, per_class_cap: int = 0,
                     mode: str = "bilinear") -> TaskPool:
    """Load one task folder as a task pool (the task is named after the folder), resized with ``mode``."""
    task = folder.name
    classes, files = _split_files(folder, seed, task)
    if per_class_cap:
        rng = derive_rng(seed, "imagefolder-cap", task)
        files["train"] = [sorted(f[i] for i in rng.permutation(len(f))[:per_class_cap]) for f in files["train"]]
    return TaskPool(task, classes, *(_read_split(files[s], img_size, mode) for s in SPLITS))


def _task_folders(cfg) -> dict[str, Path]:
    """``{task name: folder}`` of ``data.data_dir`` in the order given; folders checked, names distinct."""
    folders: dict[str, Path] = {}
    for d in cfg.data_dir:
        folder = Path(os.path.abspath(d))       # "." and a trailing "/" still name the folder; links are kept
        if not folder.is_dir():
            raise ValueError(f"data.data_dir {d} is not a directory")
        if folder.name in folders:
            raise ValueError(f"data.data_dir: {folders[folder.name]} and {folder} are both named {folder.name!r}; "
                             f"a task is named after its folder, so rename one")
        folders[folder.name] = folder
    return folders


def load_imagefolder_tasks(cfg, seed: int) -> list[TaskPool]:
    if not cfg.data_dir:
        raise ValueError("data.data_dir must name one or more task folders for data.name=imagefolder")
    folders = _task_folders(cfg)
    if cfg.tasks:
        unknown = [t for t in cfg.tasks if t not in folders]
        if unknown:
            raise ValueError(f"data.tasks: {unknown[0]!r} is not one of the data.data_dir folders "
                             f"({', '.join(folders)})")
        folders = {t: folders[t] for t in cfg.tasks}
    return [load_folder_task(f, cfg.img_size, seed, cfg.train_per_class, cfg.interpolation) for f in folders.values()]
