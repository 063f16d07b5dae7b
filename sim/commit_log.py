"""The durable commit log: a run dir's ``log.jsonl`` and ``commits/`` dirs, their repair and reading after a crash.

Run dir layout written here: ``log.jsonl`` (one JSON record per line: ``accepted``, ``rejected``, ``merged``,
``restored``) and ``commits/<seq>-<institution>/`` (peft adapter dir, ``distilled.npz``, ``meta.json``).
An accepted commit's dir is written to a temp dir and renamed into place, then the ``accepted`` line is appended and
fsync'ed; only then does main change and the acknowledgement go out. After a crash, ``repair`` drops a torn last line
and the orphan dirs of unacknowledged commits, and ``load_commits`` loads the dirs the log names, each checked
against its content hash. ``resume_point`` says what a resumed run's schedule has already been handled.
"""
from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from sim.commit import Commit
from sim.data.base import DistilledSet
from sim.model import load_adapter, save_adapter
from sim.records import json_safe

if TYPE_CHECKING:
    from sim.schedule import Schedule

LOG_FILE = "log.jsonl"
COMMITS_DIR = "commits"
DISTILLED_FILE = "distilled.npz"
META_FILE = "meta.json"


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

    def append_held(self, commit: Commit, record: dict) -> dict:
        """A commit held at the gate's cold start: its dir ``commits/held-<id>/`` (to survive a restart), then the
        ``held`` line."""
        path = write_commit_dir(commit, self.commits_dir / f"held-{commit.id}", {"held": True})
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
        named = {r["dir"] for r in records if r.get("event") == "accepted"} | {r["dir"] for r in pending_held(records)}
        for p in self.commits_dir.iterdir():
            if str(p.relative_to(self.dir)) not in named:
                shutil.rmtree(p, ignore_errors=True)
        return records

    def load_commit(self, record: dict) -> Commit:
        """The commit an ``accepted`` (or ``held``) record names, checked against its content hash."""
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


def pending_held(records: Sequence[dict]) -> list[dict]:
    """The ``held`` records (``gate.cold_start: hold``) of commits the log has not yet accepted or rejected, in
    arrival order."""
    held = {r["id"]: r for r in records if r.get("event") == "held"}
    for r in records:
        if r.get("event") in ("accepted", "rejected") and r.get("held") and r.get("id") in held:
            del held[r["id"]]
    return list(held.values())


def resume_point(schedule: Schedule, records: list[dict]) -> tuple[frozenset[str], dict[str, int]]:
    """What a resumed run skips and where its early pulls stand: ``(handled ids, {id: version to pull at})``.

    Handled: accepted, held at the gate's cold start, or rejected for a reason of its own (not an injected corrupted
    copy). With the virtual clock
    the log holds a prefix of the schedule's commits, so a contribution that pulled before the last handled commit
    pulled the version = accepted commits before its pull event.
    """
    accepted = {r["id"] for r in records if r.get("event") == "accepted"}
    handled = accepted | {r["id"] for r in records
                          if r.get("event") in ("rejected", "held") and r.get("id") and not r.get("injected")}
    remaining, version, versions = len(handled), 0, {}
    for ev in schedule.events():
        if remaining == 0:
            break
        cid = ev["contribution"]
        if ev["event"] == "commit" and cid in handled:
            remaining -= 1
            version += cid in accepted
        elif ev["event"] == "pull" and cid not in handled:
            versions[cid] = version
    return frozenset(handled), versions
