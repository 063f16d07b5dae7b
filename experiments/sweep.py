"""Ray Tune sweeps over study presets: one trial = one simulation; results as one row per trial × strategy.

Sweep dir layout::

    DIR/sweep.json          the study, its base config (after --set), the grid points; --resume reads it
    DIR/study.json          the study's layout (``analysis.layout``): its x column, config columns, report sections
    DIR/tune/               Tune's experiment state (``Tuner.restore`` continues it)
    DIR/runs/<point>/       one run dir per grid point (``forgesim run``'s layout); ``orders.parquet`` for order studies;
                            a community nested in a larger one of the study is built from that one's log
                            (``plan_builds``, ``sim.replay.replay_subset``), not trained again
    DIR/commit_cache/       content-addressed commits (``sim.cache``): a contribution is trained once per
                            training-relevant config, whatever the strategy, order or evaluation schedule
    DIR/joint/<key>/        the joint reference per distinct training config (Ray Train), when the study asks for it
    DIR/trials.jsonl        one line per trial attempt (start, done)
    DIR/results.parquet     one row per trial × strategy: the point's config columns and the run's summary metrics
    DIR/orders.parquet      order studies: one row per trial × order × strategy (and orders_per_task.parquet;
                            orders_steps.parquet for a study that scores every merge step)

Each trial reserves what its simulation uses with ``tune.PlacementGroupFactory``: an empty head bundle (the trial
function only coordinates) plus ``runtime.workers`` bundles of ``num_cpus``/``num_gpus``, the pool its torch
tasks run in (``actors.runner.worker_pool`` picks the trial's placement group up); institution and merge actors
take no CPU. So concurrent trials never compete for the same CPUs.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from analysis.layout import write_layout
from analysis.load import cache_hits, distill_audit, load_run, reference_scores, run_orders, strategy_scores
from experiments.presets import STANDARD_COLUMNS, Study
from experiments.trackers import mlflow_uri, sweep_reports, tracker_env, tune_callbacks
from sim.config import SimConfig, apply_overrides, config_from_dict, config_hash, config_to_dict

if TYPE_CHECKING:
    import pandas as pd

SWEEP_FILE = "sweep.json"
TUNE_NAME = "tune"
# results.parquet: each strategy's summary metrics, and the references' ACC/AUC, per trial
SUMMARY_METRICS = ("acc", "auc", "forgetting", "bwt", "storage_bytes", "merge_s", "infer_ms_per_image", "asr",
                   "time_to_target")
# results.parquet: what asynchrony cost, per trial (summary.json's asynchrony block, sim.asynchrony; NaN without one)
ASYNCHRONY_METRICS = ("t_end", "idle_share", "idle_share_fast", "idle_fast", "stale_rejected")
# results.parquet: the gate against the attacks, per trial (summary.json's gate block; NaN without one)
GATE_METRICS = ("malicious_commits", "honest_commits", "true_positives", "false_positives", "tpr", "fpr",
                "gate_s_per_commit")
RESULT_REFERENCES = ("base", "individual", "individual_local")


def point_name(index: int, point: dict) -> str:
    """A run dir name for grid point ``index``: ``003-institutions20-seed1`` (a list value joined with ``+``,
    ``none`` when empty: ``checksnorm+fit``)."""
    parts = [f"{key.rsplit('.', 1)[-1]}{_show(value)}" for key, value in point.items()]
    return "-".join([f"{index:03d}", *parts])


def _show(value) -> object:
    """A config value as a results cell or a name part: lists joined with ``+`` (``none`` when empty)."""
    return "+".join(map(str, value)) or "none" if isinstance(value, (list, tuple)) else value


def feature_dir(sweep_dir: Path, source: str) -> Path:
    """Where the run of point ``source`` keeps its test features for the communities built from its log."""
    return sweep_dir / "feature_cache" / source


def trial_config(base: dict, point: dict, sweep_dir: Path, features: str | None = None) -> SimConfig:
    """The config of one trial: the study's base with the point's values and the sweep's commit cache; with
    ``features`` (the name of a point whose run nested communities are built from) that run's feature cache."""
    cfg = apply_overrides(config_from_dict(base), [f"{k}={json.dumps(v)}" for k, v in point.items()])
    cache = [f"runtime.feature_cache={feature_dir(sweep_dir, features)}"] if features else []
    return apply_overrides(cfg, [f"runtime.commit_cache={sweep_dir / 'commit_cache'}", "runtime.address=null",
                                 *cache])


