import dataclasses
import subprocess
import sys

import numpy as np
import pytest

from sim.config import ScheduleConfig
from sim.schedule import (ARRIVALS, Contribution, Schedule, build_schedule, get_arrival, read_trace)


def contribution(institution: int, index: int, t_pull: float, t_commit: float) -> Contribution:
    return Contribution(f"inst{institution:03d}-{index:02d}", institution, index, t_pull, t_commit,
                        t_commit - t_pull, 0.0, False, 0)


@pytest.fixture()
def trace_csv(tmp_path):
    """Institution 0 starts at 3.0 and 0.5 (out of order in the file), institution 1 at 2.0."""
    path = tmp_path / "trace.csv"
    path.write_text("institution,time\n0,3.0\n1,2.0\n0,0.5\n")
    return path


def config_for(name: str, trace_path) -> ScheduleConfig:
    return ScheduleConfig(arrival=name, contributions=4, rate=1.5, speed_sigma=0.5, train_time=0.8,
                          commit_delay=0.2, straggler_prob=0.3, trace=str(trace_path) if name == "trace" else None)


# --------------------------------------------------------------------------------------------
# General properties, every arrival process
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(ARRIVALS))
def test_every_arrival_process_gives_a_consistent_schedule(name, trace_csv):
    # Prepare
    cfg, n = config_for(name, trace_csv), 5
    expected_counts = {0: 2, 1: 1} if name == "trace" else {i: cfg.contributions for i in range(n)}
    # Execute
    schedule = build_schedule(cfg, n, seed=3)
    # Assert: merge order, counts, durations and one contribution at a time per institution
    keys = [(c.t_commit, c.institution, c.index) for c in schedule.contributions]
    assert keys == sorted(keys)
    assert {i: len(schedule.for_institution(i)) for i in range(n) if schedule.for_institution(i)} == expected_counts
    assert len(schedule) == sum(expected_counts.values())
    for c in schedule.contributions:
        assert c.id == f"inst{c.institution:03d}-{c.index:02d}"
        assert c.t_commit > c.t_pull >= 0 and c.delay > 0
        assert c.t_commit == pytest.approx(c.t_pull + c.train_time + c.delay, rel=1e-12)
    for i in range(n):
        mine = schedule.for_institution(i)
        assert [c.index for c in mine] == list(range(len(mine)))
        assert all(b.t_pull >= a.t_commit for a, b in zip(mine, mine[1:]))
    assert len({c.seed for c in schedule.contributions}) == len(schedule)


@pytest.mark.parametrize("name", sorted(ARRIVALS))
def test_same_inputs_same_schedule_other_seed_other_schedule(name, trace_csv):
    # Prepare
    cfg = config_for(name, trace_csv)
    # Execute
    first, again, other = (build_schedule(cfg, 4, seed) for seed in (7, 7, 8))
    # Assert
    assert first == again
    assert [c.t_commit for c in first.contributions] != [c.t_commit for c in other.contributions]


def test_one_institution_does_not_change_the_others():
    # Prepare
    cfg = ScheduleConfig(contributions=3, dropout=0.3, straggler_prob=0.5, commit_delay=0.1)
    # Execute
    small, large = build_schedule(cfg, 3, seed=1), build_schedule(cfg, 4, seed=1)
    # Assert
    assert [small.for_institution(i) for i in range(3)] == [large.for_institution(i) for i in range(3)]
    assert small.speeds == large.speeds[:3]


def test_schedule_uses_no_global_rng():
    # Prepare
    np.random.seed(0)
    state = np.random.get_state()[1].copy()
    # Execute
    build_schedule(ScheduleConfig(speed_sigma=1.0, straggler_prob=0.5), 4, seed=0)
    # Assert
    assert np.array_equal(np.random.get_state()[1], state)


def test_module_imports_neither_torch_nor_ray():
    # Execute
    code = "import sys, sim.schedule; print(sorted({'torch', 'ray'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    # Assert
    assert out.stdout.strip() == "[]"


def test_unknown_arrival_lists_known_names():
    with pytest.raises(ValueError, match="unknown arrival process 'poison'; known: poisson, uniform, periodic, eager, trace"):
        get_arrival("poison")


