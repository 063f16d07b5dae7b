"""The merge actor's state: main's version, its branches and its log, and the loop that receives one commit.

Plain Python (no Ray): ``actors.merge_actor.MergeActor`` builds a ``MainState`` and forwards to it; the tests drive
it directly. Loop per received commit (``MainState.receive``):

Step 0  authentication (when the state has the run's secret): ``sim.commit.check_signature``; an unknown
        institution or a missing or wrong signature is rejected.
Step 1  validation (``sim.commit.validate_commit``): content only.
Step 2  idempotency: a commit id seen before with the same content gets its original acknowledgement back
        (``duplicate: true``); the same id with other content is rejected. Then staleness against
        ``schedule.max_staleness``.
Step 2b the gate (``gate.checks``, ``sim.gate``): norm, cosine and fit before any merge; a failed check rejects the
        commit with its measured value. At the cold start (``gate.cold_start: hold``: norm checked, fewer than
        ``gate.min_history`` accepted) the commit is held instead — its dir and a ``held`` line logged, no branch
        changed — until each can be judged against ``min_history`` others (held or accepted); then their norms are
        judged and each held commit, in arrival order, goes on through the other checks and steps 3-4 (``finish``
        takes on those a run ends holding).
Step 3  merge into every strategy's branch (``sim.branches.MainBranches``) — tentatively: merges are pure, nothing
        is replaced yet, so a merge that fails rejects the commit and changes no branch. The gate's regression
        check scores the tentative ``gate_branch`` here; failing it rejects the commit just the same.
Step 4  durable log (``sim.commit_log.CommitLog``): the commit dir, then the ``accepted`` line. Only then do the new
        branches replace the old ones and the acknowledgement go out. A restarted actor (``MainState.restore``)
        repairs the log, loads the commit dirs it names and replays the merges, which are deterministic.

At the end, ``save_main`` writes ``main/<strategy>/`` into the run dir.
"""
from __future__ import annotations

import os
import pickle
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Mapping, Sequence

from sim.branches import MainBranches, Predictor, save_main
from sim.commit import Commit, check_signature, expected_shapes, validate_commit
from sim.commit_log import CommitLog, pending_held
from sim.config import SimConfig
from sim.gate import Gate, failure, log_fields
from sim.model import Adapter, Foundation
from sim.records import is_flat