# ------------------------------------------------------------------------------------------
# The trial
# ------------------------------------------------------------------------------------------
def trial(config: dict) -> None:
    """One Tune trial: run (or, after an interruption, reuse) the point's simulation, replay its orders if the study
    asks, and report the trial's flat metrics with ``ray.tune.report`` (the results table is built from the run
    dir's records, ``write_results``)."""
    from ray import tune

    from actors.runner import run_simulation

    sweep_dir = Path(config["sweep_dir"])
    point, name = config["point"]["values"], config["point"]["name"]
    subsets = config["point"].get("subsets", [])
    cfg = trial_config(config["base"], point, sweep_dir, features=name if subsets else None)
    run_dir = sweep_dir / "runs" / name
    t0 = time.time()
    attempt = {"point": name, "tune_trial_id": tune.get_context().get_trial_id(), "pid": os.getpid()}
    _log_attempt(sweep_dir, attempt | {"event": "start", "t": t0})
    # Step 1: the simulation. A finished run dir (the trial ran before an interruption) is reused as it is; a
    # partial one is started again, its contributions come from the commit cache.
    if (run_dir / "summary.json").is_file():
        summary = load_run(run_dir).summary
    else:
        shutil.rmtree(run_dir, ignore_errors=True)
        summary = run_simulation(cfg, run_dir, run_id=name)
    # Step 2: merge orders (order studies): replayed from the run's log as tasks on the trial's pool.
    orders = config["point"].get("orders", config.get("orders", 0))      # a plan without per-point orders: all
    if orders and not (run_dir / "orders.parquet").is_file():
        replay_run(cfg, run_dir, orders, per_step=config.get("order_steps", False))
    # Step 2b: the smaller communities nested in this one (scaling studies), built from its log on the pool; the
    # run kept its test features for them (``runtime.feature_cache``), dropped once they are built.
    if subsets:
        build_subsets(cfg, config["base"], run_dir, subsets, sweep_dir, config.get("order_steps", False))
        shutil.rmtree(feature_dir(sweep_dir, name), ignore_errors=True)
        try:
            feature_dir(sweep_dir, name).parent.rmdir()        # the last one out removes the dir
        except OSError:
            pass
    # Step 3: flat metrics of the trial and its summary's numbers (``summary/...``); for the sweep's trackers
    # (``--log-to``) first the run's steps, each a report (``experiments.trackers.sweep_reports``).
    metrics = {"wall_s": summary["wall_s"], "trial_s": time.time() - t0,
               "commits_accepted": summary["commits_accepted"], "commits_rejected": summary["commits_rejected"],
               "cache_hits": cache_hits(load_run(run_dir).events)}
    _log_attempt(sweep_dir, attempt | {"event": "done", "t": time.time()})
    for report in sweep_reports(run_dir, metrics, steps=bool(config.get("log_to"))):
        tune.report(report)


def build_subsets(source_cfg: SimConfig, base: dict, source_dir: Path, subsets: list[dict], sweep_dir: Path,
                  order_steps: bool | list[str] = False) -> None:
    """The runs of ``subsets`` (plan points whose community is nested in the source run's: ``plan_builds``), each
    built from the source run's log by ``sim.replay.replay_subset`` as a task on the trial's pool, in parallel; a
    subset whose run dir is complete (an interrupted sweep) is kept, a partial one built again. Their merge orders
    follow, when the study asks for them."""
    import ray

    from actors.runner import task_options, worker_pool
    from actors.tasks import subset_task

    todo = []
    for p in subsets:
        run_dir = sweep_dir / "runs" / p["name"]
        if not (run_dir / "summary.json").is_file():
            shutil.rmtree(run_dir, ignore_errors=True)
            todo.append((p, run_dir))
    pg, own = worker_pool(source_cfg)
    try:
        ray.get([subset_task.options(**task_options(source_cfg, pg)).remote(
            str(source_dir), json.dumps(config_to_dict(trial_config(base, p["values"], sweep_dir,
                                                                    features=source_dir.name))),
            str(run_dir), p["name"]) for p, run_dir in todo])
    finally:
        if own:
            ray.util.remove_placement_group(pg)
    for p in subsets:
        run_dir = sweep_dir / "runs" / p["name"]
        if p.get("orders") and not (run_dir / "orders.parquet").is_file():
            replay_run(trial_config(base, p["values"], sweep_dir), run_dir, p["orders"], per_step=order_steps)


