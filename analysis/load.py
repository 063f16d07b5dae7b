"""Records → pandas DataFrames: one run dir or one sweep dir, and the derived tables the figures need.

This module reads the files a run or a sweep writes (``summary.json``, ``metrics.parquet``, ``events.parquet``,
``config.yaml``; ``results.parquet``, ``orders.parquet``) and never imports the simulation.

* A **run dir** holds ``summary.json``; ``metrics.parquet`` has one row per evaluation × strategy × task
  (``version`` = accepted commits at that evaluation, -1 for the references), ``events.parquet`` one row per
  schedule event (``source == "schedule"``) or merge-actor event (``source == "merge_actor"``).
* A **sweep dir** holds ``results.parquet`` (one row per trial × strategy) and/or ``orders.parquet`` (one row per
  merge order × strategy, order 0 = the original).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import yaml

__all__ = ["RunData", "SweepData", "REFERENCES", "dir_kind", "load_run", "load_sweep", "study_rows",
           "mean_ci", "t_quantile", "final_table", "strategy_task_table", "eval_history", "contributions",
           "cost_table", "strategy_scores", "reference_scores", "cache_hits", "distill_audit", "run_orders",
           "accuracy_over_time", "staleness_counts"]

# Reference predictors, never merge strategies. All but ``individual_local`` are scored on each task's pooled test
# set, like the strategies; ``individual_local`` is each site's adapter on its own test split (sim.evaluation).
REFERENCES = ("base", "individual", "individual_local", "joint")


@dataclass
class RunData:
    """Everything ``load_run`` reads from one run dir (tables are empty when their file is missing)."""

    path: Path
    summary: dict
    metrics: pd.DataFrame
    events: pd.DataFrame
    config: dict = field(default_factory=dict)

    @property
    def strategies(self) -> list[str]:
        """Merge strategies in the order of ``summary.json`` (references excluded)."""
        names = list(self.summary.get("strategies", {}))
        if not names and not self.metrics.empty:
            names = [s for s in dict.fromkeys(self.metrics["strategy"]) if s not in REFERENCES]
        return names


@dataclass
class SweepData:
    """Everything ``load_sweep`` reads from one sweep dir (``None`` for a table whose file is missing)."""

    path: Path
    results: pd.DataFrame | None
    orders: pd.DataFrame | None
    orders_per_task: pd.DataFrame | None
    orders_steps: pd.DataFrame | None = None

    def run_dirs(self, study: str | None = None) -> list[Path]:
        """Existing run dirs of the trials (of one ``study``), in seed then trial order."""
        df = self.results
        if df is None or "run_dir" not in df.columns:
            return []
        if study is not None and "study" in df.columns:
            df = df[df["study"] == study]
        df = df.dropna(subset=["run_dir"])
        df = df.sort_values([c for c in ("seed", "trial_id") if c in df.columns])
        dirs = [self.path / str(d) for d in dict.fromkeys(df["run_dir"])]
        return [d for d in dirs if (d / "summary.json").is_file()]


def dir_kind(path: str | Path) -> str | None:
    """``"run"`` (holds summary.json), ``"sweep"`` (results.parquet or orders.parquet), or None."""
    p = Path(path)
    if not p.is_dir():
        return None
    if (p / "results.parquet").is_file() or (p / "orders.parquet").is_file():
        return "sweep"
    if (p / "summary.json").is_file():
        return "run"
    return None


def _read_parquet(path: Path) -> pd.DataFrame | None:
    return pd.read_parquet(path) if path.is_file() else None


def load_run(path: str | Path) -> RunData:
    """Read a run dir. ``summary.json`` is required; the parquet files and config.yaml are optional.

    Raises:
        ValueError: the dir holds no summary.json, or a file is not what it should be.
    """
    p = Path(path)
    if not (p / "summary.json").is_file():
        raise ValueError(f"{p} is not a run dir: it has no summary.json")
    try:
        summary = json.loads((p / "summary.json").read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{p / 'summary.json'} is not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(summary, dict):
        raise ValueError(f"{p / 'summary.json'} must hold a JSON object")
    metrics = _read_parquet(p / "metrics.parquet")
    events = _read_parquet(p / "events.parquet")
    config = {}
    if (p / "config.yaml").is_file():
        config = yaml.safe_load((p / "config.yaml").read_text()) or {}
    return RunData(p, summary, metrics if metrics is not None else pd.DataFrame(),
                   events if events is not None else pd.DataFrame(), config)


def load_sweep(path: str | Path) -> SweepData:
    """Read a sweep dir (results.parquet and/or orders.parquet, orders_per_task.parquet optional).

    Raises:
        ValueError: the dir holds neither results.parquet nor orders.parquet, or a required column is missing.
    """
    p = Path(path)
    if dir_kind(p) != "sweep":
        raise ValueError(f"{p} is not a sweep dir: it has neither results.parquet nor orders.parquet")
    results = _read_parquet(p / "results.parquet")
    orders = _read_parquet(p / "orders.parquet")
    for name, df, needed in (("results.parquet", results, ("strategy", "acc")),
                             ("orders.parquet", orders, ("order", "strategy", "acc", "auc"))):
        missing = [c for c in needed if df is not None and c not in df.columns]
        if missing:
            raise ValueError(f"{p / name} lacks column(s) {', '.join(missing)}")
    return SweepData(p, results, orders, _read_parquet(p / "orders_per_task.parquet"),
                     _read_parquet(p / "orders_steps.parquet"))


def study_rows(results: pd.DataFrame | None, study: str, x: str) -> pd.DataFrame:
    """The rows of one study whose ``x`` takes at least two values (else an empty frame).

    With a ``study`` column, rows of that study; without one, every row (a sweep of a single study).
    """
    if results is None or x not in results.columns:
        return pd.DataFrame()
    df = results[results["study"] == study] if "study" in results.columns else results
    df = df.dropna(subset=[x])
    return df if df[x].nunique() >= 2 else pd.DataFrame()


# Two-sided 95% Student t quantiles for 1..30 degrees of freedom (beyond: the normal 1.96).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t_quantile(dof: int) -> float:
    """The 0.975 quantile of Student's t with ``dof`` degrees of freedom (NaN for dof < 1)."""
    if dof < 1:
        return math.nan
    return _T975[dof - 1] if dof <= len(_T975) else 1.96