# --------------------------------------------------------------------------------------------
# Arrival processes
# --------------------------------------------------------------------------------------------
def test_poisson_mean_gap_is_one_over_rate_times_speed():
    # Prepare
    cfg = ScheduleConfig(arrival="poisson", contributions=4000, rate=2.0, speed_sigma=0.5)
    speeds = (0.5, 1.0, 2.0)
    # Execute
    arrivals = ARRIVALS["poisson"](cfg, speeds, 0)
    # Assert: mean of 4000 exponential gaps is within ~6 standard errors (1.6% each) of 1 / (rate * speed)
    for times, speed in zip(arrivals, speeds):
        gaps = np.diff(np.concatenate([[0.0], times]))
        assert gaps.min() > 0
        assert gaps.mean() == pytest.approx(1 / (2.0 * speed), rel=0.1)


def test_uniform_starts_lie_in_the_horizon_sorted():
    # Prepare
    cfg = ScheduleConfig(arrival="uniform", contributions=50, rate=5.0)
    # Execute
    arrivals = ARRIVALS["uniform"](cfg, (1.0, 1.0), 0)
    # Assert: horizon = contributions / rate = 10
    for times in arrivals:
        assert len(times) == 50 and np.all(np.diff(times) >= 0)
        assert 0 <= times.min() and times.max() <= 10.0


def test_periodic_starts_are_exactly_one_period_apart():
    # Prepare: training (0.25) shorter than the period (0.5), so institutions are never busy at a start
    cfg = ScheduleConfig(arrival="periodic", contributions=4, rate=2.0, speed_sigma=0.0, train_time=0.25)
    # Execute
    schedule = build_schedule(cfg, 3, seed=0)
    # Assert
    for i in range(3):
        pulls = [c.t_pull for c in schedule.for_institution(i)]
        assert 0 <= pulls[0] < 0.5
        assert pulls == pytest.approx([pulls[0] + 0.5 * k for k in range(4)], abs=1e-12)
        assert [c.t_commit - c.t_pull for c in schedule.for_institution(i)] == pytest.approx([0.25] * 4)
    assert len({schedule.for_institution(i)[0].t_pull for i in range(3)}) == 3  # one phase per institution


def test_busy_institution_starts_when_its_previous_commit_arrives():
    # Prepare: period 1 but training 2.5, so each start waits for the previous commit
    cfg = ScheduleConfig(arrival="periodic", contributions=3, rate=1.0, speed_sigma=0.0, train_time=2.5)
    # Execute
    mine = build_schedule(cfg, 1, seed=0).for_institution(0)
    # Assert: phase p; pulls p, p + 2.5, p + 5; commits 2.5 later each
    p = mine[0].t_pull
    assert [c.t_pull for c in mine] == pytest.approx([p, p + 2.5, p + 5.0])
    assert [c.t_commit for c in mine] == pytest.approx([p + 2.5, p + 5.0, p + 7.5])


def test_trace_gives_hand_checked_schedule(trace_csv):
    # Prepare: contributions=9 is ignored with a trace
    cfg = ScheduleConfig(arrival="trace", trace=str(trace_csv), contributions=9, speed_sigma=0.0, train_time=1.0)
    # Execute
    schedule = build_schedule(cfg, 3, seed=0)
    # Assert: inst0 pulls 0.5 → commits 1.5, pulls 3.0 → 4.0; inst1 pulls 2.0 → 3.0; inst2 has no rows
    got = [(c.id, c.t_pull, c.t_commit) for c in schedule.contributions]
    assert got == [("inst000-00", 0.5, 1.5), ("inst001-00", 2.0, 3.0), ("inst000-01", 3.0, 4.0)]
    assert schedule.for_institution(2) == [] and schedule.dropouts == {}
    assert read_trace(trace_csv) == {0: [3.0, 0.5], 1: [2.0]}


