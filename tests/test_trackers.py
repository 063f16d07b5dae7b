"""Experiment trackers (``--log-to``): a smoke sweep through Ray Tune's TensorBoard and MLflow callbacks, whose MLflow
runs hold results.parquet's numbers; a single run written by TensorBoard's, MLflow's and W&B's own (offline) writers,
whose files hold the run's records; and the exit-2 cases before any work starts. The event files and W&B's offline
run file are read back with the libraries' protobuf messages, so a test checks what a tracker would show."""
from __future__ import annotations

import dataclasses
import math
import struct
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from experiments.cli import main
from experiments.sweep import SUMMARY_METRICS
from experiments.trackers import TRACKERS
from sim.config import config_to_dict


# ------------------------------------------------------------------------------------------
# Reading what the trackers wrote
# ------------------------------------------------------------------------------------------
def tb_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the TensorBoard event files under ``logdir``: ``{tag: [(step, value)]}`` (TFRecord framing:
    length, its CRC, an ``Event`` message, its CRC)."""
    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(logdir.rglob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for v in event.summary.value:
                if v.HasField("simple_value"):
                    out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def wandb_records(path: Path, kind: str) -> list[dict[str, float]]:
    """The ``history`` (or ``summary``) records of a W&B offline run file (``run-<id>.wandb``: a 7-byte header, then
    LevelDB-log records in 32 KiB blocks, each a ``Record`` message)."""
    from wandb.proto.wandb_internal_pb2 import Record

    data, block, pos, chunk, out = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B", path
    while pos + 7 <= len(data):
        if block - pos % block < 7:                      # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, part = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = chunk + data[pos + 7:pos + 7 + length], pos + 7 + length
        if part in (1, 4):                               # FULL or LAST: a whole record
            record, chunk = Record.FromString(chunk), b""
            if record.WhichOneof("record_type") == kind:
                items = record.history.item if kind == "history" else record.summary.update
                out.append({i.key or "/".join(i.nested_key): yaml.safe_load(i.value_json) for i in items})
    return out


def mlflow_runs(uri: str, monkeypatch) -> list:
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client, client.search_runs(experiments)


# ------------------------------------------------------------------------------------------
# What a tracker gets, from hand-made records
# ------------------------------------------------------------------------------------------
def test_steps_are_main_versions_with_commit_counts_merge_seconds_and_evaluations(tmp_path):
    from experiments.trackers import run_steps, summary_metrics

    # Prepare: commit a accepted (version 1) and merged, one refused at version 1, a logged again after a restart,
    # b accepted (version 2); an evaluation of fusion at version 2 on two tasks (the ``base`` reference is no step)
    actor = [{"event": "accepted", "id": "a", "version": 1, "seq": 1},
             {"event": "merged", "id": "a", "seq": 1, "strategy": "fusion", "merge_s": 0.5},
             {"event": "rejected", "id": "x", "version": 1, "reason": "nan"},
             {"event": "accepted", "id": "a", "version": 1, "seq": 1},
             {"event": "accepted", "id": "b", "version": 2, "seq": 2}]
    pd.DataFrame([{"source": "merge_actor"} | r for r in actor]).to_parquet(tmp_path / "events.parquet")
    pd.DataFrame([{"event": "eval", "version": 2, "strategy": "fusion", "task": "t1", "acc": 0.5, "auc": 0.6},
                  {"event": "eval", "version": 2, "strategy": "fusion", "task": "t(2)", "acc": 0.7, "auc": np.nan},
                  {"event": "eval", "version": -1, "strategy": "base", "task": "t1", "acc": 0.1, "auc": 0.2}]
                 ).to_parquet(tmp_path / "metrics.parquet")
    (tmp_path / "summary.json").write_text('{"commits_accepted": 2}')
    # Execute
    steps = run_steps(tmp_path)
    flat = summary_metrics({"wall_s": 3.0, "ok": True, "clock": "virtual", "gate": None, "checks": ["norm"],
                            "strategies": {"fusion": {"acc": 0.6, "auc": None, "per_task": {"t1": {"acc": 0.5}}}}})
    # Assert
    assert steps == [
        (1, {"commits/accepted": 1.0, "commits/rejected": 1.0, "fusion/merge_s": 0.5}),
        (2, {"commits/accepted": 2.0, "commits/rejected": 1.0, "fusion/acc": pytest.approx(0.6),
             "fusion/task/t1/acc": 0.5, "fusion/task/t_2_/acc": 0.7, "fusion/auc": 0.6, "fusion/task/t1/auc": 0.6})]
    assert flat == {"summary/wall_s": 3.0, "summary/ok": 1.0, "summary/strategies/fusion/acc": 0.6,
                    "summary/strategies/fusion/per_task/t1/acc": 0.5}


# ------------------------------------------------------------------------------------------
# A sweep: Ray Tune's callbacks
# ------------------------------------------------------------------------------------------
def test_a_sweep_logs_to_tensorboard_and_mlflow_the_numbers_of_results_parquet(ray_session, tiny_cfg,
                                                                                 tiny_foundation, tmp_path,
                                                                                 monkeypatch):
    # Prepare: the asynchrony study's smoke sweep (3 trials, strategies lora_avg and ties; it is this sweep that
    # test_sweep's smoke checks leave to this test)
    import importlib.util

    from test_sweep import check_smoke_sweep

    trackers = all(importlib.util.find_spec(m) for m in ("mlflow", "tensorboardX"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "asynchrony"
    # Execute
    code = main(["sweep", "asynchrony", "--smoke", "--out", str(out), "--set",
                 f"model.cache_dir={tiny_cfg.model.cache_dir}"] + (["--log-to", "tensorboard,mlflow"] if trackers else []))
    # Assert: the study's own smoke checks hold with the trackers on (without the extras: the smoke checks alone)
    assert code == 0
    res = check_smoke_sweep("asynchrony", out)
    if not trackers:
        pytest.skip("mlflow or tensorboardX is not installed (pip install 'forgesim[mlflow,tensorboard]'): the "
                    "asynchrony smoke sweep was checked without trackers")
    strategies = set(res.strategy)
    assert strategies == {"lora_avg", "ties"}
    # ...one MLflow run per trial (named after its point), whose summary metrics are results.parquet's rows
    client, runs = mlflow_runs((out / "mlruns").resolve().as_uri(), monkeypatch)
    assert len(runs) == res.trial_id.nunique() == 3
    for run in runs:
        name = run.data.params["point/name"]
        assert run.info.run_name.startswith(name) and run.info.status == "FINISHED"
        rows = res[res.trial_id == name].set_index("strategy")
        assert set(rows.index) == strategies
        metrics = run.data.metrics
        for strategy, row in rows.iterrows():
            for m in SUMMARY_METRICS:
                key = f"summary/strategies/{strategy}/{m}"
                if math.isnan(row[m]):
                    assert key not in metrics
                else:
                    assert metrics[key] == pytest.approx(row[m], rel=1e-12), key
            # the evaluations are the steps: one value per evaluated version, x = accepted commits
            history = client.get_metric_history(run.info.run_id, f"{strategy}/acc")
            assert [h.step for h in history] == sorted({h.step for h in history}) and history[-1].step == \
                rows.commits_accepted.iloc[0]
            assert history[-1].value == pytest.approx(row["acc"], rel=1e-12)
        assert metrics["summary/references/base/acc"] == pytest.approx(rows.base_acc.iloc[0], rel=1e-12)
        assert metrics["commits/accepted"] == rows.commits_accepted.iloc[0]
    # ...and each trial's TensorBoard event files hold the same numbers (float32)
    trial_dirs = [d for d in (out / "tune").iterdir() if d.is_dir()]
    assert len(trial_dirs) == 3
    for d in trial_dirs:
        scalars = tb_scalars(d)
        name = next(r.data.params["point/name"] for r in runs if d.name.startswith(r.info.run_name))
        rows = res[res.trial_id == name].set_index("strategy")
        for strategy, row in rows.iterrows():
            assert scalars[f"ray/tune/summary/strategies/{strategy}/acc"][-1][1] == pytest.approx(row["acc"], rel=1e-6)
            assert scalars[f"ray/tune/{strategy}/acc"][-1][0] == row["commits_accepted"]


# ------------------------------------------------------------------------------------------
# A single run: each library's own writer
# ------------------------------------------------------------------------------------------
def test_a_run_logs_its_steps_summary_and_figures_to_every_tracker(ray_session, tiny_run_cfg, tiny_foundation,
                                                                     tmp_path, monkeypatch, capsys):
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    # Prepare: the tiny run, W&B unconfigured (so offline)
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_PROJECT", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    cfg = tiny_run_cfg.replace(
        merge=dataclasses.replace(tiny_run_cfg.merge, strategies=("fusion", "svd")),
        schedule=dataclasses.replace(tiny_run_cfg.schedule, contributions=1),
        runtime=dataclasses.replace(tiny_run_cfg.runtime, eval_every=2))
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config_to_dict(cfg)))
    run_dir = tmp_path / "run"
    # Execute
    code = main(["run", "--config", str(tmp_path / "cfg.yaml"), "--out", str(run_dir),
                 "--log-to", "tensorboard", "--log-to", "mlflow,wandb"])
    # Assert: every tracker's per-evaluation values are metrics.parquet's means over tasks, at x = accepted commits
    assert code == 0
    printed = capsys.readouterr().out
    assert "mlflow ui --backend-store-uri" in printed and "wandb (offline)" in printed
    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    evals = metrics[(metrics.version >= 0) & metrics.strategy.isin(["fusion", "svd"])]
    want = evals.groupby(["strategy", "version"]).acc.mean()
    summary = yaml.safe_load((run_dir / "summary.json").read_text())
    figures = sorted(p.name for p in (run_dir / "report" / "figures").glob("*.png"))
    assert figures and summary["commits_accepted"] == 4
    # TensorBoard under DIR/tensorboard
    scalars = tb_scalars(run_dir / "tensorboard")
    for (strategy, version), acc in want.items():
        assert (version, pytest.approx(acc, rel=1e-6)) in scalars[f"{strategy}/acc"]
    assert scalars["commits/accepted"][-1] == (4, 4.0)
    # MLflow in the file store DIR/mlruns: history, summary, config as params, figures as artifacts
    client, runs = mlflow_runs((run_dir / "mlruns").resolve().as_uri(), monkeypatch)
    assert len(runs) == 1 and runs[0].info.run_name == "run" and runs[0].info.status == "FINISHED"
    run = runs[0]
    for strategy in ("fusion", "svd"):
        history = {h.step: h.value for h in client.get_metric_history(run.info.run_id, f"{strategy}/acc")}
        assert history == pytest.approx(want[strategy].to_dict(), rel=1e-12)
        assert run.data.metrics[f"summary/strategies/{strategy}/acc"] == \
            pytest.approx(summary["strategies"][strategy]["acc"], rel=1e-12)
        assert len(client.get_metric_history(run.info.run_id, f"{strategy}/merge_s")) == 4
    assert run.data.params["lora.rank"] == str(cfg.lora.rank)
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id, "figures")) == \
        [f"figures/{f}" for f in figures]
    # W&B offline under DIR/wandb: the run file holds the history and the summary
    (offline,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    history = wandb_records(offline, "history")
    got = {(strategy, h["_step"]): h[f"{strategy}/acc"] for h in history for strategy in ("fusion", "svd")
           if f"{strategy}/acc" in h}
    assert got == pytest.approx(want.to_dict(), rel=1e-12)
    final = {k: v for s in wandb_records(offline, "summary") for k, v in s.items()}
    assert final["summary/commits_accepted"] == 4
    assert {final[f"figures/{Path(f).stem}/_type"] for f in figures} == {"image-file"}
    assert len(list(offline.parent.glob("files/media/images/**/*.png"))) == len(figures)


# ------------------------------------------------------------------------------------------
# Bad --log-to: exit 2 before any work
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["run", "sweep"])
def test_an_unknown_tracker_is_exit_2_listing_the_known_ones(command, tmp_path, capsys):
    args = ["run", "--preset", "demo"] if command == "run" else ["sweep", "rank", "--smoke"]
    code = main([*args, "--out", str(tmp_path / "out"), "--log-to", "tensorboard,neptune"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "unknown tracker neptune" in err[0], err
    assert all(name in err[0] for name in TRACKERS) and not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", sorted(TRACKERS))
@pytest.mark.parametrize("command", ["run", "sweep"])
def test_a_tracker_whose_extra_is_missing_is_exit_2_naming_the_extra(command, name, tmp_path, monkeypatch, capsys):
    # Prepare: the tracker's package cannot be imported
    monkeypatch.setitem(sys.modules, TRACKERS[name].module, None)
    args = ["run", "--preset", "demo"] if command == "run" else ["sweep", "rank", "--smoke"]
    # Execute
    code = main([*args, "--out", str(tmp_path / "out"), "--log-to", name])
    # Assert
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"pip install 'forgesim[{TRACKERS[name].extra}]'" in err[0], err
    assert not (tmp_path / "out").exists()


def test_mlflow_uri_without_mlflow_and_log_to_on_resume_are_refused(tmp_path, capsys):
    assert main(["run", "--preset", "demo", "--out", str(tmp_path / "a"), "--mlflow-uri", "file:/tmp/x"]) == 2
    assert "--mlflow-uri is for --log-to mlflow" in capsys.readouterr().err
    assert main(["sweep", "--resume", str(tmp_path), "--log-to", "mlflow"]) == 2
    assert "--log-to" in capsys.readouterr().err and not (tmp_path / "a").exists()
