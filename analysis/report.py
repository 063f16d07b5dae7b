"""A run dir or a sweep dir → ``figures/`` (PNG + PDF) + ``report.md`` + a self-contained ``report.html``.

The report holds what a paper would print: the strategy × task ACC/AUC table (MedForge Table 1, Med-LEGO
Table 1) with the references as extra rows and the best strategy per column in bold, the cost table, the
order-sensitivity table (MedForge Table 2), run facts, and each figure with a caption saying what it shows.
``report.md`` links the PNGs under ``figures/``; ``report.html`` embeds them as base64, so it can be mailed alone.
"""
from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from analysis import claims, cost, figures
from analysis.figures import FigureResult
from analysis.layout import Section, StudyLayout, read_layouts
from analysis.load import (REFERENCES, RunData, SweepData, accuracy_over_time, contributions, cost_table, dir_kind,
                           eval_history, load_run, load_sweep, staleness_counts, study_rows, strategy_task_table)

__all__ = ["Table", "Report", "build_report", "run_report", "sweep_report", "check_layout", "claims_table", "FIGURES",
           "TABLES", "TABLE_DATA", "FIGURE_NAMES"]


@dataclass
class Table:
    """A table ready to print: two-level header (``group``, ``sub``), string cells, bold cells, italic rows."""

    title: str
    columns: list[tuple[str, str]]            # (group, sub); group "" for a plain column
    rows: list[list[str]]
    bold: set[tuple[int, int]] = field(default_factory=set)
    italic_rows: set[int] = field(default_factory=set)
    note: str = ""


@dataclass
class Report:
    """An ordered list of blocks: ``("h", level, text)``, ``("p", text)``, ``("table", Table)``,
    ``("fig", FigureResult)``."""

    title: str
    blocks: list[tuple] = field(default_factory=list)

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(("h", level, text))

    def para(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, table: Table | None) -> None:
        if table is not None and table.rows:
            self.blocks.append(("table", table))

    def figure(self, result: FigureResult | None) -> None:
        if result is not None:
            self.blocks.append(("fig", result))

    @property
    def figures(self) -> list[FigureResult]:
        return [b[1] for b in self.blocks if b[0] == "fig"]


# Tables -----------------------------------------------------------------------------------------------------------
def _pct(x: float) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _fmt(x: float, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{digits}g}" if abs(x) >= 1000 or (x != 0 and abs(x) < 10 ** -(digits - 1)) else f"{x:.{digits}f}"


def _best(values: Sequence[float], higher: bool = True) -> set[int]:
    """Indices of the best finite value (ties all win)."""
    finite = [(i, v) for i, v in enumerate(values) if v is not None and not math.isnan(v)]
    if not finite:
        return set()
    target = (max if higher else min)(v for _, v in finite)
    return {i for i, v in finite if v == target}


def task_table(summary: dict) -> Table | None:
    """Strategy × task ACC/AUC (%), references as italic extra rows, best strategy per column in bold."""
    wide = strategy_task_table(summary)
    if wide.empty:
        return None
    columns = [("", "predictor")] + [("mean" if t == "mean" else t, f"{m.upper()} (%)") for t, m in wide.columns]
    rows, italic = [], set()
    kinds = [k for _, k in wide.index]
    for r, ((name, kind), values) in enumerate(wide.iterrows()):
        rows.append([name + (" (reference)" if kind == "reference" else "")] + [_pct(v) for v in values])
        if kind == "reference":
            italic.add(r)
    bold = set()
    for c, col in enumerate(wide.columns, start=1):
        strat = [wide[col].iloc[i] if k == "strategy" else math.nan for i, k in enumerate(kinds)]
        bold |= {(r, c) for r in _best(strat)}
    return Table("Final accuracy per task (strategy × task)", columns, rows, bold, italic,
                 "ACC and macro one-vs-rest AUC in %, on each task's pooled test set (the test splits of all its "
                 "sites) at the end of the run; mean = mean over tasks. Bold: the best merge strategy per column; "
                 "references (italic) are bounds and are not ranked: base = foundation without adapter; "
                 "individual = each site's own adapter on the same pooled test set, ACC and AUC per adapter, "
                 "mean over the task's sites (a site without an accepted commit counts as base); "
                 "individual_local = the same adapters each on its own site's test split, mean over sites (not "
                 "on the strategies' test sets); joint = centralised training.")


def cost_summary_table(summary: dict) -> Table | None:
    """Per strategy: storage, merge time, inference time, forgetting and BWT of one run."""
    df = cost_table(summary)
    if df.empty:
        return None
    spec = [("storage (MB)", "storage_mb", False), ("merge s / commit", "merge_s", False),
            ("merge s total", "merge_s_total", False), ("inference ms / image", "infer_ms_per_image", False),
            ("forgetting", "forgetting", False), ("BWT", "bwt", True)]
    rows = [[s] + [_fmt(v) for v in r] for s, r in zip(df["strategy"], df[[c for _, c, _ in spec]].to_numpy())]
    bold = {(r, c) for c, (_, col, higher) in enumerate(spec, start=1) for r in _best(list(df[col]), higher)}
    return Table("Cost and stability per strategy", [("", "strategy")] + [("", lab) for lab, _, _ in spec], rows,
                 bold, note="Storage of the final merged predictor; merge time of one update (mean over commits) "
                            "and in total; inference per test image at the final evaluation; forgetting and BWT "
                            "as in the forgetting figure. Bold: best per column (lowest cost and forgetting, "
                            "highest BWT).")