def plan_builds(base: dict, points: list[dict], sweep_dir: Path) -> dict[str, dict]:
    """How each point's run is made: ``{name: {"subset_of": name or None, "fresh_because": reason or None}}``.

    Points that differ only in ``data.institutions`` form a group; the largest community of a group is run, and
    each smaller one is built from its log when ``sim.replay.subset_mismatch`` allows it (``init_from: base``,
    ``data.partition: per_institution``, the virtual clock, no faults): its institutions are the first N of the
    larger community, commit for commit. Otherwise it is a fresh run, and ``fresh_because`` says why."""
    from sim.replay import subset_mismatch

    groups: dict[str, list[dict]] = {}
    for p in points:
        rest = {k: v for k, v in p["values"].items() if k != "data.institutions"}
        groups.setdefault(json.dumps(rest, sort_keys=True), []).append(p)
    out = {}
    for members in groups.values():
        cfgs = {p["name"]: trial_config(base, p["values"], sweep_dir) for p in members}
        largest = max(members, key=lambda p: (cfgs[p["name"]].data.institutions, p["name"]))
        for p in members:
            why = None if p is largest else subset_mismatch(cfgs[largest["name"]], cfgs[p["name"]])
            out[p["name"]] = {"subset_of": largest["name"] if p is not largest and why is None else None,
                              "fresh_because": why}
    return out


def _log_attempt(sweep_dir: Path, record: dict) -> None:
    """``DIR/trials.jsonl``: one line per trial start and end (retries and resumed trials show up here)."""
    with open(sweep_dir / "trials.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")


def distinct_orders(n_commits: int, orders: int, seed: int) -> list[int]:
    """The indices of ``orders`` merge orders of ``n_commits`` commits that are distinct permutations: order 0 (the
    run's own) and the next seeded orders (``sim.replay.permutation``) that repeat none before them; all n! orders
    when ``orders`` >= n! (MedForge Table 2 merges its 3 tasks in all 3! = 6 orders). Seeded permutations of few
    commits repeat (6 draws of 3 commits give 3.6 distinct orders on average), which would count one order twice."""
    from sim.replay import permutation

    want = min(orders, math.factorial(n_commits)) if n_commits >= 1 else 0
    seen, picked, k = set(), [], 0
    while len(picked) < want:
        perm = tuple(permutation(n_commits, k, seed))
        if perm not in seen:
            seen.add(perm)
            picked.append(k)
        k += 1
    return picked


def replay_run(cfg: SimConfig, run_dir: Path, orders: int, per_step: bool | list[str] = False) -> None:
    """``orders`` distinct merge orders of ``run_dir``'s accepted commits (``distinct_orders``), split over the pool's
    workers as Ray tasks, merged with ``cfg.merge`` (strategies, search settings); writes ``orders.parquet`` and ``orders_per_task.parquet`` into the run dir, and with
    ``per_step`` ``orders_steps.parquet`` (every branch, or the strategies it names, scored after every merge step,
    ``sim.replay.replay``)."""
    import pandas as pd
    import ray

    from actors.runner import task_options, worker_pool
    from actors.tasks import replay_task
    from sim.commit_log import CommitLog

    n_commits = sum(r.get("event") == "accepted" for r in CommitLog(run_dir).read())
    ids = np.array(distinct_orders(n_commits, orders, cfg.seed))
    pg, own = worker_pool(cfg)
    try:
        chunks = [c.tolist() for c in np.array_split(ids, min(len(ids), cfg.runtime.workers)) if len(c)]
        merge = config_to_dict(cfg.merge)            # the replay's merge settings are ``cfg``'s, not only the run's
        parts = ray.get([replay_task.options(**task_options(cfg, pg)).remote(str(run_dir), chunk, None, per_step,
                                                                             merge)
                         for chunk in chunks])
    finally:
        if own:
            ray.util.remove_placement_group(pg)
    rows = [r for part in parts for r in part[0]]
    per_task = [r for part in parts for r in part[1]]
    pd.DataFrame(per_task).to_parquet(run_dir / "orders_per_task.parquet", index=False)
    if per_step and any(part[2].get("steps") for part in parts):
        pd.DataFrame([r for part in parts for r in part[2]["steps"]]).to_parquet(run_dir / "orders_steps.parquet",
                                                                             index=False)
    pd.DataFrame(rows).to_parquet(run_dir / "orders.parquet", index=False)     # last: it marks the replay done


