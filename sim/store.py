"""The main branch's durable state: commits, their validation, the append-only log, and one branch per strategy.

Plain Python (no Ray): ``actors.merge_actor.MergeActor`` wraps ``MainState`` and the tests drive it directly.

Loop per received commit (``MainState.receive``):

Step 0  authentication (when the state has the run's secret): the commit carries an HMAC of its content hash under
        its institution's key (``institution_key``: derived from the per-run secret; each institution actor gets
        its own at start); an unknown institution or a missing or wrong signature is rejected.
Step 1  validation (``validate_commit``): NaN/Inf, modules, shapes and rank, base fingerprint, unknown institution,
        task/classes, distilled set — content only, so a bad commit is named for what is wrong with it even when
        its id was accepted before.
Step 2  idempotency: a commit id seen before with the same content gets its original acknowledgement back
        (``duplicate: true``); the same id with other content is rejected. Then staleness against
        ``schedule.max_staleness``.
Step 3  merge into every strategy's branch — tentatively: merges are pure, nothing is replaced yet, so a merge
        that fails rejects the commit and changes no branch.
Step 4  durable log (``CommitLog``): the commit dir is written to a temp dir and renamed into place, then the
        ``accepted`` line is appended and fsync'ed. Only then do the new branches replace the old ones and the
        acknowledgement go out. A restarted actor (``MainState.restore``) repairs the log (a torn last line,
        orphan dirs of unacknowledged commits), loads the commit dirs it names (checking each against its
        content hash) and replays the merges, which are deterministic (seeds derived from the run seed, strategy and sequence).

Run dir layout written here: ``log.jsonl`` (one JSON record per line: ``accepted``, ``rejected``, ``merged``),
``commits/<seq>-<institution>/`` (peft adapter dir, ``distilled.npz``, ``meta.json``) and, at the end,
``main/<strategy>/`` (``save_main``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from sim.config import SimConfig
from sim.data.base import DistilledSet, derive_seed
from sim.merge import SEQUENTIAL, Mixture, default_weights, merge, merge_step, save_mixture, start_sequence
from sim.merge.api import SequentialState
from sim.model import PEFT_PREFIX, Adapter, Foundation, load_adapter, save_adapter, target_module_names

LOG_FILE = "log.jsonl"
COMMITS_DIR = "commits"
DISTILLED_FILE = "distilled.npz"
META_FILE = "meta.json"
SIGNATURE_KEY = "signature"          # in ``Commit.meta``: HMAC-SHA256 of the content hash (not logged, not hashed)


# ------------------------------------------------------------------------------------------
# Commits
# ------------------------------------------------------------------------------------------
@dataclass
class Commit:
    """What an institution sends: its adapter, its distilled set, and where in main's history it started.

    ``id``: the contribution id (``instNNN-KK``), the idempotency key. ``pulled_version``: the main version the
    adapter started from (0 with ``init_from: base``); staleness = main version on arrival − ``pulled_version``.
    ``meta``: local numbers (train/distil time, losses, val accuracy); not part of the content hash.
    """

    id: str
    institution: int
    task: str
    classes: tuple[str, ...]
    adapter: Adapter
    distilled: DistilledSet
    pulled_version: int = 0
    t_pull: float = 0.0
    t_commit: float = 0.0
    meta: dict = field(default_factory=dict)

    def record(self) -> dict:
        """Flat description (no tensors): ``meta.json`` and the log line carry it."""
        return {"id": self.id, "institution": self.institution, "task": self.task, "classes": list(self.classes),
                "pulled_version": self.pulled_version, "t_pull": self.t_pull, "t_commit": self.t_commit,
                "adapter_bytes": self.adapter.num_bytes(), "distilled_bytes": self.distilled.num_bytes(),
                "n_distilled": len(self.distilled), "distill_method": self.distilled.method,
                "hash": self.content_hash()} | {k: v for k, v in self.meta.items()
                                                if is_flat(v) and k != SIGNATURE_KEY}

    def content_hash(self) -> str:
        """SHA-256 of what defines the commit: id, institution, task, classes, pulled version, adapter tensors
        (float32, sorted keys), scaling, head, distilled images and labels. Survives a save/load round trip."""
        h = hashlib.sha256()
        h.update(json.dumps([self.id, int(self.institution), self.task, list(self.classes), int(self.pulled_version),
                             float(self.adapter.alpha), sorted(self.adapter.alpha_pattern.items())]).encode())
        for name, tensors in (("lora", self.adapter.weights), ("head", self.adapter.head or {})):
            for k in sorted(tensors):
                h.update(f"{name}:{k}:{tuple(tensors[k].shape)}".encode())
                h.update(tensors[k].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        h.update(np.ascontiguousarray(self.distilled.x, dtype=np.float32).tobytes())
        h.update(np.ascontiguousarray(self.distilled.y, dtype=np.int64).tobytes())
        return h.hexdigest()


def institution_key(secret: bytes, institution: int) -> bytes:
    """The key institution ``institution`` signs its commits with: HMAC-SHA256 of its id under the run's secret, so
    the merge actor needs only the secret and no institution can sign for another."""
    return hmac.new(secret, f"forgesim-institution:{int(institution)}".encode(), hashlib.sha256).digest()


def sign_commit(commit: Commit, key: bytes) -> Commit:
    """``commit`` carrying its signature: HMAC-SHA256 of its content hash under ``key``."""
    signature = hmac.new(key, commit.content_hash().encode(), hashlib.sha256).hexdigest()
    return dataclasses.replace(commit, meta=dict(commit.meta) | {SIGNATURE_KEY: signature})


def check_signature(commit, secret: bytes, institutions: Mapping[int, object]) -> str | None:
    """Why ``commit`` is not authentic (not a commit, unknown institution, missing or wrong signature), or ``None``."""
    if not isinstance(commit, Commit):
        return f"not a commit: {type(commit).__name__}"
    if commit.institution not in institutions:
        return f"unknown institution {commit.institution!r}"
    signature = commit.meta.get(SIGNATURE_KEY) if isinstance(commit.meta, dict) else None
    if not isinstance(signature, str):
        return f"commit {commit.id} carries no signature"
    expected = hmac.new(institution_key(secret, commit.institution), commit.content_hash().encode(),
                        hashlib.sha256).hexdigest()
    if not hmac.compare_digest(signature, expected):
        return f"commit {commit.id} has an invalid signature for institution {commit.institution}"
    return None


def expected_shapes(foundation: Foundation, cfg: SimConfig) -> dict[str, tuple[int, int]]:
    """``{peft key: shape}`` every commit's adapter must have: the configured modules at the configured rank."""
    shapes = {}
    for m in target_module_names(cfg.lora, foundation.block_count()):
        out_f, in_f = foundation.weight(m).shape
        shapes[f"{PEFT_PREFIX}{m}.lora_A.weight"] = (cfg.lora.rank, in_f)
        shapes[f"{PEFT_PREFIX}{m}.lora_B.weight"] = (out_f, cfg.lora.rank)
    return shapes


