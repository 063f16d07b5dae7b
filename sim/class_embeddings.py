"""Class embeddings from a file (``model.prototypes``): the prototype head's rows, e.g. CLIP text embeddings.

Without a file the head's class ``task/name`` has a unit vector seeded from its name (``sim.model.prototypes``);
with one, its rows are the user's embeddings, computed once (``scripts/clip_prototypes.py`` writes CLIP's):

* ``.safetensors``: one float tensor per task, named by the task, shape (n_classes, dim), rows in the task's class
  (label) order. The file's metadata may name each task's classes (key: the task, value: a JSON list of class
  names); when it does they must be the run's, in the run's order, since a permuted table silently swaps labels.
* ``.npz``: the same, one array per task (``numpy.savez(path, histology=..., xray=...)``).
* ``.npy``: one (n_classes, dim) array, for a run of exactly one task.

Rows are L2-normalised on reading. A file that does not fit the run (unreadable, a missing task, a wrong class
count or dim, non-finite or zero rows) is a ``ValueError`` naming ``model.prototypes`` and what is wrong.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

SUFFIXES = (".safetensors", ".npz", ".npy")
SINGLE = ""          # the table key of a .npy file: one task's rows, whichever task the run has


@dataclass
class ClassEmbeddings:
    """Unit-norm class embeddings read from ``path``: ``tables[task]`` (K, D); ``names[task]`` the classes the file
    names for that task (when its metadata does)."""

    path: str
    tables: dict[str, torch.Tensor]
    names: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def rows(self, task: str, classes: Sequence[str]) -> torch.Tensor:
        """(K, D) embeddings of ``task``'s ``classes``, in their order."""
        table = self.tables.get(task, self.tables.get(SINGLE))
        if table is None:
            raise ValueError(f"model.prototypes {self.path} has no embeddings for task {task!r} "
                             f"(it holds {', '.join(sorted(self.tables))})")
        if table.shape[0] != len(classes):
            raise ValueError(f"model.prototypes {self.path}: task {task!r} has {len(classes)} classes "
                             f"({', '.join(classes)}) but the file holds {table.shape[0]} rows for it")
        named = self.names.get(task)
        if named is not None and tuple(named) != tuple(classes):
            raise ValueError(f"model.prototypes {self.path}: the file names the classes of task {task!r} "
                             f"{list(named)}, the run's are {list(classes)} (rows must follow the run's label order)")
        return table.clone()

    def check(self, task_classes: Mapping[str, Sequence[str]]) -> None:
        """Every task of a run has fitting rows (run before any work starts)."""
        if SINGLE in self.tables and len(task_classes) != 1:
            raise ValueError(f"model.prototypes {self.path} is one .npy table, for a run of one task; this run has "
                             f"{len(task_classes)} ({', '.join(task_classes)}): use a .safetensors or .npz file "
                             f"with one table per task")
        for task, classes in task_classes.items():
            self.rows(task, classes)


def read_class_embeddings(path: str | Path, dim: int) -> ClassEmbeddings:
    """Read and check a class-embedding file against the feature width ``dim``; rows come back L2-normalised."""
    path = Path(path).expanduser()
    where = f"model.prototypes {path}"
    if path.suffix not in SUFFIXES:
        raise ValueError(f"{where} must be a {', '.join(SUFFIXES)} file")
    if not path.is_file():
        raise ValueError(f"{where} does not exist")
    raw, names = _read(path, where)
    if not raw:
        raise ValueError(f"{where} holds no embeddings")
    tables = {}
    for task, array in raw.items():
        label = f"{where}: {'the table' if task == SINGLE else repr(task)}"
        if array.ndim != 2 or not np.issubdtype(array.dtype, np.floating):
            raise ValueError(f"{label} must be a float array (n_classes, dim), got {array.dtype} {array.shape}")
        if array.shape[1] != dim:
            raise ValueError(f"{label} has dim {array.shape[1]}, the foundation's features have {dim}")
        t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
        if not torch.isfinite(t).all() or (t.norm(dim=1) == 0).any():
            raise ValueError(f"{label} holds non-finite or all-zero rows")
        tables[task] = F.normalize(t, dim=1)
    return ClassEmbeddings(str(path), tables, names)


def _read(path: Path, where: str) -> tuple[dict[str, np.ndarray], dict[str, tuple[str, ...]]]:
    """The file's arrays by task (``SINGLE`` for a .npy) and the class names its metadata gives."""
    names: dict[str, tuple[str, ...]] = {}
    try:
        if path.suffix == ".npy":
            return {SINGLE: np.load(path, allow_pickle=False)}, names
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as fh:
                return {k: fh[k] for k in fh.files}, names
        from safetensors import safe_open

        with safe_open(str(path), "np") as fh:
            arrays = {k: fh.get_tensor(k) for k in fh.keys()}
            meta = fh.metadata() or {}
    except Exception as exc:  # noqa: BLE001 - any unreadable file is one clear error
        raise ValueError(f"{where} is not a readable {path.suffix} file: {exc}") from None
    for task in arrays:
        if task in meta:
            try:
                value = json.loads(meta[task])
            except json.JSONDecodeError:
                value = None
            if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                raise ValueError(f"{where}: metadata for task {task!r} must be a JSON list of class names")
            names[task] = tuple(value)
    return arrays, names