def mean_ci(df: pd.DataFrame, by: list[str], value: str) -> pd.DataFrame:
    """Mean of ``value`` per group with a 95% t confidence interval of the mean over the group's rows (seeds).

    Returns one row per group: the ``by`` columns, ``mean``, ``lo``, ``hi``, ``n``; ``lo``/``hi`` equal the mean
    when the group has a single (non-NaN) value.
    """
    rows = []
    for key, g in df.dropna(subset=[value]).groupby(by, sort=True):
        v = g[value].to_numpy(float)
        mean = float(v.mean())
        half = t_quantile(len(v) - 1) * float(v.std(ddof=1)) / math.sqrt(len(v)) if len(v) > 1 else 0.0
        rows.append(dict(zip(by, key if isinstance(key, tuple) else (key,)))
                    | {"mean": mean, "lo": mean - half, "hi": mean + half, "n": len(v)})
    return pd.DataFrame(rows, columns=[*by, "mean", "lo", "hi", "n"])


def final_table(summary: dict) -> pd.DataFrame:
    """Long table of the final per-task scores: one row per predictor × task (strategies, then references).

    Columns: ``predictor``, ``kind`` ("strategy" or "reference"), ``task``, ``acc``, ``auc``. Strategies come from
    ``summary["strategies"]``, references from ``summary["references"]``; JSON null is read as NaN.
    """
    rows = []
    for kind, block in (("strategy", summary.get("strategies") or {}),
                        ("reference", summary.get("references") or {})):
        for name, s in block.items():
            for task, v in (s.get("per_task") or {}).items():
                rows.append({"predictor": name, "kind": kind, "task": task,
                             "acc": _num(v.get("acc")), "auc": _num(v.get("auc"))})
    return pd.DataFrame(rows, columns=["predictor", "kind", "task", "acc", "auc"])