def validate_commit(commit, *, institutions: Mapping[int, tuple[str, Sequence[str]]], fingerprint: str,
                    shapes: Mapping[str, tuple[int, ...]], img_size: int) -> str | None:
    """Why ``commit`` must be rejected, or ``None`` if it is acceptable.

    ``institutions``: ``{id: (task, classes)}`` of the cohort; ``fingerprint``: the foundation's;
    ``shapes``: ``expected_shapes``; ``img_size``: the distilled images' side.
    """
    if not isinstance(commit, Commit):
        return f"not a commit: {type(commit).__name__}"
    if not isinstance(commit.id, str) or not commit.id:
        return f"commit id must be a non-empty string, got {commit.id!r}"
    if commit.institution not in institutions:
        return f"unknown institution {commit.institution!r}"
    task, classes = institutions[commit.institution]
    if commit.task != task or tuple(commit.classes) != tuple(classes):
        return (f"institution {commit.institution} holds task {task!r} with classes {list(classes)}, the commit says "
                f"{commit.task!r} with {list(commit.classes)}")
    adapter = commit.adapter
    if not isinstance(adapter, Adapter):
        return f"adapter is not an Adapter: {type(adapter).__name__}"
    if adapter.base_fingerprint != fingerprint:
        return f"adapter base fingerprint {adapter.base_fingerprint} is not the foundation's {fingerprint}"
    missing = sorted(set(shapes) - set(adapter.weights))
    extra = sorted(set(adapter.weights) - set(shapes))
    if missing or extra:
        return f"adapter modules differ from the configured ones: missing {missing[:3]}, unexpected {extra[:3]}"
    for key, shape in shapes.items():
        if tuple(adapter.weights[key].shape) != tuple(shape):
            return f"adapter tensor {key} has shape {tuple(adapter.weights[key].shape)}, expected {tuple(shape)}"
    for name, tensors in (("adapter tensor", adapter.weights), ("head tensor", adapter.head or {})):
        for key, t in tensors.items():
            if not torch.isfinite(t).all():
                kind = "NaN" if torch.isnan(t).any() else "Inf"
                return f"{name} {key} contains {kind}"
    if not math.isfinite(float(adapter.alpha)) or not all(math.isfinite(v) for v in adapter.alpha_pattern.values()):
        return "adapter alpha is not finite"
    ds = commit.distilled
    if not isinstance(ds, DistilledSet):
        return f"distilled set is not a DistilledSet: {type(ds).__name__}"
    if ds.task != task or tuple(ds.classes) != tuple(classes):
        return f"distilled set is of task {ds.task!r} {list(ds.classes)}, the institution's is {task!r} {list(classes)}"
    if len(ds) == 0:
        return "distilled set is empty"
    if ds.x.ndim != 4 or ds.x.shape[1:] != (3, img_size, img_size):
        return f"distilled images have shape {ds.x.shape[1:]}, expected (3, {img_size}, {img_size})"
    if not np.isfinite(ds.x).all():
        return "distilled images contain NaN or Inf"
    if not isinstance(commit.pulled_version, (int, np.integer)) or commit.pulled_version < 0:
        return f"pulled_version must be an integer >= 0, got {commit.pulled_version!r}"
    return None