# ------------------------------------------------------------------------------------------
# The sweep
# ------------------------------------------------------------------------------------------
def resources(cfg: SimConfig):
    """What one trial reserves: an empty head bundle and the simulation's worker pool."""
    from ray import tune

    from actors.runner import pool_bundle

    bundle = pool_bundle(cfg)
    return tune.PlacementGroupFactory([{}] + [dict(bundle) for _ in range(cfg.runtime.workers)], strategy="PACK")


def trial_name(trial) -> str:
    """A Tune trial's name (its trackers' run names): its grid point's run dir name and Tune's trial id."""
    return f"{trial.config['point']['name']}-{trial.trial_id}"


def _trainable(cfg: SimConfig):
    from ray import tune

    return tune.with_resources(trial, resources(cfg))


def write_plan(study: Study, base: SimConfig, sweep_dir: Path, max_concurrent: int, log_to: tuple[str, ...] = (),
               tracking_uri: str | None = None) -> dict:
    """``sweep.json`` (what the trials run, what --resume continues, the trackers it logs to) and ``study.json`` (the
    study's layout)."""
    from analysis.report import check_layout

    layout = study.layout()
    check_layout(layout)
    # a variant axis (``Study.variants``) names the point and its results column; its trial runs the bundle
    points = [{"name": point_name(i, p), "values": study.overrides(p, base),
               "orders": study.orders_of(study.overrides(p, base))}
              | ({"labels": study.labels(p)} if study.variants else {}) for i, p in enumerate(study.points())]
    if "data.institutions" in study.grid:     # nested communities: the smaller ones built from the largest's log
        builds = plan_builds(config_to_dict(base), points, sweep_dir)
        points = [p | builds[p["name"]] for p in points]
    plan = {"study": study.name, "description": study.description, "orders": study.orders,
            "order_steps": study.order_steps if isinstance(study.order_steps, bool) else list(study.order_steps),
            "base": config_to_dict(base), "max_concurrent": max_concurrent, "points": points,
            "log_to": list(log_to), "mlflow_uri": tracking_uri}
    (sweep_dir / SWEEP_FILE).write_text(json.dumps(plan, indent=2))
    write_layout(sweep_dir, layout)
    return plan


def trial_points(plan: dict) -> list[dict]:
    """The points Tune runs as trials: every point not built from another's log, each carrying the points built
    from its own (``subsets``)."""
    nested: dict[str, list[dict]] = {}
    for p in plan["points"]:
        if p.get("subset_of"):
            nested.setdefault(p["subset_of"], []).append(p)
    return [p | ({"subsets": nested[p["name"]]} if p["name"] in nested else {})
            for p in plan["points"] if not p.get("subset_of")]


def read_plan(sweep_dir: Path) -> dict:
    path = sweep_dir / SWEEP_FILE
    if not path.is_file():
        raise ValueError(f"{sweep_dir} is not a sweep dir (no {SWEEP_FILE}); nothing to resume")
    return json.loads(path.read_text())