def facts_table(run: RunData) -> Table:
    """Key facts of one run: commits, timings, efficiency, and the config knobs that matter for reading it."""
    s, cfg = run.summary, run.config or {}
    get = lambda section, key: (cfg.get(section) or {}).get(key, "–")   # noqa: E731
    staleness = s.get("staleness") or {}
    facts = [("run id", s.get("run_id", "–")), ("institutions", s.get("n_institutions", "–")),
             ("contributions scheduled", s.get("n_contributions", "–")),
             ("commits accepted / rejected", f"{s.get('commits_accepted', '–')} / {s.get('commits_rejected', '–')}"),
             ("wall time (s)", _fmt(s.get("wall_s"), 1)), ("startup (s)", _fmt(s.get("startup_s"), 1)),
             ("busy worker time (s)", _fmt(s.get("busy_s"), 1)),
             ("parallel efficiency", _fmt(s.get("parallel_efficiency"), 2)),
             ("staleness mean / max (commits)", f"{_fmt(staleness.get('mean'), 1)} / {staleness.get('max', '–')}"),
             ("seed", s.get("seed", "–")), ("clock", s.get("clock", "–")), ("contributions start from",
                                                                            s.get("init_from", "–")),
             ("merge protocol", (s.get("asynchrony") or {}).get("protocol", "–")),
             ("data", f"{get('data', 'name')}, {get('data', 'n_tasks')} tasks"),
             ("LoRA rank", get("lora", "rank")),
             ("distillation", f"{get('distill', 'method')}, IPC {get('distill', 'ipc')}"),
             ("strategies", ", ".join(run.strategies))]
    return Table("Run facts", [("", "fact"), ("", "value")], [[k, str(v)] for k, v in facts],
                 note="Parallel efficiency = busy worker time / (worker CPU slots × wall time, startup included).")


def _mean_sd(v: pd.Series) -> str:
    v = v.dropna()
    if v.empty:
        return "–"
    return f"{100 * v.mean():.1f}" + (f" ± {100 * v.std(ddof=1):.1f}" if len(v) > 1 else "")


def sweep_table(df: pd.DataFrame, x: str, x_label: str, metric: str = "acc") -> Table | None:
    """Strategies (and references) × values of ``x``: mean ± sd over seeds of ``metric`` in %."""
    if df.empty:
        return None
    xs = sorted(df[x].unique())
    strategies = [s for s in dict.fromkeys(df["strategy"]) if s not in REFERENCES]
    rows, italic, means = [], set(), []
    for s in strategies:
        g = df[df["strategy"] == s]
        rows.append([s] + [_mean_sd(g.loc[g[x] == v, metric]) for v in xs])
        means.append([g.loc[g[x] == v, metric].mean() for v in xs])
    trials = df.drop_duplicates("trial_id") if "trial_id" in df.columns else df
    for ref in REFERENCES:
        col = f"{ref}_{metric}"
        if col in trials.columns and trials[col].notna().any():
            italic.add(len(rows))
            rows.append([f"{ref} (reference)"] + [_mean_sd(trials.loc[trials[x] == v, col]) for v in xs])
    bold = {(r, c + 1) for c in range(len(xs)) for r in _best([m[c] for m in means])}
    n_seeds = df["seed"].nunique() if "seed" in df.columns else 1
    return Table(f"{metric.upper()} (%) by {x_label}", [("", "strategy")] + [(x_label, f"{v:g}") for v in xs],
                 rows, bold, italic, f"Mean ± sd over {n_seeds} seed(s) of the final {metric.upper()} (mean over "
                                     "tasks), in %. Bold: best strategy per column.")


def orders_table(orders: pd.DataFrame) -> Table | None:
    """MedForge Table 2 as numbers: per strategy, mean ± sd, range over orders, and the original order's score."""
    if orders is None or orders.empty:
        return None
    rows, ranges = [], []
    for s in [s for s in dict.fromkeys(orders["strategy"]) if s not in REFERENCES]:
        g = orders[orders["strategy"] == s]
        row, rr = [s], []
        for metric in ("auc", "acc"):
            spread = figures._order_range(g, metric)
            first = g.loc[g["order"] == 0, metric]
            row += [_mean_sd(g[metric]), f"{100 * spread:.1f}", _pct(first.mean()) if len(first) else "–"]
            rr.append(spread)
        rows.append(row)
        ranges.append(rr)
    columns = [("", "strategy")] + [(m, sub) for m in ("AUC (%)", "ACC (%)")
                                    for sub in ("mean ± sd", "range", "original order")]
    bold = {(r, 2) for r in _best([x[0] for x in ranges], False)} | {(r, 5) for r in _best([x[1] for x in ranges],
                                                                                          False)}
    return Table("Merge-order sensitivity", columns, rows, bold,
                 note=f"Over {orders['order'].nunique()} merge orders of the same commits: mean ± sd, range "
                      "(max − min, in points of %) and the score of the original order (0). Bold: the least "
                      "order-sensitive strategy.")