def _num(x: object) -> float:
    return math.nan if x is None else float(x)


def strategy_task_table(summary: dict) -> pd.DataFrame:
    """The paper table: rows = predictors (strategies, then references), columns = (task, ACC/AUC) + (mean, …).

    The mean columns are the means over tasks as summary.json reports them (``acc``/``auc``), falling back to
    the mean of the per-task values. A second index level ``kind`` tells strategies from references.
    """
    long = final_table(summary)
    if long.empty:
        return pd.DataFrame()
    tasks = list(dict.fromkeys(long["task"]))
    wide = long.drop_duplicates(["predictor", "task"]).set_index(["predictor", "kind", "task"])[["acc", "auc"]]
    wide = wide.unstack("task").swaplevel(0, 1, axis=1)
    order = list(dict.fromkeys(long["predictor"]))
    blocks = {**(summary.get("strategies") or {}), **(summary.get("references") or {})}
    for metric in ("acc", "auc"):
        means = [_num(blocks[p].get(metric)) for p, _ in wide.index]
        fallback = wide.xs(metric, axis=1, level=1).mean(axis=1).to_numpy()
        wide[("mean", metric)] = np.where(np.isnan(means), fallback, means)
    cols = [(t, m) for t in [*tasks, "mean"] for m in ("acc", "auc")]
    wide = wide.reindex(columns=pd.MultiIndex.from_tuples(cols))
    return wide.reindex(sorted(wide.index, key=lambda ix: order.index(ix[0])))


def eval_history(metrics: pd.DataFrame) -> pd.DataFrame:
    """The evaluations of the merge strategies during the run (version ≥ 0, references dropped)."""
    if metrics.empty:
        return metrics
    df = metrics[(metrics["version"] >= 0) & ~metrics["strategy"].isin(REFERENCES)]
    if "event" in df.columns:
        df = df[df["event"] == "eval"]
    return df


def accuracy_over_time(metrics: pd.DataFrame) -> pd.DataFrame:
    """Each strategy's accuracy over virtual time in one run: one row per strategy × distinct ``t_virtual`` (when
    main reached the evaluated version), ``acc`` the mean over tasks of the last version merged at that instant
    (of versions merged together, at a synchronous round's barrier, main only rests at the last). Columns
    ``strategy``, ``t_virtual``, ``version``, ``acc``; empty when the records carry no ``t_virtual`` (a run dir
    written before they did)."""
    cols = ["strategy", "t_virtual", "version", "acc"]
    hist = eval_history(metrics)
    if hist.empty or "t_virtual" not in hist.columns:
        return pd.DataFrame(columns=cols)
    means = (hist.groupby(["strategy", "version"], sort=False)
             .agg(acc=("acc", "mean"), t_virtual=("t_virtual", "first")).reset_index())
    means = means.dropna(subset=["t_virtual"]).sort_values(["strategy", "t_virtual", "version"], kind="stable")
    return means.drop_duplicates(["strategy", "t_virtual"], keep="last")[cols].reset_index(drop=True)


def staleness_counts(summary: dict) -> pd.DataFrame:
    """A run's accepted commits per staleness (``summary.json``'s ``asynchrony.staleness_counts``): columns
    ``staleness``, ``count``; empty without the block."""
    counts = ((summary.get("asynchrony") or {}).get("staleness_counts") or {})
    return pd.DataFrame({"staleness": [int(k) for k in counts], "count": [int(v) for v in counts.values()]},
                        columns=["staleness", "count"])