def run_sweep(plan: dict, sweep_dir: Path, resume: bool = False, address: str | None = None) -> dict:
    """Run (or continue) the sweep of ``plan`` in ``sweep_dir``; writes the results tables; returns
    ``{trials, errored, wall_s, results}``."""
    import ray
    from ray import tune

    sweep_dir = Path(sweep_dir).resolve()
    base = config_from_dict(plan["base"])
    t0 = time.time()
    started = False
    if not ray.is_initialized():
        address = address or base.runtime.address or os.environ.get("RAY_ADDRESS")
        from actors.runner import connect

        started = connect(apply_overrides(base, [f"runtime.address={address}"] if address else []))
    try:
        from actors.runner import check_pool_fits
        from sim.model import load_foundation

        check_pool_fits(base)        # a trial's pool the cluster can never hold would leave Tune pending forever
        for p in plan["points"]:     # pretrain each distinct foundation once, before trials race for it
            cfg = trial_config(plan["base"], p["values"], sweep_dir)
            load_foundation(cfg.model, cfg.data.img_size)
        trainable = _trainable(base)
        tune_dir = sweep_dir / TUNE_NAME
        log_to, uri = plan.get("log_to", []), mlflow_uri(plan.get("mlflow_uri"), sweep_dir)
        if resume and tune.Tuner.can_restore(str(tune_dir)):     # Tune's state keeps the trackers' callbacks
            tuner = tune.Tuner.restore(str(tune_dir), trainable=trainable, resume_unfinished=True,
                                       resume_errored=False, restart_errored=True)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space={"study": plan["study"], "base": plan["base"], "sweep_dir": str(sweep_dir),
                             "orders": plan["orders"], "order_steps": plan.get("order_steps", False),
                             "log_to": log_to, "point": tune.grid_search(trial_points(plan))},
                tune_config=tune.TuneConfig(max_concurrent_trials=plan["max_concurrent"] or None, reuse_actors=False,
                                            trial_name_creator=trial_name),
                run_config=tune.RunConfig(name=TUNE_NAME, storage_path=str(sweep_dir), verbose=0,
                                          failure_config=tune.FailureConfig(max_failures=1),
                                          callbacks=tune_callbacks(log_to, sweep_dir, plan["study"], uri)))
        with tracker_env(log_to, uri):
            grid = tuner.fit()
        # Step 2: the joint reference, once per distinct training config (outside the trials: all resources).
        joint = joint_references(plan, sweep_dir) if base.train.joint else {}
        results = write_results(plan, sweep_dir, grid, joint)
    finally:
        if started:
            ray.shutdown()
    errored = [str(r.error).splitlines()[0] for r in grid if r.error is not None]
    return {"trials": len(grid), "errored": errored, "wall_s": time.time() - t0, "results": results}


def joint_key(cfg: SimConfig) -> str:
    """The joint reference's key: what it is trained from (a precision other than fp32 too; fp32 keys as before)."""
    precision = () if cfg.runtime.precision == "fp32" else (cfg.runtime.precision,)
    return config_hash(cfg.data, cfg.model, cfg.lora, cfg.train, cfg.seed, *precision)


def joint_references(plan: dict, sweep_dir: Path) -> dict[str, dict]:
    """``{point name: {acc, auc}}`` of the joint reference; trained once per ``joint_key`` and kept in
    ``DIR/joint/<key>/`` (a resumed sweep reuses it). The missing ones train together, one Ray Train job per kind of
    runtime resources (``experiments.joint.train_joint_many``), not one job each."""
    from experiments.joint import evaluate_joint, joint_resources, train_joint_many
    from sim.model import save_adapter

    # Step 1: each point's key and config; the keys without records yet, grouped by the resources they reserve
    keys, cfgs = {}, {}
    for p in plan["points"]:
        cfg = trial_config(plan["base"], p["values"], sweep_dir)
        keys[p["name"]] = key = joint_key(cfg)
        cfgs.setdefault(key, cfg)
    missing: dict[tuple, list[str]] = {}
    for key, cfg in cfgs.items():
        if not (sweep_dir / "joint" / key / "records.json").is_file():
            missing.setdefault(joint_resources(cfg), []).append(key)
    # Step 2: train and evaluate them, written as each group ends
    for group in missing.values():
        trained = train_joint_many([cfgs[k] for k in group], sweep_dir / "joint" / "ray_train",
                                   name=group[0] if len(group) == 1 else f"{group[0]}+{len(group) - 1}")
        # evaluated largest community first per seed and data: a nested one's cohort is then taken from it
        for key, (adapter, stats) in sorted(zip(group, trained), key=lambda kt: _nesting_order(cfgs[kt[0]])):
            where = sweep_dir / "joint" / key
            records = evaluate_joint(cfgs[key], adapter)
            save_adapter(adapter, where)
            (where / "records.json").write_text(json.dumps(records))
            (where / "stats.json").write_text(json.dumps(stats))
    # Step 3: every point's reference
    done = {}
    for key in cfgs:
        records = json.loads((sweep_dir / "joint" / key / "records.json").read_text())
        done[key] = {"acc": float(np.mean([r["acc"] for r in records])),
                     "auc": float(np.nanmean([r["auc"] for r in records]))}
    return {name: done[key] for name, key in keys.items()}