# ------------------------------------------------------------------------------------------
# The append-only log and the commit dirs
# ------------------------------------------------------------------------------------------
class CommitLog:
    """``log.jsonl`` (append-only, fsync'ed per line) and ``commits/<seq>-<institution>/`` of a run dir."""

    def __init__(self, run_dir: str | Path, create: bool = True) -> None:
        """``create=False``: a read-only view that makes no directory (checking a run dir before a resume)."""
        self.dir = Path(run_dir)
        self.path = self.dir / LOG_FILE
        self.commits_dir = self.dir / COMMITS_DIR
        if create:
            self.commits_dir.mkdir(parents=True, exist_ok=True)

    # -- writing --------------------------------------------------------------------------
    def append(self, record: dict) -> dict:
        """Append one record as a JSON line and fsync it; returns the record."""
        line = json.dumps(json_safe(record), default=str)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        return record

    def append_rejected(self, record: dict) -> dict:
        return self.append({"event": "rejected", "t_wall": time.time()} | record)

    def commit_dir_name(self, seq: int, commit: Commit) -> str:
        return f"{seq:05d}-inst{int(commit.institution):03d}"

    def write_commit(self, seq: int, commit: Commit) -> Path:
        """The commit's dir, complete or absent: written under a temp name, then renamed into place."""
        final = self.commits_dir / self.commit_dir_name(seq, commit)
        return write_commit_dir(commit, final, {"seq": seq})

    def append_accepted(self, seq: int, commit: Commit, record: dict) -> dict:
        """Write the commit dir, then the ``accepted`` line (in that order: a logged commit always has its dir)."""
        path = self.write_commit(seq, commit)
        return self.append(record | {"dir": str(path.relative_to(self.dir))})

    # -- reading --------------------------------------------------------------------------
    def _scan(self) -> tuple[list[dict], int, bool]:
        """``(records, bytes of complete lines, torn)``: a torn last line (a crash mid-write, never acknowledged) is
        left out; a corrupt line before the last is an error naming it."""
        if not self.path.exists():
            return [], 0, False
        lines = self.path.read_bytes().split(b"\n")
        records, good_bytes = [], 0
        for i, line in enumerate(lines):
            if line.strip():
                try:
                    rec = json.loads(line)
                    if not isinstance(rec, dict) or "event" not in rec:
                        raise ValueError("not a log record")
                except ValueError as exc:
                    if all(not rest.strip() for rest in lines[i + 1:]):
                        warnings.warn(f"{self.path}: ignoring a torn last line ({len(line)} bytes): {exc}",
                                      stacklevel=3)
                        return records, good_bytes, True
                    raise ValueError(f"{self.path}: line {i + 1} is corrupted ({exc}); the log cannot be replayed"
                                     ) from None
                records.append(rec)
            good_bytes += len(line) + 1
        return records, good_bytes, False

    def read(self) -> list[dict]:
        """All complete records, in order. Reading never changes the run dir (``repair`` does)."""
        return self._scan()[0]

    def repair(self) -> list[dict]:
        """Before appending again after a crash: drop a torn last line, end the last record with its newline,
        and remove commit dirs the log does not name (written, but never acknowledged). Returns the records."""
        records, good_bytes, torn = self._scan()
        if torn:
            with open(self.path, "r+b") as fh:
                fh.truncate(good_bytes)
        elif self.path.exists() and self.path.stat().st_size and not self.path.read_bytes().endswith(b"\n"):
            with open(self.path, "ab") as fh:
                fh.write(b"\n")
        named = {r["dir"] for r in records if r.get("event") == "accepted"}
        for p in self.commits_dir.iterdir():
            if str(p.relative_to(self.dir)) not in named:
                shutil.rmtree(p, ignore_errors=True)
        return records

    def load_commit(self, record: dict) -> Commit:
        """The commit an ``accepted`` record names, checked against its content hash."""
        path = self.dir / record["dir"]
        try:
            commit = read_commit_dir(path)
        except ValueError as exc:
            raise ValueError(f"commit {record.get('id')} (seq {record.get('seq')}): {exc}") from None
        if commit.content_hash() != record["hash"]:
            raise ValueError(f"commit {record['id']} (seq {record['seq']}): {path} does not match the hash in the "
                             f"log; the commit dir was modified or corrupted")
        return commit

    def load_commits(self, records: Sequence[dict]) -> list[Commit]:
        """The accepted commits of ``records``, in sequence order."""
        accepted = [r for r in records if r.get("event") == "accepted"]
        return [self.load_commit(r) for r in sorted(accepted, key=lambda r: r["seq"])]


