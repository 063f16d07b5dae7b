"""Studies: presets, the content-addressed commit cache, the Ray Train joint reference, smoke sweeps with Ray Tune
and resuming an interrupted sweep. One session-scoped Ray (``ray_session``); the resume test interrupts a sweep
running in a subprocess (its own local Ray) with SIGINT, like Ctrl-C, and continues it in this process."""
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
import pandas as pd
import pytest

ray = pytest.importorskip("ray")

from experiments.presets import STUDIES, get_study  # noqa: E402
from experiments.sweep import trial_points  # noqa: E402
from sim.cache import CommitCache, contribution_key  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULT_COLUMNS = {"trial_id", "study", "seed", "contributors", "rank", "ipc", "partition", "strategy", "acc", "auc",
                  "forgetting", "bwt", "storage_bytes", "merge_s", "infer_ms_per_image", "wall_s", "base_acc", "base_auc",
                  "individual_acc", "individual_auc", "individual_local_acc", "individual_local_auc", "joint_acc",
                  "joint_auc", "distill_fidelity", "mia_auc", "run_dir", "built", "time_to_target", "t_end",
                  "staleness_mean", "idle_share", "idle_share_fast"}


# ------------------------------------------------------------------------------------------
# Presets
# ------------------------------------------------------------------------------------------
def test_study_presets_full_and_smoke():
    # Execute
    full = {name: get_study(name) for name in STUDIES}
    smoke = {name: get_study(name, smoke=True) for name in STUDIES}
    # Assert: the grids the issue names, and smoke sizes that are small versions of the same study
    assert full["scaling"].grid["data.institutions"] == (10, 20, 30, 40, 50)
    assert full["ipc"].grid["distill.ipc"] == (1, 5, 10, 20, 50)
    assert full["rank"].grid["lora.rank"] == (2, 4, 8, 16, 32)
    assert full["order"].orders == 20 and full["order"].base.data.institutions == 12
    assert full["forgetting"].base.runtime.eval_every == 1
    assert full["scaling"].base.train.joint and full["ipc"].base.distill.audit
    assert full["asynchrony"].grid["schedule.speed_sigma"] == (0.0, 0.5, 1.0, 1.5)
    assert full["asynchrony"].grid["protocol"] == ("medforge", "async_stale", "sync_rounds")
    for name in STUDIES:           # the asynchrony smoke has one trial per protocol
        assert len(smoke[name].points()) <= (3 if name == "asynchrony" else 2)
        assert smoke[name].base.model.embed_dim <= 32
        assert len(full[name].points()) >= 3          # seeds at least
    with pytest.raises(ValueError, match="unknown study 'scalling'; known: scaling"):
        get_study("scalling")
    # a variant axis: each name is its bundle of config values, and an unknown name is one clear error
    bundle = full["asynchrony"].overrides({"schedule.speed_sigma": 0.5, "protocol": "async_stale", "seed": 1})
    assert bundle == {"schedule.speed_sigma": 0.5, "schedule.init_from": "main", "schedule.protocol": "async",
                      "schedule.staleness_weighting": True, "schedule.max_staleness": 12, "seed": 1}
    with pytest.raises(ValueError, match="protocol 'fedprox' is not one of medforge, async_stale, sync_rounds"):
        full["asynchrony"].overrides({"protocol": "fedprox"})
    # async_stale's max_staleness follows the point's institutions: a grid axis, or a base changed by --set
    stale = {"protocol": "async_stale"}
    assert full["asynchrony"].overrides(stale | {"data.institutions": 8})["schedule.max_staleness"] == 8
    changed = full["asynchrony"].base.replace(data=dataclasses.replace(full["asynchrony"].base.data, institutions=20))
    assert full["asynchrony"].overrides(stale, changed)["schedule.max_staleness"] == 20