def _nesting_order(cfg: SimConfig) -> tuple:
    """Sort key: configs of the same seed and data but the community size together, the largest first."""
    data = {k: v for k, v in config_to_dict(cfg.data).items() if k != "institutions"}
    return cfg.seed, json.dumps(data, sort_keys=True, default=str), -cfg.data.institutions


def config_columns(plan: dict, sweep_dir: Path) -> dict[str, str]:
    """The config columns of the study's results (column -> config field), from its layout record; a sweep planned
    before it had one carries the standard columns."""
    from analysis.layout import read_layouts

    return next((layout.columns for layout in read_layouts(sweep_dir) if layout.study == plan["study"]),
                dict(STANDARD_COLUMNS))


def write_results(plan: dict, sweep_dir: Path, grid, joint: dict) -> "pd.DataFrame":
    """``results.parquet`` (one row per trial × strategy) and, for order studies, ``orders.parquet`` +
    ``orders_per_task.parquet`` (one row per trial × order × strategy [× task]), from the records of the run dirs
    of the trials Tune finished (``analysis.load``)."""
    import pandas as pd

    tune_ids = {}
    for result in grid:
        point = result.config["point"] if result.config else None
        if point is not None and result.error is None and result.metrics:
            tune_ids[point["name"]] = result.metrics.get("trial_id")
    columns = config_columns(plan, sweep_dir)
    rows, orders, orders_task, orders_steps = [], [], [], []
    for p in plan["points"]:
        trial_name = p.get("subset_of") or p["name"]          # a nested community is built by its source's trial
        run_dir = sweep_dir / "runs" / p["name"]
        if trial_name not in tune_ids or not (run_dir / "summary.json").is_file():
            continue
        cfg = trial_config(plan["base"], p["values"], sweep_dir)
        run = load_run(run_dir)
        common = {"trial_id": p["name"], "tune_trial_id": tune_ids[trial_name], "study": plan["study"],
                  "built": "subset" if p.get("subset_of") else "fresh"}
        common |= {col: _get(cfg, field) for col, field in columns.items()}
        common |= p.get("labels", {})
        common |= {field: value for field, value in p["values"].items() if field not in columns.values()}
        common |= {"wall_s": run.summary["wall_s"], "commits_accepted": run.summary["commits_accepted"],
                   "cache_hits": cache_hits(run.events)}
        common |= reference_scores(run.summary, RESULT_REFERENCES)
        common |= {f"joint_{m}": joint.get(p["name"], {}).get(m, math.nan) for m in ("acc", "auc")}
        common |= distill_audit(run.events)
        gate = run.summary.get("gate") or {}
        common |= {f"gate_{m}" if not m.startswith("gate_") else m:
                   math.nan if gate.get(m) is None else float(gate[m]) for m in GATE_METRICS}
        common |= asynchrony_scores(run.summary)
        common["run_dir"] = str(run_dir.relative_to(sweep_dir))
        for s in cfg.merge.strategies:
            rows.append(common | {"strategy": s} | strategy_scores(run.summary, s, SUMMARY_METRICS))
        for table, target in zip(run_orders(run_dir), (orders, orders_task, orders_steps)):
            if table is not None:
                target += [{"trial_id": p["name"], "seed": cfg.seed} | r for r in table.to_dict("records")]
    df = pd.DataFrame(rows)
    df.to_parquet(sweep_dir / "results.parquet", index=False)
    if orders:
        pd.DataFrame(orders).to_parquet(sweep_dir / "orders.parquet", index=False)
        pd.DataFrame(orders_task).to_parquet(sweep_dir / "orders_per_task.parquet", index=False)
    if orders_steps:
        pd.DataFrame(orders_steps).to_parquet(sweep_dir / "orders_steps.parquet", index=False)
    return df


def asynchrony_scores(summary: dict) -> dict[str, float]:
    """A run's ``ASYNCHRONY_METRICS`` and its mean staleness (``staleness_mean``) as results columns (NaN where the
    summary lacks them: a run dir written before they existed)."""
    block = summary.get("asynchrony") or {}
    out = {m: math.nan if block.get(m) is None else float(block[m]) for m in ASYNCHRONY_METRICS}
    mean = (summary.get("staleness") or {}).get("mean")
    return out | {"staleness_mean": math.nan if mean is None else float(mean)}


def _get(cfg: SimConfig, field: str):
    obj = cfg
    for part in field.split("."):
        obj = getattr(obj, part)
    return _show(obj)
