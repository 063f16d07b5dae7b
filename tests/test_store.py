"""The merge actor's state without Ray: validation, the durable log, idempotency, branches, restart."""
from __future__ import annotations

import dataclasses
import json
import pickle
import time

import numpy as np
import pytest
import torch

from sim.data.base import DistilledSet
from sim.merge.specs import get_spec
from sim.model import new_adapter
from sim.branches import MainBranches, save_main
from sim.commit import Commit, expected_shapes, validate_commit
from sim.commit_log import CommitLog
from sim.main_state import MainState


@pytest.fixture(scope="module")
def store_cfg(tiny_cfg):
    # svd and ties (deterministic), fusion and mixture (searched on the distilled sets, budget 3)
    return tiny_cfg.replace(merge=dataclasses.replace(tiny_cfg.merge, strategies=("fusion", "mixture", "svd", "ties"),
                                                      budget=3))


@pytest.fixture(scope="module")
def institutions(tiny_cohort):
    return {i.id: (i.task, tuple(i.classes)) for i in tiny_cohort.institutions}


def make_commit(foundation, cohort, cfg, inst_id: int, k: int, pulled_version: int = 0) -> Commit:
    """A valid commit without training: a seeded random adapter and 2 real images per class as the 'distilled' set."""
    inst = cohort.institutions[inst_id]
    adapter = new_adapter(foundation, cfg.lora, seed=100 * inst_id + k)
    g = torch.Generator().manual_seed(inst_id * 7 + k)
    for key in adapter.weights:
        if key.endswith("lora_B.weight"):
            adapter.weights[key] = 0.05 * torch.randn(adapter.weights[key].shape, generator=g)
    idx = np.concatenate([np.flatnonzero(inst.train.y == c)[:2] for c in range(len(inst.classes))])
    x = inst.train.x[idx].astype(np.float32) / (255.0 if inst.train.x.dtype == np.uint8 else 1.0)
    distilled = DistilledSet(inst.task, tuple(inst.classes), x, inst.train.y[idx].astype(np.int64), "random")
    return Commit(f"inst{inst_id:03d}-{k:02d}", inst_id, inst.task, tuple(inst.classes), adapter, distilled,
                  pulled_version, float(k), float(k) + 0.5, {"train_s": 0.1})


@pytest.fixture()
def state(tmp_path, store_cfg, institutions, tiny_foundation):
    return MainState(tmp_path / "run", store_cfg, institutions, tiny_foundation)


@pytest.fixture()
def commits(tiny_foundation, tiny_cohort, store_cfg):
    return [make_commit(tiny_foundation, tiny_cohort, store_cfg, i, k) for k in range(2) for i in range(3)]


def branch_tensors(state: MainState, strategy: str) -> dict:
    _, pred = state.pull(strategy)
    if pred is None:
        return {}
    if hasattr(pred, "adapters"):
        return {f"{i}:{k}": v.clone() for i, a in enumerate(pred.adapters) for k, v in a.weights.items()} | {
            "weights": torch.as_tensor(pred.weights)}
    return {k: v.clone() for k, v in pred.weights.items()}


def assert_same_branches(a: MainState, b: MainState) -> None:
    for s in a.branches.strategies:
        ta, tb = branch_tensors(a, s), branch_tensors(b, s)
        assert ta.keys() == tb.keys(), s
        assert all(torch.equal(ta[k], tb[k]) for k in ta), s


def test_accepted_commit_is_logged_with_its_dir_before_the_ack(state, commits):
    # Execute
    ack = state.receive(commits[0])
    # Assert: the ack, the log line and the commit dir agree
    assert ack["event"] == "accepted" and ack["seq"] == 1 and state.version == 1 and ack["staleness"] == 0
    lines = [json.loads(line) for line in state.log.path.read_text().splitlines()]
    assert lines[0]["event"] == "accepted" and lines[0]["id"] == commits[0].id
    assert {r["strategy"] for r in lines[1:]} == set(state.branches.strategies)
    commit_dir = state.log.dir / ack["dir"]
    assert commit_dir.name == "00001-inst000"
    assert {"adapter_config.json", "adapter_model.safetensors", "distilled.npz", "meta.json"} <= {
        p.name for p in commit_dir.iterdir()}
    assert state.log.load_commit(lines[0]).content_hash() == commits[0].content_hash()


