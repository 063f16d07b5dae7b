"""What asynchrony costs and buys, per run: accuracy over virtual time, time to target accuracy, staleness and idle
time.

Pure functions over a run's schedule, its merge actor's log and its evaluation records (no Ray, no torch), so the
summary (``sim.summary``) computes them and tests check them on hand-made inputs.

* **Accuracy over virtual time** (``accuracy_curves``): main reaches version ``v`` when its ``v``-th accepted commit is
  merged, at that commit's ``t_commit`` (``version_times``; version 0, the foundation, at 0). The curve of a
  strategy is the step function ``acc(t)`` = the mean over tasks of the evaluation of the last evaluated version
  merged at or before ``t``; of several versions merged at the same instant (a synchronous round's barrier) only
  the last counts, since main passes through the others within no time.
* **Time to target** (``time_to_target``, FedScale's time-to-accuracy, Lai et al. 2022): the first virtual time at
  which ``acc(t) >= fraction × final`` (``TARGET_FRACTION`` = 0.9 of the curve's final accuracy).
* **Staleness** (``staleness_counts``): of each accepted commit, main's version on its arrival minus the version it
  pulled (the merge actor's, ``sim.main_state``); with synchronous rounds, the round's commits merged before it at
  the barrier.
* **Idle time** (``idle_times``): see its docstring.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from sim.schedule import Schedule

__all__ = ["TARGET_FRACTION", "version_times", "accuracy_curves", "time_to_target", "staleness_counts",
           "idle_times", "summarise_asynchrony"]

TARGET_FRACTION = 0.9


def version_times(log: Sequence[dict]) -> dict[int, float]:
    """``{version: virtual time main reached it}``: 0 at 0, version ``v`` at the ``t_commit`` of the accepted commit
    with ``seq`` ``v`` (one record per seq: a duplicate acknowledgement repeats it)."""
    times = {0: 0.0}
    for r in log:
        if r.get("event") == "accepted" and r.get("seq") is not None and r.get("t_commit") is not None:
            times[int(r["seq"])] = float(r["t_commit"])
    return times


def accuracy_curves(evals: Sequence[dict], times: Mapping[int, float]) -> dict[str, list[tuple[float, float]]]:
    """Per strategy, its accuracy over virtual time as ``[(t, acc), ...]`` in time order (see the module docstring).

    Args:
        evals: evaluation records ``{version, strategy, task, acc}`` (version >= 0; references are left out by the
            caller).
        times: ``version_times``; a version without a time is left out.
    Returns:
        strategy -> points, one per distinct time: the mean accuracy over tasks of the last version merged then.
    """
    by: dict[str, dict[int, list[float]]] = {}
    for r in evals:
        v = int(r["version"])
        if v in times and r.get("acc") is not None and not math.isnan(float(r["acc"])):
            by.setdefault(r["strategy"], {}).setdefault(v, []).append(float(r["acc"]))
    curves = {}
    for strategy, per_version in by.items():
        last: dict[float, tuple[int, float]] = {}
        for v, accs in per_version.items():
            t = times[v]
            if t not in last or v > last[t][0]:
                last[t] = (v, float(np.mean(accs)))
        curves[strategy] = [(t, last[t][1]) for t in sorted(last)]
    return curves


def time_to_target(curve: Sequence[tuple[float, float]], fraction: float = TARGET_FRACTION,
                   final: float | None = None) -> float:
    """The first virtual time at which the curve reaches ``fraction × final`` (``final``: its last accuracy).

    NaN for an empty curve, a NaN final accuracy, or a ``final`` the curve never reaches (its own last accuracy it
    always does).
    """
    if not curve:
        return math.nan
    final = curve[-1][1] if final is None else final
    if final is None or math.isnan(final):
        return math.nan
    target = fraction * final
    return next((float(t) for t, acc in curve if acc >= target), math.nan)


def staleness_counts(log: Sequence[dict]) -> dict[int, int]:
    """``{staleness: number of accepted commits with it}`` (sorted by staleness), one per accepted commit id."""
    accepted = {r["id"]: r for r in log if r.get("event") == "accepted" and r.get("staleness") is not None}
    counts: dict[int, int] = {}
    for r in accepted.values():
        counts[int(r["staleness"])] = counts.get(int(r["staleness"]), 0) + 1
    return dict(sorted(counts.items()))


def idle_times(schedule: Schedule) -> list[dict]:
    """Per institution with at least one contribution, how its virtual time between its first pull and the merge
    of its last commit was spent.

    For institution ``i`` with contributions ``c_0 … c_{m-1}`` (in order):

    * ``busy`` = Σ (``train_time + delay``): training and uploading;
    * ``span`` = ``t_commit(c_{m-1}) − t_pull(c_0)``: from its first pull to the merge of its last commit;
    * ``idle`` = ``span − busy`` = Σ_{k < m-1} (``t_pull(c_{k+1}) − t_arrive(c_k)``) + the barrier wait of
      ``c_{m-1}``: the time between a commit's arrival and the institution's next pull (for its last commit, that
      commit's merge) in which it neither trains nor uploads — waiting for a round's barrier (``sync_rounds``: for
      the round's slowest member) or with nothing to do (its next contribution's arrival has not come).

    Time before the first pull and after the last commit is merged is not counted: the institution has no
    contribution of the budget left to make. ``fast`` marks the faster half of the cohort (the ``ceil(n / 2)``
    institutions of highest speed, ties by id).
    """
    n = len(schedule.speeds)
    ranked = sorted(range(n), key=lambda i: (-schedule.speeds[i], i))
    fast = set(ranked[:math.ceil(n / 2)])
    out = []
    for i in range(n):
        mine = schedule.for_institution(i)
        if not mine:
            continue
        busy = sum(c.train_time + c.delay for c in mine)
        span = mine[-1].t_commit - mine[0].t_pull
        # summed gap by gap (not span - busy), so back-to-back contributions give exactly 0
        idle = sum(b.t_pull - a.t_arrive for a, b in zip(mine, mine[1:])) + mine[-1].barrier_wait
        out.append({"institution": i, "speed": float(schedule.speeds[i]), "fast": i in fast,
                    "contributions": len(mine), "busy": float(busy), "span": float(span),
                    "idle": float(max(0.0, idle)), "t_last": float(mine[-1].t_commit)})
    return out


def _share(rows: Sequence[dict]) -> float:
    span = sum(r["span"] for r in rows)
    return sum(r["idle"] for r in rows) / span if span > 0 else math.nan


def summarise_asynchrony(schedule: Schedule, log: Sequence[dict], evals: Sequence[dict], protocol: str,
                         fraction: float = TARGET_FRACTION) -> tuple[dict, dict[str, float]]:
    """``summary.json``'s ``asynchrony`` block and each strategy's time to target.

    Returns:
        ``(block, {strategy: time to target})``; the block holds the protocol, the target fraction, ``t_end``
        (virtual time of the last accepted merge), ``staleness_counts``, ``stale_rejected`` (commits rejected for
        ``schedule.max_staleness``), the idle shares (Σ idle / Σ span) of all and of the fast institutions, the fast
        institutions' mean idle time and the per-institution rows of ``idle_times``.
    """
    times = version_times(log)
    curves = accuracy_curves(evals, times)
    targets = {s: time_to_target(c, fraction) for s, c in curves.items()}
    rows = idle_times(schedule)
    fast = [r for r in rows if r["fast"]]
    block = {"protocol": protocol, "target_fraction": fraction, "t_end": max(times.values()),
             "staleness_counts": {str(k): n for k, n in staleness_counts(log).items()},
             "stale_rejected": sum(r.get("event") == "rejected" and str(r.get("reason", "")).startswith("staleness")
                                   for r in log),
             "idle_share": _share(rows), "idle_share_fast": _share(fast),
             "idle_fast": float(np.mean([r["idle"] for r in fast])) if fast else math.nan,
             "institutions": rows}
    return block, targets
