"""The clocks as drivers: one ``submit(schedule)`` that applies a schedule to the actors, virtual or wall.

pfl-research's ``Backend`` pattern: the runner has one loop (``actors.runner`` step 3) and picks a driver by
``runtime.clock`` (``DRIVERS``). Both live in the driver process and only forward: a contribution to its
``Institution`` actor (which hands it to a pooled worker), a pull and each commit to the ``MergeActor``. Commits
reach the merge actor one call at a time in the order the driver sends them (``Acks``), so the merge order is the
driver's order:

* ``VirtualDriver``: the schedule's virtual-time order — deterministic whatever the number of workers.
* ``WallDriver``: arrival order in real time, scaled by ``schedule.wall_scale`` (``sim.clock.WallClock`` keeps its
  timetable) — real concurrency, not reproducible.

Fault injection works the same in both: a planned institution kill lands ``faults.kill_delay`` seconds after the
contribution was handed over (``Killer``), and each commit call carries its source, so the merge actor can have a
contribution lost with its institution or worker made again without changing the order.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Mapping

import ray

from sim.attacks import COPYING, attack_of
from sim.clock import WallClock
from sim.config import SimConfig
from sim.faults import FaultPlan
from sim.progress import Progress
from sim.schedule import Contribution, Schedule


class Acks:
    """Calls to the merge actor in merge order, **one in flight at a time**, their acknowledgements collected as they
    complete (so progress moves during submission).

    Why one at a time: Ray does not keep the order of an actor's queued calls across a restart (the calls pending on
    a killed merge actor reach its new process in any order), so with several queued a restart could merge commits
    in another order, answer a pull at another version, or deadlock (a commit whose training waits for a pull queued
    behind it). With one call in flight only that call is retried, and the merge order is the submission order. It
    costs one driver round trip per commit; the pipeline is otherwise unchanged (training is not gated by it).
    """

    def __init__(self, progress: Progress) -> None:
        self.queue: deque[tuple[int, Callable[[], ray.ObjectRef], bool]] = deque()
        self.current: tuple[int, ray.ObjectRef, bool] | None = None
        self.results: dict[int, dict] = {}
        self.n = 0
        self.progress = progress

    def add(self, call: Callable[[], ray.ObjectRef], count: bool = True) -> int:
        """Queue ``call`` (it submits one merge actor call and returns its ref); ``count``: a commit of the schedule
        (not an injected extra), counted by the progress bar. Returns the call's index (its key in ``results``)."""
        self.queue.append((self.n, call, count))
        self.n += 1
        self._start()
        return self.n - 1

    def _start(self) -> None:
        if self.current is None and self.queue:
            index, call, count = self.queue.popleft()
            self.current = (index, call(), count)

    def pending(self) -> list[ray.ObjectRef]:
        """The ref of the call in flight, if any (to wait on together with training refs)."""
        return [self.current[1]] if self.current is not None else []

    def poll(self, timeout: float | None = 0) -> None:
        """Take in whatever acknowledgements are ready, starting the next call after each (``timeout=None``: wait for
        the call in flight)."""
        while self.current is not None:
            index, ref, count = self.current
            done, _ = ray.wait([ref], timeout=timeout, fetch_local=True)
            if not done:
                return
            self.results[index] = ray.get(ref)
            if count:
                self.progress.update(1)
            self.current, timeout = None, 0
            self._start()

    def drain(self) -> None:
        """Wait until every queued call has been answered."""
        while self.current is not None:
            self.poll(None)

    def all(self) -> list[dict]:
        self.drain()
        return [self.results[i] for i in range(self.n)]


class Killer:
    """Fault injection (``faults.kill_institutions``): kills institution actors ``delay`` seconds after it is asked,
    from timer threads, so the kill lands while the contribution is under way. Ray restarts them."""

    def __init__(self) -> None:
        self.timers: list[threading.Timer] = []
        self.kills = 0

    def _kill(self, actor) -> None:
        ray.kill(actor, no_restart=False)
        self.kills += 1

    def kill_later(self, actor, delay: float) -> None:
        timer = threading.Timer(delay, self._kill, (actor,))
        timer.daemon = True
        timer.start()
        self.timers.append(timer)

    def stop(self) -> None:
        for t in self.timers:
            t.cancel()


@dataclass(frozen=True)
class RunActors:
    """What a driver forwards to, and what the run settled before step 3.

    ``pull``: the branch contributions pull (``init_from: main``), else ``None``; ``skip``: contributions the log
    already has (resume); ``pull_versions``: past main versions early pulls are answered at (resumed virtual runs).
    """

    cfg: SimConfig
    institutions: Mapping[int, object]      # institution id -> Institution actor
    merge_actor: object
    pull: str | None
    plan: FaultPlan
    killer: Killer
    skip: frozenset[str] = frozenset()
    pull_versions: Mapping[str, int] = field(default_factory=dict)