@pytest.mark.parametrize("text, message", [
    ("inst,t\n0,1.0\n", "line 1: header must name the columns institution,time"),
    ("", "line 1: header must name the columns institution,time"),
    ("institution,time\n", "has no rows after its header"),
    ("institution,time\n0,1.0\n0,soon\n", "line 3: time must be a number, got 'soon'"),
    ("institution,time\nzero,1.0\n", "line 2: institution must be an integer, got 'zero'"),
    ("institution,time\n0,-1.5\n", "line 2: time must be a finite number >= 0, got '-1.5'"),
    ("institution,time\n0,nan\n", "line 2: time must be a finite number >= 0"),
    ("institution,time\n0,1.0\n2,1.0\n", r"line 3: unknown institution 2 \(ids must be in \[0, 1\]\)"),
    ("institution,time\n0\n", "line 2: expected columns institution,time"),
])
def test_bad_trace_names_file_and_line(tmp_path, text, message):
    # Prepare
    path = tmp_path / "bad.csv"
    path.write_text(text)
    # Execute / Assert
    with pytest.raises(ValueError, match=message) as err:
        read_trace(path, n_institutions=2)
    assert str(path) in str(err.value)


def test_missing_trace_and_unknown_institution_stop_the_build(tmp_path, trace_csv):
    # Execute / Assert: the file is missing
    with pytest.raises(ValueError, match=r"trace file .*nowhere\.csv does not exist"):
        build_schedule(ScheduleConfig(arrival="trace", trace=str(tmp_path / "nowhere.csv")), 2, 0)
    # Execute / Assert: the trace names institution 1, but there is only one
    with pytest.raises(ValueError, match="unknown institution 1"):
        build_schedule(ScheduleConfig(arrival="trace", trace=str(trace_csv)), 1, 0)


def test_eager_starts_each_contribution_when_the_previous_commit_arrives():
    # Prepare: speeds 1, so each training takes exactly train_time; commit_delay 0
    cfg = ScheduleConfig(arrival="eager", contributions=3, speed_sigma=0.0, train_time=0.5)
    # Execute
    schedule = build_schedule(cfg, 2, seed=4)
    # Assert: back to back from 0, whatever the seed or rate
    for i in range(2):
        assert [(c.t_pull, c.t_commit) for c in schedule.for_institution(i)] == [(0.0, 0.5), (0.5, 1.0), (1.0, 1.5)]


# --------------------------------------------------------------------------------------------
# Existing schedules are unchanged (hashes of the schedules built before schedule.protocol and eager existed)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, digest", [
    ({}, "92d137f4b005c28d9eaa2ab5d01bdfb9923a98334b74f372bc103194d85f831c"),
    ({"arrival": "uniform", "contributions": 3, "speed_sigma": 1.0, "straggler_prob": 0.3, "commit_delay": 0.2,
      "dropout": 0.2}, "aaa055bc7404f8b0b71df58b70c26e3ef13ba99a0bf7abf273c7a4671a8c2b1b"),
    ({"arrival": "periodic", "contributions": 4, "rate": 2.0, "speed_sigma": 1.5, "train_time": 0.8,
      "commit_delay": 0.1}, "5fb7018681fc35dc3a24a19606fe536b9e44529aef480f6ba240d432eb7fc393"),
])
def test_async_schedules_are_bit_identical_to_before(kwargs, digest):
    import hashlib

    # Execute
    s = build_schedule(ScheduleConfig(**kwargs), 7, seed=3)
    # Assert: every field of every contribution, the dropouts and the speeds, as exact floats
    blob = repr([dataclasses.astuple(c) for c in s.contributions]) + repr(sorted(s.dropouts.items())) + repr(s.speeds)
    assert hashlib.sha256(blob.encode()).hexdigest() == digest


# --------------------------------------------------------------------------------------------
# Synchronous rounds
# --------------------------------------------------------------------------------------------
def sync_cfg(**kwargs) -> ScheduleConfig:
    return ScheduleConfig(**({"arrival": "eager", "contributions": 2, "speed_sigma": 1.0, "commit_delay": 0.1,
                              "protocol": "sync_rounds"} | kwargs))