MAIN_DIR = "main"
# the fields of a ``held`` record that are neither the commit's nor how it arrived (``MainState._hold``)
HELD_FIELDS = frozenset({"event", "version", "staleness", "duplicate", "t_wall", "reason", "dir"})


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
        self.history: dict[int, Predictor] = {0: None}
        self.gate = Gate(cfg, foundation) if cfg.gate.checks else None
        self.held: list[tuple[Commit, int, dict, dict]] = []   # (commit, staleness, extra, its held record)

    # -- receiving ------------------------------------------------------------------------
    def _reject(self, commit, reason: str, extra: dict | None = None) -> dict:
        rec = {"event": "rejected", "id": getattr(commit, "id", None), "institution": getattr(commit, "institution", None),
               "reason": reason, "version": self.version, "duplicate": False} | (extra or {})
        if isinstance(getattr(commit, "meta", None), dict) and is_flat(commit.meta.get("injected")):
            rec["injected"] = commit.meta.get("injected")   # a fault-injected copy (sim.faults): say so in the log
        if isinstance(getattr(commit, "meta", None), dict) and is_flat(commit.meta.get("attack")):
            rec["attack"] = commit.meta.get("attack")       # a malicious institution's (sim.attacks): for the measures
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
        held = next((rec for c, _, _, rec in self.held if c.id == cid), None)
        if held is not None:
            if commit.content_hash() == held["hash"]:
                return dict(held) | {"duplicate": True}
            return self._reject(commit, f"duplicate commit id {cid} with different content (held at the gate's "
                                        f"cold start)", extra)
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
        if self.gate is not None and self.gate.holds():
            return self._hold(commit, staleness, extra)
        return self._judge(commit, staleness, extra)

    def _judge(self, commit, staleness: int, extra: dict | None, held_norm=None) -> dict:
        """Steps 2b-4 of ``receive``; ``held_norm``: the commit's norm check when it was judged while held."""
        # Step 2b: the gate's checks that need no merge.
        t_gate = time.perf_counter()
        checks = self.gate.precheck(commit, held_norm) if self.gate is not None else []
        gate_s = time.perf_counter() - t_gate
        if failure(checks):
            return self._reject(commit, failure(checks), (extra or {}) | log_fields(checks) | {"gate_s": gate_s})
        # Step 3: tentative merges (a failure changes nothing), then the gate's regression check on them.
        seq = self.version + 1
        try:
            update, merges = self.branches.propose(commit, seq, staleness)
        except Exception as exc:   # noqa: BLE001 — any merge failure is this commit's rejection reason
            return self._reject(commit, f"merge failed: {type(exc).__name__}: {exc}", extra)
        if self.gate is not None and "regression" in self.cfg.gate.checks:
            t_gate, branch = time.perf_counter(), self.cfg.gate_branch
            received = self.branches.arrived.seen(len(self.branches.arrived) - 1) if len(self.branches.arrived) else []
            checks.append(self.gate.regression(commit, self.branches.predictor(branch), update["merged"][branch],
                                               received))
            gate_s += time.perf_counter() - t_gate
            if failure(checks):
                return self._reject(commit, failure(checks), (extra or {}) | log_fields(checks) | {"gate_s": gate_s})
        if self.gate is not None:
            extra = (extra or {}) | log_fields(checks) | {"gate_s": gate_s}
        # Step 4: durable log, then the new state, then the acknowledgement.
        ack = {"event": "accepted", "seq": seq, "version": seq, "staleness": staleness, "reason": None,
               "duplicate": False, "t_wall": time.time()} | commit.record() | (extra or {})
        ack = self.log.append_accepted(seq, commit, ack)
        for rec in merges:
            self.log.append(rec)
        self._apply(commit, ack, update, merges)
        return dict(ack)

    # -- the gate's cold start ---------------------------------------------------------------
    def _hold(self, commit: Commit, staleness: int, extra: dict | None) -> dict:
        """Hold ``commit`` (its dir, then a ``held`` line); once the held ones have a ``Gate.quorum``, take them on
        (``_release``) and return this commit's acknowledgement (``released``: how many), else its ``held`` record."""
        g = self.cfg.gate
        rec = {"event": "held", "version": self.version, "staleness": staleness, "duplicate": False,
               "t_wall": time.time(), "reason": f"held at the gate's cold start: {len(self.gate.norms)} accepted, "
                                                f"{len(self.held) + 1} held, too few to judge its norm against "
                                                f"gate.min_history {g.min_history} others"} \
            | commit.record() | (extra or {})
        rec = self.log.append_held(commit, rec)
        self._records.append(rec)
        self.held.append((commit, staleness, dict(extra or {}), rec))
        if not self.gate.quorum(len(self.held)):
            return dict(rec)
        acks = self._release()
        return acks[-1] | {"released": len(acks)}

    def _release(self) -> list[dict]:
        """Judge the held commits' norms together (``Gate.held_norms``), then take each, in arrival order, through
        steps 2b-4 with that norm check (its log record says ``held``); returns their acknowledgements."""
        held, self.held = self.held, []
        norms = self.gate.held_norms([c for c, _, _, _ in held]) if held else []
        return [self._judge(c, staleness, extra | {"held": True}, norm)
                for (c, staleness, extra, _), norm in zip(held, norms)]

    def finish(self) -> list[dict]:
        """Take on the commits a run ends holding (fewer than ``gate.min_history`` arrived in all: their norms pass
        unjudged, the other checks run); the merge actor calls it before the final evaluation. Returns their
        acknowledgements (none when nothing is held)."""
        return self._release()

    def _apply(self, commit: Commit, ack: dict, update: dict, merges: list[dict]) -> None:
        if self.gate is not None:
            self.gate.accept(commit)
        self.branches.apply(update)
        self.version = ack["seq"]
        self.commits.append(commit)
        self.acks[commit.id] = ack
        self._records += [ack] + merges
        if self.history_strategy is not None:
            self.history[self.version] = self.branches.predictor(self.history_strategy)

    # -- what the merge actor receives over Ray ---------------------------------------------
    def receive_delivered(self, commit, attempts: int, note: dict | None = None,
                          started: float | None = None) -> dict:
        """``receive`` for a commit that reached the merge actor after ``attempts`` tries: its log record also says
        how it arrived (``note``, ``attempts``, ``received_bytes``: its pickled size); the acknowledgement (not the
        log) carries the training task's seconds and, with ``started`` (``time.perf_counter()`` when the call
        came in), the seconds until the acknowledgement."""
        extra = (note or {}) | {"attempts": attempts}
        extra["received_bytes"] = len(pickle.dumps(commit, protocol=5))
        ack = self.receive(commit, extra)
        ack["task_s"] = commit.meta.get("task_s", 0.0) if hasattr(commit, "meta") else 0.0
        if started is not None:
            ack["ack_s"] = time.perf_counter() - started
        return ack

    def reject_undelivered(self, failure: str, contribution, attempts: int, note: dict | None = None) -> dict:
        """Log that ``contribution`` (a ``sim.schedule`` contribution, or ``None``) produced no commit: its training
        raised, or its result stayed lost after ``attempts`` tries."""
        return self.reject(f"contribution failed: {failure}", id=getattr(contribution, "id", None),
                           institution=getattr(contribution, "institution", None),
                           extra=(note or {}) | {"attempts": attempts})

    def mark_restored(self) -> dict:
        """Log that this process rebuilt the state from the log (a merge actor restart; the summary counts them)."""
        record = self.log.append({"event": "restored", "version": self.version, "t_wall": time.time(),
                                  "pid": os.getpid()})
        self._records.append(record)
        return record

    def save_main(self) -> Path:
        """Every branch now, written to ``main/<strategy>/`` in the run dir (``sim.branches.save_main``)."""
        return save_main(self.branches.snapshot(), self.log.dir / MAIN_DIR)

    def storage_bytes(self) -> dict[str, int]:
        """``{strategy: bytes of its branch now}`` (0 before the first commit)."""
        return {s: (p.num_bytes() if p is not None else 0) for s, p in self.branches.snapshot().items()}

    # -- reading --------------------------------------------------------------------------
    def pull(self, strategy: str, version: int | None = None) -> tuple[int, Predictor]:
        """``(version, predictor)`` of ``strategy``'s branch now, or at a past ``version`` (the ``history``
        strategy only); ``None`` before the first commit."""
        if strategy not in self.branches.strategies:
            raise ValueError(f"no branch {strategy!r}; branches: {', '.join(self.branches.strategies)}")
        if version is None or version == self.version:
            return self.version, self.branches.predictor(strategy)
        if strategy != self.history_strategy or version not in self.history:
            raise ValueError(f"branch {strategy!r} at version {version} is not kept (main is at {self.version})")
        return version, self.history[version]

    def pull_accepted(self, institution: int, contribution_id: str,
                      version: int | None = None) -> tuple[int, Adapter | None]:
        """``(version, adapter)``: what a free rider (``attacks.kind: free_rider``) pulls to copy — one accepted commit
        of another institution on ``institution``'s task among the first ``version`` accepted (default: all now),
        drawn per contribution (``sim.attacks.copy_source``); ``None`` adapter when there is none. The log of
        accepted commits is public, as a forge's history is; this reads it as of the pull."""
        from sim.attacks import copy_source

        v = self.version if version is None else int(version)
        if not 0 <= v <= self.version:
            raise ValueError(f"accepted commits at version {v} are not known (main is at {self.version})")
        if institution not in self.institutions:
            raise ValueError(f"unknown institution {institution}")
        task = self.institutions[institution][0]
        return v, copy_source(self.commits[:v], institution, task, self.cfg.seed, contribution_id)

    def snapshot(self) -> tuple[int, dict[str, Predictor]]:
        return self.version, self.branches.snapshot()

    def tasks_seen(self) -> list[str]:
        """Tasks of the accepted commits, in order of first arrival."""
        return list(dict.fromkeys(c.task for c in self.commits))

    def tasks_to_score(self) -> list[str]:
        """The tasks an evaluation scores (``runtime.eval_tasks``): ``tasks_seen`` (seen), or those first and then
        every other task of the cohort in institution order (all), so accuracy over time is on one fixed set."""
        seen = self.tasks_seen()
        if self.cfg.runtime.eval_tasks != "all":
            return seen
        return list(dict.fromkeys(seen + [self.institutions[i][0] for i in sorted(self.institutions)]))

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
        for rec in pending_held(records):   # still held at the gate's cold start when the log ends
            commit = state.log.load_commit(rec)
            own = commit.record()
            arrival = {k: v for k, v in rec.items() if k not in HELD_FIELDS and k not in own}
            state.held.append((commit, int(rec["staleness"]), arrival, rec))
        return state

    @classmethod
    def open(cls, run_dir: str | Path, cfg: SimConfig, institutions: Mapping[int, tuple[str, Sequence[str]]],
             foundation: Foundation, secret: bytes | None = None, history: str | None = None,
             on_apply: Callable[["MainState"], None] | None = None) -> "MainState":
        """The merge actor's state for ``run_dir``: a new one, or, when the run dir has a log (the actor was
        restarted, or the run is resumed), the ``restore``d one with a ``restored`` record logged."""
        if not CommitLog(run_dir, create=False).path.exists():
            return cls(run_dir, cfg, institutions, foundation, secret=secret, history=history)
        state = cls.restore(run_dir, cfg, institutions, foundation, secret=secret, history=history, on_apply=on_apply)
        state.mark_restored()
        return state
