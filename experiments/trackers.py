"""Experiment trackers for ``forgesim run|sweep --log-to tensorboard,mlflow,wandb``.

A tracker is fed from the records a finished run dir holds (``events.parquet``, ``metrics.parquet``,
``summary.json``), so ``sim/`` and ``actors/`` know nothing of trackers and a resumed run's history is whole:

* one **step** per main version, step = accepted commits so far (``metrics.parquet``'s ``version``): the commit
  counters ``commits/accepted`` and ``commits/rejected`` (a rejected commit counts at the version it was refused
  at), ``<strategy>/merge_s`` of the commit that made the version, and at an evaluation every strategy's
  ``<strategy>/acc``, ``<strategy>/auc`` (means over tasks) and ``<strategy>/task/<task>/acc`` / ``auc``;
* the **summary**: every number of ``summary.json`` as ``summary/<path>`` (``summary/strategies/fusion/acc``,
  ``summary/references/base/acc``, ``summary/commits_accepted``), logged at the last step;
* the **figures** of the run's report (``DIR/report/figures/*.png``; single runs).

A single run writes with each library's own writer (``TRACKERS``: tensorboardX's ``SummaryWriter`` under
``DIR/tensorboard``, an ``MlflowClient`` run, a ``wandb.init`` run under ``DIR/wandb``). A sweep hands Ray Tune the
library's logger callback (``tune_callbacks``) and its trials report the same steps and summary with
``ray.tune.report`` (``sweep_reports``), the step as Tune's ``timesteps_total``.

MLflow writes to ``--mlflow-uri``, else ``MLFLOW_TRACKING_URI``, else the file store ``DIR/mlruns``. W&B runs offline
unless the environment configures it (``WANDB_MODE``, or ``WANDB_API_KEY`` for online).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Protocol, Sequence

from experiments.common import CLIError

__all__ = ["TRACKERS", "TrackerSpec", "RunTarget", "add_tracker_args", "parse_trackers", "mlflow_uri", "run_steps",
           "summary_metrics", "log_run", "tune_callbacks", "sweep_reports", "tracker_env", "wandb_mode", "where_logged"]

SUMMARY_PREFIX = "summary/"
DEFAULT_PROJECT = "forgesim"          # the MLflow experiment of single runs; the W&B project unless WANDB_PROJECT


# ------------------------------------------------------------------------------------------
# What a tracker gets: steps, the summary, figures (from the run dir's records)
# ------------------------------------------------------------------------------------------
def run_steps(run_dir: str | Path) -> list[tuple[int, dict[str, float]]]:
    """``[(step, metrics)]`` in step order, one entry per main version that has something to log (see the module
    docstring); step = accepted commits so far."""
    from analysis.load import eval_history, load_run

    run = load_run(run_dir)
    steps: dict[int, dict[str, float]] = {}
    # Step 1: commits, in log order (an accepted commit logged twice after a restart counts once).
    ev = run.events
    actor = ev[ev["source"] == "merge_actor"] if not ev.empty and "source" in ev.columns else ev.iloc[:0]
    accepted, rejected = set(), 0
    for r in actor.to_dict("records"):
        event = r.get("event")
        if event == "merged" and _finite(r.get("merge_s")):        # seq = the version this merge made
            steps.setdefault(int(r["seq"]), {})[_key(f"{r['strategy']}/merge_s")] = float(r["merge_s"])
        elif event in ("accepted", "rejected"):
            if event == "accepted":
                accepted.add(r["id"])
            else:
                rejected += 1
            step = int(r["version"]) if _finite(r.get("version")) else len(accepted)   # main's version after it
            steps.setdefault(step, {}).update({"commits/accepted": float(len(accepted)),
                                               "commits/rejected": float(rejected)})
    # Step 2: evaluations, every strategy at every evaluated version.
    evals = eval_history(run.metrics)
    for (version, strategy), df in (evals.groupby(["version", "strategy"], sort=True) if not evals.empty else []):
        out = steps.setdefault(int(version), {})
        for m in ("acc", "auc"):
            values = df[m].astype(float)
            if values.notna().any():
                out[_key(f"{strategy}/{m}")] = float(values.mean())
            for task, value in zip(df["task"], values):
                if _finite(value):
                    out[_key(f"{strategy}/task/{task}/{m}")] = float(value)
    return sorted(steps.items())


def summary_metrics(summary: dict) -> dict[str, float]:
    """Every finite number of ``summary.json`` as ``summary/<path>`` (nested keys joined with ``/``; booleans as
    0/1; strings, lists and nulls left out)."""
    out: dict[str, float] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}{k}/", v)
        elif isinstance(value, (bool, int, float)) and _finite(value):
            out[_key(prefix[:-1])] = float(value)

    walk(SUMMARY_PREFIX, summary)
    return out


def _finite(value) -> bool:
    try:
        return value is not None and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _key(name: str) -> str:
    """A metric name every tracker accepts (MLflow allows letters, digits, ``_ - . / `` and spaces)."""
    return re.sub(r"[^\w./\- ]", "_", name)


def _flat_config(config: dict, prefix: str = "") -> dict[str, str]:
    """A nested config as ``{section.field: value}`` (the names ``--set`` takes)."""
    out = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out |= _flat_config(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = str(v)
    return out


# ------------------------------------------------------------------------------------------
# Single runs: each library's own writer
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunTarget:
    """What a writer of one run needs: its dir, a name, its config and where MLflow writes."""

    run_dir: Path
    name: str
    config: dict
    mlflow_uri: str


class Writer(Protocol):
    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def finish(self, step: int, summary: dict[str, float], figures: Sequence[Path]) -> None: ...


class TensorBoardWriter:
    """tensorboardX's ``SummaryWriter`` (the writer Ray Tune's ``TBXLoggerCallback`` uses) under ``DIR/tensorboard``;
    the figures as images."""

    def __init__(self, target: RunTarget):
        import yaml
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(logdir=str(target.run_dir / "tensorboard"))
        self.writer.add_text("config", f"```\n{yaml.safe_dump(target.config, sort_keys=False)}```")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, global_step=step)

    def finish(self, step: int, summary: dict[str, float], figures: Sequence[Path]) -> None:
        import numpy as np
        from PIL import Image

        self.log(step, summary)
        for png in figures:
            image = np.asarray(Image.open(png).convert("RGB"))               # (H, W, 3)
            self.writer.add_image(f"figures/{png.stem}", image, global_step=step, dataformats="HWC")
        self.writer.close()


class MLflowWriter:
    """An ``MlflowClient`` run in experiment ``forgesim`` (its name: the run dir's), the config as params, the
    figures as artifacts under ``figures/``."""

    def __init__(self, target: RunTarget):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=target.mlflow_uri)
        experiment = self.client.get_experiment_by_name(DEFAULT_PROJECT)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(DEFAULT_PROJECT)
        self.run_id = self.client.create_run(experiment_id, run_name=target.name,
                                             tags={"run_dir": str(target.run_dir)}).info.run_id
        self._batch(params=_flat_config(target.config))

    def _batch(self, metrics: dict[str, float] | None = None, step: int = 0, params: dict | None = None) -> None:
        import time

        from mlflow.entities import Metric, Param

        now = int(time.time() * 1000)
        ms = [Metric(k, v, now, step) for k, v in (metrics or {}).items()]
        ps = [Param(k, v) for k, v in (params or {}).items()]
        for i in range(0, max(len(ms), len(ps)), 100):        # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, metrics=ms[i:i + 100], params=ps[i:i + 100])

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self._batch(metrics, step)

    def finish(self, step: int, summary: dict[str, float], figures: Sequence[Path]) -> None:
        self._batch(summary, step)
        for png in figures:
            self.client.log_artifact(self.run_id, str(png), artifact_path="figures")
        self.client.set_terminated(self.run_id)


class WandbWriter:
    """A ``wandb.init`` run under ``DIR/wandb`` (offline unless the environment configures W&B), the summary as the
    run's summary, the figures as images."""

    def __init__(self, target: RunTarget):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", DEFAULT_PROJECT), name=target.name,
                              dir=str(target.run_dir), mode=wandb_mode(), config=target.config,
                              settings=wandb.Settings(silent=True, console="off"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def finish(self, step: int, summary: dict[str, float], figures: Sequence[Path]) -> None:
        if figures:
            self.run.log({f"figures/{png.stem}": self.wandb.Image(str(png)) for png in figures}, step=step)
        self.run.summary.update(summary)
        self.run.finish()


def wandb_mode() -> str:
    """W&B's mode: ``WANDB_MODE`` when set, else online with ``WANDB_API_KEY``, else offline (nothing leaves the
    machine unless the user configured W&B)."""
    return os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")


# ------------------------------------------------------------------------------------------
# Sweeps: Ray Tune's logger callbacks, fed by the trials' reports
# ------------------------------------------------------------------------------------------
def _tensorboard_callback(sweep_dir: Path, study: str, uri: str):
    from ray.tune.logger import TBXLoggerCallback

    return TBXLoggerCallback()


def _mlflow_callback(sweep_dir: Path, study: str, uri: str):
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    return MLflowLoggerCallback(tracking_uri=uri, experiment_name=f"{DEFAULT_PROJECT}-{study}",
                                tags={"sweep_dir": str(sweep_dir), "study": study})


def _wandb_callback(sweep_dir: Path, study: str, uri: str):
    from ray.air.integrations.wandb import WandbLoggerCallback

    return WandbLoggerCallback(project=os.environ.get("WANDB_PROJECT", DEFAULT_PROJECT), group=study,
                               mode=wandb_mode())


def tune_callbacks(names: Sequence[str], sweep_dir: Path, study: str, uri: str) -> list:
    """Ray Tune's logger callback of each tracker in ``names``, for the sweep in ``sweep_dir`` (MLflow: to ``uri``)."""
    return [TRACKERS[n].callback(sweep_dir, study, uri) for n in names]


def sweep_reports(run_dir: str | Path, final: dict, steps: bool) -> Iterator[dict]:
    """What a trial reports with ``ray.tune.report``: with ``steps``, each step of ``run_steps`` (``timesteps_total``
    = the step, the x axis Tune's TensorBoard and MLflow callbacks use), then ``final`` with the summary's numbers."""
    from analysis.load import load_run

    last = 0
    if steps:
        for step, metrics in run_steps(run_dir):
            last = step
            yield metrics | {"timesteps_total": step}
    summary = load_run(run_dir).summary
    yield final | summary_metrics(summary) | {"timesteps_total": max(last, int(summary.get("commits_accepted", 0)))}


# ------------------------------------------------------------------------------------------
# The registry, the flags and their checks
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrackerSpec:
    """A tracker: the module it needs, the forgesim extra that installs it, its writer for one run and its Ray Tune
    callback for a sweep, and where its files go."""

    module: str
    extra: str
    writer: Callable[[RunTarget], Writer]
    callback: Callable[[Path, str, str], object]
    where: str


TRACKERS: dict[str, TrackerSpec] = {
    "tensorboard": TrackerSpec("tensorboardX", "tensorboard", TensorBoardWriter, _tensorboard_callback,
                               "run: DIR/tensorboard; sweep: each trial's dir under DIR/tune"),
    "mlflow": TrackerSpec("mlflow", "mlflow", MLflowWriter, _mlflow_callback,
                          "the MLflow store of --mlflow-uri (default: the file store DIR/mlruns)"),
    "wandb": TrackerSpec("wandb", "wandb", WandbWriter, _wandb_callback,
                         "run: DIR/wandb; sweep: each trial's dir under DIR/tune (offline unless configured)"),
}


def add_tracker_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-to", metavar="TRACKER[,TRACKER]", action="append", default=[],
                   help=f"also log to experiment trackers ({', '.join(TRACKERS)}); comma list, repeatable")
    p.add_argument("--mlflow-uri", metavar="URI",
                   help="MLflow tracking URI for --log-to mlflow (default: the file store DIR/mlruns)")


def parse_trackers(values: Sequence[str], uri: str | None = None) -> tuple[str, ...]:
    """The trackers of ``--log-to`` (comma lists, repeats, duplicates dropped), each checked to be known and
    importable, before any work starts."""
    names = tuple(dict.fromkeys(n.strip() for v in values for n in v.split(",") if n.strip()))
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise CLIError(f"--log-to: unknown tracker {', '.join(unknown)}; known: {', '.join(TRACKERS)}")
    if uri is not None and "mlflow" not in names:
        raise CLIError("--mlflow-uri is for --log-to mlflow")
    for n in names:
        spec = TRACKERS[n]
        try:
            importlib.import_module(spec.module)
        except ImportError:
            raise CLIError(f"--log-to {n} needs the {spec.module} package: pip install 'forgesim[{spec.extra}]'"
                           ) from None
    return names


def mlflow_uri(given: str | None, out_dir: Path) -> str:
    """``--mlflow-uri``, else ``MLFLOW_TRACKING_URI`` (the user's MLflow setup), else the file store
    ``out_dir/mlruns``."""
    return given or os.environ.get("MLFLOW_TRACKING_URI") or (Path(out_dir).resolve() / "mlruns").as_uri()


def _is_file_store(uri: str) -> bool:
    return uri.startswith("file:") or "://" not in uri


@contextlib.contextmanager
def tracker_env(names: Sequence[str], uri: str) -> Iterator[None]:
    """The environment the trackers' libraries read, for as long as they log to MLflow's tracking ``uri`` and the
    others: MLflow (3.x) refuses a file store unless ``MLFLOW_ALLOW_FILE_STORE`` opts in, and Ray's W&B callback asks
    for an API key unless ``WANDB_MODE`` says offline. A variable the user set is left as it is."""
    wanted = {}
    if "mlflow" in names and _is_file_store(uri):
        wanted["MLFLOW_ALLOW_FILE_STORE"] = "true"
    if "wandb" in names:
        wanted["WANDB_MODE"] = wandb_mode()
    added = [k for k in wanted if k not in os.environ]
    os.environ.update({k: wanted[k] for k in added})
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def where_logged(names: Sequence[str], out_dir: str | Path, uri: str | None = None, sweep: bool = False
                 ) -> list[str]:
    """One line per tracker: where it wrote and how to look (printed by ``forgesim run|sweep``)."""
    out = Path(out_dir)
    logs = out / "tune" if sweep else out
    uri = mlflow_uri(uri, out)
    lines = {"tensorboard": f"tensorboard: tensorboard --logdir {logs if sweep else out / 'tensorboard'}",
             "mlflow": f"mlflow: mlflow ui --backend-store-uri {uri}" if _is_file_store(uri) else f"mlflow: {uri}",
             "wandb": f"wandb ({wandb_mode()}): {logs / '*' / 'wandb' if sweep else out / 'wandb'}"
                      + (" (upload later with wandb sync)" if wandb_mode() == "offline" else "")}
    return [lines[n] for n in names]


def log_run(names: Sequence[str], run_dir: str | Path, uri: str | None = None) -> None:
    """Log the finished run in ``run_dir`` to the trackers ``names``: its steps, its summary and the figures of its
    report (built into ``run_dir/report`` first)."""
    import yaml

    from analysis.load import load_run
    from analysis.report import build_report

    if not names:
        return
    run_dir = Path(run_dir).resolve()
    figures = sorted((build_report(run_dir).parent / "figures").glob("*.png"))
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    summary = load_run(run_dir).summary
    target = RunTarget(run_dir, run_dir.name, config, mlflow_uri(uri, run_dir))
    steps = run_steps(run_dir)
    last = max([s for s, _ in steps] + [int(summary.get("commits_accepted", 0))])
    with tracker_env(names, target.mlflow_uri):
        for n in names:
            writer = TRACKERS[n].writer(target)
            for step, metrics in steps:
                writer.log(step, metrics)
            writer.finish(last, summary_metrics(summary), figures)