def test_sync_rounds_by_hand():
    # Prepare: 3 institutions, 2 rounds; speeds and delays are the seed's draws, the rest is computed here
    cfg = sync_cfg()
    schedule = build_schedule(cfg, 3, seed=0)
    free = build_schedule(dataclasses.replace(cfg, protocol="async"), 3, seed=0)
    draws = {c.id: (c.train_time, c.delay) for c in free.contributions}
    # Execute: the barriers by hand — round 0 starts at 0, each round ends at its latest arrival
    b0 = max(sum(draws[f"inst{i:03d}-00"]) for i in range(3))
    b1 = b0 + max(sum(draws[f"inst{i:03d}-01"]) for i in range(3))
    # Assert: the same contributions (ids, seeds, training times, delays) as async, other times
    assert {c.id: (c.train_time, c.delay, c.seed) for c in schedule.contributions} == \
        {c.id: (c.train_time, c.delay, c.seed) for c in free.contributions}
    # ...pulls at the round's start, every commit merged at its round's barrier, in institution order
    assert [c.id for c in schedule.contributions] == [f"inst{i:03d}-{k:02d}" for k in (0, 1) for i in range(3)]
    assert [c.t_pull for c in schedule.contributions] == pytest.approx([0.0] * 3 + [b0] * 3)
    assert [c.t_commit for c in schedule.contributions] == pytest.approx([b0] * 3 + [b1] * 3)
    for c in schedule.contributions:
        train, delay = draws[c.id]
        assert c.t_arrive == pytest.approx(c.t_pull + train + delay)
        assert c.barrier_wait == pytest.approx(c.t_commit - c.t_arrive) and c.barrier_wait >= 0
    # ...the slowest member of each round waits for no one
    for k in (0, 1):
        waits = [c.barrier_wait for c in schedule.contributions if c.index == k]
        assert min(waits) == 0.0 and sorted(waits)[1] > 0
    # ...the events: a round's commits, then the next round's pulls, at the same instant
    events = [(e["event"], e["contribution"]) for e in schedule.events() if e["t_virtual"] == b0]
    assert events == [("commit", f"inst{i:03d}-00") for i in range(3)] + [("pull", f"inst{i:03d}-01") for i in range(3)]


def test_sync_rounds_staleness_is_the_place_in_the_barrier():
    # Execute
    schedule = build_schedule(sync_cfg(contributions=3), 4, seed=1)
    # Assert: every commit of a round pulled the main of the previous barrier; merged k-th in it, it is k stale
    assert schedule.expected_staleness() == {f"inst{i:03d}-{k:02d}": i for i in range(4) for k in range(3)}


def test_sync_rounds_pull_waits_for_a_late_arrival(tmp_path):
    # Prepare: a trace where institution 1 is available for round 1 only at 5.0, after the round-0 barrier (2.0)
    trace = tmp_path / "t.csv"
    trace.write_text("institution,time\n0,0\n0,0\n1,0\n1,5.0\n")
    cfg = ScheduleConfig(arrival="trace", trace=str(trace), speed_sigma=0.0, train_time=2.0, protocol="sync_rounds")
    # Execute
    got = [(c.id, c.t_pull, c.t_commit) for c in build_schedule(cfg, 2, seed=0).contributions]
    # Assert: round 1 starts at 2.0; institution 0 pulls then, institution 1 at 5.0; the barrier is 7.0
    assert got == [("inst000-00", 0.0, 2.0), ("inst001-00", 0.0, 2.0), ("inst000-01", 2.0, 7.0),
                   ("inst001-01", 5.0, 7.0)]


def test_sync_rounds_do_not_wait_for_an_institution_that_left():
    # Prepare: dropout 1 — everyone leaves before its second contribution
    cfg = sync_cfg(contributions=3, dropout=1.0)
    # Execute
    schedule = build_schedule(cfg, 3, seed=2)
    # Assert: one round; each leaves at the start of round 1 (the round-0 barrier)
    barrier = max(c.t_commit for c in schedule.contributions)
    assert sorted(c.id for c in schedule.contributions) == [f"inst{i:03d}-00" for i in range(3)]
    assert schedule.dropouts == {0: barrier, 1: barrier, 2: barrier}


def test_sync_rounds_are_deterministic_and_seeded():
    # Execute
    first, again, other = (build_schedule(sync_cfg(straggler_prob=0.5), 5, seed) for seed in (3, 3, 4))
    # Assert
    assert first == again and first.contributions != other.contributions


