"""The seeded schedule of contributions in virtual time.

An *arrival process* (one registry, ``ARRIVALS``) gives each institution the times at which it would like to
*start* a contribution (pull main and begin local training). ``build_schedule`` turns these into
``Contribution`` s:

* each institution ``i`` has a speed ``s_i = exp(speed_sigma * z_i)``, ``z_i ~ N(0, 1)`` (lognormal(0, sigma);
  exactly 1 when ``speed_sigma = 0``), used by every arrival process;
* training lasts ``train_time / s_i``, times ``straggler_factor`` for a straggler (probability ``straggler_prob``);
* the commit reaches the merge actor after an exponential delay of mean ``commit_delay``:
  ``t_commit = t_pull + train_time + delay``;
* an institution works on one contribution at a time: ``t_pull[k+1] = max(arrival[k+1], t_commit[k])``;
* before each contribution ``k >= 1`` the institution leaves for good with probability ``dropout``, at the
  time it would have pulled.

``schedule.protocol`` says when a commit is merged (``PROTOCOLS``):

* ``async`` (the default, and MedForge's): on arrival, ``t_commit = t_arrive = t_pull + train_time + delay``;
* ``sync_rounds``: synchronous rounds with a barrier (FedAvg's protocol, McMahan et al. 2017). Contribution ``k`` of
  every institution is round ``k``. Round ``k`` starts at ``T_k`` (``T_0 = 0``, ``T_k`` = round ``k - 1``'s barrier);
  each member pulls at ``max(T_k, arrival[k])`` (the arrival process says when it is available), trains and uploads
  as above, and the round's barrier is its slowest member's arrival ``B_k = max t_arrive``. Every commit of the
  round is merged at ``t_commit = B_k`` (in institution order, the virtual clock's tie-break), so fast members wait
  ``B_k - t_arrive`` and the next round's pulls, at ``B_k``, see every commit of the round. An institution that
  drops out before round ``k`` is not waited for. The barrier couples the institutions, so this is a mode of
  ``build_schedule`` and not an arrival process (which draws each institution's start times alone).

Both protocols make the same contributions (same ids, seeds, speeds, stragglers and delays): only the times differ.

The merge order of the virtual clock is ``(t_commit, institution, index)``. Every random draw comes from
``derive_rng(seed, "schedule", ...)`` with a separate stream per institution (and per contribution), so the
same inputs give the identical schedule and changing one institution's draws leaves the others' untouched.
No global RNG state is used. This module is pure (numpy only).
"""
from __future__ import annotations

import bisect
import csv
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from sim.data.base import derive_rng, derive_seed
from sim.registry import lookup

if TYPE_CHECKING:   # annotations only: sim.config checks schedule.arrival against ARRIVALS, so no import cycle
    from sim.config import ScheduleConfig

__all__ = ["Contribution", "Schedule", "ARRIVALS", "PROTOCOLS", "get_arrival", "build_schedule", "read_trace",
           "poisson", "uniform", "periodic", "eager", "trace"]

# schedule.protocol: when a commit is merged (see the module docstring)
PROTOCOLS = ("async", "sync_rounds")

# Same-time events: a commit is merged before a pull at that instant, so the pull sees it.
_EVENT_ORDER = {"commit": 0, "dropout": 1, "pull": 2}