def contributions(events: pd.DataFrame) -> pd.DataFrame:
    """One row per contribution: ``id``, ``institution``, ``task``, ``t_pull``, ``t_commit``, ``status``
    ("accepted", "rejected", "pending" = committed but no verdict recorded, "dropout"), ``staleness``, ``reason``.

    Spans come from the schedule's pull/commit rows; accepted rows of the merge actor fill in what the schedule
    does not say (task, staleness) and stand in for the schedule when it was not recorded.
    """
    cols = ["id", "institution", "task", "t_pull", "t_commit", "status", "staleness", "reason"]
    if events.empty or "event" not in events.columns:
        return pd.DataFrame(columns=cols)
    src = events["source"] if "source" in events.columns else pd.Series("", index=events.index)
    sched, actor = events[src == "schedule"], events[src == "merge_actor"]
    # Step 1: the schedule's spans, one per contribution id.
    spans = pd.DataFrame(columns=["id", "institution", "t_pull", "t_commit"])
    if not sched.empty and "contribution" in sched.columns:
        pulls = sched[sched["event"] == "pull"].set_index("contribution")
        commits = sched[sched["event"] == "commit"].set_index("contribution")
        spans = pd.DataFrame({"institution": pulls["institution"], "t_pull": pulls["t_virtual"]})
        spans["t_commit"] = commits["t_virtual"].reindex(spans.index)
        spans = spans.rename_axis("id").reset_index()
    # Step 2: the merge actor's verdicts.
    acc = actor[actor["event"] == "accepted"] if not actor.empty else actor
    rej = actor[actor["event"] == "rejected"] if not actor.empty else actor
    keep = [c for c in ("id", "institution", "task", "t_pull", "t_commit", "staleness") if c in acc.columns]
    verdict = acc[keep].assign(status="accepted")
    if not rej.empty:
        verdict = pd.concat([verdict, rej[[c for c in ("id", "reason") if c in rej.columns]]
                            .assign(status="rejected")], ignore_index=True)
    verdict = verdict.drop_duplicates("id", keep="first") if "id" in verdict.columns else verdict
    # Step 3: join; schedule spans win, the actor's fill the gaps.
    if spans.empty:
        out = verdict
    else:
        out = spans.merge(verdict, on="id", how="left", suffixes=("", "_actor"))
        for c in ("institution", "t_pull", "t_commit"):
            if f"{c}_actor" in out.columns:
                out[c] = out[c].fillna(out.pop(f"{c}_actor"))
        out["status"] = out["status"].fillna("pending")
    drops = sched[sched["event"] == "dropout"] if not sched.empty else sched
    if not drops.empty:
        out = pd.concat([out, pd.DataFrame({"institution": drops["institution"], "t_pull": drops["t_virtual"],
                                            "status": "dropout"})], ignore_index=True)
    out = out.reindex(columns=cols)
    out["institution"] = pd.to_numeric(out["institution"], errors="coerce")
    # a rejected or pending commit carries no task: an institution holds one task, so take it from its others
    known = out.dropna(subset=["task", "institution"]).drop_duplicates("institution").set_index("institution")["task"]
    out["task"] = out["task"].fillna(out["institution"].map(known))
    return out.sort_values(["institution", "t_pull"], kind="stable").reset_index(drop=True)


def cost_table(summary: dict) -> pd.DataFrame:
    """One row per strategy: storage (MB), mean and total merge time (s), inference (ms/image), final ACC/AUC."""
    rows = []
    for name, s in (summary.get("strategies") or {}).items():
        rows.append({"strategy": name, "acc": _num(s.get("acc")), "auc": _num(s.get("auc")),
                     "storage_mb": _num(s.get("storage_bytes")) / 1e6, "merge_s": _num(s.get("merge_s")),
                     "merge_s_total": _num(s.get("merge_s_total")),
                     "infer_ms_per_image": _num(s.get("infer_ms_per_image")),
                     "forgetting": _num(s.get("forgetting")), "bwt": _num(s.get("bwt"))})
    return pd.DataFrame(rows)