def strategies_table(rows: pd.DataFrame, orders: pd.DataFrame | None) -> Table | None:
    """Every strategy side by side, per dataset: final ACC and AUC (mean ± sd over seeds), their range over merge
    orders (the mean over trials of max − min), storage, inference cost per image and merge time."""
    if rows is None or rows.empty:
        return None
    datasets = list(dict.fromkeys(rows["dataset"])) if "dataset" in rows.columns else [None]
    table_rows, bold = [], set()
    for d in datasets:
        part = rows if d is None else rows[rows["dataset"] == d]
        trials = set(part["trial_id"]) if "trial_id" in part.columns else set()
        mine = (orders[orders["trial_id"].isin(trials)] if orders is not None and not orders.empty
                and "trial_id" in orders.columns else None)
        first, accs = len(table_rows), []
        for s in [s for s in dict.fromkeys(part["strategy"]) if s not in REFERENCES]:
            g = part[part["strategy"] == s]
            spread = []
            for metric in ("acc", "auc"):
                o = mine[mine["strategy"] == s] if mine is not None else None
                per_trial = (o.groupby("trial_id")[metric].agg(lambda v: v.max() - v.min())
                             if o is not None and not o.empty and o["order"].nunique() > 1 else None)
                spread.append("–" if per_trial is None else f"{100 * per_trial.mean():.1f}")
            table_rows.append(([d] if d is not None else []) + [
                s, _mean_sd(g["acc"]), _mean_sd(g["auc"]), *spread,
                _fmt(g["storage_bytes"].mean() / 1024) if "storage_bytes" in g else "–",
                _fmt(g["infer_ms_per_image"].mean()) if "infer_ms_per_image" in g else "–",
                _fmt(g["merge_s"].mean()) if "merge_s" in g else "–"])
            accs.append(g["acc"].mean())
        lead = 1 if d is not None else 0
        bold |= {(first + i, lead + 1) for i in _best(accs)}
    columns = ([("", "dataset")] if datasets != [None] else []) + [
        ("", "strategy"), ("", "ACC (%)"), ("", "AUC (%)"), ("order range", "ACC"), ("order range", "AUC"),
        ("", "storage (KB)"), ("", "inference ms / image"), ("", "merge s")]
    n_seeds = rows["seed"].nunique() if "seed" in rows.columns else 1
    return Table("Every strategy on the same commits", columns, table_rows, bold,
                 note=f"Final ACC and AUC (mean over tasks, in %), mean ± sd over {n_seeds} seed(s); order range: "
                      "max − min over the replayed merge orders, in points of %, the mean over trials; storage: the "
                      "merged predictor; inference: ms per test image; merge s: the strategy's merge time of the "
                      "run (summary). Bold: best ACC per dataset.")


def poisoning_table(rows: pd.DataFrame | None) -> Table | None:
    """Attacks and the gate, per attack kind × gate setting × malicious share × strategy: final ACC (mean ± sd over
    seeds), its drop from the same seed's run without attackers (share 0, same kind and gate), the backdoor's
    attack success, and the gate's true and false positive rates (the share of malicious and of honest commits it
    rejected)."""
    need = {"attack", "attack_share", "gate", "strategy", "acc", "seed"}
    if rows is None or rows.empty or not need <= set(rows.columns):
        return None
    rows = rows[~rows["strategy"].isin(REFERENCES)]
    clean = rows[rows["attack_share"] == 0].set_index(["attack", "gate", "seed", "strategy"])["acc"]
    table_rows = []
    keys = ["attack", "gate", "attack_share", "strategy"]
    for (attack, gate, share, strategy), g in rows.groupby(keys, sort=False):
        ref = [clean.get((attack, gate, seed, strategy), math.nan) for seed in g["seed"]]
        drop = pd.Series(np.asarray(ref, dtype=float) - g["acc"].to_numpy(dtype=float))
        asr = g["asr"] if "asr" in g else pd.Series(dtype=float)
        tpr = g["gate_tpr"] if "gate_tpr" in g else pd.Series(dtype=float)
        fpr = g["gate_fpr"] if "gate_fpr" in g else pd.Series(dtype=float)
        table_rows.append([attack, gate, f"{100 * share:.0f}", strategy, _mean_sd(g["acc"]),
                           "–" if share == 0 else _mean_sd(drop), _mean_sd(asr), _mean_sd(tpr), _mean_sd(fpr)])
    columns = [("", "attack"), ("", "gate"), ("", "malicious (%)"), ("", "strategy"), ("", "ACC (%)"),
               ("", "drop vs clean (pp)"), ("", "backdoor success (%)"), ("gate", "TPR (%)"), ("gate", "FPR (%)")]
    return Table("Attacks and the gate", columns, table_rows,
                 note="ACC: final accuracy, mean over tasks, mean ± sd over seeds; drop: the same seed's run without "
                      "attackers (same attack setting, same gate) minus this one, in points of %; backdoor success: "
                      "triggered test images of other classes sent to the target class; TPR / FPR: malicious / "
                      "honest commits the gate rejected (– without attackers, or without the gate's commits).")