@dataclass(frozen=True)
class Contribution:
    """One pull → train → commit cycle of one institution, in virtual time."""

    id: str            # f"inst{institution:03d}-{index:02d}"
    institution: int
    index: int         # k-th contribution of this institution, 0-based
    t_pull: float      # pulls main and starts training
    t_commit: float    # its commit is merged: on arrival (async), at its round's barrier (sync_rounds)
    train_time: float  # virtual training duration (speed and straggling included)
    delay: float       # virtual time between end of training and the commit's arrival
    straggler: bool
    seed: int          # derive_seed(seed, "contribution", institution, index): training/distillation seed

    @property
    def t_arrive(self) -> float:
        """When the commit has arrived (training and upload done): ``t_pull + train_time + delay``."""
        return self.t_pull + self.train_time + self.delay

    @property
    def barrier_wait(self) -> float:
        """Virtual time the arrived commit waited for its round's barrier before it was merged (0 when async)."""
        return max(0.0, self.t_commit - self.t_arrive)

    def record(self) -> dict:
        """The fields as a flat dict."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Schedule:
    """All contributions of a run, sorted by ``(t_commit, institution, index)`` — the virtual merge order."""

    contributions: tuple[Contribution, ...]
    dropouts: dict[int, float]    # institution -> virtual time it left
    speeds: tuple[float, ...]     # per institution

    def __len__(self) -> int:
        return len(self.contributions)

    def for_institution(self, institution: int) -> list[Contribution]:
        """``institution``'s contributions in the order it makes them."""
        return sorted((c for c in self.contributions if c.institution == institution), key=lambda c: c.index)

    def events(self) -> list[dict]:
        """Flat records ``{event, t_virtual, institution, contribution}``, one per pull, commit and dropout.

        Sorted by ``(t_virtual, commit < dropout < pull, institution, index)``; a dropout's ``contribution``
        is ``None`` (it never started) and it sorts with the index it would have had.
        """
        keyed = []
        for c in self.contributions:
            for event, t in (("pull", c.t_pull), ("commit", c.t_commit)):
                keyed.append(((t, _EVENT_ORDER[event], c.institution, c.index), event, c.id))
        done = {i: sum(c.institution == i for c in self.contributions) for i in self.dropouts}
        for i, t in self.dropouts.items():
            keyed.append(((t, _EVENT_ORDER["dropout"], i, done[i]), "dropout", None))
        keyed.sort(key=lambda item: item[0])
        return [{"event": event, "t_virtual": key[0], "institution": key[2], "contribution": cid}
                for key, event, cid in keyed]

    def expected_staleness(self) -> dict[str, int]:
        """Per contribution id, the commits merged between its pull and its own commit.

        That is the number of commits earlier in merge order whose ``t_commit`` is after its ``t_pull``; a
        commit at exactly ``t_pull`` was merged before the pull. It equals the merge actor's staleness when
        every commit is accepted (a rejected commit does not advance the main branch).
        """
        times = [c.t_commit for c in self.contributions]  # sorted: merge order
        # Commits with t_commit <= t_pull are all before position p, so p minus their count is the answer.
        return {c.id: p - bisect.bisect_right(times, c.t_pull) for p, c in enumerate(self.contributions)}


# --------------------------------------------------------------------------------------------
# Arrival processes: (cfg, speeds, seed) -> per institution, sorted start times
# --------------------------------------------------------------------------------------------
def _arrival_rng(seed: int, institution: int) -> np.random.Generator:
    return derive_rng(seed, "schedule", "arrival", institution)


def poisson(cfg: ScheduleConfig, speeds: Sequence[float], seed: int) -> list[np.ndarray]:
    """``cfg.contributions`` starts per institution with exponential gaps of rate ``cfg.rate * s_i`` from 0."""
    return [np.cumsum(_arrival_rng(seed, i).exponential(1.0 / (cfg.rate * s), cfg.contributions))
            for i, s in enumerate(speeds)]


def uniform(cfg: ScheduleConfig, speeds: Sequence[float], seed: int) -> list[np.ndarray]:
    """``cfg.contributions`` starts per institution, uniform on ``[0, contributions / rate]``, sorted."""
    horizon = cfg.contributions / cfg.rate
    return [np.sort(_arrival_rng(seed, i).uniform(0.0, horizon, cfg.contributions)) for i in range(len(speeds))]


def periodic(cfg: ScheduleConfig, speeds: Sequence[float], seed: int) -> list[np.ndarray]:
    """A start every ``1 / rate``, from a random phase in ``[0, 1 / rate)`` per institution."""
    period = 1.0 / cfg.rate
    return [_arrival_rng(seed, i).uniform(0.0, period) + period * np.arange(cfg.contributions)
            for i in range(len(speeds))]


def trace(cfg: ScheduleConfig, speeds: Sequence[float], seed: int) -> list[np.ndarray]:
    """Start times read from the CSV ``cfg.trace``; an institution makes one contribution per row of it
    (``cfg.contributions`` and ``cfg.rate`` are ignored; an institution without rows makes none)."""
    times = read_trace(cfg.trace, len(speeds))
    return [np.sort(np.asarray(times.get(i, []), dtype=float)) for i in range(len(speeds))]