# One run's numbers as a sweep's results rows carry them ---------------------------------------------------------
def strategy_scores(summary: dict, strategy: str, metrics: Sequence[str]) -> dict[str, float]:
    """``{metric: value}`` of one strategy in ``summary.json`` (NaN where the strategy or the metric is missing)."""
    block = (summary.get("strategies") or {}).get(strategy)
    return {m: _num(block.get(m)) if block is not None else math.nan for m in metrics}


def reference_scores(summary: dict, references: Sequence[str], metrics: Sequence[str] = ("acc", "auc")
                     ) -> dict[str, float]:
    """``{<reference>_<metric>: value}`` of ``summary.json``'s references (NaN where missing, e.g.
    ``individual_local`` in a run dir written before it existed)."""
    refs = summary.get("references") or {}
    return {f"{ref}_{m}": _num(refs[ref].get(m)) if ref in refs else math.nan for ref in references
            for m in metrics}


def cache_hits(events: pd.DataFrame) -> int:
    """How many of a run's events were served by the commit cache (``cache_hit``)."""
    if events.empty or "cache_hit" not in events.columns:
        return 0
    return int(events["cache_hit"].fillna(False).astype(bool).sum())


def distill_audit(events: pd.DataFrame) -> dict[str, float]:
    """The privacy and fidelity audit of the run's accepted distilled sets (NaN without an audit).

    ``distill_fidelity``, ``mia_auc`` and ``memorised_fraction`` are means over the sets. The membership attack's
    TPR at 1 % / 0.1 % FPR (``mia_tpr_at_<point>_fpr``; ``mia_exposed_…`` for the exposed members) is pooled: the
    members found at each institution's own threshold over all members attacked, with its 95 % Clopper–Pearson
    interval (``…_lo``, ``…_hi``); ``mia_n_members`` / ``mia_n_nonmembers`` are the pooled counts. A point no set
    could resolve (fewer than 1 / FPR non-members) stays NaN.
    """
    from scipy.stats import beta

    out = {"distill_fidelity": math.nan, "mia_auc": math.nan, "memorised_fraction": math.nan}
    acc = events[events["event"] == "accepted"] if not events.empty and "event" in events.columns else events.iloc[:0]
    for col in list(out):
        if col in acc.columns and acc[col].notna().any():
            out[col] = float(acc[col].astype(float).mean())
    nonmembers = acc["mia_n_nonmembers"].astype(float) if "mia_n_nonmembers" in acc.columns else None
    out["mia_n_nonmembers"] = (float(nonmembers.sum()) if nonmembers is not None and nonmembers.notna().any()
                               else math.nan)
    for prefix in ("mia", "mia_exposed"):
        n_col = f"{prefix}_n_members"
        n = acc[n_col].astype(float) if n_col in acc.columns else pd.Series(dtype=float)
        out[n_col] = float(n.sum()) if n.notna().any() else math.nan
        for point in ("1pct", "0p1pct"):
            col = f"{prefix}_tpr_at_{point}_fpr"
            tpr = acc[col].astype(float) if col in acc.columns else pd.Series(dtype=float)
            ok = tpr.notna() & n.reindex(tpr.index).notna()
            k, total = float((tpr[ok] * n[ok]).round().sum()), float(n[ok].sum())
            if total == 0:
                out |= {col: math.nan, f"{col}_lo": math.nan, f"{col}_hi": math.nan}
                continue
            lo = 0.0 if k == 0 else float(beta.ppf(0.025, k, total - k + 1))
            hi = 1.0 if k == total else float(beta.ppf(0.975, k + 1, total - k))
            out |= {col: k / total, f"{col}_lo": lo, f"{col}_hi": hi}
    return out


def run_orders(path: str | Path) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
    """A run dir's merge orders (``orders.parquet``, ``orders_per_task.parquet``, ``orders_steps.parquet``; None
    where missing)."""
    p = Path(path)
    return (_read_parquet(p / "orders.parquet"), _read_parquet(p / "orders_per_task.parquet"),
            _read_parquet(p / "orders_steps.parquet"))