def test_idle_time_by_hand():
    from sim.asynchrony import idle_times

    # Prepare: A trains 0 → 1 and 1 → 2, B trains 0 → 4 and 4 → 8 (no upload delay)
    a = [contribution(0, 0, 0.0, 1.0), contribution(0, 1, 1.0, 2.0)]
    b = [contribution(1, 0, 0.0, 4.0), contribution(1, 1, 4.0, 8.0)]
    free = Schedule(tuple(sorted(a + b, key=lambda c: c.t_commit)), {}, (4.0, 1.0))
    # ...the same in rounds: A's commits wait for B's at 4 and 8, A's second training starts at 4
    a_sync = [Contribution("inst000-00", 0, 0, 0.0, 4.0, 1.0, 0.0, False, 0),
              Contribution("inst000-01", 0, 1, 4.0, 8.0, 1.0, 0.0, False, 0)]
    rounds = Schedule((a_sync[0], b[0], a_sync[1], b[1]), {}, (4.0, 1.0))
    # Execute
    idle_free, idle_rounds = idle_times(free), idle_times(rounds)
    # Assert: async, nobody waits; in rounds A (the fast half) waits 3 per round: idle 6 of span 8
    assert [(r["institution"], r["busy"], r["span"], r["idle"], r["fast"]) for r in idle_free] == \
        [(0, 2.0, 2.0, 0.0, True), (1, 8.0, 8.0, 0.0, False)]
    assert [(r["institution"], r["busy"], r["span"], r["idle"]) for r in idle_rounds] == \
        [(0, 2.0, 8.0, 6.0), (1, 8.0, 8.0, 0.0)]


# --------------------------------------------------------------------------------------------
# Speeds, stragglers, delays, dropout
# --------------------------------------------------------------------------------------------
def test_zero_sigma_means_unit_speeds_and_exact_train_time():
    # Execute
    schedule = build_schedule(ScheduleConfig(speed_sigma=0.0, train_time=0.7), 3, seed=5)
    # Assert
    assert schedule.speeds == (1.0, 1.0, 1.0)
    assert {c.train_time for c in schedule.contributions} == {0.7}
    assert {c.delay for c in schedule.contributions} == {0.0}


def test_stragglers_multiply_training_time_by_the_factor_exactly():
    # Prepare
    base = ScheduleConfig(contributions=3, speed_sigma=0.5, train_time=2.0, straggler_factor=3.0)
    # Execute
    normal = build_schedule(base, 3, seed=2)
    slow = build_schedule(dataclasses.replace(base, straggler_prob=1.0), 3, seed=2)
    # Assert
    assert not any(c.straggler for c in normal.contributions)
    assert all(c.straggler for c in slow.contributions)
    for i in range(3):
        slow_times = [c.train_time for c in slow.for_institution(i)]
        assert [c.train_time * 3.0 for c in normal.for_institution(i)] == slow_times
        assert [c.train_time for c in normal.for_institution(i)] == [2.0 / normal.speeds[i]] * 3


def test_dropout_one_leaves_after_the_first_contribution():
    # Prepare
    cfg = ScheduleConfig(contributions=4, dropout=1.0)
    # Execute
    schedule = build_schedule(cfg, 5, seed=0)
    # Assert: one contribution each; each leaves when it would have pulled its second
    assert sorted(c.id for c in schedule.contributions) == [f"inst{i:03d}-00" for i in range(5)]
    assert sorted(schedule.dropouts) == list(range(5))
    for i in range(5):
        assert schedule.dropouts[i] >= schedule.for_institution(i)[0].t_commit
    dropouts = [e for e in schedule.events() if e["event"] == "dropout"]
    assert len(dropouts) == 5 and all(e["contribution"] is None for e in dropouts)


def test_no_dropout_no_dropouts():
    # Execute
    schedule = build_schedule(ScheduleConfig(contributions=3), 4, seed=0)
    # Assert
    assert schedule.dropouts == {} and len(schedule) == 12