def eager(cfg: ScheduleConfig, speeds: Sequence[float], seed: int) -> list[np.ndarray]:
    """``cfg.contributions`` starts per institution, all at 0: an institution is always ready, so it starts each
    contribution as soon as it may (its previous commit has arrived, or, with synchronous rounds, its round has
    begun); compute-bound institutions whose only pace is their speed (``cfg.rate`` is ignored)."""
    return [np.zeros(cfg.contributions) for _ in speeds]


ARRIVALS: dict[str, Callable[[ScheduleConfig, Sequence[float], int], list[np.ndarray]]] = {
    "poisson": poisson,
    "uniform": uniform,
    "periodic": periodic,
    "eager": eager,
    "trace": trace,
}


def get_arrival(name: str) -> Callable[[ScheduleConfig, Sequence[float], int], list[np.ndarray]]:
    """Look an arrival process up by name; a typo lists the known names."""
    return lookup(ARRIVALS, name, "arrival process")


def read_trace(path: str | Path | None, n_institutions: int | None = None) -> dict[int, list[float]]:
    """Read a trace CSV with header ``institution,time`` (extra columns ignored) into start times per institution.

    Args:
        path: the CSV file; one row per contribution start, institution ids 0-based, times >= 0.
        n_institutions: if given, an institution id >= it is an error.
    Returns:
        institution -> its start times in file order.
    Raises:
        ValueError naming the file (and line) for a missing file, a bad header or a bad row.
    """
    path = Path(path) if path else None
    if path is None or not path.is_file():
        raise ValueError(f"schedule.trace: trace file {path} does not exist")
    with path.open(newline="") as fh:
        rows = [(n, row) for n, row in enumerate(csv.reader(fh), start=1) if any(v.strip() for v in row)]
    header = [v.strip().lower() for v in rows[0][1]] if rows else []
    if "institution" not in header or "time" not in header:
        raise ValueError(f"schedule.trace: {path} line 1: header must name the columns institution,time, "
                         f"got {','.join(header)!r}")
    if len(rows) < 2:
        raise ValueError(f"schedule.trace: {path} has no rows after its header")
    col_i, col_t = header.index("institution"), header.index("time")
    times: dict[int, list[float]] = {}
    for line, row in rows[1:]:
        inst, t = _trace_row(path, line, row, col_i, col_t, n_institutions)
        times.setdefault(inst, []).append(t)
    return times


def _trace_row(path: Path, line: int, row: list[str], col_i: int, col_t: int, n: int | None) -> tuple[int, float]:
    """One parsed ``(institution, time)`` row of a trace, or a ValueError naming the file and line."""
    where = f"schedule.trace: {path} line {line}"
    if len(row) <= max(col_i, col_t):
        raise ValueError(f"{where}: expected columns institution,time, got {','.join(row)!r}")
    try:
        inst = int(row[col_i].strip())
    except ValueError:
        raise ValueError(f"{where}: institution must be an integer, got {row[col_i]!r}") from None
    try:
        t = float(row[col_t].strip())
    except ValueError:
        raise ValueError(f"{where}: time must be a number, got {row[col_t]!r}") from None
    if not math.isfinite(t) or t < 0:
        raise ValueError(f"{where}: time must be a finite number >= 0, got {row[col_t].strip()!r}")
    if inst < 0 or (n is not None and inst >= n):
        known = f"in [0, {n - 1}]" if n is not None else ">= 0"
        raise ValueError(f"{where}: unknown institution {inst} (ids must be {known})")
    return inst, t


# --------------------------------------------------------------------------------------------
# Building the schedule
# --------------------------------------------------------------------------------------------
def draw_speeds(sigma: float, n_institutions: int, seed: int) -> tuple[float, ...]:
    """Institution speeds ``exp(sigma * z_i)``: lognormal(0, sigma), and one normal draw per institution, so
    changing ``sigma`` rescales the same ranking of institutions."""
    return tuple(float(math.exp(sigma * derive_rng(seed, "schedule", "speed", i).standard_normal()))
                 for i in range(n_institutions))