def test_a_study_entry_is_what_its_sweep_dir_records_for_the_report(tmp_path):
    from analysis.layout import DEFAULT_LAYOUTS, read_layouts
    from experiments.sweep import config_columns, write_plan

    # Execute
    study = get_study("ipc", smoke=True)
    plan = write_plan(study, study.base, tmp_path, 0)
    # Assert: the layout record (x column, config columns, sections) is the entry's, read back by analysis
    assert read_layouts(tmp_path) == (study.layout(),)
    assert config_columns(plan, tmp_path) == {"seed": "seed", "contributors": "data.institutions",
                                              "rank": "lora.rank", "ipc": "distill.ipc", "partition": "data.partition",
                                              "dataset": "data.name", "attack": "attacks.kind",
                                              "attack_share": "attacks.share", "gate": "gate.checks"}
    # ...and a sweep dir without a record is read as its built-in study would have written it
    assert tuple(get_study(name).layout() for name in STUDIES) == DEFAULT_LAYOUTS


# ------------------------------------------------------------------------------------------
# Commit cache
# ------------------------------------------------------------------------------------------
def test_contribution_key_depends_on_training_config_only(tiny_run_cfg):
    # Prepare
    key = contribution_key(tiny_run_cfg, "inst000-00", 7)
    r = dataclasses.replace
    # Execute / Assert: merge, schedule of evaluations, workers and the clock do not change training
    for same in (tiny_run_cfg.replace(merge=r(tiny_run_cfg.merge, strategies=("svd",), budget=9)),
                 tiny_run_cfg.replace(runtime=r(tiny_run_cfg.runtime, workers=1, eval_every=1)),
                 tiny_run_cfg.replace(train=r(tiny_run_cfg.train, joint=True))):
        assert contribution_key(same, "inst000-00", 7) == key
    # ...the LoRA, training, distillation, data, seed and the contribution do
    for other in (tiny_run_cfg.replace(lora=r(tiny_run_cfg.lora, rank=2)),
                  tiny_run_cfg.replace(train=r(tiny_run_cfg.train, steps=3)),
                  tiny_run_cfg.replace(distill=r(tiny_run_cfg.distill, ipc=1)),
                  tiny_run_cfg.replace(seed=1)):
        assert contribution_key(other, "inst000-00", 7) != key
    assert contribution_key(tiny_run_cfg, "inst000-01", 7) != key
    assert contribution_key(tiny_run_cfg, "inst000-00", 8) != key


def test_commit_cache_makes_once_and_ignores_a_corrupted_entry(tiny_run_cfg, tiny_foundation, tiny_cohort, tmp_path):
    from sim.contribute import contribute
    from sim.schedule import build_schedule

    # Prepare
    c = build_schedule(tiny_run_cfg.schedule, len(tiny_cohort.institutions), 0).contributions[0]
    inst = tiny_cohort.institutions[c.institution]
    cache, key, made = CommitCache(tmp_path), contribution_key(tiny_run_cfg, c.id, c.seed), []

    def make():
        made.append(1)
        return contribute(tiny_foundation, inst, tiny_run_cfg, c)

    # Execute
    first, hit1 = cache.get_or_make(key, make)
    second, hit2 = cache.get_or_make(key, make)
    (cache.path(key) / "distilled.npz").write_bytes(b"not an npz")        # corrupt the entry
    with pytest.warns(UserWarning, match="commit cache: ignoring"):
        third, hit3 = cache.get_or_make(key, make)
    # Assert
    assert (hit1, hit2, hit3) == (False, True, False) and len(made) == 2
    assert first.content_hash() == second.content_hash() == third.content_hash()


@pytest.fixture(scope="module")
def cached_runs(ray_session, tiny_run_cfg, tmp_path_factory):
    """The same tiny run three times: no cache; cache (trains, fills it); cache with other strategies (loads)."""
    from actors.runner import run_simulation

    root = tmp_path_factory.mktemp("cache-runs")
    r = dataclasses.replace
    cfg = tiny_run_cfg.replace(merge=r(tiny_run_cfg.merge, strategies=("svd", "ties")),
                               runtime=r(tiny_run_cfg.runtime, eval_every=0))
    cached = cfg.replace(runtime=r(cfg.runtime, commit_cache=str(root / "cache")))
    other = cached.replace(merge=r(cfg.merge, strategies=("svd", "lora_avg")))
    return {name: (root / name, run_simulation(c, root / name))
            for name, c in (("plain", cfg), ("fill", cached), ("reuse", other))}


