"""The wall clock's timetable: when, in real seconds, each institution starts a contribution and sends its commit.

Under ``runtime.clock: wall`` the schedule's virtual times are scaled by ``schedule.wall_scale`` and the merge order
is the order commits arrive (real concurrency, not reproducible). An institution works on one contribution at a
time, as in the schedule: it starts its next one at ``start + t_pull · scale`` or, when it is late, as soon as its
previous commit is acknowledged; a commit is sent ``delay · scale`` seconds after its training has finished.
``WallClock`` only keeps this timetable (plain Python, tested without Ray); the wall driver (``actors.drivers``)
asks it what is due, does it, and tells it what happened.
"""
from __future__ import annotations

import heapq
from collections import deque
from typing import Iterable

from sim.schedule import Contribution, Schedule


class WallClock:
    """The timetable of one wall-clock run: starts that are due, commits that are due, and what is under way."""

    def __init__(self, schedule: Schedule, start: float, scale: float, skip: Iterable[str] = ()) -> None:
        """``start``: the real time of virtual time 0; ``skip``: contributions not to make (the log has them)."""
        skip = set(skip)
        self.start, self.scale = start, scale
        self.queues: dict[int, deque[Contribution]] = {}
        for c in sorted(schedule.contributions, key=lambda c: (c.institution, c.index)):
            if c.id not in skip:
                self.queues.setdefault(c.institution, deque()).append(c)
        self.busy: dict[int, Contribution] = {}          # institution -> its contribution under way
        self.sending: list[tuple[float, int, int, Contribution]] = []   # heap of (due, institution, index, c)

    def start_time(self, c: Contribution) -> float:
        """When ``c`` is due to start: its scaled pull time."""
        return self.start + c.t_pull * self.scale

    def due_starts(self, now: float) -> list[Contribution]:
        """The contributions to start now (their institution is free and their time has come), marked under way."""
        due = sorted((self.start_time(q[0]), i) for i, q in self.queues.items()
                     if q and i not in self.busy and self.start_time(q[0]) <= now)
        started = []
        for _, i in due:
            self.busy[i] = self.queues[i].popleft()
            started.append(self.busy[i])
        return started

    def trained(self, c: Contribution, now: float) -> None:
        """``c``'s training finished at ``now``: its commit is due ``delay · scale`` later."""
        heapq.heappush(self.sending, (now + c.delay * self.scale, c.institution, c.index, c))

    def due_commits(self, now: float) -> list[Contribution]:
        """The commits to send now, in the order they are due (= the merge order)."""
        out = []
        while self.sending and self.sending[0][0] <= now:
            out.append(heapq.heappop(self.sending)[3])
        return out

    def acknowledged(self, c: Contribution) -> None:
        """``c``'s commit was answered: its institution may start its next contribution."""
        if self.busy.get(c.institution) == c:
            del self.busy[c.institution]

    def next_due(self) -> float | None:
        """The earliest real time something is due (a start of a free institution, a commit), ``None`` if nothing."""
        times = [self.start_time(q[0]) for i, q in self.queues.items() if q and i not in self.busy]
        times += [self.sending[0][0]] if self.sending else []
        return min(times, default=None)

    @property
    def finished(self) -> bool:
        """Every contribution started, and every one started has been acknowledged."""
        return not self.busy and not any(self.queues.values())