def _draw(cfg: ScheduleConfig, institution: int, k: int, speed: float, seed: int) -> tuple[bool, bool, float, float]:
    """Contribution ``k``'s own draws: ``(leaves before it, straggles, train_time, delay)``.

    Contribution ``k`` has its own stream, so e.g. changing ``dropout`` never changes a kept contribution, and both
    protocols draw the same contributions.
    """
    rng = derive_rng(seed, "schedule", "contribution", institution, k)
    u_dropout, u_straggler = rng.random(2)
    delay = cfg.commit_delay * float(rng.standard_exponential())
    straggler = bool(u_straggler < cfg.straggler_prob)
    train_time = cfg.train_time / speed * (cfg.straggler_factor if straggler else 1.0)
    return bool(k >= 1 and u_dropout < cfg.dropout), straggler, train_time, delay


def _contribution(institution: int, k: int, t_pull: float, t_commit: float, train_time: float, delay: float,
                  straggler: bool, seed: int) -> Contribution:
    return Contribution(f"inst{institution:03d}-{k:02d}", institution, k, t_pull, t_commit, train_time, delay,
                        straggler, derive_seed(seed, "contribution", institution, k))


def plan_institution(cfg: ScheduleConfig, institution: int, speed: float, arrivals: np.ndarray, seed: int
                     ) -> tuple[list[Contribution], float | None]:
    """One institution's contributions under ``async``, done one at a time from its ``arrivals``, and its dropout
    time (or None)."""
    out: list[Contribution] = []
    t_free = 0.0  # when the previous commit arrived: the institution is busy until then
    for k, t_arrive in enumerate(arrivals):
        leaves, straggler, train_time, delay = _draw(cfg, institution, k, speed, seed)
        t_pull = max(float(t_arrive), t_free)
        if leaves:
            return out, t_pull
        t_free = t_pull + train_time + delay
        out.append(_contribution(institution, k, t_pull, t_free, train_time, delay, straggler, seed))
    return out, None


def plan_rounds(cfg: ScheduleConfig, speeds: Sequence[float], arrivals: Sequence[np.ndarray], seed: int
                ) -> tuple[list[Contribution], dict[int, float]]:
    """Every institution's contributions under ``sync_rounds`` and the dropout times (see the module docstring).

    Round ``k`` holds contribution ``k`` of every institution that has one and has not left; it starts at the
    previous round's barrier and ends at its own, the latest arrival of its members.
    """
    out: list[Contribution] = []
    dropouts: dict[int, float] = {}
    t_round = 0.0
    for k in range(max((len(a) for a in arrivals), default=0)):
        members = []       # (institution, t_pull, train_time, delay, straggler) of round k
        for i, (speed, times) in enumerate(zip(speeds, arrivals)):
            if i in dropouts or k >= len(times):
                continue
            leaves, straggler, train_time, delay = _draw(cfg, i, k, speed, seed)
            t_pull = max(float(times[k]), t_round)
            if leaves:
                dropouts[i] = t_pull
                continue
            members.append((i, t_pull, train_time, delay, straggler))
        if not members:
            break
        barrier = max(t_pull + train_time + delay for _, t_pull, train_time, delay, _ in members)
        out += [_contribution(i, k, t_pull, barrier, train_time, delay, straggler, seed)
                for i, t_pull, train_time, delay, straggler in members]
        t_round = barrier
    return out, dropouts


def build_schedule(cfg: ScheduleConfig, n_institutions: int, seed: int) -> Schedule:
    """The seeded schedule of ``n_institutions`` institutions (see the module docstring for the semantics)."""
    if n_institutions < 1:
        raise ValueError(f"build_schedule needs at least one institution, got {n_institutions}")
    # Step 1: speeds, then each institution's start times from the arrival process.
    speeds = draw_speeds(cfg.speed_sigma, n_institutions, seed)
    arrivals = get_arrival(cfg.arrival)(cfg, speeds, seed)
    # Step 2: each institution's contributions, with stragglers, delays and dropout: one at a time on its own, or in
    # rounds with a barrier.
    contributions: list[Contribution] = []
    dropouts: dict[int, float] = {}
    if cfg.protocol == "sync_rounds":
        contributions, dropouts = plan_rounds(cfg, speeds, arrivals, seed)
    else:
        for i, (speed, times) in enumerate(zip(speeds, arrivals)):
            planned, t_left = plan_institution(cfg, i, speed, times, seed)
            contributions += planned
            if t_left is not None:
                dropouts[i] = t_left
    # Step 3: the merge order of the virtual clock.
    contributions.sort(key=lambda c: (c.t_commit, c.institution, c.index))
    return Schedule(tuple(contributions), dropouts, speeds)
