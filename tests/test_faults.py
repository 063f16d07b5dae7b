"""Fault injection and its guarantees: every acknowledged commit is in the log exactly once, faults that only delay
work leave the main branches and metrics of the fault-free run, rejected commits change nothing, commits are
authenticated, the merge actor never receives raw images, a killed driver's run resumes, and a run survives the loss
of a worker node of a 2-node cluster.

The pure parts (fault plan, corrupted commits, signatures, pulls at past versions, the resume point) run without
Ray; the rest shares one fault-free run of a small config that pulls from main (so merge order matters) as the
reference, on the session's Ray (the 2-node cluster and the killed driver run in subprocesses).
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sim.config import CORRUPT_KINDS, FaultsConfig, config_from_dict, config_to_dict
from sim.data.base import DistilledSet
from sim.faults import corrupt_commit, expected_reason, plan_faults
from sim.model import load_adapter, new_adapter
from sim.commit import Commit, institution_key, sign_commit
from sim.main_state import MainState

ROOT = Path(__file__).resolve().parents[1]
SECRET = b"s" * 32


# ------------------------------------------------------------------------------------------
# Without Ray
# ------------------------------------------------------------------------------------------
def test_fault_plan_is_seeded_and_follows_its_probabilities():
    ids = [f"inst{i:03d}-{k:02d}" for i in range(50) for k in range(4)]
    faults = FaultsConfig(kill_institutions=0.5, corrupt=0.25, slow=0.1, slow_s=2.0, corrupt_kinds=("nan", "shape"))
    # Execute
    plan, again, other = plan_faults(faults, 0, ids), plan_faults(faults, 0, ids), plan_faults(faults, 1, ids)
    only_kills = plan_faults(dataclasses.replace(faults, corrupt=0.0, slow=0.0), 0, ids)
    # Assert: same seed same plan, another seed another; rates near p; each fault drawn on its own stream
    assert plan == again and plan != other
    assert 70 <= len(plan.killed) <= 130 and 25 <= len(plan.corrupt) <= 75 and 5 <= len(plan.slow) <= 40
    assert set(plan.corrupt.values()) == {"nan", "shape"} and set(plan.slow.values()) == {2.0}
    assert only_kills.killed == plan.killed and not only_kills.corrupt and not only_kills.slow
    none = plan_faults(FaultsConfig(), 0, ids)
    assert not (none.killed or none.corrupt or none.slow) and not FaultsConfig().any
    assert len(plan_faults(FaultsConfig(kill_institutions=1.0), 0, ids).killed) == len(ids)


@pytest.mark.parametrize("field, value", [("kill_institutions", 1.5), ("corrupt", -0.1), ("slow", "often"),
                                          ("kill_merge_actor_after", [0]), ("kill_merge_actor_after", [2, 2]),
                                          ("corrupt_kinds", ["bitflip"]), ("corrupt_kinds", []), ("slow_s", -1),
                                          ("retries", -1), ("kill_delay", float("inf"))])
def test_faults_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"faults.{field}"):
        config_from_dict({"faults": {field: value}})


@pytest.fixture(scope="module")
def store_cfg(tiny_cfg):
    return tiny_cfg.replace(merge=dataclasses.replace(tiny_cfg.merge, strategies=("svd", "ties")))


@pytest.fixture(scope="module")
def institutions(tiny_cohort):
    return {i.id: (i.task, tuple(i.classes)) for i in tiny_cohort.institutions}


def make_commit(foundation, cohort, cfg, inst_id: int, k: int) -> Commit:
    """A valid commit without training: a seeded adapter and 2 real images per class as its 'distilled' set."""
    inst = cohort.institutions[inst_id]
    adapter = new_adapter(foundation, cfg.lora, seed=100 * inst_id + k)
    g = torch.Generator().manual_seed(7 * inst_id + k)
    adapter.weights = {key: (0.05 * torch.randn(v.shape, generator=g) if key.endswith("lora_B.weight") else v)
                       for key, v in adapter.weights.items()}
    idx = np.concatenate([np.flatnonzero(inst.train.y == c)[:2] for c in range(len(inst.classes))])
    x = inst.train.x[idx].astype(np.float32) / (255.0 if inst.train.x.dtype == np.uint8 else 1.0)
    distilled = DistilledSet(inst.task, tuple(inst.classes), x, inst.train.y[idx].astype(np.int64), "random")
    return Commit(f"inst{inst_id:03d}-{k:02d}", inst_id, inst.task, tuple(inst.classes), adapter, distilled, 0,
                  float(k), float(k) + 0.5)


def branches(state: MainState) -> dict:
    return {s: {k: v.clone() for k, v in state.pull(s)[1].weights.items()} for s in state.branches.strategies}


@pytest.mark.parametrize("kind", CORRUPT_KINDS)
def test_each_corruption_is_rejected_with_its_reason_and_changes_nothing(kind, tmp_path, store_cfg, institutions,
                                                                        tiny_foundation, tiny_cohort):
    # Prepare: an authenticated main with one accepted commit, and a signed genuine commit of institution 1
    state = MainState(tmp_path / "run", store_cfg, institutions, tiny_foundation, secret=SECRET)
    sign = lambda c: sign_commit(c, institution_key(SECRET, c.institution))  # noqa: E731
    assert state.receive(sign(make_commit(tiny_foundation, tiny_cohort, store_cfg, 0, 0)))["event"] == "accepted"
    genuine = sign(make_commit(tiny_foundation, tiny_cohort, store_cfg, 1, 0))
    if kind == "replay":       # a replayed id: the genuine commit is on main, then its id comes again
        assert state.receive(genuine)["event"] == "accepted"
    before, lines_before = branches(state), len(state.log.read())
    # Execute
    ack = state.receive(corrupt_commit(genuine, kind, institution_key(SECRET, 1)))
    # Assert: rejected for its own reason, logged with it, nothing else changed
    assert ack["event"] == "rejected" and expected_reason(kind) in ack["reason"].lower(), ack["reason"]
    records = state.log.read()
    assert len(records) == lines_before + 1 and records[-1]["reason"] == ack["reason"]
    assert records[-1]["injected"] == kind
    after = branches(state)
    assert all(torch.equal(before[s][k], after[s][k]) for s in before for k in before[s])
    assert state.version == (2 if kind == "replay" else 1)
    assert len(list(state.log.commits_dir.iterdir())) == state.version


def test_commits_must_carry_their_institutions_signature(tmp_path, store_cfg, institutions, tiny_foundation,
                                                         tiny_cohort):
    # Prepare
    state = MainState(tmp_path / "run", store_cfg, institutions, tiny_foundation, secret=SECRET)
    commit = make_commit(tiny_foundation, tiny_cohort, store_cfg, 2, 0)
    forged = {"unsigned": commit,
              "another institution's key": sign_commit(commit, institution_key(SECRET, 3)),
              "another run's secret": sign_commit(commit, institution_key(b"x" * 32, 2)),
              "signed, then changed": dataclasses.replace(sign_commit(commit, institution_key(SECRET, 2)),
                                                          pulled_version=0, id="inst002-09")}
    # Execute / Assert: each is rejected, the genuine one is accepted, and the signature is not logged
    for name, c in forged.items():
        ack = state.receive(c)
        assert ack["event"] == "rejected" and "signature" in ack["reason"], name
    assert state.version == 0
    ack = state.receive(sign_commit(commit, institution_key(SECRET, 2)))
    assert ack["event"] == "accepted" and "signature" not in ack
    assert not any("signature" in r for r in state.log.read())


def test_pull_at_a_past_version_needs_the_history(tmp_path, store_cfg, institutions, tiny_foundation, tiny_cohort):
    # Prepare: three commits, then a restore that keeps the svd branch's history
    state = MainState(tmp_path / "run", store_cfg, institutions, tiny_foundation)
    for i in range(3):
        state.receive(make_commit(tiny_foundation, tiny_cohort, store_cfg, i, 0))
    at = {}
    for v in range(1, 4):
        fresh = MainState(tmp_path / f"r{v}", store_cfg, institutions, tiny_foundation)
        for i in range(v):
            fresh.receive(make_commit(tiny_foundation, tiny_cohort, store_cfg, i, 0))
        at[v] = fresh.pull("svd")[1]
    # Execute
    restored = MainState.restore(tmp_path / "run", store_cfg, institutions, tiny_foundation, history="svd")
    # Assert
    assert restored.pull("svd", 0) == (0, None)
    for v in (1, 2, 3):
        version, adapter = restored.pull("svd", v)
        assert version == v and all(torch.equal(adapter.weights[k], at[v].weights[k]) for k in adapter.weights)
    with pytest.raises(ValueError, match="not kept"):
        state.pull("svd", 1)


def test_resume_point_skips_what_the_log_has_and_replays_early_pulls():
    from sim.commit_log import resume_point
    from sim.config import ScheduleConfig
    from sim.schedule import build_schedule

    schedule = build_schedule(ScheduleConfig(contributions=3, init_from="main"), 4, 0)
    order = [c.id for c in schedule.contributions]        # merge order
    # Prepare: the first four commits handled (one rejected for staleness), plus an injected copy's rejection
    records = [{"event": "accepted", "id": order[0]}, {"event": "accepted", "id": order[1]},
               {"event": "rejected", "id": order[1], "injected": "nan"},
               {"event": "rejected", "id": order[2], "reason": "staleness"}, {"event": "accepted", "id": order[3]}]
    # Execute
    skip, versions = resume_point(schedule, records)
    # Assert: handled ones are skipped; an unhandled contribution that pulled before the last handled commit pulls
    # the version it saw (accepted commits before its pull), later pulls get the current main
    assert skip == set(order[:4])
    position = {(e["event"], e["contribution"]): n for n, e in enumerate(schedule.events())}
    last = position[("commit", order[3])]
    for cid in order[4:]:
        pull_at = position[("pull", cid)]
        if pull_at < last:
            seen = sum(position[("commit", a)] < pull_at for a in (order[0], order[1], order[3]))
            assert versions[cid] == seen
        else:
            assert cid not in versions
    assert versions, "the schedule should have a contribution that pulled before the crash point"


# ------------------------------------------------------------------------------------------
# On Ray: one fault-free reference run, and the same config with faults
# ------------------------------------------------------------------------------------------
ray = pytest.importorskip("ray")


def metrics_of(summary: dict) -> dict:
    strategies = {name: {k: s[k] for k in ("acc", "auc", "per_task", "forgetting", "bwt", "storage_bytes")}
                  for name, s in summary["strategies"].items()}
    return {"strategies": strategies, "references": summary["references"],
            "commits_accepted": summary["commits_accepted"]}


def log_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]


def main_tensors(run_dir: Path, strategy: str) -> dict:
    path = run_dir / "main" / strategy
    if (path / "mixture.json").is_file():
        from sim.merge import load_mixture

        m = load_mixture(path)
        return {f"{i}:{k}": v for i, a in enumerate(m.adapters) for k, v in a.weights.items()} | {
            "weights": torch.as_tensor(np.asarray(m.weights))}
    return load_adapter(path).weights


def assert_exactly_once(run_dir: Path, ids: list[str]) -> None:
    accepted = [r["id"] for r in log_of(run_dir) if r["event"] == "accepted"]
    assert sorted(accepted) == sorted(ids), "every contribution accepted exactly once"
    assert [r["seq"] for r in log_of(run_dir) if r["event"] == "accepted"] == list(range(1, len(ids) + 1))


@pytest.fixture(scope="module")
def ref_cfg(tiny_run_cfg):
    """Pulls the svd branch (init_from main), so a change of merge order or of a pulled version would show."""
    return tiny_run_cfg.replace(
        schedule=dataclasses.replace(tiny_run_cfg.schedule, init_from="main", pull_strategy="svd"),
        merge=dataclasses.replace(tiny_run_cfg.merge, strategies=("fusion", "mixture", "svd")),
        runtime=dataclasses.replace(tiny_run_cfg.runtime, eval_every=3))


@pytest.fixture(scope="module")
def reference(ray_session, ref_cfg, tmp_path_factory):
    from actors.runner import run_simulation
    from sim.schedule import build_schedule

    out = tmp_path_factory.mktemp("reference") / "run"
    ids = [c.id for c in build_schedule(ref_cfg.schedule, ref_cfg.data.institutions, ref_cfg.seed).contributions]
    return out, run_simulation(ref_cfg, out), ids


FAULTS = FaultsConfig(kill_institutions=0.3, kill_delay=0.3, kill_merge_actor_after=(2, 5), corrupt=0.5, slow=0.3,
                      slow_s=0.5)


def test_a_run_whose_faults_only_delay_work_ends_like_the_fault_free_run(reference, ref_cfg, tmp_path):
    from actors.runner import run_simulation

    # Prepare: kills of institutions and of the merge actor, slow tasks, corrupted copies — all planned from the seed
    ref_dir, ref_summary, ids = reference
    cfg = ref_cfg.replace(faults=FAULTS)
    plan = plan_faults(cfg.faults, cfg.seed, ids)
    assert plan.killed and plan.slow and len(set(plan.corrupt.values())) >= 3, plan   # the seed exercises them
    # Execute
    summary = run_simulation(cfg, tmp_path / "run")
    # Assert: same branches, same metrics; each contribution accepted once; exactly the corrupted copies rejected,
    # each for its kind's reason; the merge actor restarted once per planned kill
    run_dir = tmp_path / "run"
    assert metrics_of(summary) == metrics_of(ref_summary)
    for s in cfg.merge.strategies:
        got, want = main_tensors(run_dir, s), main_tensors(ref_dir, s)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got), s
    assert_exactly_once(run_dir, ids)
    log = log_of(run_dir)
    rejected = {(r["id"], r["injected"]): r["reason"] for r in log if r["event"] == "rejected"}
    assert set(rejected) == set(plan.corrupt.items())
    assert all(expected_reason(kind) in reason.lower() for (_, kind), reason in rejected.items()), rejected
    assert summary["commits_rejected"] == len(plan.corrupt)
    assert sum(r["event"] == "restored" for r in log) == len(FAULTS.kill_merge_actor_after)
    assert summary["faults"]["institution_kills_done"] == len(plan.killed)
    assert all(r.get("slowed_s") == 0.5 for r in log if r["event"] == "accepted" and r["id"] in plan.slow)


def test_the_wall_clock_merges_every_contribution_once_through_killed_institutions(ray_session, ref_cfg, tmp_path):
    from actors.runner import run_simulation
    from sim.schedule import build_schedule

    # Prepare: the wall clock (arrival order), with killed institutions and corrupted copies
    cfg = ref_cfg.replace(faults=FaultsConfig(kill_institutions=0.5, kill_delay=0.3, corrupt=0.3),
                          runtime=dataclasses.replace(ref_cfg.runtime, clock="wall"))
    ids = [c.id for c in build_schedule(cfg.schedule, cfg.data.institutions, cfg.seed).contributions]
    plan = plan_faults(cfg.faults, cfg.seed, ids)
    assert plan.killed and plan.corrupt, plan
    # Execute
    summary = run_simulation(cfg, tmp_path / "run")
    # Assert: each contribution accepted once, exactly the corrupted copies rejected, every planned kill done
    assert_exactly_once(tmp_path / "run", ids)
    assert {r["id"] for r in log_of(tmp_path / "run") if r["event"] == "rejected"} == set(plan.corrupt)
    assert summary["clock"] == "wall" and summary["commits_rejected"] == len(plan.corrupt)
    assert summary["faults"]["institution_kills_done"] == len(plan.killed)


def test_a_lost_contribution_is_made_again_by_the_restarted_institution(ray_session, ref_cfg, tiny_cohort, tmp_path):
    from actors.institution import Institution
    from actors.merge_actor import MergeActor
    from actors.runner import task_options, worker_pool
    from sim.schedule import build_schedule

    # Prepare: an institution makes a commit, then dies (Ray restarts it): the commit it owned is gone
    cfg = ref_cfg.replace(schedule=dataclasses.replace(ref_cfg.schedule, init_from="base"),
                          merge=dataclasses.replace(ref_cfg.merge, strategies=("svd",)),
                          runtime=dataclasses.replace(ref_cfg.runtime, eval_every=0))
    blob = json.dumps(config_to_dict(cfg))
    pg, _ = worker_pool(cfg)
    options = task_options(cfg, pg)
    inst = tiny_cohort.institutions[1]
    contribution = next(c for c in build_schedule(cfg.schedule, 4, cfg.seed).contributions if c.institution == 1)
    merge = MergeActor.remote(str(tmp_path / "run"), blob, {i.id: (i.task, tuple(i.classes))
                                                            for i in tiny_cohort.institutions}, options, SECRET)
    private = ray.put(inst)              # held here: a restart needs the constructor arguments
    actor = Institution.remote([private], blob, options, {1: institution_key(SECRET, 1)})
    try:
        [ref] = ray.get(actor.contribute.remote(contribution, None))
        ray.kill(actor, no_restart=False)    # while it trains: the commit will never exist
        while True:                      # until the restarted process answers
            try:
                assert ray.get(actor.ping.remote(), timeout=30) == (1,)
                break
            except ray.exceptions.RayActorError:
                time.sleep(0.2)
        with pytest.raises(ray.exceptions.ObjectLostError):
            ray.get(ref, timeout=30)
        # Execute
        ack = ray.get(merge.commit.remote([ref], (actor, contribution, None, 0)))
        unrecoverable = ray.get(merge.commit.remote([ref]))        # no source: it cannot be made again
    finally:
        ray.kill(actor)
        ray.kill(merge)
        ray.util.remove_placement_group(pg)
    # Assert
    assert ack["event"] == "accepted" and ack["attempts"] == 2 and ack["id"] == contribution.id
    assert unrecoverable["event"] == "rejected" and "contribution failed" in unrecoverable["reason"]


def test_the_merge_actor_receives_adapters_and_distilled_sets_never_raw_images(reference, tiny_cohort):
    # Prepare
    run_dir, _, _ = reference
    train = {i.id: i.train.x for i in tiny_cohort.institutions}
    # Assert: what reached the merge actor per commit (its pickled size, measured on arrival) is the adapter and the
    # distilled set plus a few hundred bytes of metadata — far less than the institution's training images
    for r in (r for r in log_of(run_dir) if r["event"] == "accepted"):
        images_bytes = train[r["institution"]].astype(np.float32).nbytes
        assert r["received_bytes"] <= r["adapter_bytes"] + r["distilled_bytes"] + 8192, r
        assert r["received_bytes"] < images_bytes / 2, r
    # ...and no distilled image is a training image (DM moves every pixel of its real initialisation)
    for d in sorted((run_dir / "commits").iterdir()):
        assert {p.name for p in d.iterdir()} == {"adapter_config.json", "adapter_model.safetensors",
                                                 "forgesim_adapter.json", "distilled.npz", "meta.json"}
        meta = json.loads((d / "meta.json").read_text())
        x = DistilledSet.load(d / "distilled.npz").x.reshape(-1, 1, *train[meta["institution"]].shape[1:])
        real = train[meta["institution"]].astype(np.float32)
        real = real / 255.0 if train[meta["institution"]].dtype == np.uint8 else real
        assert not (np.abs(x - real[None]).reshape(len(x), len(real), -1).max(axis=2) < 1e-6).any(), d.name


def _wait(predicate, timeout: float, what: str) -> None:
    t0 = time.time()
    while not predicate():
        if time.time() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _quiet(path: Path, seconds: float) -> bool:
    """Whether ``path`` does not change for ``seconds`` (the processes of a killed run are gone)."""
    size = path.stat().st_size
    time.sleep(seconds)
    return path.stat().st_size == size


def _accepted(run_dir: Path) -> int:
    try:
        return sum('"event": "accepted"' in line for line in (run_dir / "log.jsonl").read_text().splitlines())
    except OSError:
        return 0


def test_a_run_whose_driver_was_killed_resumes_without_retraining(reference, ref_cfg, tmp_path):
    import yaml

    from experiments.cli import main

    # Prepare: `forgesim run` in its own process group, killed (driver and its local Ray) after 3 accepted commits
    ref_dir, ref_summary, ids = reference
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config_to_dict(ref_cfg)))
    run_dir = tmp_path / "run"
    with open(tmp_path / "driver.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "experiments.cli", "run", "--config", str(tmp_path / "cfg.yaml"),
                                 "--out", str(run_dir)], cwd=ROOT, stdout=log, stderr=log, start_new_session=True)
    try:
        _wait(lambda: _accepted(run_dir) >= 3 or proc.poll() is not None, 240, "3 accepted commits")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    assert _accepted(run_dir) < len(ids), "the driver finished before it was killed"
    _wait(lambda: _quiet(run_dir / "log.jsonl", 2.0), 60, "the killed run's Ray to stop writing")
    before = [r for r in log_of(run_dir) if r["event"] == "accepted"]
    # Execute
    assert main(["run", "--resume", str(run_dir)]) == 0
    # Assert: the summary of an uninterrupted run; the accepted commits were kept, not retrained
    summary = json.loads((run_dir / "summary.json").read_text())
    assert metrics_of(summary) == metrics_of(ref_summary)
    assert summary["resumed"] == {"skipped": len(before), "contributions_run": len(ids) - len(before)}
    assert_exactly_once(run_dir, ids)
    after = [r for r in log_of(run_dir) if r["event"] == "accepted"]
    assert after[:len(before)] == before
    for s in ref_cfg.merge.strategies:
        got, want = main_tensors(run_dir, s), main_tensors(ref_dir, s)
        assert all(torch.equal(got[k], want[k]) for k in want), s


def test_a_run_survives_losing_a_worker_node_of_a_two_node_cluster(reference, ref_cfg, tmp_path):
    import yaml

    # Prepare: the reference config, run by a subprocess on its own ray.cluster_utils.Cluster (head + worker node);
    # the worker node holding the pool is removed after 2 accepted commits and a fresh one added
    ref_dir, ref_summary, ids = reference
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config_to_dict(ref_cfg)))
    # Execute
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "multinode_run.py"), str(tmp_path / "cfg.yaml"),
                           str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True, timeout=420)
    # Assert: every contribution accepted exactly once, and the numbers of the single-node reference
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["removed_after_accepted"] >= 2 and report["nodes_alive_at_end"] == 2
    assert_exactly_once(tmp_path / "run", ids)
    assert metrics_of(json.loads((tmp_path / "run" / "summary.json").read_text())) == metrics_of(ref_summary)