_COMMIT_FIELDS = {"id", "institution", "task", "classes", "pulled_version", "t_pull", "t_commit", "seq", "hash",
                  "adapter_bytes", "distilled_bytes", "n_distilled", "distill_method"}


def write_commit_dir(commit: Commit, final: Path, extra: dict | None = None) -> Path:
    """``final``/ = the commit's peft adapter dir, ``distilled.npz`` and ``meta.json`` (its record + ``extra``),
    complete or absent: written and fsync'ed under a temp name, then renamed into place (replacing an orphan)."""
    final = Path(final)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_adapter(commit.adapter, tmp)
    commit.distilled.save(tmp / DISTILLED_FILE)
    (tmp / META_FILE).write_text(json.dumps(json_safe(commit.record() | (extra or {})), indent=2, default=str))
    for p in tmp.iterdir():
        with open(p, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():   # an orphan of a crash between rename and log line, for this very name
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def read_commit_dir(path: Path) -> Commit:
    """The ``Commit`` a commit dir holds (``write_commit_dir``); an unreadable dir is a ``ValueError`` naming it."""
    path = Path(path)
    try:
        meta = json.loads((path / META_FILE).read_text())
        adapter = load_adapter(path)
        distilled = DistilledSet.load(path / DISTILLED_FILE)
        return Commit(meta["id"], int(meta["institution"]), meta["task"], tuple(meta["classes"]), adapter, distilled,
                      int(meta["pulled_version"]), float(meta["t_pull"]), float(meta["t_commit"]),
                      {k: v for k, v in meta.items() if k not in _COMMIT_FIELDS})
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} is unreadable: {exc}") from None