@pytest.mark.parametrize("corrupt, words", [
    (lambda c, f, cfg: dataclasses.replace(c, adapter=dataclasses.replace(c.adapter, weights={
        k: v * torch.nan for k, v in c.adapter.weights.items()})), "nan"),
    (lambda c, f, cfg: dataclasses.replace(c, adapter=dataclasses.replace(c.adapter, weights={
        k: (v * torch.inf if "lora_A" in k else v) for k, v in c.adapter.weights.items()})), "inf"),
    (lambda c, f, cfg: dataclasses.replace(c, adapter=new_adapter(f, dataclasses.replace(cfg.lora, rank=2), 0)),
     "shape"),
    (lambda c, f, cfg: dataclasses.replace(c, adapter=dataclasses.replace(c.adapter, base_fingerprint="0" * 16)),
     "fingerprint"),
    (lambda c, f, cfg: dataclasses.replace(c, institution=99), "unknown institution"),
    (lambda c, f, cfg: dataclasses.replace(c, task="dermoscopy"), "task"),
    (lambda c, f, cfg: dataclasses.replace(c, distilled=dataclasses.replace(c.distilled, x=c.distilled.x[:, :, :8, :8])),
     "distilled images"),
    (lambda c, f, cfg: dataclasses.replace(c, adapter=dataclasses.replace(c.adapter, weights={
        k: v for k, v in c.adapter.weights.items() if "blocks.0." not in k})), "modules"),
])
def test_bad_commit_is_rejected_with_its_reason_and_changes_nothing(state, commits, tiny_foundation, store_cfg,
                                                                   corrupt, words):
    # Prepare: one good commit on main
    state.receive(commits[0])
    before = {s: branch_tensors(state, s) for s in state.branches.strategies}
    bad = corrupt(commits[1], tiny_foundation, store_cfg)
    # Execute
    ack = state.receive(bad)
    # Assert
    assert ack["event"] == "rejected" and words in ack["reason"].lower(), ack["reason"]
    assert state.version == 1 and len(list(state.log.commits_dir.iterdir())) == 1
    for s in state.branches.strategies:
        after = branch_tensors(state, s)
        assert all(torch.equal(before[s][k], after[k]) for k in after)
    last = json.loads(state.log.path.read_text().splitlines()[-1])
    assert last["event"] == "rejected" and last["reason"] == ack["reason"]


def test_validate_commit_accepts_a_good_commit(commits, institutions, tiny_foundation, store_cfg):
    assert validate_commit(commits[0], institutions=institutions, fingerprint=tiny_foundation.fingerprint,
                           shapes=expected_shapes(tiny_foundation, store_cfg), img_size=store_cfg.data.img_size) is None


def test_commits_are_idempotent_by_id(state, commits):
    # Prepare
    first = state.receive(commits[0])
    # Execute: the same commit again, and another commit under the same id
    again = state.receive(commits[0])
    impostor = state.receive(dataclasses.replace(commits[1], id=commits[0].id))
    # Assert
    assert again["duplicate"] and again["seq"] == first["seq"] and state.version == 1
    assert impostor["event"] == "rejected" and "duplicate commit id" in impostor["reason"]


def test_staleness_is_recorded_and_limited(tmp_path, store_cfg, institutions, tiny_foundation, tiny_cohort):
    # Prepare: max staleness 1
    cfg = store_cfg.replace(schedule=dataclasses.replace(store_cfg.schedule, init_from="main", max_staleness=1))
    st = MainState(tmp_path / "run", cfg, institutions, tiny_foundation)
    mk = lambda i, k, v: make_commit(tiny_foundation, tiny_cohort, cfg, i, k, pulled_version=v)  # noqa: E731
    # Execute
    acks = [st.receive(mk(0, 0, 0)), st.receive(mk(1, 0, 0)), st.receive(mk(2, 0, 0)), st.receive(mk(3, 0, 5))]
    # Assert: staleness = version on arrival − pulled version
    assert [a.get("staleness") for a in acks[:2]] == [0, 1]
    assert acks[2]["event"] == "rejected" and "max_staleness" in acks[2]["reason"]
    assert acks[3]["event"] == "rejected" and "ahead of main" in acks[3]["reason"]


