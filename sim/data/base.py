"""Array containers and helpers shared by the dataset loaders."""
from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml


def derive_rng(seed: int, *keys: object) -> np.random.Generator:
    """An independent, reproducible generator for (seed, *keys); no global RNG state is touched."""
    digest = hashlib.sha256(repr((seed,) + keys).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def derive_seed(seed: int, *keys: object) -> int:
    """A 63-bit integer seed derived from (seed, *keys), e.g. for ``torch.Generator.manual_seed``."""
    digest = hashlib.sha256(repr((seed,) + keys).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass(frozen=True)
class Split:
    """Images ``x`` (n, 3, S, S) — uint8 in [0, 255] (real data) or float32 in [0, 1] (synthetic/distilled
    images) — and integer labels ``y`` (n,)."""

    x: np.ndarray
    y: np.ndarray

    def __post_init__(self) -> None:
        if self.x.ndim != 4 or self.x.shape[1] != 3 or self.x.dtype not in (np.uint8, np.float32):
            raise ValueError(f"Split.x must be uint8 or float32 (n, 3, S, S), got {self.x.dtype} {self.x.shape}")
        if self.y.shape != (self.x.shape[0],):
            raise ValueError(f"Split.y must have shape ({self.x.shape[0]},), got {self.y.shape}")

    def __len__(self) -> int:
        return len(self.y)

    def take(self, idx: np.ndarray) -> "Split":
        return Split(self.x[idx], self.y[idx])

    @staticmethod
    def concat(parts: list["Split"]) -> "Split":
        return Split(np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts]))

    def class_counts(self, n_classes: int) -> np.ndarray:
        return np.bincount(self.y, minlength=n_classes)


@dataclass(frozen=True)
class DistilledSet:
    """A small labelled image set of one task that may leave an institution (or real data wrapped alike).

    ``x`` float32 (n, 3, S, S) in [0, 1]; ``y`` int64 (n,) indexes ``classes``. This is also the proxy data
    the merge actor searches coefficients on (the union of the distilled sets it has received).
    """

    task: str
    classes: tuple[str, ...]
    x: np.ndarray
    y: np.ndarray
    method: str = "dm"
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        Split(self.x, self.y)  # same shape/dtype rules
        if len(self.y) and (self.y.min() < 0 or self.y.max() >= len(self.classes)):
            raise ValueError(f"distilled set of task {self.task!r}: labels must index its {len(self.classes)} classes")

    @property
    def split(self) -> Split:
        return Split(self.x, self.y)

    def __len__(self) -> int:
        return len(self.y)

    def num_bytes(self) -> int:
        return int(self.x.nbytes + self.y.nbytes)

    def save(self, path: str | Path) -> Path:
        """Write ``distilled.npz``: images, labels, class_names, task, method (+ meta as JSON)."""
        path = Path(path)
        np.savez_compressed(path, images=self.x.astype(np.float32), labels=self.y.astype(np.int64),
                            class_names=np.array(self.classes), task=np.array(self.task),
                            method=np.array(self.method), meta=np.array(json.dumps(self.meta, default=str)))
        return path

    @staticmethod
    def load(path: str | Path) -> "DistilledSet":
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                missing = [k for k in ("images", "labels", "class_names", "task") if k not in z.files]
                if missing:
                    raise ValueError(f"{path}: missing key {missing[0]!r}")
                x = z["images"]
                x = x.astype(np.float32) / (255.0 if x.dtype == np.uint8 else 1.0)
                return DistilledSet(str(z["task"]), tuple(str(c) for c in z["class_names"]), x,
                                    z["labels"].astype(np.int64), str(z["method"]) if "method" in z.files else "?",
                                    json.loads(str(z["meta"])) if "meta" in z.files else {})
        except (OSError, EOFError, zipfile.BadZipFile) as exc:
            raise ValueError(f"{path}: not a readable distilled .npz: {exc}") from None


@dataclass(frozen=True)
class TaskPool:
    """One task before it is split across sites."""

    name: str
    classes: tuple[str, ...]
    train: Split
    val: Split
    test: Split