def test_a_strategy_sweep_reuses_commits_and_gets_the_same_numbers(cached_runs):
    # Prepare / Execute: the module fixture
    events = {name: pd.read_parquet(d / "events.parquet") for name, (d, _) in cached_runs.items()}
    accepted = {name: ev[ev.event == "accepted"] for name, ev in events.items()}
    # Assert: the second cached run trained nothing, the first trained everything
    assert not accepted["fill"]["cache_hit"].any() and accepted["reuse"]["cache_hit"].all()
    assert len(accepted["reuse"]) == len(accepted["plain"]) == 8
    # ...and the commits are the same ones, so the shared strategy's numbers are identical to an uncached run
    assert list(accepted["reuse"]["hash"]) == list(accepted["plain"]["hash"])
    svd = {name: s["strategies"]["svd"] for name, (_, s) in cached_runs.items()}
    assert svd["plain"]["per_task"] == svd["fill"]["per_task"] == svd["reuse"]["per_task"]


def test_joint_reference_trains_with_two_ray_train_workers(cached_runs, tiny_run_cfg):
    from experiments.joint import add_joint_reference

    # Prepare
    run_dir, _ = cached_runs["plain"]
    r = dataclasses.replace
    cfg = tiny_run_cfg.replace(train=r(tiny_run_cfg.train, joint=True, joint_steps=12),
                               runtime=r(tiny_run_cfg.runtime, workers=2))
    # Execute
    summary = add_joint_reference(cfg, run_dir)
    # Assert: 2 workers, a real adapter, recorded beside the other references
    joint = summary["references"]["joint"]
    assert joint["workers"] == 2 and joint["steps"] == 12
    assert set(joint["per_task"]) == {"histology", "xray"} and 0 <= joint["acc"] <= 1
    assert (run_dir / "joint" / "adapter_model.safetensors").is_file()
    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    assert len(metrics[metrics.strategy == "joint"]) == 2
    assert json.loads((run_dir / "summary.json").read_text())["references"]["joint"]["acc"] == joint["acc"]


def test_report_builds_from_a_real_run(cached_runs):
    from analysis import build_report

    # Prepare / Execute: the report of a small real run (4 institutions × 2 contributions, svd and ties)
    run_dir, _ = cached_runs["fill"]
    html = build_report(run_dir)
    # Assert: the paper table and the run's figures
    md = (html.parent / "report.md").read_text()
    assert "svd" in md and "ties" in md and "individual" in md
    assert (html.parent / "figures" / "timeline.png").stat().st_size > 0
    assert not (html.parent / "figures" / "progress.png").exists()      # one evaluation only: no curve to draw