class Driver:
    """Applies a schedule to the actors: ``submit(schedule)`` → the acknowledgement of every commit call, in order."""

    def __init__(self, run: RunActors, progress: Progress) -> None:
        self.run = run
        self.acks = Acks(progress)

    def submit(self, schedule: Schedule) -> list[dict]:
        raise NotImplementedError

    def _pull_call(self, c: Contribution, version: int | None = None) -> ray.ObjectRef | None:
        """The merge actor call ``c`` pulls with (``None``: it pulls nothing): main's branch (``init_from: main``) or,
        for a free rider (``sim.attacks``), the accepted commit it copies; at ``version`` when given (resumed runs)."""
        if attack_of(self.run.cfg, c) in COPYING:
            return self.run.merge_actor.pull_accepted.remote(c.institution, c.id, version)
        if self.run.pull:
            return self.run.merge_actor.pull.remote(self.run.pull, version)
        return None

    def _contribute(self, c: Contribution, pulled: list | None) -> list[ray.ObjectRef]:
        """Hand ``c`` to its institution (``pulled``: ``[ref]`` to the pull's answer); returns the refs of its commit
        and, if one is planned, of a corrupted copy. A planned kill of the institution lands ``kill_delay`` s later."""
        institution = self.run.institutions[c.institution]
        refs = ray.get(institution.contribute.remote(c, pulled))
        if c.id in self.run.plan.killed:
            self.run.killer.kill_later(institution, self.run.cfg.faults.kill_delay)
        return refs

    def _commit(self, c: Contribution, pulled: list | None, refs: list[ray.ObjectRef], injected: str) -> int:
        """Queue ``c``'s commit, then its corrupted copy (noted as ``injected``), for the merge actor; returns the
        index of the last call in ``self.acks``."""
        institution, merge_actor = self.run.institutions[c.institution], self.run.merge_actor
        for index, ref in enumerate(refs):
            note = {"injected": injected} if index else None
            last = self.acks.add(lambda ref=ref, source=(institution, c, pulled, index), note=note:
                                 merge_actor.commit.remote([ref], source, note), count=not index)
        return last


class VirtualDriver(Driver):
    """Step 3 with the virtual clock: every event submitted in virtual-time order.

    A pull is a merge actor call made after every earlier commit is answered; a contribution depends on its pull
    through an object ref, and everything else runs in parallel on the pool. At most ``runtime.workers + 1``
    contributions are in flight at once: Ray does not run queued tasks of different owners in submission order, so
    without the window the pool could train late contributions first while the merge actor waits for an early one.
    With it, the pool works in virtual-time order and merges and evaluations overlap training. The merge order never
    depends on it (commits reach the merge actor one at a time in schedule order, see ``Acks``).
    """

    def submit(self, schedule: Schedule) -> list[dict]:
        run, window = self.run, self.run.cfg.runtime.workers + 1
        pending: dict[str, tuple] = {}
        in_flight: list[ray.ObjectRef] = []
        by_id = {c.id: c for c in schedule.contributions}
        for ev in schedule.events():
            cid = ev["contribution"]
            if cid in run.skip:
                continue
            if ev["event"] == "pull":
                while len(in_flight) >= window:
                    ready, _ = ray.wait(in_flight + self.acks.pending(), num_returns=1, timeout=1.0,
                                        fetch_local=False)
                    in_flight = [r for r in in_flight if r not in ready]
                    self.acks.poll()
                pulled = self._pull(by_id[cid])
                refs = self._contribute(by_id[cid], pulled)
                pending[cid] = (by_id[cid], pulled, refs)
                in_flight.append(refs[0])
            elif ev["event"] == "commit":
                c, pulled, refs = pending.pop(cid)
                self._commit(c, pulled, refs, run.plan.corrupt.get(cid, "corrupt"))
            self.acks.poll()
        return self.acks.all()

    def _pull(self, c: Contribution) -> list | None:
        """``[ref]`` to what ``c`` pulls as of this point of the schedule (every commit before it answered first), or
        ``None`` when it pulls nothing."""
        if attack_of(self.run.cfg, c) not in COPYING and not self.run.pull:
            return None
        self.acks.drain()
        pull_ref = self._pull_call(c, self.run.pull_versions.get(c.id))
        ray.wait([pull_ref], fetch_local=False)
        return [pull_ref]


class WallDriver(Driver):
    """Step 3 with the wall clock: contributions start at their scaled pull times and commits are sent when their
    training is done plus the scaled delay (``sim.clock.WallClock``); the merge order is the order they are sent.

    Contributions the merge actor has accepted already (a restored or resumed run) or in ``skip`` are not made again.
    A pull is answered with main as it is when the merge actor receives it.
    """

    def submit(self, schedule: Schedule) -> list[dict]:
        run = self.run
        done = set(ray.get(run.merge_actor.accepted_ids.remote())) | set(run.skip)
        clock = WallClock(schedule, time.time() + 0.5, run.cfg.schedule.wall_scale, done)
        training: dict[ray.ObjectRef, tuple] = {}      # ref of the genuine commit -> (c, pulled, refs)
        trained: dict[str, tuple] = {}                  # id -> (pulled, refs), trained, waiting for its delay
        answers: dict[int, Contribution] = {}           # index in acks of a contribution's last call -> it
        while not clock.finished:
            now = time.time()
            for c in clock.due_starts(now):
                call = self._pull_call(c)
                pulled = [call] if call is not None else None
                refs = self._contribute(c, pulled)
                training[refs[0]] = (c, pulled, refs)
            for c in clock.due_commits(now):
                answers[self._commit(c, *trained.pop(c.id), "corrupt")] = c
            for ref in self._wait(list(training), clock.next_due()):
                c, pulled, refs = training.pop(ref)
                trained[c.id] = (pulled, refs)
                clock.trained(c, time.time())
            for index in [i for i in answers if i in self.acks.results]:
                clock.acknowledged(answers.pop(index))
        return self.acks.all()

    def _wait(self, training: list[ray.ObjectRef], due: float | None) -> list[ray.ObjectRef]:
        """Wait until a training finishes, an acknowledgement comes or ``due`` (at most 1 s); the finished trainings."""
        timeout = min(1.0, max(0.0, due - time.time())) if due is not None else 1.0
        refs = training + self.acks.pending()
        if refs:
            ready, _ = ray.wait(refs, num_returns=1, timeout=timeout, fetch_local=False)
        else:
            time.sleep(timeout)
            ready = []
        self.acks.poll()
        return [r for r in ready if r in training]


DRIVERS: dict[str, type[Driver]] = {"virtual": VirtualDriver, "wall": WallDriver}
