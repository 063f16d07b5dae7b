"""Content-addressed commit cache: a contribution is trained once per training-relevant config, then reused.

Sweeping a merge strategy, a merge order or anything else that does not change local training must not retrain
(issue: studies). ``runtime.commit_cache`` names a directory shared by runs; ``contribution_key`` hashes what a
contribution's adapter and distilled set depend on — the seed, the data, model, LoRA, training and distillation
sections, the device and thread count (numerics), the contribution's id and seed, and, with ``init_from: main``,
the content of the adapter it pulled — and nothing else (not the merge strategies, the evaluation schedule, the
worker count or the clock). ``CommitCache.get_or_make`` returns the cached ``Commit`` or makes, stores and
returns it; ``cached_contribution`` is what a training task calls: the cached commit with this run's schedule
times. Making holds a per-key file lock, so two runs that need the same contribution at the same time train
it once (the second waits and loads). Entries are written whole (temp dir + rename) and checked against their
content hash on load; an unreadable entry is trained again and replaced.

Layout: ``<dir>/<key[:2]>/<key>/`` = a commit dir (``sim.commit_log.write_commit_dir``).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import warnings
from pathlib import Path
from typing import Callable

from sim.config import SimConfig, config_to_dict


COMMIT_SECTIONS = ("data", "model", "lora", "train", "distill")
# Fields added after the first commit caches were written: at their defaults they leave a key as it was (the commit
# is the same), so existing caches stay valid.
LATER_FIELDS = {"data": {"interpolation": "bilinear", "classes": None},
                "model": {"pretrained": "none", "keep_head": False, "prototypes": None, "pretrain_data": "shapes"}}
LATER_ATTACK_FIELDS = {"noise": 0.01}      # attacks: fields added after attacked commits were first cached
# Model fields that name a file: the key holds the file's content hash too, so a file replaced under the same name
# does not hand out commits trained on the old one.
FILE_FIELDS = ("checkpoint", "pretrained", "prototypes")


def commit_config(cfg: SimConfig) -> dict:
    """What a contribution's commit is made from, beside its id and seed: the run seed, the device kind, the torch
    threads, the precision (when not fp32) and the data, model, LoRA, training and distillation sections (not the joint reference's fields of
    ``train``, which no contribution reads), with the content hash of every file the model section names."""
    parts = {"seed": cfg.seed, "device": cfg.runtime.device.split(":")[0], "threads": cfg.runtime.threads}
    if cfg.runtime.precision != "fp32":      # added later: an fp32 commit keeps its key
        parts["precision"] = cfg.runtime.precision
    parts |= {name: config_to_dict(getattr(cfg, name)) for name in COMMIT_SECTIONS}
    for field in ("joint", "joint_steps"):      # the joint reference does not touch contributions
        parts["train"].pop(field, None)
    for section, defaults in LATER_FIELDS.items():
        for field, default in defaults.items():
            if parts[section].get(field) == default:
                parts[section].pop(field)
    dirs = parts["data"].get("data_dir")
    if isinstance(dirs, (list, tuple)) and len(dirs) <= 1:      # as keyed when data.data_dir held one path or None
        parts["data"]["data_dir"] = dirs[0] if dirs else None
    files = {f: file_digest(getattr(cfg.model, f)) for f in FILE_FIELDS
             if getattr(cfg.model, f) not in (None, "none", "hub")}
    if files:
        parts["model_files"] = files
    return parts


@functools.lru_cache(maxsize=32)
def _digest(path: str, size: int, mtime_ns: int, inode: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def file_digest(path: str) -> str:
    """sha256 of a file's bytes (memoised per size, modification time and inode); "missing" if there is none."""
    p = Path(path).expanduser()
    if not p.is_file():
        return "missing"
    st = p.stat()
    return _digest(str(p.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)


def contribution_key(cfg: SimConfig, contribution_id: str, contribution_seed: int, pulled=None,
                     attack: str | None = None) -> str:
    """The cache key of one contribution (sha256 hex); ``pulled``: the ``Adapter`` it starts from, if any (a free
    rider's: the accepted adapter it copies); ``attack``: the attack it carries (``sim.attacks.attack_of``), whose
    settings join the key — an honest contribution's key does not depend on ``attacks:``, so clean and attacked
    runs share their honest commits (and a later ``attacks`` field at its default leaves an attacked key as it was)."""
    parts = commit_config(cfg) | {"id": contribution_id, "contribution_seed": int(contribution_seed)}
    if attack is not None:
        settings = config_to_dict(cfg.attacks)
        for field, default in LATER_ATTACK_FIELDS.items():
            if settings.get(field) == default:
                settings.pop(field)
        parts["attack"] = settings | {"kind": attack}
    h = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
    if pulled is not None:
        import torch

        h.update(json.dumps([float(pulled.alpha), sorted(pulled.alpha_pattern.items())]).encode())
        for group, tensors in (("lora", pulled.weights), ("head", pulled.head or {})):
            for name in sorted(tensors):
                h.update(f"{group}:{name}:{tuple(tensors[name].shape)}".encode())
                h.update(tensors[name].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


class CommitCache:
    """A directory of commits keyed by ``contribution_key``."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.dir / key[:2] / key

    def get(self, key: str):
        """The cached ``Commit`` or ``None`` (an entry that does not load or match its hash counts as missing)."""
        from sim.commit_log import read_commit_dir

        path = self.path(key)
        if not path.is_dir():
            return None
        try:
            commit = read_commit_dir(path)
            expected = json.loads((path / "meta.json").read_text()).get("hash")
        except (ValueError, OSError) as exc:
            warnings.warn(f"commit cache: ignoring {path}: {exc}", stacklevel=2)
            return None
        if commit.content_hash() != expected:
            warnings.warn(f"commit cache: ignoring {path}: content does not match its hash", stacklevel=2)
            return None
        return commit

    def put(self, key: str, commit) -> Path:
        from sim.commit_log import write_commit_dir

        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_commit_dir(commit, path)

    def get_or_make(self, key: str, make: Callable[[], object]) -> tuple[object, bool]:
        """``(commit, hit)``: the cached commit, or ``make()``'s, stored under ``key`` (one maker per key)."""
        from sim.model import file_lock

        commit = self.get(key)
        if commit is not None:
            return commit, True
        with file_lock(self.dir / key[:2] / f"{key}.lock"):
            commit = self.get(key)             # made by another run while this one waited for the lock
            if commit is not None:
                return commit, True
            commit = make()
            self.put(key, commit)
            return commit, False


def cached_contribution(cache_dir: str | Path, cfg: SimConfig, contribution, pulled, pulled_version: int,
                        make: Callable[[], object]):
    """The ``Commit`` of ``contribution``: from the cache at ``cache_dir``, else ``make()``'s (then stored).

    Args:
        cache_dir: ``runtime.commit_cache``.
        cfg: the run's config (its training-relevant sections key the entry).
        contribution: the schedule's ``Contribution``.
        pulled: the ``Adapter`` it starts from (``init_from: main``), part of the key; ``None`` = the foundation.
        pulled_version: the main version ``pulled`` is.
        make: trains and distils it (``sim.contribute.contribute`` with these arguments).
    Returns:
        The commit with this run's schedule times, pulled version and straggler flag (training does not depend on
        them, so a cached commit may carry another run's), and ``meta["cache_hit"]``.
    """
    from sim.attacks import attack_of

    key = contribution_key(cfg, contribution.id, contribution.seed, pulled, attack_of(cfg, contribution))
    commit, hit = CommitCache(cache_dir).get_or_make(key, make)
    return dataclasses.replace(commit, pulled_version=pulled_version, t_pull=contribution.t_pull,
                               t_commit=contribution.t_commit,
                               meta=commit.meta | {"cache_hit": hit, "straggler": contribution.straggler})
