"""The per-run asynchrony measures (sim.asynchrony) on hand-made logs, evaluations and schedules."""
import math
import subprocess
import sys

import numpy as np
import pytest

from sim.asynchrony import (accuracy_curves, idle_times, staleness_counts, summarise_asynchrony, time_to_target,
                            version_times)
from sim.config import ScheduleConfig
from sim.schedule import build_schedule


def accepted(seq: int, t_commit: float, staleness: int = 0, cid: str | None = None) -> dict:
    return {"event": "accepted", "seq": seq, "id": cid or f"c{seq}", "t_commit": t_commit, "staleness": staleness}


def evals(strategy: str, version: int, accs: list[float]) -> list[dict]:
    return [{"event": "eval", "version": version, "strategy": strategy, "task": f"t{k}", "acc": a}
            for k, a in enumerate(accs)]


def test_time_to_target_on_a_constructed_curve():
    # Prepare: accuracy 0.2 at t=1, 0.5 at 2, 0.8 at 3.5 (> 0.9 x 0.85 = 0.765), 0.7 at 4, 0.85 at 6
    curve = [(1.0, 0.2), (2.0, 0.5), (3.5, 0.8), (4.0, 0.7), (6.0, 0.85)]
    # Execute / Assert: the first time at or above the target, even if the curve dips later
    assert time_to_target(curve) == 3.5
    assert time_to_target(curve, fraction=1.0) == 6.0
    assert time_to_target(curve, fraction=0.5) == 2.0               # 0.425: 0.5 at t=2
    assert time_to_target(curve, final=0.9) == 6.0                   # target 0.81: 0.8 at 3.5 falls short
    assert math.isnan(time_to_target(curve, final=0.95))             # target 0.855: never reached


def test_time_to_target_edges():
    # Execute / Assert
    assert math.isnan(time_to_target([]))
    assert math.isnan(time_to_target([(1.0, float("nan"))]))
    assert math.isnan(time_to_target([(1.0, 0.5)], final=1.0))       # never reached
    assert time_to_target([(1.0, 0.0), (2.0, 0.0)]) == 1.0           # a final accuracy of 0 is reached at once


def test_version_times_and_curves_take_the_last_version_of_an_instant():
    # Prepare: versions 1-3 merged at a barrier at t=4 (3 is the round's last), version 4 at t=7
    log = [accepted(1, 4.0), {"event": "merged", "seq": 1}, accepted(2, 4.0), accepted(3, 4.0),
           {"event": "rejected", "id": "x", "reason": "staleness 9 exceeds schedule.max_staleness 4"},
           accepted(4, 7.0), accepted(4, 7.0)]                       # a duplicate acknowledgement of seq 4
    records = (evals("ties", 1, [0.9, 0.1]) + evals("ties", 2, [0.1, 0.1]) + evals("ties", 3, [0.5, 0.3])
               + evals("ties", 4, [0.6, 0.6]) + evals("svd", 4, [0.2, 0.4]))
    # Execute
    times = version_times(log)
    curves = accuracy_curves(records, times)
    # Assert: mid-barrier versions 1 and 2 never show; the mean over tasks of version 3 stands for t=4
    assert times == {0: 0.0, 1: 4.0, 2: 4.0, 3: 4.0, 4: 7.0}
    assert np.allclose(curves["ties"], [(4.0, 0.4), (7.0, 0.6)]) and len(curves["ties"]) == 2
    assert np.allclose(curves["svd"], [(7.0, 0.3)]) and len(curves["svd"]) == 1
    # ...the curve's time to target: 0.9 x 0.6 = 0.54 first reached at 7
    assert time_to_target(curves["ties"]) == 7.0


def test_staleness_counts_one_per_accepted_commit():
    # Prepare
    log = [accepted(1, 1.0, 0, "a"), accepted(2, 2.0, 2, "b"), accepted(2, 2.0, 2, "b"), accepted(3, 3.0, 0, "c"),
           {"event": "rejected", "id": "d", "staleness": 7}]
    # Execute / Assert
    assert staleness_counts(log) == {0: 2, 2: 1}


def test_summary_block_of_a_sync_schedule():
    # Prepare: 4 eager institutions in 2 synchronous rounds; every commit accepted at its barrier
    schedule = build_schedule(ScheduleConfig(arrival="eager", contributions=2, speed_sigma=1.0,
                                             protocol="sync_rounds"), 4, seed=0)
    stale = schedule.expected_staleness()
    log = [accepted(k + 1, c.t_commit, stale[c.id], c.id) for k, c in enumerate(schedule.contributions)]
    records = [r for k in range(1, 9) for r in evals("ties", k, [k / 10])]
    # Execute
    block, targets = summarise_asynchrony(schedule, log, records, "sync_rounds")
    # Assert: t_end is the second barrier; the target (0.9 x 0.8 = 0.72) is only reached there (version 8, 0.8)
    barriers = sorted({c.t_commit for c in schedule.contributions})
    assert block["t_end"] == barriers[1] and targets == {"ties": barriers[1]}
    assert block["staleness_counts"] == {"0": 2, "1": 2, "2": 2, "3": 2} and block["stale_rejected"] == 0
    # ...idle shares from the per-institution rows, recomputed here
    rows = idle_times(schedule)
    fast = [r for r in rows if r["fast"]]
    assert len(fast) == 2 and all(r["speed"] >= max(q["speed"] for q in rows if not q["fast"]) for r in fast)
    assert block["idle_share"] == pytest.approx(sum(r["idle"] for r in rows) / sum(r["span"] for r in rows))
    assert block["idle_share_fast"] == pytest.approx(sum(r["idle"] for r in fast) / sum(r["span"] for r in fast))
    assert block["idle_fast"] == pytest.approx(np.mean([r["idle"] for r in fast])) and block["idle_fast"] > 0
    # ...every span is the whole run (0 to the last barrier); busy is training plus upload
    for r in rows:
        mine = schedule.for_institution(r["institution"])
        assert r["span"] == pytest.approx(barriers[1])
        assert r["busy"] == pytest.approx(sum(c.train_time + c.delay for c in mine))


def test_module_imports_neither_torch_nor_ray():
    # Execute
    code = "import sys, sim.asynchrony; print(sorted({'torch', 'ray'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    # Assert
    assert out.stdout.strip() == "[]"