# --------------------------------------------------------------------------------------------
# Events and staleness on a hand-built schedule
# --------------------------------------------------------------------------------------------
@pytest.fixture()
def two_institutions() -> Schedule:
    """A: pull 0 → commit 3, pull 3 → commit 4.  B: pull 1 → commit 2, pull 2 → commit 5."""
    a0, a1 = contribution(0, 0, 0.0, 3.0), contribution(0, 1, 3.0, 4.0)
    b0, b1 = contribution(1, 0, 1.0, 2.0), contribution(1, 1, 2.0, 5.0)
    return Schedule((b0, a0, a1, b1), {}, (1.0, 1.0))


def test_expected_staleness_by_hand(two_institutions):
    # Execute
    staleness = two_institutions.expected_staleness()
    # Assert: merge order B0(2) A0(3) A1(4) B1(5)
    #   B0 pulled at 1: nothing arrived in (1, 2)              → 0
    #   A0 pulled at 0: B0 arrived at 2                        → 1
    #   A1 pulled at 3: A0 at exactly 3 was merged before pull → 0
    #   B1 pulled at 2: B0 at exactly 2 before; A0, A1 after   → 2
    assert staleness == {"inst001-00": 0, "inst000-00": 1, "inst000-01": 0, "inst001-01": 2}


def test_events_put_a_commit_before_a_pull_at_the_same_time(two_institutions):
    # Execute
    events = two_institutions.events()
    # Assert
    got = [(e["t_virtual"], e["event"], e["contribution"]) for e in events]
    assert got == [
        (0.0, "pull", "inst000-00"), (1.0, "pull", "inst001-00"),
        (2.0, "commit", "inst001-00"), (2.0, "pull", "inst001-01"),
        (3.0, "commit", "inst000-00"), (3.0, "pull", "inst000-01"),
        (4.0, "commit", "inst000-01"), (5.0, "commit", "inst001-01"),
    ]
    assert all(set(e) == {"event", "t_virtual", "institution", "contribution"} for e in events)


def test_dropout_event_sorts_between_commit_and_pull():
    # Prepare: A leaves at 2.0, when B's commit arrives and B pulls again
    b0, b1 = contribution(1, 0, 0.0, 2.0), contribution(1, 1, 2.0, 3.0)
    a0 = contribution(0, 0, 0.0, 1.0)
    schedule = Schedule((a0, b0, b1), {0: 2.0}, (1.0, 1.0))
    # Execute
    at_two = [(e["event"], e["institution"]) for e in schedule.events() if e["t_virtual"] == 2.0]
    # Assert
    assert at_two == [("commit", 1), ("dropout", 0), ("pull", 1)]


def test_built_schedule_staleness_matches_a_replay_of_its_events():
    # Prepare
    schedule = build_schedule(ScheduleConfig(contributions=3, rate=2.0, commit_delay=0.3), 6, seed=4)
    # Execute: replay events, counting merged commits as the main version
    version, pulled, replayed = 0, {}, {}
    for e in schedule.events():
        if e["event"] == "pull":
            pulled[e["contribution"]] = version
        elif e["event"] == "commit":
            replayed[e["contribution"]] = version - pulled[e["contribution"]]
            version += 1
    # Assert
    assert replayed == schedule.expected_staleness()
    assert max(replayed.values()) > 0


def test_contribution_record_is_flat():
    # Execute
    record = contribution(2, 1, 0.5, 1.5).record()
    # Assert
    assert record == {"id": "inst002-01", "institution": 2, "index": 1, "t_pull": 0.5, "t_commit": 1.5,
                      "train_time": 1.0, "delay": 0.0, "straggler": False, "seed": 0}


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, field", [
    ({"straggler_prob": 2}, "schedule.straggler_prob"),
    ({"straggler_prob": -0.1}, "schedule.straggler_prob"),
    ({"straggler_factor": 0.5}, "schedule.straggler_factor"),
    ({"dropout": 1.5}, "schedule.dropout"),
    ({"dropout": -0.1}, "schedule.dropout"),
    ({"train_time": 0}, "schedule.train_time"),
    ({"train_time": float("nan")}, "schedule.train_time"),
    ({"commit_delay": -1}, "schedule.commit_delay"),
    ({"max_staleness": -2}, "schedule.max_staleness"),
    ({"wall_scale": 0}, "schedule.wall_scale"),
    ({"rate": 0}, "schedule.rate"),
    ({"arrival": "bursty"}, "schedule.arrival"),
    ({"arrival": "trace"}, "schedule.trace"),
    ({"protocol": "barrier"}, "schedule.protocol"),
])
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError) as err:
        ScheduleConfig(**kwargs)
    assert str(err.value).startswith(field), str(err.value)