def test_staleness_weighting_down_weights_stale_commits(tmp_path, store_cfg, institutions, tiny_foundation,
                                                        tiny_cohort):
    # Prepare: the same two commits, the second stale by 1, with and without 1/(1+s) weighting
    results = {}
    for weighting in (False, True):
        cfg = store_cfg.replace(merge=dataclasses.replace(store_cfg.merge, strategies=("task_arithmetic",)),
                                schedule=dataclasses.replace(store_cfg.schedule, init_from="main",
                                                             staleness_weighting=weighting))
        st = MainState(tmp_path / f"run{weighting}", cfg, institutions, tiny_foundation)
        st.receive(make_commit(tiny_foundation, tiny_cohort, cfg, 0, 0))
        st.receive(make_commit(tiny_foundation, tiny_cohort, cfg, 1, 0))
        results[weighting] = st
    a = [c.adapter for c in results[True].commits]
    # Assert: task arithmetic's default λ per contributor (a scale, not 1/N) times 1/(1+s): λ·(1, 1/2)
    lam = get_spec("task_arithmetic").default_weight
    assert lam is not None and lam != 0.5                      # a published scale, not a mean of two
    merged = results[True].pull("task_arithmetic")[1]
    m = a[0].modules()[0]
    expected = lam * (a[0].delta(m) + a[1].delta(m) / 2)
    assert torch.allclose(merged.delta(m), expected, atol=1e-5)
    plain = results[False].pull("task_arithmetic")[1]
    assert torch.allclose(plain.delta(m), lam * (a[0].delta(m) + a[1].delta(m)), atol=1e-5)


def test_restore_rebuilds_every_acknowledged_commit_and_branch(state, commits, store_cfg, institutions,
                                                               tiny_foundation):
    # Prepare: 4 accepted, 1 rejected; an orphan dir and a torn line as a crash would leave them
    for c in commits[:4]:
        state.receive(c)
    state.receive(dataclasses.replace(commits[4], institution=99))
    (state.log.commits_dir / "00005-inst001").mkdir()
    with open(state.log.path, "a") as fh:
        fh.write('{"event": "accepted", "seq": 5, "id"')
    # Execute
    with pytest.warns(UserWarning, match="torn last line"):
        restored = MainState.restore(state.log.dir, store_cfg, institutions, tiny_foundation)
    # Assert
    assert restored.version == 4 and [c.id for c in restored.commits] == [c.id for c in commits[:4]]
    assert not (state.log.commits_dir / "00005-inst001").exists()
    assert_same_branches(state, restored)
    assert restored.receive(commits[1])["duplicate"]
    ack = restored.receive(commits[4])
    assert ack["event"] == "accepted" and ack["seq"] == 5
    assert all(json.loads(line) for line in restored.log.path.read_text().splitlines())


def test_restore_names_a_corrupted_commit_dir(state, commits, store_cfg, institutions, tiny_foundation):
    # Prepare
    for c in commits[:2]:
        state.receive(c)
    target = state.log.commits_dir / "00002-inst001" / "distilled.npz"
    ds = DistilledSet.load(target)
    dataclasses.replace(ds, x=np.clip(ds.x + 0.1, 0, 1)).save(target)
    # Execute / Assert
    with pytest.raises(ValueError, match="00002-inst001.*does not match the hash"):
        MainState.restore(state.log.dir, store_cfg, institutions, tiny_foundation)


def test_corrupted_log_line_is_an_error_naming_it(tmp_path):
    log = CommitLog(tmp_path)
    log.append({"event": "rejected", "reason": "x"})
    with open(log.path, "a") as fh:
        fh.write("garbage\n")
    log.append({"event": "rejected", "reason": "y"})
    with pytest.raises(ValueError, match="line 2 is corrupted"):
        log.read()


def test_save_main_writes_each_branch(state, commits, tmp_path):
    from sim.merge import load_mixture
    from sim.model import load_adapter

    for c in commits[:3]:
        state.receive(c)
    version, snap = state.snapshot()
    out = save_main(snap, tmp_path / "main")
    assert load_mixture(out / "mixture").weights.shape == (3,)
    for s in ("fusion", "svd", "ties"):
        assert load_adapter(out / s).modules() == snap[s].modules()
    assert state.tasks_seen() == list(dict.fromkeys(c.task for c in commits[:3]))
    assert set(state.latest_adapters()) == {0, 1, 2}


# -- what the merge actor forwards (MainState) and what replay uses (MainBranches) --------------------------------
@pytest.fixture()
def fast_cfg(store_cfg):
    # deterministic strategies only, so these tests need no coefficient search
    return store_cfg.replace(merge=dataclasses.replace(store_cfg.merge, strategies=("svd", "ties")))


def test_a_delivered_commit_logs_how_it_arrived(tmp_path, fast_cfg, institutions, tiny_foundation, commits):
    # Prepare
    state = MainState(tmp_path / "run", fast_cfg, institutions, tiny_foundation)
    commit = dataclasses.replace(commits[0], meta=commits[0].meta | {"task_s": 0.25})
    # Execute
    ack = state.receive_delivered(commit, 2, {"via": "test"}, started=time.perf_counter())
    # Assert: the log line carries the note, the attempts and the pickled size; the ack also the timings
    line = json.loads(state.log.path.read_text().splitlines()[0])
    assert line["event"] == "accepted" and line["via"] == "test" and line["attempts"] == 2
    assert line["received_bytes"] == len(pickle.dumps(commit, protocol=5))
    assert list(line)[-4:] == ["via", "attempts", "received_bytes", "dir"]
    assert ack["task_s"] == 0.25 and ack["ack_s"] >= 0 and "ack_s" not in line