def to_unit_float(x):
    """uint8 images → float32 in [0, 1]; float images pass through (numpy or torch)."""
    import torch

    t = torch.as_tensor(x)
    return t.float() / 255.0 if t.dtype == torch.uint8 else t.float()


def to_rgb_uint8(images: np.ndarray, name: str = "images") -> np.ndarray:
    """(n, H, W) / (n, H, W, 1) / (n, H, W, 3) / (n, 3, H, W) uint8-like → uint8 (n, 3, H, W)."""
    a = np.asarray(images)
    if a.ndim == 3:
        a = np.repeat(a[:, None], 3, axis=1)
    elif a.ndim == 4 and a.shape[-1] in (1, 3) and a.shape[1] not in (1, 3):
        a = np.repeat(a, 3, axis=-1) if a.shape[-1] == 1 else a
        a = a.transpose(0, 3, 1, 2)
    elif a.ndim == 4 and a.shape[1] in (1, 3):
        a = np.repeat(a, 3, axis=1) if a.shape[1] == 1 else a
    else:
        raise ValueError(f"{name} must have shape (n, H, W), (n, H, W, 1|3) or (n, 1|3, H, W), got {a.shape}")
    if a.dtype != np.uint8:
        if np.issubdtype(a.dtype, np.floating) and a.size and a.max() <= 1.0:
            a = a * 255.0
        a = np.clip(np.round(a), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(a)


def resize_uint8(x: np.ndarray, size: int, mode: str = "bilinear") -> np.ndarray:
    """Resize uint8 (n, 3, H, W) to (n, 3, size, size) with antialiased ``mode`` (bilinear or bicubic)
    interpolation (``data.interpolation``)."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    import torch
    import torch.nn.functional as F

    out = []
    for start in range(0, len(x), 2048):  # chunks bound peak memory for large files
        t = torch.from_numpy(x[start:start + 2048]).float()
        t = F.interpolate(t, size=(size, size), mode=mode, antialias=True, align_corners=False)
        out.append(t.round().clamp(0, 255).to(torch.uint8).numpy())
    return np.concatenate(out) if out else np.zeros((0, 3, size, size), np.uint8)


def read_class_map(path: str | Path) -> dict[str, tuple[str, ...]]:
    """``data.classes``: a JSON (``.json``) or YAML file mapping a task to its class names in label order, e.g.
    ``{"chestmnist": ["normal", "pneumonia"]}``; errors name the field and the file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data.classes {path} is not a file")
    kind = "JSON" if path.suffix == ".json" else "YAML"
    try:
        text = path.read_text()
        raw = json.loads(text) if kind == "JSON" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ValueError(f"data.classes {path} is not valid {kind}: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"data.classes {path} must map each task to a list of class names")
    out = {}
    for task, names in raw.items():
        if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"data.classes {path}: task {task!r} must map to a list of class names, got {names!r}")
        if len(set(names)) != len(names):
            raise ValueError(f"data.classes {path}: task {task!r} names a class twice: {names}")
        out[str(task)] = tuple(names)
    return out


def apply_class_map(classes: dict[str, tuple[str, ...]], path: str | Path) -> dict[str, tuple[str, ...]]:
    """``classes`` (task -> class names) with the names of the ``data.classes`` file at ``path`` for the tasks it
    lists; a task it does not know, or a list whose length is not the task's number of classes, is an error."""
    names = read_class_map(path)
    unknown = [t for t in names if t not in classes]
    if unknown:
        raise ValueError(f"data.classes {path}: {unknown[0]!r} is not a task of this run (tasks: "
                         f"{', '.join(classes)})")
    for task, new in names.items():
        if len(new) != len(classes[task]):
            raise ValueError(f"data.classes {path}: task {task!r} has {len(classes[task])} classes "
                             f"({', '.join(classes[task])}), the map gives {len(new)} names")
    return {task: names.get(task, old) for task, old in classes.items()}