def test_config_accepts_the_edges():
    # Execute
    cfg = ScheduleConfig(straggler_prob=1.0, straggler_factor=1.0, dropout=1.0, commit_delay=0.0, max_staleness=0,
                         staleness_weighting=True, pull_strategy="svd", init_from="main")
    # Assert
    assert ScheduleConfig().max_staleness == -1 and cfg.max_staleness == 0 and cfg.pull_strategy == "svd"


# --------------------------------------------------------------------------------------------
# The wall clock's timetable (sim.clock)
# --------------------------------------------------------------------------------------------
def test_wall_clock_starts_at_scaled_times_and_waits_for_the_previous_acknowledgement(two_institutions):
    from sim.clock import WallClock

    # Prepare: A pulls at 0 and 3, B at 1 and 2 (virtual); 10 s of real time per unit, start at t = 100 s
    clock = WallClock(two_institutions, start=100.0, scale=10.0)
    by_id = {c.id: c for c in two_institutions.contributions}
    # Execute / Assert: at 100 s only A0 is due; B0 at 110 s
    assert [c.id for c in clock.due_starts(100.0)] == ["inst000-00"] and clock.next_due() == 110.0
    assert [c.id for c in clock.due_starts(115.0)] == ["inst001-00"]
    # B1 is due at 120 s, but B is busy until B0's commit is acknowledged: nothing starts, nothing else is due
    assert clock.due_starts(125.0) == [] and clock.next_due() is None
    clock.trained(by_id["inst001-00"], 126.0)          # delay 0: the commit is due at once
    assert [c.id for c in clock.due_commits(126.0)] == ["inst001-00"] and clock.due_starts(126.0) == []
    clock.acknowledged(by_id["inst001-00"])
    assert [c.id for c in clock.due_starts(127.0)] == ["inst001-01"]    # late: as soon as B is free
    assert not clock.finished


def test_wall_clock_sends_commits_after_their_scaled_delay_in_due_order():
    from sim.clock import WallClock

    # Prepare: two institutions, one contribution each, delays 2 and 0.5 (virtual), scale 2
    a = Contribution("inst000-00", 0, 0, 0.0, 4.0, 2.0, 2.0, False, 0)
    b = Contribution("inst001-00", 1, 0, 0.0, 2.0, 1.5, 0.5, False, 0)
    clock = WallClock(Schedule((b, a), {}, (1.0, 1.0)), start=0.0, scale=2.0)
    assert [c.id for c in clock.due_starts(0.0)] == ["inst000-00", "inst001-00"]
    # Execute: A trains until 1 s (due 1 + 4 = 5 s), B until 3 s (due 3 + 1 = 4 s)
    clock.trained(a, 1.0)
    clock.trained(b, 3.0)
    # Assert: nothing before 4 s; B then A, the order they arrive; finished once both are acknowledged
    assert clock.due_commits(3.9) == [] and clock.next_due() == 4.0
    assert [c.id for c in clock.due_commits(6.0)] == ["inst001-00", "inst000-00"]
    clock.acknowledged(a)
    clock.acknowledged(b)
    assert clock.finished and clock.next_due() is None


def test_wall_clock_skips_what_the_log_has(two_institutions):
    from sim.clock import WallClock

    # Execute: A0 and B0 were merged before (a resumed run)
    clock = WallClock(two_institutions, start=0.0, scale=1.0, skip={"inst000-00", "inst001-00"})
    # Assert: each institution goes on with its second contribution, at its own time
    assert [c.id for c in clock.due_starts(2.5)] == ["inst001-01"]
    assert [c.id for c in clock.due_starts(3.0)] == ["inst000-01"]
    assert WallClock(two_institutions, 0.0, 1.0, skip=[c.id for c in two_institutions.contributions]).finished