def test_an_undelivered_contribution_is_rejected_with_its_failure(tmp_path, fast_cfg, institutions, tiny_foundation):
    # Prepare
    state = MainState(tmp_path / "run", fast_cfg, institutions, tiny_foundation)
    contribution = dataclasses.make_dataclass("C", ["id", "institution"])("inst003-00", 3)
    # Execute
    rec = state.reject_undelivered("RuntimeError: boom", contribution, 3, {"injected": None})
    lost = state.reject_undelivered("lost after 1 attempts", None, 1)
    # Assert
    assert rec["reason"] == "contribution failed: RuntimeError: boom" and rec["id"] == "inst003-00"
    assert rec["institution"] == 3 and rec["attempts"] == 3 and state.version == 0
    assert lost["id"] is None and lost["institution"] is None
    assert [json.loads(x)["event"] for x in state.log.path.read_text().splitlines()] == ["rejected", "rejected"]


def test_open_starts_fresh_or_restores_and_says_so(tmp_path, fast_cfg, institutions, tiny_foundation, commits):
    # Prepare / Execute: a new run dir, then the same dir again (a restarted merge actor)
    run = tmp_path / "run"
    first = MainState.open(run, fast_cfg, institutions, tiny_foundation)
    for c in commits[:2]:
        first.receive(c)
    replayed = []
    again = MainState.open(run, fast_cfg, institutions, tiny_foundation, on_apply=lambda s: replayed.append(s.version))
    # Assert
    assert first.records()[0]["event"] == "accepted" and again.version == 2 and replayed == [1, 2]
    last = json.loads(run.joinpath("log.jsonl").read_text().splitlines()[-1])
    assert last["event"] == "restored" and last["version"] == 2
    assert again.records()[-1]["event"] == "restored"
    assert_same_branches(first, again)


def test_main_state_saves_its_branches_and_their_sizes(tmp_path, fast_cfg, institutions, tiny_foundation, commits):
    # Prepare
    state = MainState(tmp_path / "run", fast_cfg, institutions, tiny_foundation)
    assert state.storage_bytes() == {"svd": 0, "ties": 0}
    state.receive(commits[0])
    # Execute
    out = state.save_main()
    # Assert
    assert out == tmp_path / "run" / "main" and {p.name for p in out.iterdir()} == {"svd", "ties"}
    assert state.storage_bytes() == {s: state.pull(s)[1].num_bytes() for s in ("svd", "ties")}


def test_branches_add_is_propose_then_apply(fast_cfg, tiny_foundation, commits):
    # Prepare
    a, b = MainBranches(("svd", "ties"), fast_cfg, tiny_foundation), MainBranches(("svd", "ties"), fast_cfg,
                                                                                    tiny_foundation)
    # Execute
    for seq, c in enumerate(commits[:3], start=1):
        records = a.add(c, seq, 0)
        update, expected = b.propose(c, seq, 0)
        b.apply(update)
        # Assert
        assert [r["strategy"] for r in records] == ["svd", "ties"]
        assert [{k: v for k, v in r.items() if k != "merge_s"} for r in records] == [
            {k: v for k, v in r.items() if k != "merge_s"} for r in expected]
    for s in ("svd", "ties"):
        assert all(torch.equal(a.predictor(s).weights[k], b.predictor(s).weights[k]) for k in a.predictor(s).weights)
    assert a.snapshot().keys() == {"svd", "ties"} and a.snapshot() is not a.merged


def test_branches_refuse_an_unknown_strategy_up_front(fast_cfg, tiny_foundation):
    with pytest.raises(ValueError, match="unknown merge strategy 'tiess'; known: .*ties"):
        MainBranches(("ties", "tiess"), fast_cfg, tiny_foundation)


def test_a_shared_probability_cache_starts_only_the_output_space_branches(store_cfg, tiny_foundation):
    from sim.merge.mixture import ProbabilityCache

    # Prepare
    branches = MainBranches(("fusion", "mixture", "svd"), store_cfg, tiny_foundation)
    cache = ProbabilityCache()
    # Execute
    branches.share_probability_cache(cache)
    # Assert
    assert set(branches.states) == {"mixture"} and branches.states["mixture"].cache is cache
