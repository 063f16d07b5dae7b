"""Attacks by registered institutions (``sim.attacks``) and the gate that keeps them out of main (``sim.gate``)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from sim import attacks
from sim.commit import Commit
from sim.config import AttacksConfig, GateConfig, SimConfig, apply_overrides
from sim.data.base import DistilledSet
from sim.gate import Gate, robust_z, set_accuracy, update_vector
from sim.main_state import MainState
from sim.metrics import accuracy, predict_proba
from sim.schedule import build_schedule
from sim.train import train_adapter

pytestmark = pytest.mark.usefixtures("single_thread")
STEPS = 120
# The tiny foundation is a weak feature extractor: its honest adapters fit their own real images at 0.46-0.83 (a noise
# set of the same labels: at most 0.36, chance 0.33), and merging an honest one lowers another task's sets by ~0.02;
# the constructed cases below set the thresholds between those (the defaults are for real foundations).
MIN_FIT, MAX_DROP = 0.41, 0.1


def real_set(inst, per_class: int = 8, offset: int = 0) -> DistilledSet:
    """Real training images of an institution as its distilled set."""
    idx = np.concatenate([np.flatnonzero(inst.train.y == c)[offset:offset + per_class]
                          for c in range(len(inst.classes))])
    return DistilledSet(inst.task, inst.classes, inst.train.x[idx].astype(np.float32) / 255.0, inst.train.y[idx],
                        method="real")


def trained(cfg, foundation, inst, seed: int, train=None):
    return train_adapter(foundation, train or inst.train, inst.task, inst.classes, cfg.lora,
                         dataclasses.replace(cfg.train, steps=STEPS), seed=seed).adapter


@pytest.fixture(scope="module")
def honest(tiny_cfg, tiny_foundation, tiny_cohort):
    """Two honest commits per institution of the tiny cohort (4 institutions, 2 tasks), adapters trained on their
    own data and real images as their distilled sets."""
    out = []
    for k in range(2):
        for inst in tiny_cohort.institutions:
            adapter = trained(tiny_cfg, tiny_foundation, inst, seed=100 * k + inst.id)
            out.append(Commit(f"inst{inst.id:03d}-{k:02d}", inst.id, inst.task, tuple(inst.classes), adapter,
                              real_set(inst, offset=8 * k)))
    return out


# ------------------------------------------------------------------------------------------
# Who attacks, and what each attack does
# ------------------------------------------------------------------------------------------
def test_malicious_share_and_start_are_drawn_from_the_seed():
    cfg = apply_overrides(SimConfig(), ["data.institutions=10", "attacks.kind=scale", "attacks.share=0.3",
                                        "attacks.start=4"])
    bad = attacks.malicious(cfg.attacks, 10, cfg.seed)
    assert len(bad) == 3 and bad == attacks.malicious(cfg.attacks, 10, cfg.seed)
    assert bad != attacks.malicious(cfg.attacks, 10, cfg.seed + 1) or len(bad) == 10
    order = build_schedule(cfg.schedule, 10, cfg.seed).contributions
    kinds = [attacks.attack_of(cfg, c) for c in order]
    assert all(k is None for k in kinds[:4])
    assert all((k == "scale") == (c.institution in bad) for c, k in zip(order[4:], kinds[4:]))
    clean = apply_overrides(cfg, ["attacks.share=0"])
    assert not clean.attacks.any and all(attacks.attack_of(clean, c) is None for c in order)


def test_scale_and_sign_flip_change_the_update_as_claimed(honest, tiny_foundation, tiny_cohort):
    a = honest[0].adapter
    scaled = attacks.attacked_update(a, "scale", AttacksConfig(kind="scale", scale=10.0))
    flipped = attacks.attacked_update(a, "sign_flip", AttacksConfig(kind="sign_flip"))
    for m in a.modules():
        torch.testing.assert_close(scaled.delta(m), 10.0 * a.delta(m))
        torch.testing.assert_close(flipped.delta(m), -a.delta(m))
    # a sign-flipped adapter scores worse on its task than the honest one
    inst = tiny_cohort.institutions[honest[0].institution]

    def acc(adapter):
        return accuracy(inst.test.y, predict_proba(tiny_foundation, adapter, inst.test.x, inst.task, inst.classes))

    assert acc(flipped) < acc(a)


def test_label_flip_and_backdoor_poison_the_training_data(tiny_cfg, tiny_foundation, tiny_cohort):
    inst = tiny_cohort.institutions[0]
    k = len(inst.classes)
    cfg = AttacksConfig(kind="backdoor", share=1.0, poison_rate=0.3, target_class=1, trigger_size=3)
    flipped = attacks.poisoned_training(inst.train, k, "label_flip", cfg, 0, "c")
    np.testing.assert_array_equal(flipped.y, (inst.train.y + 1) % k)
    poisoned = attacks.poisoned_training(inst.train, k, "backdoor", cfg, 0, "c")
    changed = np.flatnonzero((poisoned.x != inst.train.x).any(axis=(1, 2, 3)) | (poisoned.y != inst.train.y))
    assert abs(len(changed) - 0.3 * len(inst.train.y)) <= 1 and (poisoned.y[changed] == 1).all()
    assert (poisoned.x[changed][:, :, -3:, -3:] == 255).all()
    again = attacks.poisoned_training(inst.train, k, "backdoor", cfg, 0, "c")
    np.testing.assert_array_equal(again.x, poisoned.x)                 # deterministic per seed and contribution
    # the backdoored adapter sends triggered test images of other classes to the target far more than the honest one
    honest_a = trained(tiny_cfg, tiny_foundation, inst, seed=7)
    backdoored = trained(tiny_cfg, tiny_foundation, inst, seed=7, train=poisoned)
    others = inst.test.y != 1
    triggered = attacks.stamp(inst.test.x[others], 3)

    def success(adapter):
        p = predict_proba(tiny_foundation, adapter, triggered, inst.task, inst.classes)
        return float((p.argmax(1) == 1).mean())

    assert success(backdoored) > success(honest_a) + 0.2
    assert attacks.attack_success(tiny_foundation, backdoored, inst.test, inst.task, inst.classes, cfg) == \
        pytest.approx(success(backdoored))
    # and a label-flipped adapter is worse on the true labels
    lf = trained(tiny_cfg, tiny_foundation, inst, seed=7, train=flipped)
    assert set_accuracy(tiny_foundation, lf, [real_set(inst)]) < set_accuracy(tiny_foundation, honest_a,
                                                                                [real_set(inst)])


def test_distill_mismatch_sends_noise_with_the_labels(honest):
    ds = honest[0].distilled
    bad = attacks.mismatched_set(ds, 0, "c")
    assert bad.x.shape == ds.x.shape and (bad.y == ds.y).all() and not np.allclose(bad.x, ds.x)
    assert bad.x.min() >= 0 and bad.x.max() <= 1


def relative_change(a, b) -> float:
    """‖ΔW_a − ΔW_b‖ / ‖ΔW_b‖ over every module, from the dense updates."""
    return float((update_vector(a) - update_vector(b)).norm() / update_vector(b).norm())


def test_free_rider_copies_an_accepted_adapter_of_its_task_of_another_institution(honest):
    # Prepare: the honest first round, institutions 0-3 on two tasks
    first = honest[:4]
    me = first[0]
    mates = [c for c in first if c.task == me.task and c.institution != me.institution]
    # Execute
    picks = {id(attacks.copy_source(first, me.institution, me.task, 0, f"c{k}")) for k in range(8)}
    again = attacks.copy_source(first, me.institution, me.task, 0, "c1")
    # Assert: only another institution's commit of its own task is copied, the same one per (seed, contribution)
    assert picks == {id(c.adapter) for c in mates} and mates
    assert again is attacks.copy_source(first, me.institution, me.task, 0, "c1")
    assert attacks.copy_source([me], me.institution, me.task, 0, "c1") is None            # only its own
    assert attacks.copy_source([c for c in first if c.task != me.task], me.institution, me.task, 0, "c") is None


def test_free_ride_is_close_to_but_not_the_copied_adapter_and_deterministic_per_seed(honest):
    # Prepare
    source = honest[1].adapter
    # Execute
    copy = attacks.free_ride(source, 0.01, 0, "inst002-01")
    same = attacks.free_ride(source, 0.01, 0, "inst002-01")
    other = attacks.free_ride(source, 0.01, 1, "inst002-01")
    exact = attacks.free_ride(source, 0.0, 0, "inst002-01")
    # Assert: each factor moves by about 1 % of its norm, ΔW by a few %, never 0; same seed and id, same commit
    for key, f in source.weights.items():
        rel = float((copy.weights[key] - f).norm() / f.norm())
        assert 0.005 < rel < 0.02 and not torch.equal(copy.weights[key], f)
    assert 0 < relative_change(copy, source) < 0.05
    assert all(torch.equal(copy.weights[k], same.weights[k]) for k in copy.weights)
    assert not all(torch.equal(copy.weights[k], other.weights[k]) for k in copy.weights)
    assert all(torch.equal(exact.weights[k], source.weights[k]) for k in source.weights)
    assert copy.alpha == source.alpha and copy.base_fingerprint == source.base_fingerprint


def test_a_free_rider_commits_the_copy_without_training_and_with_its_own_distilled_set(tiny_run_cfg, tiny_foundation,
                                                                                        tiny_cohort, honest):
    from sim.contribute import contribute

    # Prepare: every institution free-rides from the first merge position on
    cfg = apply_overrides(tiny_run_cfg, ["attacks.kind=free_rider", "attacks.share=1.0", "attacks.noise=0.01"])
    c = build_schedule(cfg.schedule, cfg.data.institutions, cfg.seed).contributions[0]
    inst = tiny_cohort.institutions[c.institution]
    source = next(h for h in honest if h.task == inst.task and h.institution != inst.id)
    # Execute
    commit = contribute(tiny_foundation, inst, cfg, c, pulled=source.adapter, pulled_version=3)
    # Assert: the copy, marked, untrained, from the pulled version, with a set of its own task
    assert commit.meta["attack"] == "free_rider" and commit.meta["train_s"] == 0.0
    assert 0 < relative_change(commit.adapter, source.adapter) < 0.05
    assert commit.pulled_version == 3 and commit.distilled.task == inst.task == commit.task
    # nothing to copy (no accepted commit of its task yet): it trains honestly, unmarked
    alone = contribute(tiny_foundation, inst, cfg, c)
    assert "attack" not in alone.meta and alone.meta["train_s"] > 0


def test_a_free_riders_cache_key_holds_its_attack_its_noise_and_the_copied_adapter(honest):
    from sim.cache import contribution_key

    cfg = apply_overrides(SimConfig(), ["attacks.kind=free_rider", "attacks.share=0.5"])
    key = contribution_key(cfg, "inst000-00", 7, honest[1].adapter, "free_rider")
    assert key != contribution_key(cfg, "inst000-00", 7, honest[1].adapter, None)              # honest
    assert key != contribution_key(cfg, "inst000-00", 7, honest[3].adapter, "free_rider")      # another copy
    assert key != contribution_key(apply_overrides(cfg, ["attacks.noise=0.05"]), "inst000-00", 7, honest[1].adapter,
                                   "free_rider")
    # attacks.noise at its default leaves the earlier kinds' keys as they were before it existed (caches stay valid)
    scale = apply_overrides(SimConfig(), ["attacks.kind=scale", "attacks.share=0.5"])
    assert contribution_key(scale, "inst000-00", 7, None, "scale") == \
        "b25f1dec1717d9949f249539546c0410ef707ea61106fea0eaa57cbb4d54730b"


def test_main_state_answers_a_free_riders_pull_with_an_accepted_commit(tmp_path, tiny_cfg, tiny_foundation,
                                                                      tiny_cohort, honest):
    cfg = tiny_cfg.replace(merge=dataclasses.replace(tiny_cfg.merge, strategies=("task_arithmetic",)))
    meta = {i.id: (i.task, tuple(i.classes)) for i in tiny_cohort.institutions}
    state = MainState(tmp_path / "run", cfg, meta, tiny_foundation)
    me = honest[0]
    assert state.pull_accepted(me.institution, "c") == (0, None)                     # nothing accepted yet
    for c in honest[:4]:
        state.receive(c)
    version, adapter = state.pull_accepted(me.institution, "c")
    mates = [c.adapter for c in honest[:4] if c.task == me.task and c.institution != me.institution]
    assert version == 4 and any(adapter is a for a in mates)
    # at a past version only the commits accepted by then are copied (a resumed run's early pulls)
    first_mate = next(i for i, c in enumerate(honest[:4]) if c.task == me.task and c.institution != me.institution)
    assert state.pull_accepted(me.institution, "c", first_mate) == (first_mate, None)
    with pytest.raises(ValueError, match="version 9"):
        state.pull_accepted(me.institution, "c", 9)


# ------------------------------------------------------------------------------------------
# Each check rejects its attack on a constructed case and passes honest commits
# ------------------------------------------------------------------------------------------
def gate_for(tiny_cfg, tiny_foundation, *checks: str, **thresholds) -> Gate:
    cfg = tiny_cfg.replace(gate=GateConfig(checks=checks, **thresholds))
    return Gate(cfg, tiny_foundation)


def test_robust_z_by_hand():
    assert robust_z(5.0, [1.0, 2.0, 3.0]) == pytest.approx((5 - 2) / (1.4826 * 1.0))
    assert robust_z(5.0, [1.0, 2.0, 3.0], floor=2.0) == pytest.approx((5 - 2) / 2.0)
    assert robust_z(2.0, [2.0, 2.0]) == 0.0 and robust_z(3.0, [2.0, 2.0]) == float("inf")


def test_norm_check_rejects_a_scaled_update_and_passes_honest_ones(tiny_cfg, tiny_foundation, honest):
    gate = gate_for(tiny_cfg, tiny_foundation, "norm", min_history=3)
    for c in honest[:4]:
        gate.accept(c)
    scaled = dataclasses.replace(honest[4], adapter=attacks.attacked_update(honest[4].adapter, "scale",
                                                                            AttacksConfig(kind="scale", scale=10.0)))
    (ok,), (bad,) = gate.precheck(honest[4]), gate.precheck(scaled)
    # by hand: its task has 2 accepted commits (< min_history), so it is judged against all 4, on the log scale
    logs = np.log([float(update_vector(c.adapter).norm()) for c in honest[:4]])
    med = np.median(logs)
    spread = max(1.4826 * np.median(np.abs(logs - med)), 0.25)
    expected = (np.log(float(update_vector(scaled.adapter).norm())) - med) / spread
    assert ok.passed and bad.value == pytest.approx(expected) and expected == pytest.approx(np.log(10) / spread +
                                                                                           ok.value, rel=1e-4)
    assert not bad.passed and "robust z" in bad.reason
    # too little history: no judgement
    fresh = gate_for(tiny_cfg, tiny_foundation, "norm", min_history=3)
    assert fresh.precheck(scaled)[0].passed


def test_cosine_check_rejects_a_sign_flipped_update_and_passes_honest_ones(tiny_cfg, tiny_foundation, honest):
    gate = gate_for(tiny_cfg, tiny_foundation, "cosine", min_history=1)
    for c in honest[:4]:
        gate.accept(c)
    flipped = dataclasses.replace(honest[4], adapter=attacks.attacked_update(honest[4].adapter, "sign_flip",
                                                                             AttacksConfig(kind="sign_flip")))
    (ok,), (bad,) = gate.precheck(honest[4]), gate.precheck(flipped)
    assert ok.passed and ok.value > 0 and not bad.passed and bad.value == pytest.approx(-ok.value, abs=1e-5)


def test_duplicate_check_rejects_a_free_riders_copy_and_passes_honest_ones(tiny_cfg, tiny_foundation, honest):
    # Prepare: the first round accepted; a free rider copies institution 1's commit with 1 % noise
    gate = gate_for(tiny_cfg, tiny_foundation, "duplicate")
    assert gate.precheck(honest[0])[0].passed                            # nothing accepted: nothing to copy
    for c in honest[:4]:
        gate.accept(c)
    copy = dataclasses.replace(honest[5], adapter=attacks.free_ride(honest[1].adapter, 0.01, 0, "c"))
    # Execute
    bad = gate.precheck(copy)[0]
    ok = [gate.precheck(c)[0] for c in honest[4:]]
    # Assert: the cosine is the dense one, ~1 to the copied commit; honest second-round commits stay below 0.99
    dense = float(torch.nn.functional.cosine_similarity(update_vector(copy.adapter), update_vector(honest[1].adapter),
                                                        dim=0))
    assert not bad.passed and bad.value == pytest.approx(dense, abs=1e-6) and bad.value > 0.999
    assert honest[1].id in bad.reason and "gate.max_cosine" in bad.reason
    assert all(c.passed and c.value < 0.99 for c in ok)
    for c in ok:                                                         # each the largest dense cosine
        vec = update_vector(honest[4 + ok.index(c)].adapter)
        best = max(float(torch.nn.functional.cosine_similarity(vec, update_vector(h.adapter), dim=0))
                   for h in honest[:4])
        assert c.value == pytest.approx(best, abs=1e-6)


def test_fit_check_rejects_a_mismatched_set_and_passes_honest_ones(tiny_cfg, tiny_foundation, honest):
    gate = gate_for(tiny_cfg, tiny_foundation, "fit", min_fit=MIN_FIT)
    mismatched = dataclasses.replace(honest[0], distilled=attacks.mismatched_set(honest[0].distilled, 0, "c"))
    assert all(gate.precheck(c)[0].passed for c in honest)
    bad = gate.precheck(mismatched)[0]
    assert not bad.passed and bad.value < MIN_FIT and "own distilled set" in bad.reason


def test_regression_check_rejects_updates_that_hurt_main(tiny_cfg, tiny_foundation, honest):
    # Prepare: main's task_arithmetic branch after the honest first round (institutions 0-3, two tasks)
    from sim.branches import MainBranches

    cfg = tiny_cfg.replace(merge=dataclasses.replace(tiny_cfg.merge, strategies=("task_arithmetic",)),
                           gate=GateConfig(checks=("regression",), max_drop=MAX_DROP, min_gain=-MAX_DROP))
    branches = MainBranches(("task_arithmetic",), cfg, tiny_foundation)
    for seq, c in enumerate(honest[:4], start=1):
        branches.add(c, seq, 0)
    gate, received = Gate(cfg, tiny_foundation), branches.arrived.seen(3)
    flip = AttacksConfig(kind="sign_flip")

    def check(c):
        update, _ = branches.propose(c, 5, 0)
        return gate.regression(c, branches.predictor("task_arithmetic"), update["merged"]["task_arithmetic"],
                               received)

    def flipped(c):
        return dataclasses.replace(c, adapter=attacks.attacked_update(c.adapter, "sign_flip", flip))

    # Execute / Assert: honest second-round commits pass; a sign-flipped histology commit lowers the xray sets
    # beyond max_drop, a sign-flipped xray commit lowers its own task's
    assert all(check(c).passed for c in honest[4:])
    other = check(flipped(honest[4]))
    assert not other.passed and other.value > MAX_DROP and "lowers task xray" in other.reason
    own = check(flipped(honest[5]))
    assert not own.passed and "its own task xray" in own.reason


# ------------------------------------------------------------------------------------------
# In the merge actor's loop: a rejected commit changes nothing
# ------------------------------------------------------------------------------------------
def test_a_commit_the_gate_rejects_changes_no_branch(tmp_path, tiny_cfg, tiny_foundation, tiny_cohort, honest):
    cfg = tiny_cfg.replace(merge=dataclasses.replace(tiny_cfg.merge, strategies=("ties", "svd")),
                           gate=GateConfig(checks=("norm", "fit"), min_history=3, min_fit=MIN_FIT))
    meta = {i.id: (i.task, tuple(i.classes)) for i in tiny_cohort.institutions}
    state = MainState(tmp_path / "run", cfg, meta, tiny_foundation)
    acks = [state.receive(c) for c in honest[:4]]     # the first three held at the cold start, the fourth takes all on
    assert [a["event"] for a in acks] == ["held", "held", "held", "accepted"] and acks[3]["released"] == 4
    before = {s: {k: v.clone() for k, v in p.weights.items()} for s, p in state.branches.snapshot().items()}
    scaled = dataclasses.replace(honest[4], adapter=attacks.attacked_update(honest[4].adapter, "scale",
                                                                            AttacksConfig(kind="scale", scale=10.0)),
                                 meta={"attack": "scale"})
    ack = state.receive(scaled)
    assert ack["event"] == "rejected" and ack["gate_failed"] == "norm" and ack["reason"].startswith("gate norm:")
    assert ack["attack"] == "scale" and ack["gate_norm"] > 3.5 and state.version == 4
    after = state.branches.snapshot()
    assert all(torch.equal(before[s][k], after[s].weights[k]) for s in before for k in before[s])
    # the honest commit passes, with the figures in its log record
    ok = state.receive(honest[4])
    assert ok["event"] == "accepted" and "gate_norm" in ok and "gate_fit" in ok and ok["gate_s"] >= 0


# ------------------------------------------------------------------------------------------
# The cold start: commits held until gate.min_history can judge their norms
# ------------------------------------------------------------------------------------------
def cold_state(path, tiny_cfg, tiny_foundation, tiny_cohort, checks=("norm",), cold_start="hold") -> MainState:
    cfg = tiny_cfg.replace(merge=dataclasses.replace(tiny_cfg.merge, strategies=("ties", "svd")),
                           gate=GateConfig(checks=checks, min_history=3, cold_start=cold_start))
    return MainState(path, cfg, {i.id: (i.task, tuple(i.classes)) for i in tiny_cohort.institutions}, tiny_foundation)


def branch_weights(state: MainState) -> dict:
    return {s: p.weights for s, p in state.branches.snapshot().items()}


def same_weights(x: dict, y: dict) -> bool:
    return x.keys() == y.keys() and all(x[s].keys() == y[s].keys() and all(torch.equal(x[s][k], y[s][k])
                                                                           for k in x[s]) for s in x)


def test_a_scaled_first_commit_is_held_and_rejected_at_the_cold_start(tmp_path, tiny_cfg, tiny_foundation,
                                                                      tiny_cohort, honest):
    # Prepare: the very first commit is scaled × 10 (attacks.start 0), then honest ones
    scaled = dataclasses.replace(honest[0], adapter=attacks.attacked_update(honest[0].adapter, "scale",
                                                                            AttacksConfig(kind="scale", scale=10.0)),
                                 meta={"attack": "scale"})
    stream = [scaled] + honest[1:5]
    # Execute: through the norm check, holding at the cold start; and the honest commits alone, ungated
    state = cold_state(tmp_path / "hold", tiny_cfg, tiny_foundation, tiny_cohort)
    acks = []
    for c in stream:
        acks.append(state.receive(c))
        if len(acks) < 4:     # held: merged into nothing yet
            assert acks[-1]["event"] == "held" and state.version == 0
            assert all(p is None for p in state.branches.snapshot().values())
    alone = cold_state(tmp_path / "alone", tiny_cfg, tiny_foundation, tiny_cohort, checks=())
    for c in honest[1:5]:
        alone.receive(c)
    # Assert: the fourth arrival (each of the four then has gate.min_history = 3 others) judged them and took them on
    # in arrival order: the scaled one rejected by its norm, the honest ones accepted (their records say held)
    assert [a["event"] for a in acks] == ["held", "held", "held", "accepted", "accepted"]
    assert acks[3]["released"] == 4 and "released" not in acks[4]
    log = [r for r in state.records() if r["event"] in ("accepted", "rejected")]
    assert [(r["id"], r["event"], bool(r.get("held"))) for r in log] == \
        [(scaled.id, "rejected", True)] + [(c.id, "accepted", True) for c in stream[1:4]] + [(stream[4].id, "accepted",
                                                                                            False)]
    assert log[0]["gate_failed"] == "norm" and "3 other commits held or accepted" in log[0]["reason"]
    # by hand: each one's modified z-score against the log norms of the other three
    logs = np.log([float(update_vector(c.adapter).norm()) for c in stream[:4]])
    z = []
    for i in range(4):
        others = np.delete(logs, i)
        med = np.median(others)
        z.append((logs[i] - med) / max(1.4826 * np.median(np.abs(others - med)), 0.25))
    assert [r["gate_norm"] for r in log[:4]] == pytest.approx(z) and z[0] > 3.5 and max(map(abs, z[1:])) <= 3.5
    # ...and main is main of the honest commits alone, bit for bit
    assert state.version == alone.version == 4
    assert same_weights(branch_weights(state), branch_weights(alone))
    # with cold_start: pass the scaled commit goes through unjudged, and main is not the honest one
    passed = cold_state(tmp_path / "pass", tiny_cfg, tiny_foundation, tiny_cohort, cold_start="pass")
    acks = [passed.receive(c) for c in stream]
    assert all(a["event"] == "accepted" for a in acks) and np.isnan(acks[0]["gate_norm"])
    assert not same_weights(branch_weights(passed), branch_weights(alone))


def test_commits_held_at_the_cold_start_survive_a_restart(tmp_path, tiny_cfg, tiny_foundation, tiny_cohort, honest):
    from sim.commit_log import pending_held, resume_point

    # Prepare: three commits held, one delivered twice
    state = cold_state(tmp_path / "run", tiny_cfg, tiny_foundation, tiny_cohort)
    first = [state.receive(c, {"attempts": 1}) for c in honest[:3]]
    again = state.receive(honest[0], {"attempts": 2})
    assert [a["event"] for a in first] == ["held"] * 3 and again["duplicate"] and again["id"] == honest[0].id
    held_records = state.log.read()
    assert [r["id"] for r in pending_held(held_records)] == [c.id for c in honest[:3]]
    # Execute: the merge actor restarts and rebuilds from the log; the fourth commit comes to the new one
    restored = MainState.open(tmp_path / "run", state.cfg, state.institutions, tiny_foundation)
    held = [(c.id, staleness, extra) for c, staleness, extra, _ in restored.held]
    ack = restored.receive(honest[3])
    # Assert: the held commits came back (content checked against the log's hash), with how they arrived, and the
    # fourth took them on as an uninterrupted actor does
    assert held == [(c.id, 0, {"attempts": 1}) for c in honest[:3]]
    assert ack["event"] == "accepted" and ack["released"] == 4 and restored.version == 4
    fresh = cold_state(tmp_path / "fresh", tiny_cfg, tiny_foundation, tiny_cohort)
    for c in honest[:4]:
        fresh.receive(c)
    assert same_weights(branch_weights(restored), branch_weights(fresh))
    assert pending_held(restored.log.read()) == []
    # a resumed run counts held commits as handled, not to be trained again
    schedule = build_schedule(state.cfg.schedule, len(tiny_cohort.institutions), state.cfg.seed)
    assert {c.id for c in honest[:3]} <= resume_point(schedule, held_records)[0]


def test_a_run_that_ends_holding_takes_its_commits_on_unjudged(tmp_path, tiny_cfg, tiny_foundation, tiny_cohort,
                                                               honest):
    state = cold_state(tmp_path / "run", tiny_cfg, tiny_foundation, tiny_cohort)
    assert [state.receive(c)["event"] for c in honest[:2]] == ["held", "held"]
    acks = state.finish()
    assert [(a["id"], a["event"]) for a in acks] == [(honest[0].id, "accepted"), (honest[1].id, "accepted")]
    assert all(np.isnan(a["gate_norm"]) for a in acks) and state.version == 2 and state.finish() == []


@pytest.mark.parametrize("kind", ["scale", "sign_flip"])
def test_with_20_percent_update_attackers_the_gated_main_is_main_of_their_honest_commits_alone(
        tmp_path, tiny_cfg, tiny_foundation, tiny_cohort, honest, kind):
    # Prepare: the malicious share of 20 % drawn from the seed (one of the 4 institutions), attacking from the fifth
    # commit on (attacks.start 4: its second-round commit); the stream is the honest commits in merge order, the
    # malicious institution's from then on attacked as its kind says
    ac = AttacksConfig(kind=kind, share=0.2, start=4, scale=10.0)
    bad = attacks.malicious(ac, len(tiny_cohort.institutions), tiny_cfg.seed)
    assert len(bad) == 1
    stream = [dataclasses.replace(c, adapter=attacks.attacked_update(c.adapter, kind, ac), meta={"attack": kind})
              if c.institution in bad and k >= ac.start else c for k, c in enumerate(honest)]
    attacked = {c.id for c in stream if c.meta.get("attack")}
    strategies = ("ties", "svd", "mixture")
    meta = {i.id: (i.task, tuple(i.classes)) for i in tiny_cohort.institutions}

    def main_of(commits, checks):
        cfg = tiny_cfg.replace(merge=dataclasses.replace(tiny_cfg.merge, strategies=strategies),
                               gate=GateConfig(checks=checks, min_history=2))
        state = MainState(tmp_path / f"run-{len(list(tmp_path.iterdir()))}", cfg, meta, tiny_foundation)
        return state, [state.receive(c) for c in commits]

    # Execute: the attacked stream through the gate (norm and cosine); the same stream without the attacked commits,
    # ungated
    gated, acks = main_of(stream, ("norm", "cosine"))
    alone, _ = main_of([c for c in stream if c.id not in attacked], ())
    # Assert: the gate rejected exactly the attacked commits (its true positives, no honest commit lost), each by the
    # check meant for its kind, and every branch of the gated main predicts bit for bit as main of the honest commits
    rejected = {a["id"]: a["gate_failed"] for a in acks if a["event"] == "rejected"}
    assert set(rejected) == attacked and attacked
    assert set(rejected.values()) == {"norm" if kind == "scale" else "cosine"}
    (_, ours), (_, theirs) = gated.snapshot(), alone.snapshot()
    for strategy in strategies:
        for task in tiny_cohort.tasks:
            x, classes = tiny_cohort.task_split(task, "test").x, tiny_cohort.task_classes[task]
            p = predict_proba(tiny_foundation, ours[strategy], x, task, classes)
            q = predict_proba(tiny_foundation, theirs[strategy], x, task, classes)
            assert np.array_equal(p, q), (strategy, task)


def test_bad_attacks_and_gate_fields_are_named():
    for override, message in (("attacks.kind=evil", "attacks.kind must be one of none, scale"),
                              ("attacks.share=1.5", "attacks.share must be"),
                              ("attacks.poison_rate=0", "attacks.poison_rate must be"),
                              ("gate.checks=[norm,norm]", "gate.checks must be a list of distinct names"),
                              ("gate.min_fit=2", "gate.min_fit must be"),
                              ("gate.norm_z=0", "gate.norm_z must be"),
                              ("attacks.noise=-0.1", "attacks.noise must be a finite number >= 0"),
                              ("attacks.noise=.inf", "attacks.noise must be"),
                              ("gate.max_cosine=1.5", "gate.max_cosine must be")):
        with pytest.raises(ValueError, match=message):
            apply_overrides(SimConfig(), [override])
    with pytest.raises(ValueError, match="gate.strategy 'ties' is not one of merge.strategies"):
        apply_overrides(SimConfig(), ["merge.strategies=[svd]", "gate.checks=[regression]", "gate.strategy=ties"])


@pytest.mark.parametrize("override, field", [("attacks.kind=evil", "attacks.kind"),
                                             ("gate.checks=[nrm]", "gate.checks"), ("attacks.noise=-1", "attacks.noise")])
def test_forgesim_run_exits_2_naming_a_bad_attacks_or_gate_field(override, field, tmp_path, capsys):
    from experiments.cli import main

    code = main(["run", "--preset", "demo", "--set", override, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("forgesim: error: ") and field in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_a_run_with_attackers_and_the_gate_records_both(ray_session, tiny_run_cfg, tmp_path):
    from actors.runner import run_simulation
    from sim.commit_log import CommitLog

    # Prepare: half the institutions flip the sign of their updates from the third merge position on
    cfg = apply_overrides(tiny_run_cfg, ["attacks.kind=sign_flip", "attacks.share=0.5", "attacks.start=2",
                                         "gate.checks=[norm,cosine,fit]", "gate.min_history=1",
                                         f"gate.min_fit={MIN_FIT}"])
    schedule = build_schedule(cfg.schedule, cfg.data.institutions, cfg.seed)
    expected = {c.id for c in schedule.contributions if attacks.attack_of(cfg, c)}
    # Execute
    summary = run_simulation(cfg, tmp_path / "run")
    # Assert: every malicious commit is marked in the log (accepted or rejected), the gate's counts add up, and the
    # rejected commits are in no branch (each accepted commit is merged once)
    log = CommitLog(tmp_path / "run").read()
    seen = [r for r in log if r["event"] == "accepted" or (r["event"] == "rejected" and r.get("gate_failed"))]
    assert {r["id"] for r in seen if r.get("attack") == "sign_flip"} == expected and expected
    g = summary["gate"]
    assert g["malicious_commits"] == len(expected) and g["checks"] == ["norm", "cosine", "fit"]
    assert g["true_positives"] + g["false_positives"] == g["rejected_by_gate"] == summary["commits_rejected"]
    assert g["honest_commits"] + g["malicious_commits"] == len(schedule.contributions)
    assert summary["commits_accepted"] + summary["commits_rejected"] == len(schedule.contributions)
    merged = [r for r in log if r["event"] == "merged" and r["strategy"] == cfg.merge.strategies[0]]
    assert [r["id"] for r in merged] == [r["id"] for r in log if r["event"] == "accepted"]
    assert all("gate_norm" in r and "gate_s" in r for r in log if r["event"] == "accepted")


def test_a_run_with_free_riders_and_the_duplicate_check_keeps_their_copies_out(ray_session, tiny_run_cfg, tmp_path):
    from actors.runner import run_simulation
    from sim.commit_log import CommitLog

    # Prepare: half the institutions free-ride from the third merge position on
    cfg = apply_overrides(tiny_run_cfg, ["attacks.kind=free_rider", "attacks.share=0.5", "attacks.start=2",
                                         "gate.checks=[duplicate]", "merge.strategies=[svd,median]"])
    # Execute
    summary = run_simulation(cfg, tmp_path / "run")
    # Assert: some contributions free-rode (copied through the merge actor), and the gate rejected every copy
    log = CommitLog(tmp_path / "run").read()
    riders = [r for r in log if r.get("attack") == "free_rider"]
    assert riders and all(r["event"] == "rejected" and r["gate_failed"] == "duplicate" for r in riders)
    assert all(r["gate_duplicate"] > 0.999 for r in riders)
    assert summary["gate"]["true_positives"] == len(riders) and summary["gate"]["false_positives"] == 0