# ------------------------------------------------------------------------------------------
# Branches
# ------------------------------------------------------------------------------------------
class MainBranches:
    """One branch per strategy over the same commit stream.

    fusion/mixture with ``merge.search_mode: sequential``: MedForge's merge as commits arrive (``merge_step``), the
    two stage coefficients searched on the proxy — the latest distilled set of every institution received so far.
    fusion/mixture with ``global``: all N coefficients searched again on each commit. Every other strategy:
    ``merge`` over every accepted adapter, with its default weights — or, with ``schedule.staleness_weighting``,
    each commit's weight times 1/(1 + staleness) (renormalised for the averaging strategies). Searched strategies
    are not staleness-weighted: their coefficients are fitted on the proxy instead.
    """

    def __init__(self, strategies: Sequence[str], cfg: SimConfig, foundation: Foundation) -> None:
        self.strategies = tuple(strategies)
        self.cfg, self.foundation = cfg, foundation
        self.adapters: list[Adapter] = []
        self.staleness: list[int] = []
        self.proxy_sets: dict[int, DistilledSet] = {}
        self.states: dict[str, SequentialState] = {}
        self.merged: dict[str, Adapter | Mixture | None] = {s: None for s in self.strategies}

    def _sequential(self, strategy: str) -> bool:
        return strategy in SEQUENTIAL and self.cfg.merge.search_mode == "sequential"

    def _weights(self, strategy: str, staleness: list[int]) -> np.ndarray | None:
        if not self.cfg.schedule.staleness_weighting:
            return None
        base = default_weights(strategy, len(staleness))
        factor = 1.0 / (1.0 + np.asarray(staleness, dtype=np.float64))
        if np.isclose(base.sum(), 1.0):
            return factor / factor.sum()
        return base * factor

    def propose(self, commit: Commit, seq: int, staleness: int) -> tuple[dict, list[dict]]:
        """Every branch with ``commit`` merged in, without changing this object: ``(update, merge records)``.

        Raises whatever a merge raises; ``apply(update)`` makes the update current.
        """
        adapters = self.adapters + [commit.adapter]
        stale = self.staleness + [staleness]
        proxy_sets = dict(self.proxy_sets) | {commit.institution: commit.distilled}
        proxy = list(proxy_sets.values())
        states, merged, records = {}, {}, []
        for s in self.strategies:
            seed = derive_seed(self.cfg.seed, "merge", s, seq)
            if self._sequential(s):
                state = merge_step(self.states.get(s) or start_sequence(s), commit.adapter, foundation=self.foundation,
                                   proxy=proxy, cfg=self.cfg.merge, seed=seed)
                states[s], merged[s] = state, state.merged
                rec = {k: v for k, v in state.stages[-1].items() if k != "trace"}
                rec["coefficients"] = np.asarray(state.coefficients).tolist()
            else:
                res = merge(s, adapters, self._weights(s, stale), cfg=self.cfg.merge, foundation=self.foundation,
                            proxy=proxy if s in SEQUENTIAL else None, seed=seed)
                merged[s] = res.merged
                rec = res.record()
                if res.coefficients is not None:
                    rec["coefficients"] = np.asarray(res.coefficients).tolist()
            records.append({"event": "merged", "seq": seq, "id": commit.id, "strategy": s} | rec)
        update = {"adapters": adapters, "staleness": stale, "proxy_sets": proxy_sets, "states": states,
                  "merged": merged}
        return update, records

    def apply(self, update: dict) -> None:
        self.adapters, self.staleness = update["adapters"], update["staleness"]
        self.proxy_sets = update["proxy_sets"]
        self.states |= update["states"]
        self.merged |= update["merged"]