def test_joint_training_is_data_parallel_equivalent(tiny_run_cfg, tiny_foundation, tiny_cohort):
    """Two ranks whose gradients are averaged (a hand-rolled all-reduce between two in-process replicas) hold the
    same adapter; one rank alone is deterministic."""
    import threading

    from experiments.joint import joint_parts
    from sim.train import train_joint_adapter

    # Prepare: a barrier-based all-reduce between two threads
    parts, cfg = joint_parts(tiny_cohort), tiny_run_cfg
    barrier, slots = threading.Barrier(2), {}

    def sync_for(rank):
        def sync(grads):
            slots[rank] = grads
            barrier.wait()
            mean = [(a + b) / 2 for a, b in zip(slots[0], slots[1])]
            barrier.wait()
            for g, m in zip(grads, mean):
                g.copy_(m)
        return sync

    out = {}

    def run(rank):
        out[rank] = train_joint_adapter(tiny_foundation, parts, cfg.lora, cfg.train, 0, 6, rank, 2, sync_for(rank))

    # Execute
    threads = [threading.Thread(target=run, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    solo = [train_joint_adapter(tiny_foundation, parts, cfg.lora, cfg.train, 0, 6) for _ in range(2)]
    # Assert
    for k in out[0].adapter.weights:
        assert np.allclose(out[0].adapter.weights[k], out[1].adapter.weights[k], atol=1e-6)
        assert np.array_equal(solo[0].adapter.weights[k], solo[1].adapter.weights[k])
    assert out[0].stats["images"] == 6 * (cfg.train.batch_size // 2)


# ------------------------------------------------------------------------------------------
# Sweeps
# ------------------------------------------------------------------------------------------
def sweep_args(study: str, out: Path, tiny_cfg) -> list[str]:
    return ["sweep", study, "--smoke", "--out", str(out), "--set", f"model.cache_dir={tiny_cfg.model.cache_dir}"]


# the rank study's smoke sweep is the one the resume test interrupts and completes (and checks the same way), the
# asynchrony study's the one tests/test_trackers.py logs to TensorBoard and MLflow (and checks with
# check_smoke_sweep); the paper-protocol studies' smoke sweeps are tested with their claims table in
# tests/test_claims.py
@pytest.mark.parametrize("study", sorted(set(STUDIES) - {"rank", "asynchrony", "medforge", "medlego"}))
def test_smoke_sweep_writes_one_row_per_trial_and_strategy(study, ray_session, tiny_cfg, tiny_foundation, tmp_path):
    from experiments.cli import main

    # Prepare
    out = tmp_path / study
    # Execute
    assert main(sweep_args(study, out, tiny_cfg)) == 0
    # Assert
    check_smoke_sweep(study, out)


def check_smoke_sweep(study: str, out: Path) -> pd.DataFrame:
    """What every study's smoke sweep dir must hold (one results row per trial and strategy, the grid's values, a
    summary per run, the report's figure) and what each study adds; returns ``results.parquet``."""
    preset = get_study(study, smoke=True)
    res = pd.read_parquet(out / "results.parquet")
    assert RESULT_COLUMNS <= set(res.columns)
    assert len(res) == len(preset.points()) * len(preset.base.merge.strategies)
    assert set(res.strategy) == set(preset.base.merge.strategies) and (res.study == study).all()
    assert res[["acc", "auc", "base_acc", "individual_acc"]].notna().all().all()
    for field, values in preset.grid.items():
        column = {f: c for c, f in preset.columns.items()}.get(field, field)
        shown = ["+".join(v) or "none" if isinstance(v, tuple) else v for v in values]    # gate.checks: joined
        assert sorted(res[column].unique()) == sorted(shown)
    for run_dir in res.run_dir.unique():
        assert (out / run_dir / "summary.json").is_file()
    attempts = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    plan = json.loads((out / "sweep.json").read_text())
    assert sum(a["event"] == "done" for a in attempts) == len(trial_points(plan))
    # ...and the report of the sweep dir shows the study's figure
    from analysis import build_report

    html = build_report(out)
    figure = {"scaling": "scaling", "order": "orders", "forgetting": "forgetting", "ipc": "ipc", "rank": "rank",
              "strategies": "orders", "poisoning": None, "asynchrony": "time_to_accuracy"}[study]
    if figure:
        assert (html.parent / "figures" / f"{figure}.png").stat().st_size > 0
        assert f"figures/{figure}.png" in (html.parent / "report.md").read_text()
    if study == "poisoning":      # the attacked run's malicious commits met the gate; the table says how it did
        attacked = res[res.attack_share > 0]
        assert (attacked.gate_malicious_commits > 0).all() and attacked.gate_tpr.between(0, 1).all()
        assert res[res.attack_share == 0].gate_malicious_commits.eq(0).all() and (res.gate != "none").all()
        report = (html.parent / "report.md").read_text()
        assert "Attacks and the gate" in report and "drop vs clean (pp)" in report
    if study == "scaling":      # the 4-institution community is built from the 8's log: one trial trains
        assert (html.parent / "figures" / "cost.png").is_file()
        assert len(trial_points(plan)) == 1 and (res.built == "subset").sum() == len(res) / 2
        small = res[res.contributors == 4]
        assert (small.built == "subset").all() and (res[res.contributors == 8].built == "fresh").all()
        summary = json.loads((out / small.run_dir.iloc[0] / "summary.json").read_text())
        assert summary["replayed_from"]["n_institutions"] == 8 and summary["commits_accepted"] == 4
        assert res.joint_acc.notna().all() and len(list((out / "joint").glob("*/records.json"))) == 2
        # ...both joint references (one per community size) trained in one Ray Train job
        assert [json.loads(f.read_text())["batched"] for f in (out / "joint").glob("*/stats.json")] == [2, 2]
    if study == "asynchrony":
        check_asynchrony_sweep(out, res, html, preset)
    if study == "ipc":
        assert res.distill_fidelity.notna().all() and res.mia_auc.between(0, 1).all()
    if study == "forgetting":
        assert res.forgetting.notna().all() and res.bwt.notna().all()
    if study == "strategies":     # every registered strategy is a branch, and the report has their table
        from sim.merge import SPECS

        assert set(res.strategy) == set(SPECS) and res[["storage_bytes", "infer_ms_per_image"]].notna().all().all()
        report = (html.parent / "report.md").read_text()
        assert "Every strategy on the same commits" in report and all(f"| {s} |" in report for s in SPECS)
        # ...and every branch was scored after every merge step of every order (OPCM's protocol)
        steps = pd.read_parquet(out / "orders_steps.parquet")
        n_commits = int(res.commits_accepted.iloc[0])
        assert len(steps) == preset.orders * len(SPECS) * n_commits * steps.task.nunique()
        assert sorted(steps.step.unique()) == list(range(1, n_commits + 1))
        assert "Accuracy and forgetting per merge step" in report
        assert (html.parent / "figures" / "steps.png").stat().st_size > 0
    if study in ("order", "strategies"):
        orders = pd.read_parquet(out / "orders.parquet")
        assert len(orders) == preset.orders * len(preset.base.merge.strategies)
        assert sorted(orders.order.unique()) == list(range(preset.orders))
        # order 0 is the run's own order: it reproduces the run's final accuracy
        first = orders[orders.order == 0].set_index("strategy").acc
        assert np.allclose(first[res.strategy], res.set_index("strategy").acc[res.strategy], atol=1e-9)
    return res


def check_asynchrony_sweep(out: Path, res: pd.DataFrame, html: Path, preset) -> None:
    """The asynchrony smoke: each protocol ran as its bundle says, its measures are in the results, and the report
    has the accuracy-over-time figure (one line per protocol), the staleness and idle figure and the table."""
    trials = res.drop_duplicates("trial_id").set_index("protocol")
    assert set(trials.index) == {"medforge", "async_stale", "sync_rounds"}
    configs = {p: json.loads((out / "sweep.json").read_text())["points"][i]["values"] for i, p in
               enumerate(t["protocol"] for t in (preset.labels(q) for q in preset.points()))}
    assert configs["sync_rounds"]["schedule.protocol"] == "sync_rounds"
    assert configs["medforge"]["schedule.init_from"] == "base"
    assert configs["async_stale"]["schedule.staleness_weighting"] is True
    # every trial merged on the same cohort with the same budget; the last merge is the slowest's last arrival
    assert trials.commits_accepted.add(trials.stale_rejected).eq(8).all()
    assert trials.t_end.nunique() == 1
    assert (res.time_to_target > 0).all() and (res.time_to_target <= res.t_end).all()
    # MedForge's commits start from the foundation: never stale, nobody waits (eager arrivals)
    assert trials.loc["medforge", "staleness_mean"] == 0 and trials.loc["medforge", "idle_share"] == 0
    # sync rounds: the fast half waits at every barrier; a round's commits are 0 … 3 stale by their merge place
    assert trials.loc["sync_rounds", "idle_share_fast"] > trials.loc["sync_rounds", "idle_share"] > 0
    summary = json.loads((out / trials.loc["sync_rounds", "run_dir"] / "summary.json").read_text())
    assert summary["asynchrony"]["staleness_counts"] == {"0": 2, "1": 2, "2": 2, "3": 2}
    # ...merged at the barriers in institution order, round 1 pulled main after round 0's four merges
    events = pd.read_parquet(out / trials.loc["sync_rounds", "run_dir"] / "events.parquet")
    merged = events[events.event == "accepted"].sort_values("seq")
    assert list(merged.id) == [f"inst{i:03d}-{k:02d}" for k in (0, 1) for i in range(4)]
    assert list(merged.pulled_version) == [0] * 4 + [4] * 4 and merged.t_commit.nunique() == 2
    # evaluation rows carry virtual time: one time per barrier (2 rounds)
    metrics = pd.read_parquet(out / trials.loc["sync_rounds", "run_dir"] / "metrics.parquet")
    assert metrics[metrics.version > 0].t_virtual.nunique() == 2
    # ...and every evaluation scores both tasks (runtime.eval_tasks: all), the first one too, with one task merged
    assert metrics[metrics.version > 0].groupby(["version", "strategy"]).task.nunique().eq(2).all()
    report = (html.parent / "report.md").read_text()
    assert "Time to accuracy, staleness and idle time per protocol" in report
    assert (html.parent / "figures" / "staleness_idle.png").stat().st_size > 0


def test_an_interrupted_sweep_resumes_without_rerunning_finished_trials(ray_session, tiny_cfg, tiny_foundation,
                                                                         tmp_path):
    from experiments.cli import main

    # Prepare: the rank smoke sweep (2 trials, one at a time) in a subprocess, interrupted after its first trial
    out = tmp_path / "rank"
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-m", "experiments.cli", *sweep_args("rank", out, tiny_cfg),
                             "--max-concurrent", "1"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 300
    done = []
    while time.time() < deadline and proc.poll() is None:
        log = out / "trials.jsonl"
        done = [json.loads(x) for x in log.read_text().splitlines()] if log.is_file() else []
        if any(a["event"] == "done" for a in done) and any(a["event"] == "start" and a["point"].startswith("001")
                                                           for a in done):
            break
        time.sleep(0.5)
    assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
    proc.send_signal(signal.SIGINT)             # Ctrl-C during the second trial: Tune saves its state and stops
    try:
        proc.wait(timeout=120)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of its local Ray is left
        except ProcessLookupError:
            pass
    first = next(a["point"] for a in done if a["event"] == "done")
    summary_before = (out / "runs" / first / "summary.json").read_text()
    # Execute
    assert main(["sweep", "--resume", str(out)]) == 0
    # Assert: every trial has its rows; the finished one was not started again
    res = pd.read_parquet(out / "results.parquet")
    assert len(res) == 2 * 4 and res.trial_id.nunique() == 2
    assert RESULT_COLUMNS <= set(res.columns) and sorted(res["rank"].unique()) == [2, 4]
    assert res[["acc", "auc", "storage_bytes"]].notna().all().all()
    from analysis import build_report

    assert (build_report(out).parent / "figures" / "rank.png").stat().st_size > 0
    attempts = [json.loads(x) for x in (out / "trials.jsonl").read_text().splitlines()]
    assert sum(a["event"] == "start" and a["point"] == first for a in attempts) == 1
    assert (out / "runs" / first / "summary.json").read_text() == summary_before


def test_sweep_bad_input_is_one_clear_error(tmp_path, capsys):
    from experiments.cli import main

    # Execute / Assert
    assert main(["sweep", "scalling", "--smoke", "--out", str(tmp_path / "a")]) == 2
    assert "unknown study 'scalling'" in capsys.readouterr().err
    assert main(["sweep", "--resume", str(tmp_path)]) == 2
    assert "is not a sweep dir" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    assert main(["sweep", "rank", "--smoke", "--out", str(tmp_path / "full")]) == 2
    assert "is not empty" in capsys.readouterr().err and (tmp_path / "full" / "x").read_text() == "keep"
