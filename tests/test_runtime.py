"""The Ray runtime end to end, on one session-scoped Ray: run dir, determinism across worker counts, staleness,
rejected commits and a killed merge actor."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest

ray = pytest.importorskip("ray")

SUMMARY_KEYS = {"run_id", "n_institutions", "commits_accepted", "commits_rejected", "wall_s", "strategies",
                "references"}
STRATEGY_KEYS = {"acc", "auc", "per_task", "forgetting", "bwt", "storage_bytes", "merge_s", "infer_ms_per_image"}


def metrics_of(summary: dict) -> dict:
    """The parts of a summary that must not depend on timing or on the number of workers."""
    strategies = {name: {k: s[k] for k in ("acc", "auc", "per_task", "forgetting", "bwt", "storage_bytes")}
                  for name, s in summary["strategies"].items()}
    return {"strategies": strategies, "references": summary["references"],
            "commits_accepted": summary["commits_accepted"], "commits_rejected": summary["commits_rejected"]}


@pytest.fixture(scope="module")
def run_two_workers(ray_session, tiny_run_cfg, tmp_path_factory):
    from actors.runner import run_simulation

    out = tmp_path_factory.mktemp("run2") / "run"
    return out, run_simulation(tiny_run_cfg, out)


def test_small_run_end_to_end(run_two_workers, tiny_run_cfg):
    # Prepare / Execute: the module fixture ran 4 institutions × 2 contributions with 4 strategies
    out, summary = run_two_workers
    # Assert: the run dir holds what the issue lists
    for name in ("config.yaml", "log.jsonl", "events.parquet", "metrics.parquet", "summary.json"):
        assert (out / name).is_file(), name
    assert len(list((out / "commits").iterdir())) == 8
    commit_dir = sorted((out / "commits").iterdir())[0]
    assert {"adapter_config.json", "adapter_model.safetensors", "distilled.npz", "meta.json"} <= {
        p.name for p in commit_dir.iterdir()}
    for s in tiny_run_cfg.merge.strategies:
        assert (out / "main" / s).is_dir()
    assert (out / "main" / "mixture" / "mixture.json").is_file()
    assert SUMMARY_KEYS <= set(summary) and summary["commits_accepted"] == 8 and summary["commits_rejected"] == 0
    assert set(summary["strategies"]) == set(tiny_run_cfg.merge.strategies)
    for s in summary["strategies"].values():
        assert STRATEGY_KEYS <= set(s) and 0 <= s["acc"] <= 1 and s["storage_bytes"] > 0
        assert set(s["per_task"]) == {"histology", "xray"}
    assert set(summary["references"]) == {"base", "individual", "individual_local"}
    metrics = pd.read_parquet(out / "metrics.parquet")
    # evaluations at versions 4 and 8 (eval_every 4), every strategy × task, plus the references
    assert set(metrics[metrics.strategy == "svd"].version) == {4, 8}
    assert {"base", "individual", "individual_local"} <= set(metrics.strategy)
    # every strategy and every reference is scored on the same test set of each task (one n per task)
    final = metrics[metrics.version.isin([8, -1])]
    assert final.groupby("task")["n"].nunique().eq(1).all()
    assert all(summary["references"]["individual"]["per_task"][t]["n_sites"] == 2 for t in ("histology", "xray"))
    events = pd.read_parquet(out / "events.parquet")
    assert {"pull", "commit", "accepted"} <= set(events.event)
    assert json.loads((out / "summary.json").read_text())["run_id"] == summary["run_id"]


def test_same_seed_same_metrics_with_one_and_two_workers(run_two_workers, tiny_run_cfg, tmp_path):
    from actors.runner import run_simulation

    # Prepare: one worker and one actor per institution, against two workers and the default hosting (two
    # institutions per actor for four institutions)
    _, two = run_two_workers
    one_cfg = tiny_run_cfg.replace(runtime=dataclasses.replace(tiny_run_cfg.runtime, workers=1,
                                                               institutions_per_actor=1))
    # Execute
    one = run_simulation(one_cfg, tmp_path / "run1")
    # Assert: the same numbers whatever the pool's size and however the institutions are hosted
    assert metrics_of(one) == metrics_of(two)
    assert one["institution_actors"] == {"actors": 4, "institutions_per_actor": 1}
    assert two["institution_actors"] == {"actors": 2, "institutions_per_actor": 2}


def test_init_from_main_records_staleness(ray_session, tiny_run_cfg, tmp_path):
    from actors.runner import run_simulation
    from sim.schedule import build_schedule

    # Prepare: a schedule where institutions pull the svd branch while others are still training
    cfg = tiny_run_cfg.replace(
        schedule=dataclasses.replace(tiny_run_cfg.schedule, init_from="main", pull_strategy="svd"),
        merge=dataclasses.replace(tiny_run_cfg.merge, strategies=("svd", "ties")),
        runtime=dataclasses.replace(tiny_run_cfg.runtime, eval_every=0))
    expected = build_schedule(cfg.schedule, cfg.data.institutions, cfg.seed).expected_staleness()
    # Execute
    summary = run_simulation(cfg, tmp_path / "run")
    # Assert: every accepted commit carries its staleness, as the schedule predicts
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    accepted = {r["id"]: r for r in log if r["event"] == "accepted"}
    assert {cid: r["staleness"] for cid, r in accepted.items()} == expected
    assert max(expected.values()) > 0 and summary["staleness"]["max"] == max(expected.values())
    assert all(r["pulled_version"] + r["staleness"] == r["seq"] - 1 for r in accepted.values())


@pytest.fixture()
def merge_actor(ray_session, tiny_run_cfg, tiny_cohort, tmp_path):
    """A merge actor on a fresh run dir, and two real commits made in this process."""
    from actors.merge_actor import MergeActor
    from actors.runner import task_options, worker_pool
    from sim.config import config_to_dict
    from sim.contribute import contribute
    from sim.model import load_foundation
    from sim.schedule import build_schedule

    cfg = tiny_run_cfg.replace(merge=dataclasses.replace(tiny_run_cfg.merge, strategies=("svd", "mixture")),
                               runtime=dataclasses.replace(tiny_run_cfg.runtime, eval_every=0))
    foundation = load_foundation(cfg.model, cfg.data.img_size)
    schedule = build_schedule(cfg.schedule, len(tiny_cohort.institutions), cfg.seed)
    commits = [contribute(foundation, tiny_cohort.institutions[c.institution], cfg, c)
               for c in schedule.contributions[:2]]
    pg, _ = worker_pool(cfg)
    meta = {i.id: (i.task, tuple(i.classes)) for i in tiny_cohort.institutions}
    actor = MergeActor.remote(str(tmp_path / "run"), json.dumps(config_to_dict(cfg)), meta, task_options(cfg, pg))
    yield actor, commits, tmp_path / "run"
    ray.kill(actor)
    ray.util.remove_placement_group(pg)


def test_bad_commit_is_rejected_and_changes_no_branch(merge_actor):
    # Prepare
    actor, (good, other), _ = merge_actor
    assert ray.get(actor.commit.remote([ray.put(good)]))["event"] == "accepted"
    version, before = ray.get(actor.pull.remote("svd"))
    bad = dataclasses.replace(other, adapter=dataclasses.replace(other.adapter, weights={
        k: v * np.nan for k, v in other.adapter.weights.items()}))
    # Execute
    ack = ray.get(actor.commit.remote([ray.put(bad)]))
    # Assert
    assert ack["event"] == "rejected" and "nan" in ack["reason"].lower()
    version_after, after = ray.get(actor.pull.remote("svd"))
    assert version_after == version == 1
    assert all(np.array_equal(before.weights[k], after.weights[k]) for k in before.weights)


def test_killed_merge_actor_comes_back_with_every_acknowledged_commit(merge_actor):
    # Prepare
    actor, commits, run_dir = merge_actor
    acks = [ray.get(actor.commit.remote([ray.put(c)])) for c in commits]
    assert [a["event"] for a in acks] == ["accepted", "accepted"]
    # Execute: kill the process; Ray restarts it and it rebuilds from the log
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(actor.die.remote())
    version, adapter = ray.get(actor.pull.remote("svd"))
    # Assert: both acknowledged commits are there, once; resubmitting one is idempotent
    assert version == 2 and adapter is not None
    again = ray.get(actor.commit.remote([ray.put(commits[1])]))
    assert again["event"] == "accepted" and again["duplicate"] and ray.get(actor.ping.remote()) == 2
    accepted = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in accepted if r["event"] == "accepted") == sorted(c.id for c in commits)


def test_replay_with_the_original_order_reproduces_the_run(run_two_workers, tmp_path):
    from experiments.cli import main

    # Prepare
    out, summary = run_two_workers
    # Execute: 3 orders via the CLI
    code = main(["replay", str(out), "--orders", "3", "--strategies", "fusion,mixture,svd", "--out",
                 str(tmp_path / "orders")])
    # Assert: order 0 = the run's final per-task metrics; every order × strategy has a row
    assert code == 0
    rows = pd.read_parquet(tmp_path / "orders" / "orders.parquet")
    per_task = pd.read_parquet(tmp_path / "orders" / "orders_per_task.parquet")
    assert len(rows) == 9 and set(rows.order) == {0, 1, 2}
    for s in ("fusion", "mixture", "svd"):
        got = per_task[(per_task.order == 0) & (per_task.strategy == s)].set_index("task")
        for task, m in summary["strategies"][s]["per_task"].items():
            assert got.loc[task, "acc"] == pytest.approx(m["acc"], abs=1e-9), (s, task)
            assert got.loc[task, "auc"] == pytest.approx(m["auc"], abs=1e-9), (s, task)
    perms = json.loads((tmp_path / "orders" / "orders.json").read_text())["permutations"]
    assert perms[0] == sorted(perms[0]) and perms[1] != perms[0]


def test_replay_scores_a_merged_adapter_another_order_produced_once(tiny_foundation, tiny_cohort, monkeypatch):
    import torch

    import sim.evaluation
    from sim.model import PEFT_PREFIX, Adapter
    from sim.replay import ReplayEvaluator

    # Prepare: two adapters of the same content (distinct objects, as two orders of an order-invariant merge give),
    # one of other factors, and the first with another scaling; evaluate_predictor counted
    g = torch.Generator().manual_seed(0)
    weights = {}
    for m in ("blocks.0.attn.qkv", "blocks.1.attn.qkv"):
        out_f, in_f = tiny_foundation.weight(m).shape
        weights[f"{PEFT_PREFIX}{m}.lora_A.weight"] = torch.randn(4, in_f, generator=g) * 0.3
        weights[f"{PEFT_PREFIX}{m}.lora_B.weight"] = torch.randn(out_f, 4, generator=g) * 0.3
    same = Adapter(weights, 8.0, tiny_foundation.fingerprint)
    again = Adapter({k: v.clone() for k, v in weights.items()}, 8.0, tiny_foundation.fingerprint)
    other = Adapter({k: -v for k, v in weights.items()}, 8.0, tiny_foundation.fingerprint)
    scaled = Adapter(weights, 16.0, tiny_foundation.fingerprint)
    tasks = list(tiny_cohort.task_classes)
    calls = []
    real = sim.evaluation.evaluate_predictor
    monkeypatch.setattr(sim.evaluation, "evaluate_predictor", lambda *a: calls.append(a[1]) or real(*a))
    evaluator = ReplayEvaluator(tiny_foundation, tiny_cohort, tasks)
    # Execute: order 1 scores `same` and `other`, order 2 `again` and `scaled`
    first = evaluator.records({"svd": same, "fusion": other}, 4)
    second = evaluator.records({"svd": again, "fusion": scaled}, 4)
    # Assert: `again` took `same`'s records (no second pass); every other content was scored, as a run scores it
    assert [id(p) for p in calls] == [id(same), id(other), id(scaled)]
    svd = lambda recs: [r for r in recs if r["strategy"] == "svd"]
    assert svd(second) == svd(first)
    fresh = sim.evaluation.evaluate_snapshot(tiny_foundation, {"svd": again, "fusion": scaled}, tiny_cohort, tasks, 4)
    drop = lambda recs: [{k: v for k, v in r.items() if k != "infer_s"} for r in recs]
    assert drop(second) == drop(fresh)


def test_replay_per_step_scores_every_step_and_ends_at_the_final_merge(run_two_workers, tmp_path, capsys):
    from experiments.cli import main

    # Prepare: the run's commits, replayed in 2 orders by a one-shot and a continual strategy
    out, summary = run_two_workers
    n_commits = summary["commits_accepted"]
    # Execute
    code = main(["replay", str(out), "--orders", "2", "--strategies", "svd,opcm", "--per-step", "--out",
                 str(tmp_path / "steps")])
    # Assert: one row per order × strategy × step × task; the last step's scores are the order's final ones; a
    # task is "seen" from the first step whose merged commits include one of its own
    assert code == 0 and "ACC on the tasks merged so far" in capsys.readouterr().out
    steps = pd.read_parquet(tmp_path / "steps" / "orders_steps.parquet")
    per_task = pd.read_parquet(tmp_path / "steps" / "orders_per_task.parquet")
    tasks = sorted(per_task.task.unique())
    assert len(steps) == 2 * 2 * n_commits * len(tasks)
    last = steps[steps.step == n_commits].set_index(["order", "strategy", "task"]).sort_index()
    final = per_task.set_index(["order", "strategy", "task"]).sort_index()
    np.testing.assert_allclose(last.acc.to_numpy(), final.acc.to_numpy(), atol=1e-12)
    perms = json.loads((tmp_path / "steps" / "orders.json").read_text())["permutations"]
    from sim.replay import load_replayable

    task_of = [c.task for c in load_replayable(out)[1]]
    for k, perm in enumerate(perms):
        for step in range(1, n_commits + 1):
            seen = set(steps[(steps.order == k) & (steps.strategy == "opcm") & (steps.step == step) & steps.seen].task)
            assert seen == {task_of[i] for i in perm[:step]}
    # ...and per_step may name the strategies scored per step: the others are scored at the end only
    from sim.replay import replay

    rows, _, info = replay(out, [1], ["svd", "opcm"], per_step=["opcm"])
    assert {r["strategy"] for r in rows} == {"svd", "opcm"} and {r["strategy"] for r in info["steps"]} == {"opcm"}
    got = pd.DataFrame(info["steps"]).sort_values(["step", "task"]).reset_index(drop=True)
    want = steps[(steps.order == 1) & (steps.strategy == "opcm")].sort_values(["step", "task"]).reset_index(drop=True)
    np.testing.assert_allclose(got.acc.to_numpy(), want.acc.to_numpy(), atol=1e-12)


def test_replay_refuses_a_run_that_pulled_from_main(tmp_path, tiny_run_cfg, capsys):
    import yaml

    from experiments.cli import main
    from sim.config import config_to_dict

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = tiny_run_cfg.replace(schedule=dataclasses.replace(tiny_run_cfg.schedule, init_from="main"))
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg)))
    (run_dir / "log.jsonl").write_text("")
    assert main(["replay", str(run_dir), "--orders", "2", "--out", str(tmp_path / "o")]) == 2
    assert "init_from=base" in capsys.readouterr().err and not (tmp_path / "o").exists()