def steps_table(steps: pd.DataFrame | None) -> Table | None:
    """Per strategy: ACC on the tasks merged so far after the first, middle and last merge step, and the last
    step's forgetting, each mean ± sd over the replayed orders (``analysis.steps``)."""
    from analysis.steps import step_summary

    if steps is None or steps.empty:
        return None
    summary = step_summary(steps)
    last = int(summary["step"].max())
    shown = list(dict.fromkeys([1, max(1, (last + 1) // 2), last]))

    def cell(g: pd.DataFrame, step: int, metric: str) -> str:
        r = g[g["step"] == step]
        if r.empty or math.isnan(r[f"{metric}_mean"].iloc[0]):
            return "–"
        return f"{100 * r[f'{metric}_mean'].iloc[0]:.1f} ± {100 * r[f'{metric}_sd'].iloc[0]:.1f}"

    rows, finals = [], []
    for s in [s for s in dict.fromkeys(summary["strategy"]) if s not in REFERENCES]:
        g = summary[summary["strategy"] == s]
        rows.append([s] + [cell(g, k, "acc_seen") for k in shown] + [cell(g, last, "forgetting")])
        finals.append(g.loc[g["step"] == last, "acc_seen_mean"].mean())
    columns = ([("", "strategy")] + [("ACC on the tasks merged so far (%)", f"step {k}") for k in shown]
               + [("", f"forgetting at step {last} (pp)")])
    return Table("Accuracy and forgetting per merge step", columns, rows, {(r, len(shown)) for r in _best(finals)},
                 note=f"Mean ± sd over {int(summary['orders'].max())} replayed order(s) (and trials); forgetting: the "
                      "mean drop of the tasks merged earlier from their best accuracy at an earlier step. Bold: best "
                      "final accuracy.")


def asynchrony_table(rows: pd.DataFrame | None, x: str = "sigma", x_label: str = "σ", by: str = "protocol"
                     ) -> Table | None:
    """Per protocol × value of ``x`` (speed heterogeneity): each strategy's time to 90 % of its final accuracy and
    its final ACC, then what the protocol cost — the virtual time of the last merge, the mean staleness of the
    accepted commits, the commits rejected as too stale and the idle shares of the fast half and of all
    institutions; each mean ± sd over seeds."""
    need = {by, x, "strategy", "acc", "time_to_target"}
    if rows is None or rows.empty or not need <= set(rows.columns):
        return None
    strategies = [s for s in dict.fromkeys(rows["strategy"]) if s not in REFERENCES]

    def num(v: pd.Series, scale: float = 1.0, digits: int = 2) -> str:
        v = v.dropna() * scale
        if v.empty:
            return "–"
        return f"{v.mean():.{digits}f}" + (f" ± {v.std(ddof=1):.{digits}f}" if len(v) > 1 else "")

    table_rows = []
    for proto in dict.fromkeys(rows[by]):
        for value in sorted(rows.loc[rows[by] == proto, x].unique()):
            g = rows[(rows[by] == proto) & (rows[x] == value)]
            trials = g.drop_duplicates("trial_id") if "trial_id" in g.columns else g
            cells = []
            for s in strategies:
                mine = g[g["strategy"] == s]
                cells += [num(mine["time_to_target"]), _mean_sd(mine["acc"])]
            cells += [num(trials[c]) if c in trials else "–" for c in ("t_end", "staleness_mean")]
            cells += [num(trials["stale_rejected"], digits=1) if "stale_rejected" in trials else "–"]
            cells += [num(trials[c], 100, 1) if c in trials else "–" for c in ("idle_share_fast", "idle_share")]
            table_rows.append([str(proto), f"{value:g}"] + cells)
    columns = ([("", by), ("", x_label)] + [(s, sub) for s in strategies for sub in ("time to 90 %", "ACC (%)")]
               + [("", "last merge (t)"), ("", "staleness (mean)"), ("", "stale rejected"),
                  ("idle (%)", "fast half"), ("idle (%)", "all")])
    n_seeds = rows["seed"].nunique() if "seed" in rows.columns else 1
    return Table("Time to accuracy, staleness and idle time per protocol", columns, table_rows,
                 note=f"Mean ± sd over {n_seeds} seed(s). Time to 90 %: the first virtual time at which the branch's "
                      "ACC on every task of the cohort reaches 90 % of its final ACC (sim.asynchrony); ACC: final, "
                      "mean over tasks, in %; last merge: the virtual time of the last accepted commit's merge; "
                      "staleness: commits merged between a contribution's pull and its merge, mean over accepted "
                      "commits; stale rejected: commits rejected by schedule.max_staleness per run; idle: the share "
                      "of virtual time between an institution's first pull and its last merge spent neither "
                      "training nor uploading (waiting for a barrier or for its next start), of the faster half "
                      "of the institutions and of all. Virtual time unit: one training at speed 1.")


def orders_task_table(per_task: pd.DataFrame | None) -> Table | None:
    """Range (max − min over orders) of the AUC per strategy × task, in points of %."""
    if per_task is None or per_task.empty or not {"strategy", "task", "order", "auc"} <= set(per_task.columns):
        return None
    spread = per_task.groupby(["strategy", "task"], sort=False)["auc"].agg(lambda v: v.max() - v.min()).unstack()
    tasks = list(spread.columns)
    rows = [[s] + [f"{100 * v:.1f}" for v in spread.loc[s]] for s in spread.index]
    return Table("Merge-order sensitivity per task", [("", "strategy")] + [("AUC range", t) for t in tasks], rows,
                 note="Range (max − min over merge orders) of each task's AUC, in points of %.")


CLAIMS_TITLE = "Claims side by side"


def claims_table(findings: Sequence[claims.Finding]) -> Table | None:
    """The seed papers' claims side by side with forgesim's numbers and a verdict each (``analysis.claims``)."""
    if not findings:
        return None
    rows, bold = [], set()
    for r, f in enumerate(findings):
        what = f.claim.statement + (f" — {f.subject}" if f.subject else "")
        rows.append([what, f.claim.source, f.paper, f.measured, str(f.n) if f.n else "–", f.verdict, f.reason])
        if f.verdict in ("holds", "fails"):
            bold.add((r, 5))
    columns = [("", "claim"), ("", "source"), ("", "paper"), ("forgesim", "measured: mean ± 95 % CI; Δ [CI]"),
               ("forgesim", "n"), ("", "verdict"), ("", "why")]
    return Table(CLAIMS_TITLE, columns, rows, bold, note=(
        "Scores on [0, 1], final evaluation, mean over tasks. n = trials (seeds) with both numbers; ± and [ ] are "
        "the two-sided 95 % Student t interval of the mean over them; Δ is a paired per-trial difference (trials "
        "merge identical commits). Verdict: holds when the interval of the claim's difference lies entirely on its "
        "side of the threshold (0; collapse: a share < " f"{claims.COLLAPSE_SHARE:g} of individual's gain over "
        "base), fails when entirely on the other side, inconclusive when it contains the threshold or n = 1; not "
        "testable here when the sweep lacks what the claim needs. Rows of a sweep that varies distill.method use "
        "its dm (DM-DSA) trials, except the distiller claim."))


# Report bodies ----------------------------------------------------------------------------------------------------
def _time_label(run: RunData) -> str:
    """The schedule's times are virtual; with the wall clock, institutions slept ``wall_scale`` s per unit."""
    schedule = run.config.get("schedule") or {}
    train_time, scale = schedule.get("train_time"), schedule.get("wall_scale")
    if (run.summary.get("clock") or (run.config.get("runtime") or {}).get("clock")) == "wall" and scale:
        return f"scheduled virtual time (units; wall clock: 1 unit = {scale:g} s)"
    return (f"virtual time (units; schedule.train_time = {train_time:g})" if isinstance(train_time, (int, float))
            else "virtual time (units)")


def run_report(run: RunData, fig_dir: Path) -> Report:
    """The report of one run dir."""
    rep = Report(f"forgesim report — run {run.summary.get('run_id', run.path.name)}")
    rep.para(f"Source: run dir `{run.path}`.")
    # Step 1: facts and the paper tables.
    rep.heading("Run")
    rep.table(facts_table(run))
    rep.heading("Results")
    rep.table(task_table(run.summary))
    rep.table(cost_summary_table(run.summary))
    # Step 2: figures from the records.
    history = eval_history(run.metrics)
    bars = _forgetting_bars(run.summary)
    rep.heading("Figures")
    rep.figure(figures.plot_progress(history, run.summary.get("references") or {}, fig_dir))
    rep.figure(figures.plot_forgetting(history, bars, fig_dir))
    rep.figure(figures.plot_timeline(contributions(run.events), fig_dir, _time_label(run)))
    return rep


def _forgetting_bars(summary: dict) -> pd.DataFrame:
    """Forgetting/BWT rows of one run's summary (one row per strategy)."""
    df = cost_table(summary)
    return df[["strategy", "forgetting", "bwt"]] if not df.empty else df


@dataclass(frozen=True)
class StudyData:
    """One study's records as its report sections read them: the sweep, the study's layout and where figures go."""

    sweep: SweepData
    layout: StudyLayout
    fig_dir: Path
    max_ms_per_point: float = cost.DEFAULT_MAX_MS_PER_POINT

    @cached_property
    def rows(self) -> pd.DataFrame:
        """The study's rows whose x takes at least two values (empty for a study without x)."""
        if not self.layout.x:
            return pd.DataFrame()
        return study_rows(self.sweep.results, self.layout.study, self.layout.x)

    @cached_property
    def results(self) -> pd.DataFrame:
        """Every row of the study, whatever it varies (every row without a ``study`` column)."""
        res = self.sweep.results
        if res is None or res.empty:
            return pd.DataFrame()
        return res[res["study"] == self.layout.study] if "study" in res.columns else res

    @cached_property
    def forgetting_rows(self) -> pd.DataFrame:
        """The study's rows with a forgetting or BWT value (every row without a ``study`` column)."""
        res = self.sweep.results
        if res is None or not {"forgetting", "bwt"} <= set(res.columns):
            return pd.DataFrame()
        rows = res[res["study"] == self.layout.study] if "study" in res.columns else res
        return rows.dropna(subset=["forgetting", "bwt"], how="all")

    @property
    def steps(self) -> pd.DataFrame:
        """The sweep's per-step scores of replayed orders (empty when none were recorded)."""
        return self.sweep.orders_steps if self.sweep.orders_steps is not None else pd.DataFrame()

    @property
    def orders(self) -> pd.DataFrame:
        return self.sweep.orders if self.sweep.orders is not None else pd.DataFrame()

    @cached_property
    def asynchrony_runs(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Per run dir of the study: its accuracy over virtual time (the foundation's accuracy at t = 0 first) and
        its staleness counts, each row with the trial's config and variant columns (``trial_id``, ``seed``, the
        layout's x, ``protocol``); empty frames when the rows or the run dirs lack them."""
        res = self.results
        if res.empty or "run_dir" not in res.columns or "protocol" not in res.columns:
            return pd.DataFrame(), pd.DataFrame()
        keep = [c for c in ("trial_id", "seed", self.layout.x, "protocol") if c and c in res.columns]
        curves, stale = [], []
        for _, trial in res.drop_duplicates("trial_id").iterrows():
            run_dir = self.sweep.path / str(trial["run_dir"])
            if not (run_dir / "summary.json").is_file():
                continue
            run = load_run(run_dir)
            info = {c: trial[c] for c in keep}
            over = accuracy_over_time(run.metrics)
            if not over.empty:
                base = (run.summary.get("references") or {}).get("base", {}).get("acc")
                if base is not None:
                    start = pd.DataFrame({"strategy": over["strategy"].unique(), "t_virtual": 0.0, "version": 0,
                                          "acc": float(base)})
                    over = pd.concat([start, over[over["t_virtual"] > 0]], ignore_index=True)
                curves.append(over.assign(**info))
            counts = staleness_counts(run.summary)
            if not counts.empty:
                stale.append(counts.assign(**info))
        return (pd.concat(curves, ignore_index=True) if curves else pd.DataFrame(),
                pd.concat(stale, ignore_index=True) if stale else pd.DataFrame())

    @cached_property
    def claim_data(self) -> claims.ClaimData:
        """The study's rows and merge orders as the claims read them (``analysis.claims``)."""
        return claims.claim_data(self.sweep, self.layout.study)


def _scaling(st: StudyData) -> FigureResult | None:
    result = figures.plot_scaling(st.rows, st.fig_dir, st.layout.x, st.layout.axis_label)
    if result is not None:
        result.caption += communities_note(st.rows)
    return result


PARTITIONS = {"per_institution": "each institution brings its own data (data.partition: per_institution)",
              "pool": "a fixed pool of each task is split over the sites, so more institutions hold less data each "
                      "(data.partition: pool)"}


def communities_note(rows: pd.DataFrame) -> str:
    """How the study's communities were made, for a caption: their data partition(s), and which runs were built from
    a larger community's log (``built`` = subset) rather than trained."""
    parts = [PARTITIONS.get(p, f"data.partition: {p}") for p in sorted(rows["partition"].dropna().unique())] \
        if "partition" in rows else []
    note = f" Communities: {'; '.join(parts)}." if parts else ""
    if "built" in rows and (rows["built"] == "subset").any():
        runs = rows.drop_duplicates("trial_id") if "trial_id" in rows else rows
        note += (f" {int((runs['built'] == 'subset').sum())} of {len(runs)} runs were built from the log of the "
                 f"largest community of their seed (its first N institutions, commit for commit), not trained again.")
    return note


def _cost(st: StudyData) -> FigureResult | None:
    return figures.plot_cost(st.rows, st.fig_dir, st.max_ms_per_point, st.layout.x, st.layout.axis_label)


def _ipc(st: StudyData) -> FigureResult | None:
    return figures.plot_ipc(st.rows, st.fig_dir, st.layout.x, st.layout.axis_label)


def _rank(st: StudyData) -> FigureResult | None:
    return figures.plot_rank(st.rows, st.fig_dir, st.layout.x, st.layout.axis_label)


def _orders(st: StudyData) -> FigureResult | None:
    return figures.plot_orders(st.sweep.orders, st.fig_dir)


def _steps(st: StudyData) -> FigureResult | None:
    return figures.plot_steps(st.steps, st.fig_dir)


def _time_to_accuracy(st: StudyData) -> FigureResult | None:
    return figures.plot_time_to_accuracy(st.asynchrony_runs[0], st.results, st.fig_dir, st.layout.x or "sigma",
                                         x_label=st.layout.x_label or "σ",
                                         time_label="virtual time (units: one training at speed 1)")


def _staleness_idle(st: StudyData) -> FigureResult | None:
    return figures.plot_staleness_idle(st.asynchrony_runs[1], st.results, st.fig_dir, st.layout.x or "sigma",
                                       x_label=st.layout.x_label or "σ")


def _forgetting(st: StudyData) -> FigureResult | None:
    """Forgetting bars from the study's rows, the heatmap from the study's first run dir (if it was kept)."""
    rows, history = st.forgetting_rows, None
    runs = st.sweep.run_dirs(st.layout.study)
    if runs:
        history = eval_history(load_run(runs[0]).metrics)
    result = figures.plot_forgetting(history, rows[["strategy", "forgetting", "bwt"] + (["seed"] if "seed" in rows
                                                                                        else [])], st.fig_dir)
    if result is not None and runs:
        result.caption += f" Heatmaps: the run in `{runs[0].relative_to(st.sweep.path)}`."
    return result


# figure name -> (the data a section with it needs: shown only when non-empty, the figure)
FIGURES: dict[str, tuple[Callable[[StudyData], pd.DataFrame], Callable[[StudyData], FigureResult | None]]] = {
    "scaling": (lambda st: st.rows, _scaling),
    "cost": (lambda st: st.rows, _cost),
    "orders": (lambda st: st.orders, _orders),
    "steps": (lambda st: st.steps, _steps),
    "forgetting": (lambda st: st.forgetting_rows, _forgetting),
    "ipc": (lambda st: st.rows, _ipc),
    "rank": (lambda st: st.rows, _rank),
    "time_to_accuracy": (lambda st: st.asynchrony_runs[0], _time_to_accuracy),
    "staleness_idle": (lambda st: st.asynchrony_runs[1], _staleness_idle),
}
# every figure a report may write: a figure whose data is gone must not survive from an earlier report
FIGURE_NAMES = (*FIGURES, "timeline", "progress")


def breakeven_table(rows: pd.DataFrame, max_ms_per_point: float, x: str, x_label: str) -> Table | None:
    """Mixture vs Fusion per value of ``x`` (``analysis.cost.mixture_breakeven``)."""
    table = cost.mixture_breakeven(rows, max_ms_per_point, x)
    if table.empty:
        return None
    return Table("Mixture vs Fusion", [("", x_label), ("", "ACC gain (pp)"), ("", "extra inference ms / image"),
                                       ("", "ms per pp"), ("", "pays")],
                 [[f"{v:g}", f"{r.gain_pp:.1f}", _fmt(r.extra_ms), _fmt(r.ms_per_pp), "yes" if r.pays else "no"]
                  for v, r in zip(table[x], table.itertuples())],
                 note=f"Mixture pays when its gain is > 0 and costs ≤ {max_ms_per_point:g} ms/image "
                      "per percentage point.")


# table name -> the table (None when its data do not exist)
TABLES: dict[str, Callable[[StudyData], Table | None]] = {
    "acc": lambda st: sweep_table(st.rows, st.layout.x, st.layout.x_label, "acc"),
    "auc": lambda st: sweep_table(st.rows, st.layout.x, st.layout.x_label, "auc"),
    "mixture_vs_fusion": lambda st: breakeven_table(st.rows, st.max_ms_per_point, st.layout.x, st.layout.x_label),
    "orders": lambda st: orders_table(st.sweep.orders),
    "orders_per_task": lambda st: orders_task_table(st.sweep.orders_per_task),
    "strategies": lambda st: strategies_table(st.results, st.sweep.orders),
    "poisoning": lambda st: poisoning_table(st.results),
    "steps": lambda st: steps_table(st.sweep.orders_steps),
    "claims": lambda st: claims_table(claims.evaluate(st.claim_data)),
    "asynchrony": lambda st: asynchrony_table(st.results, st.layout.x or "sigma", st.layout.x_label or "σ"),
}
# table name -> the data a tables-only section of it needs (shown only when non-empty); other tables read the
# study's rows over x
TABLE_DATA: dict[str, Callable[[StudyData], pd.DataFrame]] = {"claims": lambda st: st.claim_data.results,
                                                             "strategies": lambda st: st.results,
                                                             "poisoning": lambda st: st.results,
                                                             "asynchrony": lambda st: st.results}


def check_layout(layout: StudyLayout) -> None:
    """Every figure and table a layout names is one the report draws; a section over x needs the layout's x."""
    for section in layout.sections:
        if section.figure and section.figure not in FIGURES:
            raise ValueError(f"study {layout.study!r}: unknown figure {section.figure!r}; known: {', '.join(FIGURES)}")
        for name in section.tables:
            if name not in TABLES:
                raise ValueError(f"study {layout.study!r}: unknown table {name!r}; known: {', '.join(TABLES)}")


def study_sections(rep: Report, st: StudyData) -> None:
    """The sections of one study's layout whose data exist: heading, figure, tables."""
    for section in st.layout.sections:
        data = FIGURES[section.figure][0](st) if section.figure else _tables_data(st, section.tables)
        if data.empty:
            continue
        if _shown(rep, section):
            continue
        rep.heading(section.heading)
        if section.figure:
            rep.figure(FIGURES[section.figure][1](st))
        for name in section.tables:
            rep.table(TABLES[name](st))


def _shown(rep: Report, section: Section) -> bool:
    """Whether the section's figure (or claims table) is in the report already: a dir without study.json reads
    several studies' layouts, and those that read the same sweep-wide data (its merge orders, its claims) would
    draw it twice."""
    if section.figure:
        return any(fig.name == section.figure for fig in rep.figures)
    return "claims" in section.tables and any(b[0] == "table" and b[1].title == CLAIMS_TITLE for b in rep.blocks)


def _tables_data(st: StudyData, tables: Sequence[str]) -> pd.DataFrame:
    """A tables-only section's data: its tables' own (``TABLE_DATA``) when they all have one, else the rows over x."""
    if tables and all(name in TABLE_DATA for name in tables):
        return TABLE_DATA[tables[0]](st)
    return st.rows


def sweep_report(sweep: SweepData, fig_dir: Path, max_ms_per_point: float = cost.DEFAULT_MAX_MS_PER_POINT,
                 layouts: Sequence[StudyLayout] | None = None) -> Report:
    """The report of one sweep dir: the sections of its study's layout (``analysis.layout``) whose data exist.

    ``layouts`` default to the sweep dir's ``study.json`` (``analysis.layout.read_layouts``).
    """
    rep = Report(f"forgesim report — sweep {sweep.path.name}")
    res = sweep.results
    # Step 1: what the sweep holds.
    facts = [("source", str(sweep.path))]
    if res is not None and not res.empty:
        facts += [("trials", res["trial_id"].nunique() if "trial_id" in res.columns else len(res)),
                  ("studies", ", ".join(map(str, dict.fromkeys(res["study"]))) if "study" in res.columns else "–"),
                  ("seeds", res["seed"].nunique() if "seed" in res.columns else "–"),
                  ("strategies", ", ".join(s for s in dict.fromkeys(res["strategy"]) if s not in REFERENCES))]
    if sweep.orders is not None:
        facts.append(("merge orders", sweep.orders["order"].nunique()))
    rep.heading("Sweep")
    rep.table(Table("Sweep facts", [("", "fact"), ("", "value")], [[k, str(v)] for k, v in facts]))
    # Step 2: each study's sections that have data.
    layouts = read_layouts(sweep.path) if layouts is None else layouts
    for layout in layouts:
        check_layout(layout)
    for layout in layouts:
        study_sections(rep, StudyData(sweep, layout, fig_dir, max_ms_per_point))
    if len(rep.blocks) <= 2:
        rep.para("This sweep holds no study with at least two values of its variable, so there is nothing to plot.")
    return rep


# Rendering --------------------------------------------------------------------------------------------------------
def _md_cell(text: str, bold: bool, italic: bool) -> str:
    text = text.replace("|", "\\|")
    if bold:
        text = f"**{text}**"
    return f"*{text}*" if italic else text


def table_md(t: Table) -> str:
    header = [f"{g} {s}".strip() if g else s for g, s in t.columns]
    lines = [f"**{t.title}**", "", "| " + " | ".join(header) + " |",
             "|" + "|".join(":--" if i == 0 else "--:" for i in range(len(header))) + "|"]
    for r, row in enumerate(t.rows):
        lines.append("| " + " | ".join(_md_cell(v, (r, c) in t.bold, r in t.italic_rows)
                                       for c, v in enumerate(row)) + " |")
    if t.note:
        lines += ["", t.note]
    return "\n".join(lines)


def table_html(t: Table) -> str:
    esc = html.escape
    out = [f'<table><caption>{esc(t.title)}</caption><thead>']
    if any(g for g, _ in t.columns):
        out.append("<tr>")
        i = 0
        while i < len(t.columns):
            g = t.columns[i][0]
            span = 1
            while i + span < len(t.columns) and g and t.columns[i + span][0] == g:
                span += 1
            out.append(f'<th colspan="{span}" class="group">{esc(g)}</th>' if span > 1 or g else "<th></th>")
            i += span
        out.append("</tr>")
    out.append("<tr>" + "".join(f"<th>{esc(s)}</th>" for _, s in t.columns) + "</tr></thead><tbody>")
    for r, row in enumerate(t.rows):
        cls = ' class="ref"' if r in t.italic_rows else ""
        cells = []
        for c, v in enumerate(row):
            v = esc(v)
            cells.append(f"<td>{'<b>' + v + '</b>' if (r, c) in t.bold else v}</td>")
        out.append(f"<tr{cls}>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    if t.note:
        out.append(f'<p class="note">{esc(t.note)}</p>')
    return "\n".join(out)


def _inline_md(text: str) -> str:
    """HTML for a paragraph with `code` spans (the only markdown our paragraphs use)."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def render_md(rep: Report, out: Path) -> str:
    lines, n = [f"# {rep.title}", ""], 0
    for block in rep.blocks:
        if block[0] == "h":
            lines += ["#" * block[1] + " " + block[2], ""]
        elif block[0] == "p":
            lines += [block[1], ""]
        elif block[0] == "table":
            lines += [table_md(block[1]), ""]
        else:
            n += 1
            fig = block[1]
            rel = fig.png.relative_to(out) if fig.png.is_relative_to(out) else fig.png
            pdf = fig.paths[1].relative_to(out) if fig.paths[1].is_relative_to(out) else fig.paths[1]
            lines += [f"![Figure {n}: {fig.name}]({rel.as_posix()})", "",
                      f"*Figure {n} ({fig.name}; [PDF]({pdf.as_posix()})).* {fig.caption}", ""]
    return "\n".join(lines)


_CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; max-width: 1200px; margin: 2em auto;
       padding: 0 1.5em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; border-bottom: 2px solid #333; padding-bottom: .2em; }
h2 { font-size: 1.25em; margin-top: 1.8em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 1em 0 .3em; font-size: .9em; }
caption { caption-side: top; text-align: left; font-weight: bold; padding-bottom: .3em; }
th, td { padding: .25em .6em; border-bottom: 1px solid #ddd; text-align: right; }
th { background: #f3f3f3; } th.group { text-align: center; border-bottom: 1px solid #999; }
td:first-child, th:first-child { text-align: left; }
tr.ref td { font-style: italic; color: #555; } tr.ref:first-of-type td, tr:not(.ref) + tr.ref td
{ border-top: 1.5px solid #888; }
p.note { font-size: .85em; color: #555; margin-top: 0; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: .9em; color: #333; margin-top: .4em; }
code { background: #f4f4f4; padding: 0 .2em; }
"""


def render_html(rep: Report) -> str:
    body, n = [f"<h1>{html.escape(rep.title)}</h1>"], 0
    for block in rep.blocks:
        if block[0] == "h":
            body.append(f"<h{block[1]}>{html.escape(block[2])}</h{block[1]}>")
        elif block[0] == "p":
            body.append(f"<p>{_inline_md(block[1])}</p>")
        elif block[0] == "table":
            body.append(table_html(block[1]))
        else:
            n += 1
            fig = block[1]
            raw = fig.png.read_bytes()
            # show every figure at the same scale (its size at 96 css px per inch), shrunk only to fit the page
            width = round(int.from_bytes(raw[16:20], "big") * 96 / figures.DPI)
            data = base64.b64encode(raw).decode("ascii")
            body.append(f'<figure id="fig-{fig.name}"><img alt="Figure {n}: {fig.name}" width="{width}" '
                        f'src="data:image/png;base64,{data}"><figcaption><b>Figure {n}.</b> '
                        f"{_inline_md(fig.caption)}</figcaption></figure>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(rep.title)}</title><style>{_CSS}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def build_report(path: str | Path, out: str | Path | None = None,
                 max_ms_per_point: float = cost.DEFAULT_MAX_MS_PER_POINT) -> Path:
    """Write ``figures/``, ``report.md`` and ``report.html`` for a run dir or a sweep dir; return report.html's path.

    Args:
        path: a run dir (holds summary.json) or a sweep dir (holds results.parquet or orders.parquet).
        out: output dir (default ``path/report``); figures of an earlier report there are replaced.
        max_ms_per_point: the cost figure's rule for when Mixture stops paying (see ``analysis.cost.mixture_breakeven``).
    Raises:
        ValueError: ``path`` is neither a run dir nor a sweep dir, or ``out`` is a file.
    """
    # Step 1: what kind of dir, and where the report goes.
    src = Path(path)
    kind = dir_kind(src)
    if kind is None:
        what = "does not exist" if not src.exists() else "is not a directory" if not src.is_dir() else \
            "is neither a run dir (summary.json) nor a sweep dir (results.parquet or orders.parquet)"
        raise ValueError(f"{src} {what}")
    dest = Path(out) if out is not None else src / "report"
    if dest.exists() and not dest.is_dir():
        raise ValueError(f"--out {dest} exists and is not a directory")
    fig_dir = dest / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    for name in FIGURE_NAMES:   # a figure whose data is gone must not survive from an earlier report
        for suffix in (".png", ".pdf"):
            (fig_dir / f"{name}{suffix}").unlink(missing_ok=True)
    # Step 2: load the records and build the figures and tables.
    rep = run_report(load_run(src), fig_dir) if kind == "run" else sweep_report(load_sweep(src), fig_dir,
                                                                                 max_ms_per_point)
    # Step 3: render.
    (dest / "report.md").write_text(render_md(rep, dest))
    html_path = dest / "report.html"
    html_path.write_text(render_html(rep))
    return html_path