# ------------------------------------------------------------------------------------------
# The merge actor's state
# ------------------------------------------------------------------------------------------
class MainState:
    """Main's version, branches and log. ``receive(commit) -> ack`` is the merge actor's whole job.

    ``secret``: the run's secret; with it every commit must be signed (``sign_commit``) with its institution's key.
    ``history``: a strategy whose branch is kept at every version, so ``pull(history, version)`` can answer for a
    past version (a resumed run replays pulls made before its driver died).
    """

    def __init__(self, run_dir: str | Path, cfg: SimConfig, institutions: Mapping[int, tuple[str, Sequence[str]]],
                 foundation: Foundation, strategies: Sequence[str] | None = None, secret: bytes | None = None,
                 history: str | None = None) -> None:
        self.cfg, self.foundation = cfg, foundation
        self.institutions = {int(k): (v[0], tuple(v[1])) for k, v in institutions.items()}
        self.log = CommitLog(run_dir)
        self.branches = MainBranches(strategies or cfg.merge.strategies, cfg, foundation)
        self.shapes = expected_shapes(foundation, cfg)
        self.version = 0
        self.commits: list[Commit] = []
        self.acks: dict[str, dict] = {}        # id -> ack of the accepted commit (with its hash)
        self._records: list[dict] = []         # every log record, in order
        self.secret = secret
        self.history_strategy = history
        self.history: dict[int, Adapter | Mixture | None] = {0: None}

    # -- receiving ------------------------------------------------------------------------
    def _reject(self, commit, reason: str, extra: dict | None = None) -> dict:
        rec = {"event": "rejected", "id": getattr(commit, "id", None), "institution": getattr(commit, "institution", None),
               "reason": reason, "version": self.version, "duplicate": False} | (extra or {})
        if isinstance(getattr(commit, "meta", None), dict) and is_flat(commit.meta.get("injected")):
            rec["injected"] = commit.meta.get("injected")   # a fault-injected copy (sim.faults): say so in the log
        rec = self.log.append_rejected(rec)
        self._records.append(rec)
        return dict(rec)

    def reject(self, reason: str, *, id: str | None = None, institution: int | None = None,
               extra: dict | None = None) -> dict:
        """Log the rejection of a commit that never arrived (its contribution failed); returns the record."""
        return self._reject(SimpleNamespace(id=id, institution=institution), reason, extra)

    def receive(self, commit, extra: dict | None = None) -> dict:
        """Authenticate, validate, merge and log one commit; returns its acknowledgement (after the log line is on
        disk). ``extra``: flat fields added to its log record (how it arrived: bytes received, attempts).

        ack: ``{event: accepted|rejected, id, institution, seq, version, staleness, pulled_version, reason,
        duplicate, hash, ...}``; ``version`` is main's version after this commit.
        """
        # Step 0: authentication.
        if self.secret is not None:
            reason = check_signature(commit, self.secret, self.institutions)
            if reason:
                return self._reject(commit, reason, extra)
        # Step 1: validation (content only).
        reason = validate_commit(commit, institutions=self.institutions, fingerprint=self.foundation.fingerprint,
                                 shapes=self.shapes, img_size=self.cfg.data.img_size)
        if reason:
            return self._reject(commit, reason, extra)
        # Step 2: idempotency by id, then staleness.
        cid = commit.id
        if cid in self.acks:
            if commit.content_hash() == self.acks[cid]["hash"]:
                return self.acks[cid] | {"duplicate": True}
            return self._reject(commit, f"duplicate commit id {cid} with different content (already accepted as "
                                        f"seq {self.acks[cid]['seq']})", extra)
        if commit.pulled_version > self.version:
            return self._reject(commit, f"pulled version {commit.pulled_version} is ahead of main (version "
                                        f"{self.version})", extra)
        # init_from base: every adapter starts from the foundation, so no commit is stale.
        staleness = self.version - int(commit.pulled_version) if self.cfg.schedule.init_from == "main" else 0
        limit = self.cfg.schedule.max_staleness
        if limit >= 0 and staleness > limit:
            return self._reject(commit, f"staleness {staleness} exceeds schedule.max_staleness {limit}", extra)
        # Step 3: tentative merges (a failure changes nothing).
        seq = self.version + 1
        try:
            update, merges = self.branches.propose(commit, seq, staleness)
        except Exception as exc:   # noqa: BLE001 — any merge failure is this commit's rejection reason
            return self._reject(commit, f"merge failed: {type(exc).__name__}: {exc}", extra)
        # Step 4: durable log, then the new state, then the acknowledgement.
        ack = {"event": "accepted", "seq": seq, "version": seq, "staleness": staleness, "reason": None,
               "duplicate": False, "t_wall": time.time()} | commit.record() | (extra or {})
        ack = self.log.append_accepted(seq, commit, ack)
        for rec in merges:
            self.log.append(rec)
        self._apply(commit, ack, update, merges)
        return dict(ack)

    def _apply(self, commit: Commit, ack: dict, update: dict, merges: list[dict]) -> None:
        self.branches.apply(update)
        self.version = ack["seq"]
        self.commits.append(commit)
        self.acks[commit.id] = ack
        self._records += [ack] + merges
        if self.history_strategy is not None:
            self.history[self.version] = self.branches.merged[self.history_strategy]

    # -- reading --------------------------------------------------------------------------
    def pull(self, strategy: str, version: int | None = None) -> tuple[int, Adapter | Mixture | None]:
        """``(version, predictor)`` of ``strategy``'s branch now, or at a past ``version`` (the ``history``
        strategy only); ``None`` before the first commit."""
        if strategy not in self.branches.merged:
            raise ValueError(f"no branch {strategy!r}; branches: {', '.join(self.branches.strategies)}")
        if version is None or version == self.version:
            return self.version, self.branches.merged[strategy]
        if strategy != self.history_strategy or version not in self.history:
            raise ValueError(f"branch {strategy!r} at version {version} is not kept (main is at {self.version})")
        return version, self.history[version]

    def snapshot(self) -> tuple[int, dict[str, Adapter | Mixture | None]]:
        return self.version, dict(self.branches.merged)

    def tasks_seen(self) -> list[str]:
        """Tasks of the accepted commits, in order of first arrival."""
        return list(dict.fromkeys(c.task for c in self.commits))

    def latest_adapters(self) -> dict[int, Adapter]:
        """Each institution's latest accepted adapter."""
        return {c.institution: c.adapter for c in self.commits}

    def records(self) -> list[dict]:
        return [dict(r) for r in self._records]

    # -- restart --------------------------------------------------------------------------
    @classmethod
    def restore(cls, run_dir: str | Path, cfg: SimConfig, institutions: Mapping[int, tuple[str, Sequence[str]]],
                foundation: Foundation, strategies: Sequence[str] | None = None, secret: bytes | None = None,
                history: str | None = None, on_apply: Callable[["MainState"], None] | None = None) -> "MainState":
        """Rebuild from the run dir's log: every acknowledged commit, the branches replayed in sequence order.

        ``on_apply(state)`` is called after each replayed commit (the merge actor re-runs the evaluations that its
        dead predecessor owned).
        """
        state = cls(run_dir, cfg, institutions, foundation, strategies, secret, history)
        records = state.log.repair()
        by_seq = {r["seq"]: r for r in records if r.get("event") == "accepted"}
        for commit in state.log.load_commits(records):
            ack = by_seq[state.version + 1]
            update, merges = state.branches.propose(commit, ack["seq"], int(ack["staleness"]))
            state._apply(commit, ack, update, merges)
            if on_apply is not None:
                on_apply(state)
        state._records = records          # the log's own records (its merge records included), not the replay's
        return state


def save_main(snapshot: Mapping[str, Adapter | Mixture | None], out_dir: str | Path) -> Path:
    """``main/<strategy>/``: a peft adapter dir, or a mixture dir (``save_mixture``); branches without a commit are
    skipped."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for strategy, predictor in snapshot.items():
        if predictor is None:
            continue
        target = out / strategy
        shutil.rmtree(target, ignore_errors=True)
        if isinstance(predictor, Mixture):
            save_mixture(predictor, target)
        else:
            save_adapter(predictor, target)
    return out


def is_flat(v) -> bool:
    """A value a flat record (a parquet column, a log field) can hold."""
    return v is None or isinstance(v, (str, int, float, bool))


def json_safe(value):
    """JSON-safe records: NaN/Inf → null, numpy scalars → Python, keys → str (lists and tuples → lists)."""
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
