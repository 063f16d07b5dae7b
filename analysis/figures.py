"""One function per figure: records (DataFrames) in, a PNG and a PDF out.

Where a figure needs more than selecting columns, a shaping function (``cost_frames``, ``forgetting_frames``,
``timeline_frames``) turns the records into the DataFrames it draws, and a drawing function (``draw_cost`` …) takes
them; ``plot_*`` is the two in turn. Every ``plot_*`` takes the tables it needs and an output dir, and returns a ``FigureResult`` (paths, the axis labels,
the legend entries and a caption), or ``None`` when its data does not exist — so a report shows a figure only when
there is something to show. Lines are means over seeds with a 95% t confidence band of the mean where there are
several seeds (``analysis.load.mean_ci``). Figures are built on ``matplotlib.figure.Figure`` (Agg canvas), never
through pyplot, so no global state or display is touched.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from analysis.cost import DEFAULT_MAX_MS_PER_POINT, mixture_breakeven, stops_paying
from analysis.load import REFERENCES, mean_ci

__all__ = ["FigureResult", "strategy_color", "plot_scaling", "plot_cost", "cost_frames", "draw_cost",
           "plot_orders", "plot_forgetting", "forgetting_frames", "draw_forgetting", "plot_ipc", "plot_rank",
           "plot_timeline", "timeline_frames", "draw_timeline", "plot_progress", "plot_time_to_accuracy",
           "plot_staleness_idle"]

DPI = 150
_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
            "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173")
_REF_STYLE = {"base": ("0.55", ":"), "individual": ("0.1", "--"), "individual_local": ("#6a51a3", "--"),
              "joint": ("#8c2d04", "-.")}
ACC_LABEL = "ACC (mean over tasks, fraction)"
AUC_LABEL = "AUC (macro one-vs-rest, mean over tasks)"


@dataclass
class FigureResult:
    """What a figure function wrote and what the figure says (for tests and captions)."""

    name: str
    paths: list[Path]
    axes_labels: list[tuple[str, str]]   # (xlabel, ylabel) of every labelled axes
    legend_labels: list[str]
    caption: str
    notes: dict = field(default_factory=dict)

    @property
    def png(self) -> Path:
        return next(p for p in self.paths if p.suffix == ".png")


def strategy_color(name: str, others: Sequence[str] = ()) -> str:
    """The colour of strategy ``name``: its place among ``others``, the strategies of the records in order of
    appearance (a name not among them takes the next colour). The records name the strategies, so no list of names
    is kept here; a report's figures read the same strategies in the same order, so they agree on the colours."""
    order = list(dict.fromkeys(others))
    return _PALETTE[(order.index(name) if name in order else len(order)) % len(_PALETTE)]


def _save(fig: Figure, out_dir: Path, name: str, caption: str, notes: dict | None = None) -> FigureResult:
    """Write ``name``.png and .pdf and collect the labels and legend entries."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = [(ax.get_xlabel(), ax.get_ylabel()) for ax in fig.axes if ax.get_xlabel() or ax.get_ylabel()]
    legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    entries = list(dict.fromkeys(t.get_text() for lg in legends for t in lg.get_texts()))
    paths = [out_dir / f"{name}.png", out_dir / f"{name}.pdf"]
    fig.savefig(paths[0], dpi=DPI, bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight")
    return FigureResult(name, paths, labels, entries, caption, notes or {})


def _strategies(df: pd.DataFrame) -> list[str]:
    return [s for s in dict.fromkeys(df["strategy"]) if s not in REFERENCES]


def _line_ci(ax: Axes, df: pd.DataFrame, x: str, y: str, label: str, color: str, style: str = "-",
             marker: str = "o") -> bool:
    """Mean of ``y`` per ``x`` over rows (seeds), with a 95% CI band where a point has several rows."""
    stats = mean_ci(df, [x], y)
    if stats.empty:
        return False
    ax.plot(stats[x], stats["mean"], style, color=color, marker=marker, ms=4, lw=1.6, label=label)
    if (stats["n"] > 1).any():
        ax.fill_between(stats[x], stats["lo"], stats["hi"], color=color, alpha=0.18, lw=0)
    return True


def _per_trial(df: pd.DataFrame, cols: Sequence[str]) -> pd.DataFrame:
    """One row per trial (reference and trial-level columns repeat over a trial's strategy rows)."""
    key = "trial_id" if "trial_id" in df.columns else None
    return df.drop_duplicates(key) if key else df.drop_duplicates([c for c in cols if c in df.columns])


def _references(ax: Axes, df: pd.DataFrame, x: str, metric: str) -> None:
    """Dashed reference curves (``base_acc``, ``individual_acc``, ``joint_acc`` …) over ``x``."""
    trials = _per_trial(df, [x, "seed"])
    for ref in REFERENCES:
        col = f"{ref}_{metric}"
        if col in trials.columns and trials[col].notna().any():
            color, style = _REF_STYLE[ref]
            _line_ci(ax, trials, x, col, f"{ref} (reference)", color, style, marker="")


def _seed_note(df: pd.DataFrame) -> str:
    n = df["seed"].nunique() if "seed" in df.columns else 1
    return (f"Lines: mean over {n} seeds; bands: 95% t confidence interval of the mean."
            if n > 1 else "One seed: no confidence band.")


def _fig_legend(fig: Figure, axes: Sequence[Axes]) -> None:
    """One legend for the whole figure, below the panels, entries in first-seen order, rows of balanced length."""
    handles, labels = {}, []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in handles:
                handles[lab] = h
                labels.append(lab)
    # entry width ≈ handle + gap + 0.075 in per character at the default font size
    needed = sum(0.45 + 0.075 * len(lab) for lab in labels)
    rows = max(1, math.ceil(needed / (0.95 * fig.get_figwidth())))
    if labels:
        fig.legend([handles[lab] for lab in labels], labels, loc="lower center", ncol=math.ceil(len(labels) / rows),
                   frameon=False, bbox_to_anchor=(0.5, 0.0))
    # room under the panels for tick labels, the x label and the legend's rows (in inches)
    fig.subplots_adjust(bottom=(0.8 + 0.27 * rows) / fig.get_figheight())


def _log_y(ax: Axes) -> None:
    """Log y axis with plain-number labels at 1, 2, 5 × 10^k (readable without reading exponents)."""
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


# 1. scaling -------------------------------------------------------------------------------------------------------
def plot_scaling(results: pd.DataFrame, out_dir: str | Path, x: str = "contributors",
                 x_label: str = "contributors (institutions)") -> FigureResult | None:
    """Mean ACC and AUC vs number of contributors, per strategy, with the references (``analysis.load.REFERENCES``).

    Args:
        results: sweep rows (one per trial × strategy) with ``x``, ``strategy``, ``acc``, ``auc`` and optionally
            ``seed`` and reference columns ``base_acc``, ``individual_auc``, ``individual_local_acc``, ….
        out_dir: where ``scaling.png``/``.pdf`` go.
        x, x_label: the column on the x axis and its axis label.
    Returns:
        The figure's result, or None without at least two values of ``x``.
    """
    if results.empty or x not in results.columns or results[x].nunique() < 2:
        return None
    fig = Figure(figsize=(11, 4.4))
    axes = fig.subplots(1, 2)
    strategies = _strategies(results)
    for ax, metric, label in zip(axes, ("acc", "auc"), (ACC_LABEL, AUC_LABEL)):
        for s in strategies:
            _line_ci(ax, results[results["strategy"] == s], x, metric, s, strategy_color(s, strategies))
        _references(ax, results, x, metric)
        ax.set_xlabel(x_label)
        ax.set_ylabel(label)
        ax.set_xticks(sorted(results[x].unique()))
        ax.grid(alpha=0.3)
    axes[0].set_title("Accuracy")
    axes[1].set_title("AUC")
    _fig_legend(fig, axes)
    caption = ("Scaling: final ACC (left) and macro AUC (right), each the mean over tasks, against the number of "
               "contributing institutions, per merge strategy; dashed/dotted curves are the references (base = "
               f"foundation without adapter, individual = each site's own adapter on its task's pooled test set, "
               f"mean over sites, individual_local = the same adapters on their own sites' test splits, joint = "
               f"centralised; all but individual_local are scored on the strategies' test sets). "
               f"{_seed_note(results)}")
    return _save(fig, Path(out_dir), "scaling", caption)


# 2. cost ----------------------------------------------------------------------------------------------------------
_COST_PANELS = (("storage_mb", "storage of the merged predictor (MB)"), ("merge_s", "merge time per commit (s)"),
                ("infer_ms_per_image", "inference time (ms / image)"))


def cost_frames(results: pd.DataFrame, max_ms_per_point: float = DEFAULT_MAX_MS_PER_POINT, x: str = "contributors",
                mixture: str = "mixture", fusion: str = "fusion") -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """The cost figure's data: the sweep rows with ``storage_mb``, and Mixture's break-even table
    (``analysis.cost.mixture_breakeven``); None without two values of ``x`` or any cost column."""
    cost_cols = [c for c in ("storage_bytes", "merge_s", "infer_ms_per_image") if c in results.columns]
    if results.empty or x not in results.columns or results[x].nunique() < 2 or not cost_cols:
        return None
    df = results.assign(storage_mb=results["storage_bytes"] / 1e6) if "storage_bytes" in results else results
    return df, mixture_breakeven(results, max_ms_per_point, x, mixture, fusion)


def plot_cost(results: pd.DataFrame, out_dir: str | Path, max_ms_per_point: float = DEFAULT_MAX_MS_PER_POINT,
              x: str = "contributors", x_label: str = "contributors (institutions)") -> FigureResult | None:
    """Storage (MB), merge time (s per commit) and inference (ms/image) vs contributors, per strategy; plus
    Mixture's accuracy gain over Fusion, marking where it stops paying for its inference cost (``mixture_breakeven``).
    """
    frames = cost_frames(results, max_ms_per_point, x)
    return None if frames is None else draw_cost(*frames, out_dir, max_ms_per_point, x, x_label)


def draw_cost(df: pd.DataFrame, table: pd.DataFrame, out_dir: str | Path,
              max_ms_per_point: float = DEFAULT_MAX_MS_PER_POINT, x: str = "contributors",
              x_label: str = "contributors (institutions)") -> FigureResult:
    """Draw ``cost_frames``' tables: three cost panels per strategy and the break-even panel."""
    panels = [(c, lab) for c, lab in _COST_PANELS if c in df.columns]
    stop = stops_paying(table, x)
    fig = Figure(figsize=(11, 8.2))
    axes = list(fig.subplots(2, 2).ravel())
    strategies = _strategies(df)
    for ax, (col, label) in zip(axes, panels):
        for s in strategies:
            _line_ci(ax, df[df["strategy"] == s], x, col, s, strategy_color(s, strategies))
        values = df[col].dropna()
        if len(values) and (values > 0).all() and values.max() / values.min() > 20:
            _log_y(ax)
        ax.set_ylabel(label)
    gain_ax = axes[3]
    if not table.empty:
        _gain_panel(gain_ax, table, x)
    else:
        gain_ax.axis("off")
        gain_ax.text(0.5, 0.5, "Mixture and Fusion not both in this sweep", ha="center", va="center",
                     transform=gain_ax.transAxes, color="0.4")
    for ax in axes[:len(panels)] + ([gain_ax] if not table.empty else []):
        ax.set_xlabel(x_label)
        ax.set_xticks(sorted(df[x].unique()))
        ax.grid(alpha=0.3)
        if stop is not None:
            ax.axvline(stop, color="#b2182b", ls=":", lw=1.5, label=f"Mixture stops paying (n ≥ {stop:g})")
    for ax in axes[len(panels):3]:
        ax.axis("off")
    _fig_legend(fig, axes)
    return _save(fig, Path(out_dir), "cost", _cost_caption(table, stop, max_ms_per_point, df),
                 {"breakeven": stop, "max_ms_per_point": max_ms_per_point})


def _gain_panel(ax: Axes, table: pd.DataFrame, x: str) -> None:
    """Mixture − Fusion ACC gain per ``x``, each point annotated with its price in ms/image per pp."""
    ax.axhline(0, color="0.5", lw=0.8)
    ax.plot(table[x], table["gain_pp"], "-s", color="0.15", ms=4, label="Mixture − Fusion ACC gain")
    lo_x, hi_x = table[x].min(), table[x].max()
    for _, r in table.iterrows():
        text = f"{r['ms_per_pp']:.2g} ms/pp" if r["gain_pp"] > 0 else "no gain"
        # the outermost labels grow inwards, so they stay inside the axes
        ha = "left" if r[x] == lo_x and lo_x != hi_x else "right" if r[x] == hi_x and lo_x != hi_x else "center"
        ax.annotate(text, (r[x], r["gain_pp"]), textcoords="offset points", xytext=(0, 7), ha=ha,
                    fontsize=7, color="0.2")
    low, high = min(0.0, table["gain_pp"].min()), max(0.0, table["gain_pp"].max())
    ax.set_ylim(low - 0.08 * (high - low + 1e-9), high + 0.2 * (high - low + 1e-9))
    ax.margins(x=0.08)
    ax.set_ylabel("Mixture − Fusion ACC (percentage points)")


def _cost_caption(table: pd.DataFrame, stop: float | None, max_ms_per_point: float, df: pd.DataFrame) -> str:
    if table.empty:
        verdict = "Mixture and Fusion are not both present, so no break-even is marked."
    elif stop is None:
        verdict = "Mixture pays at the largest contributor count tested, so no break-even is marked."
    else:
        verdict = f"By this rule Mixture stops paying from {stop:g} contributors on (red dotted line)."
    return ("Cost: storage of the merged predictor (MB), mean merge time per commit (s) and inference time "
            "(ms per test image) against the number of contributors, per strategy (log scale where values span "
            "more than 20×). Bottom right: Mixture's ACC gain over Fusion in percentage points (pp), annotated with "
            "the extra inference ms/image it costs per pp. Rule: Mixture pays at n contributors when its gain "
            f"is > 0 and costs at most {max_ms_per_point:g} ms/image per pp; it stops paying at the smallest n "
            f"from which it pays at no larger n tested. {verdict} {_seed_note(df)}")


# 3. order sensitivity ---------------------------------------------------------------------------------------------
def _order_range(g: pd.DataFrame, metric: str) -> float:
    """max − min over merge orders; with several seeds, the mean over seeds of the per-seed range."""
    if "seed" in g.columns and g["seed"].nunique() > 1:
        return float(g.groupby("seed")[metric].agg(lambda v: v.max() - v.min()).mean())
    return float(g[metric].max() - g[metric].min())


def plot_orders(orders: pd.DataFrame, out_dir: str | Path) -> FigureResult | None:
    """Final AUC and ACC across merge orders, per strategy: points over a box, the range (max − min) written on.

    Args:
        orders: one row per order × strategy (``order`` 0 = the original order), with ``acc`` and ``auc``.
    """
    if orders is None or orders.empty or orders["order"].nunique() < 2:
        return None
    strategies = _strategies(orders)
    fig = Figure(figsize=(max(7.0, 1.6 * len(strategies) * 2 + 2), 4.6))
    axes = fig.subplots(1, 2)
    rng = np.random.default_rng(0)    # fixed jitter: the figure is reproducible
    for ax, metric, label in zip(axes, ("auc", "acc"), (AUC_LABEL, ACC_LABEL)):
        data = [orders.loc[orders["strategy"] == s, metric].dropna().to_numpy() for s in strategies]
        box = ax.boxplot(data, positions=range(len(strategies)), widths=0.55, showfliers=False, patch_artist=True,
                         medianprops={"color": "0.15"})
        for patch, s in zip(box["boxes"], strategies):
            patch.set(facecolor=(*to_rgb(strategy_color(s, strategies)), 0.18), edgecolor="0.3")
        for i, s in enumerate(strategies):
            g = orders[orders["strategy"] == s]
            jitter = rng.uniform(-0.17, 0.17, len(g))
            ax.scatter(i + jitter, g[metric], s=14, color=strategy_color(s, strategies), alpha=0.8, zorder=3,
                       edgecolor="none", label="one merge order")
            first = g[g["order"] == 0]
            if len(first):
                ax.scatter(np.full(len(first), i), first[metric], marker="*", s=110, color="black", zorder=4,
                           label="original order (0)")
        top, bottom = orders[metric].max(), orders[metric].min()
        pad = max(top - bottom, 0.02)
        for i, s in enumerate(strategies):
            g = orders[orders["strategy"] == s]
            ax.text(i, g[metric].max() + 0.06 * pad, f"range {_order_range(g, metric):.3f}", ha="center",
                    va="bottom", fontsize=8)
        ax.set_ylim(bottom - 0.1 * pad, top + 0.22 * pad)
        ax.set_xticks(range(len(strategies)), strategies, rotation=20 if len(strategies) > 5 else 0)
        ax.set_xlabel("merge strategy")
        ax.set_ylabel(f"final {label}")
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_title("AUC across merge orders")
    axes[1].set_title("ACC across merge orders")
    handles = [Line2D([], [], marker="o", ls="", color="0.4", ms=5, label="one merge order"),
               Line2D([], [], marker="*", ls="", color="black", ms=10, label="original order (0)")]
    fig.legend(handles=handles, loc="lower center", ncol=2, frameon=False, bbox_to_anchor=(0.5, -0.01))
    fig.subplots_adjust(bottom=0.2 if len(strategies) <= 5 else 0.26)
    n_orders = orders["order"].nunique()
    caption = (f"Merge-order sensitivity: the final AUC (left) and ACC (right) of each strategy when the same "
               f"commits are merged in {n_orders} different orders (order 0 = the original arrival order, star). "
               "Boxes: quartiles over orders; the number above each box is the range (max − min) over orders"
               + (", averaged over seeds." if "seed" in orders.columns and orders["seed"].nunique() > 1 else "."))
    return _save(fig, Path(out_dir), "orders", caption)


def plot_steps(steps: pd.DataFrame, out_dir: str | Path) -> FigureResult | None:
    """ACC on the tasks merged so far (left) and forgetting (right) after every merge step, per strategy: the mean
    over replayed orders with a ± sd band (``analysis.steps.step_summary``; OPCM's protocol).

    Args:
        steps: ``orders_steps.parquet`` rows (order × strategy × step × task, with ``acc`` and ``seen``).
    """
    from analysis.steps import step_summary

    if steps is None or steps.empty:
        return None
    summary = step_summary(steps)
    strategies = _strategies(summary)
    fig = Figure(figsize=(11.0, 4.4))
    axes = fig.subplots(1, 2)
    for ax, metric, label in zip(axes, ("acc_seen", "forgetting"), ("ACC on the tasks merged so far (fraction)",
                                                                      "forgetting (drop from best ACC)")):
        for i, s in enumerate(strategies):
            g = summary[(summary["strategy"] == s) & summary[f"{metric}_mean"].notna()]
            if g.empty:
                continue
            color = strategy_color(s, strategies)
            style = ("-", "--", ":")[(i // len(_PALETTE)) % 3]      # colours repeat past the palette: dash them
            ax.plot(g["step"], g[f"{metric}_mean"], style, marker="o", color=color, ms=3, lw=1.4, label=s)
            ax.fill_between(g["step"], g[f"{metric}_mean"] - g[f"{metric}_sd"],
                            g[f"{metric}_mean"] + g[f"{metric}_sd"], color=color, alpha=0.12, lw=0)
        ax.set_xlabel("merge step (commits merged)")
        ax.set_ylabel(label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].set_title("Accuracy as commits arrive")
    axes[1].set_title("Forgetting as commits arrive")
    axes[0].legend(fontsize=7, ncol=2 if len(strategies) > 8 else 1, frameon=False)
    n_orders = int(summary["orders"].max())
    caption = (f"Every branch scored after every merge step of {n_orders} replayed order(s) of the same commits: "
               "mean ACC over the tasks merged so far (left) and forgetting, the mean drop of the earlier tasks from "
               "their best ACC at an earlier step (right); line: mean over orders, band: ± sd (OPCM's protocol).")
    return _save(fig, Path(out_dir), "steps", caption)


# 4. forgetting ----------------------------------------------------------------------------------------------------
def _heatmap(ax: Axes, grid: pd.DataFrame, cmap, annotate: bool):
    """One strategy's task × version accuracy grid (``forgetting_frames``' rows of that strategy)."""
    tasks, versions = list(grid.index), list(grid.columns)
    values = np.ma.masked_invalid(grid.to_numpy(float))
    im = ax.imshow(values, cmap=cmap, vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    if annotate:
        for (r, c), v in np.ndenumerate(grid.to_numpy(float)):
            if not math.isnan(v):
                ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if v < 0.55 else "black")
    step = max(1, math.ceil(len(versions) / 6))
    ax.set_xticks(range(0, len(versions), step), [str(v) for v in versions[::step]])
    ax.set_yticks(range(len(tasks)), tasks)
    return im


def forgetting_frames(history: pd.DataFrame | None, bars: pd.DataFrame | None
                      ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The forgetting figure's data (each empty when its input is).

    Returns:
        heat: test accuracy, rows (strategy, task) — strategies in order of appearance, tasks in order of arrival —
            columns the evaluated main versions; NaN where a task was not yet seen.
        bar_stats: one row per strategy, columns (``forgetting`` | ``bwt``, ``mean`` | ``lo`` | ``hi`` | ``n``)
            (``analysis.load.mean_ci`` over the rows, i.e. seeds) and (``rows``, ``n``): the strategy's rows.
    """
    heat, bar_stats = pd.DataFrame(), pd.DataFrame()
    if history is not None and not history.empty and history["version"].nunique() >= 1:
        tasks = list(dict.fromkeys(history.sort_values("version", kind="stable")["task"]))   # order of arrival
        versions = sorted(int(v) for v in history["version"].unique())
        strategies = _strategies(history)
        if strategies:
            heat = pd.concat([history[history["strategy"] == s].pivot_table(index="task", columns="version",
                                                                            values="acc")
                              .reindex(index=tasks, columns=versions) for s in strategies], keys=strategies,
                             names=["strategy", "task"])
    if bars is not None and not bars.empty and bars[["forgetting", "bwt"]].notna().any().any():
        names = _strategies(bars)
        parts = {col: mean_ci(bars, ["strategy"], col).set_index("strategy").reindex(names)
                 for col in ("forgetting", "bwt")}
        parts["rows"] = bars.groupby("strategy").size().reindex(names).to_frame("n")
        bar_stats = pd.concat(parts, axis=1)
    return heat, bar_stats


def plot_forgetting(history: pd.DataFrame | None, bars: pd.DataFrame | None, out_dir: str | Path
                    ) -> FigureResult | None:
    """Per strategy, a task × merge-event (main version) accuracy heatmap; and forgetting / BWT bars.

    Args:
        history: evaluations during a run (``strategy``, ``task``, ``version``, ``acc``), or None.
        bars: ``strategy``, ``forgetting``, ``bwt``: one row per run (seed); several rows give a 95% CI error bar.
    """
    heat, bar_stats = forgetting_frames(history, bars)
    return draw_forgetting(heat, bar_stats, out_dir)


_BARS = (("forgetting", "forgetting (best earlier − final ACC)", ""), ("bwt", "BWT (final − first ACC)", "//"))


def draw_forgetting(heat: pd.DataFrame, bar_stats: pd.DataFrame, out_dir: str | Path) -> FigureResult | None:
    """Draw ``forgetting_frames``' tables: one heatmap per strategy above the forgetting / BWT bars."""
    has_heat, has_bars = not heat.empty, not bar_stats.empty
    if not has_heat and not has_bars:
        return None
    strategies = list(dict.fromkeys(heat.index.get_level_values("strategy"))) if has_heat else []
    ncols = max(1, min(len(strategies), 4))
    nrows = math.ceil(len(strategies) / ncols) if strategies else 0
    fig = Figure(figsize=(max(9.0, 3.4 * ncols + 1.2), 2.9 * nrows + (3.6 if has_bars else 0.6)))
    grid = fig.add_gridspec(nrows + (1 if has_bars else 0), ncols + 1,
                            width_ratios=[1] * ncols + [0.05],
                            height_ratios=[1] * nrows + ([1.15] if has_bars else []), hspace=0.55, wspace=0.3)
    if has_heat:
        _heatmaps(fig, grid, heat, strategies, ncols, nrows)
    if has_bars:
        _forgetting_bars(fig.add_subplot(grid[nrows, :ncols] if has_heat else grid[0, :ncols]), bar_stats)
    caption = ""
    if has_heat:
        caption += ("Forgetting: each heatmap shows one strategy's test accuracy per task (rows, in order of "
                    "arrival) at each evaluation of the main branch (columns: main version = number of accepted commits; grey = task "
                    "not yet seen). ")
    if has_bars:
        caption += ("Bars: forgetting = mean over tasks of (best earlier accuracy − final accuracy), higher is worse; "
                    "BWT (backward transfer) = mean over tasks of (final − first accuracy), negative means forgetting"
                    + ("; error bars: 95% CI over seeds." if (bar_stats[("rows", "n")] > 1).any() else "."))
    return _save(fig, Path(out_dir), "forgetting", caption)


def _heatmaps(fig: Figure, grid, heat: pd.DataFrame, strategies: list[str], ncols: int, nrows: int) -> None:
    """One task × version heatmap per strategy, and their shared colour bar."""
    import matplotlib

    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="0.92")
    annotate = len(heat.columns) <= 12
    im = None
    for i, s in enumerate(strategies):
        ax = fig.add_subplot(grid[i // ncols, i % ncols])
        im = _heatmap(ax, heat.loc[s], cmap, annotate)
        ax.set_title(s, fontsize=10)
        ax.set_xlabel("main version (accepted commits)")
        ax.set_ylabel("task" if i % ncols == 0 else "")
        if i % ncols:
            ax.set_yticklabels([])
    cax = fig.add_subplot(grid[:nrows, ncols])
    fig.colorbar(im, cax=cax, label="test accuracy (fraction)")


def _forgetting_bars(ax: Axes, bar_stats: pd.DataFrame) -> None:
    """Forgetting and BWT per strategy, side by side in the strategy's colour, CI error bars over seeds."""
    names = list(bar_stats.index)
    pos = np.arange(len(names))
    for k, (col, label, hatch) in enumerate(_BARS):
        stats = bar_stats[col]
        err = np.vstack([stats["mean"] - stats["lo"], stats["hi"] - stats["mean"]])
        ax.bar(pos + (k - 0.5) * 0.38, stats["mean"], width=0.38, label=label, hatch=hatch,
               color=[strategy_color(s, names) for s in names], alpha=0.9 if k == 0 else 0.45,
               edgecolor="0.2", yerr=err if (stats["n"] > 1).any() else None, capsize=3)
    ax.axhline(0, color="0.3", lw=0.8)
    ax.set_xticks(pos, names)
    ax.set_xlabel("merge strategy")
    ax.set_ylabel("accuracy change (fraction)")
    # the bars take their strategy's colour: the legend tells the two kinds by fill and hatch only
    ax.legend(handles=[Patch(facecolor="0.45", edgecolor="0.2", label=_BARS[0][1]),
                       Patch(facecolor="0.85", edgecolor="0.2", hatch="//", label=_BARS[1][1])],
              loc="best", fontsize=8, frameon=True, framealpha=0.9)
    ax.grid(alpha=0.3, axis="y")


# 5. IPC -----------------------------------------------------------------------------------------------------------
# The membership attack's operating point the privacy panel plots: all members, and the exposed ones (the members
# nearest to a distilled image), each with its pooled 95% Clopper-Pearson interval (``analysis.load.distill_audit``).
_MIA_LINES = (("mia_tpr_at_1pct_fpr", "all members", "0.25"), ("mia_exposed_tpr_at_1pct_fpr", "exposed members",
                                                                  "tab:red"))
_INIT = "distill.init"


def _init_groups(results: pd.DataFrame) -> list[tuple[str, str, pd.DataFrame]]:
    """(label suffix, line style, rows) per distillation init when the study varies it, else one group."""
    if _INIT not in results.columns or results[_INIT].nunique() < 2:
        return [("", "-", results)]
    styles = {"real": "-", "noise": "--"}
    return [(f" (init {v})", styles.get(v, ":"), results[results[_INIT] == v])
            for v in sorted(results[_INIT].dropna().unique())]


def _fidelity_panel(ax: Axes, groups: list, strategies: list[str], x: str) -> None:
    for suffix, style, df in groups:
        per_strategy = "trial_id" in df.columns and df.groupby("trial_id")["distill_fidelity"].nunique().max() > 1
        if per_strategy:
            for s in strategies:
                _line_ci(ax, df[df["strategy"] == s], x, "distill_fidelity", s + suffix, strategy_color(s, strategies),
                         style)
        else:
            _line_ci(ax, _per_trial(df, [x, "seed"]), x, "distill_fidelity", "distilled sets (all strategies)" + suffix,
                     "0.25", style)
    ax.axhline(1.0, color="0.5", ls=":", lw=1, label="fidelity 1 = as good as real data")
    ax.set_ylabel("distillation fidelity (ACC distilled / ACC real)")
    ax.set_title("Fidelity")


def _privacy_panel(ax: Axes, groups: list, x: str) -> None:
    """TPR at 1% FPR of the membership attack per x: mean over seeds (band: over seeds) and the pooled
    Clopper-Pearson interval (vertical bars, mean over seeds)."""
    for suffix, style, df in groups:
        trials = _per_trial(df, [x, "seed"])
        for col, label, color in _MIA_LINES:
            if col not in trials.columns or trials[col].isna().all():
                continue
            _line_ci(ax, trials, x, col, f"TPR@1%FPR, {label}{suffix}", color, style)
            if {f"{col}_lo", f"{col}_hi"} <= set(trials.columns):
                ci = trials.groupby(x)[[f"{col}_lo", f"{col}_hi"]].mean().dropna()
                ax.vlines(ci.index, ci[f"{col}_lo"], ci[f"{col}_hi"], color=color, lw=4, alpha=0.3)
    ax.axhline(0.01, color="0.5", ls=":", lw=1, label="TPR = FPR 1% (no membership leak)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("membership-inference TPR at 1% FPR")
    ax.set_title("Privacy")


def plot_ipc(results: pd.DataFrame, out_dir: str | Path, x: str = "ipc", x_label: str = "images per class (IPC)"
             ) -> FigureResult | None:
    """ACC vs images per class (IPC) per strategy, with distillation fidelity and privacy (membership-inference
    TPR at 1% FPR with its confidence interval) panels; one line style per distillation init when it varies."""
    if results.empty or x not in results.columns or results[x].nunique() < 2:
        return None
    extra = [c for c in ("distill_fidelity", "mia_tpr_at_1pct_fpr")
             if c in results.columns and results[c].notna().any()]
    fig = Figure(figsize=(5.2 * (1 + len(extra)), 4.4))
    axes = list(np.atleast_1d(fig.subplots(1, 1 + len(extra))))
    strategies, groups = _strategies(results), _init_groups(results)
    for s in strategies:
        for suffix, style, df in groups:
            _line_ci(axes[0], df[df["strategy"] == s], x, "acc", s + suffix, strategy_color(s, strategies), style)
    _references(axes[0], results, x, "acc")
    axes[0].set_ylabel(ACC_LABEL)
    axes[0].set_title("Accuracy")
    for ax, col in zip(axes[1:], extra):
        if col == "distill_fidelity":
            _fidelity_panel(ax, groups, strategies, x)
        else:
            _privacy_panel(ax, groups, x)
    for ax in axes:
        ax.set_xlabel(x_label)
        ax.set_xticks(sorted(results[x].unique()))
        ax.grid(alpha=0.3)
    _fig_legend(fig, axes)
    return _save(fig, Path(out_dir), "ipc", _ipc_caption(results, extra, len(groups) > 1))


def _ipc_caption(results: pd.DataFrame, extra: list[str], by_init: bool) -> str:
    n = results.drop_duplicates("trial_id") if "trial_id" in results.columns else results
    counts = ""
    if "mia_n_members" in n.columns and n["mia_n_members"].notna().any():
        counts = (f" (per trial, pooled over its distilled sets: about {n['mia_n_members'].mean():.0f} members, "
                  f"{n['mia_exposed_n_members'].mean():.0f} exposed, {n['mia_n_nonmembers'].mean():.0f} non-members)")
    return ("Distillation budget: final ACC (mean over tasks) against the number of distilled images per class "
            "(IPC) each institution commits, per strategy, with references"
            + ("; solid lines: distilled from real-image init, dashed: from noise" if by_init else "")
            + ("; distillation fidelity (accuracy of an adapter trained on the distilled set / on the real "
               "training split, 1 = lossless)" if "distill_fidelity" in extra else "")
            + ("; privacy as the true-positive rate at 1% false-positive rate of a per-record membership-inference "
               "attack (LiRA, Carlini et al. 2022) on an adapter trained on the distilled set, for all members and "
               "for the exposed ones (nearest to a distilled image)" + counts + "; vertical bars: pooled 95% "
               "Clopper-Pearson interval; TPR = 0.01 is no leak" if "mia_tpr_at_1pct_fpr" in extra else "")
            + f". {_seed_note(results)}")


# 6. rank ----------------------------------------------------------------------------------------------------------
def plot_rank(results: pd.DataFrame, out_dir: str | Path, x: str = "rank", x_label: str = "LoRA rank r"
              ) -> FigureResult | None:
    """ACC and storage (MB) of the merged predictor vs LoRA rank, per strategy."""
    if results.empty or x not in results.columns or results[x].nunique() < 2:
        return None
    df = results.assign(storage_mb=results["storage_bytes"] / 1e6) if "storage_bytes" in results else results
    panels = [("acc", ACC_LABEL)] + ([("storage_mb", "storage of the merged predictor (MB)")]
                                     if "storage_mb" in df.columns else [])
    fig = Figure(figsize=(5.4 * len(panels), 4.4))
    axes = list(np.atleast_1d(fig.subplots(1, len(panels))))
    strategies = _strategies(df)
    ranks = sorted(df[x].unique())
    for ax, (col, label) in zip(axes, panels):
        for s in strategies:
            _line_ci(ax, df[df["strategy"] == s], x, col, s, strategy_color(s, strategies))
        if col == "acc":
            _references(ax, df, x, "acc")
        elif (df[col].dropna() > 0).all():
            _log_y(ax)
        if min(ranks) > 0 and max(ranks) / min(ranks) >= 8:
            ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [f"{r:g}" for r in ranks])
        ax.minorticks_off()
        ax.set_xlabel(x_label)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    _fig_legend(fig, axes)
    caption = ("LoRA rank: final ACC (mean over tasks) and storage of the merged predictor (MB, log scale) against "
               f"the adapters' rank r, per strategy. {_seed_note(results)}")
    return _save(fig, Path(out_dir), "rank", caption)


# 7. timeline ------------------------------------------------------------------------------------------------------
def timeline_frames(contribs: pd.DataFrame) -> tuple[pd.DataFrame, pd.Series]:
    """The timeline's data: the contributions with a pull time, plus ``t_end`` (the commit, or the pull where there
    was none) and ``t_mark`` (where the verdict mark goes: the commit, the pull for a dropout); and the staleness of
    the accepted commits."""
    spans = contribs.dropna(subset=["t_pull"]) if not contribs.empty else contribs
    if spans.empty:
        return spans, pd.Series(dtype=float, name="staleness")
    spans = spans.assign(t_end=spans["t_commit"].where(spans["t_commit"].notna(), spans["t_pull"]),
                         t_mark=spans["t_pull"].where(spans["status"] == "dropout", spans["t_commit"]))
    return spans, contribs.loc[contribs["status"] == "accepted", "staleness"].dropna()


def plot_timeline(contribs: pd.DataFrame, out_dir: str | Path, time_label: str = "virtual time (units)"
                  ) -> FigureResult | None:
    """Each institution's training spans (pull → commit) and commit marks over time; staleness histogram.

    Args:
        contribs: ``analysis.load.contributions(events)``.
        time_label: the x-axis label (virtual or wall time and its unit).
    """
    spans, stale = timeline_frames(contribs)
    return None if spans.empty else draw_timeline(spans, stale, out_dir, time_label)


# (status, marker, colour, legend label) of the commit marks
_MARKS = (("accepted", "o", "black", "commit accepted"), ("rejected", "X", "#d62728", "commit rejected"),
          ("pending", "o", "0.6", "commit (no verdict)"), ("dropout", "x", "0.35", "dropout"))


def draw_timeline(spans: pd.DataFrame, stale: pd.Series, out_dir: str | Path,
                  time_label: str = "virtual time (units)") -> FigureResult:
    """Draw ``timeline_frames``' tables: the spans and marks per institution (left), the staleness histogram."""
    insts = sorted(int(i) for i in spans["institution"].dropna().unique())
    height = max(3.6, 0.24 * len(insts) + 1.8)
    fig = Figure(figsize=(13, height))
    grid = fig.add_gridspec(1, 2, width_ratios=[3.2, 1], wspace=0.25)
    _spans_panel(fig.add_subplot(grid[0, 0]), spans, insts, time_label)
    _staleness_panel(fig.add_subplot(grid[0, 1]), stale)
    caption = ("Timeline: each institution's local training spans, from pulling the main branch (tick) to "
               f"committing (marker: the merge actor's verdict), coloured by task; x axis: {time_label}. Right: the "
               "staleness of the accepted commits, i.e. how many commits were merged between a contribution's pull "
               "and its own merge (dashed: mean).")
    return _save(fig, Path(out_dir), "timeline", caption)


def _spans_panel(ax: Axes, spans: pd.DataFrame, insts: list[int], time_label: str) -> None:
    tasks = sorted(t for t in spans["task"].dropna().unique())
    # more tasks than the first ten colours: start further on in the palette
    task_color = {t: _PALETTE[(i + 10) % len(_PALETTE)] if len(tasks) > 10 else _PALETTE[i]
                  for i, t in enumerate(tasks)}
    # Step 1: the spans, coloured by task.
    work = spans[spans["status"] != "dropout"]
    for _, r in work.iterrows():
        ax.hlines(r["institution"], r["t_pull"], r["t_end"], color=task_color.get(r["task"], "0.6"), lw=5, alpha=0.75)
    # a pull tick separates back-to-back contributions of one institution
    ax.scatter(work["t_pull"], work["institution"], marker="|", s=90, color="0.25", zorder=3, label="pull")
    # Step 2: the commit marks by verdict, and dropouts.
    handles = [Patch(color=task_color[t], alpha=0.75, label=f"training: {t}") for t in tasks]
    handles.append(Line2D([], [], marker="|", ls="", color="0.25", ms=9, label="pull"))
    for status, marker, color, label in _MARKS:
        g = spans[spans["status"] == status]
        if g.empty:
            continue
        ax.scatter(g["t_mark"], g["institution"], marker=marker, s=22, color=color, zorder=3, label=label)
        handles.append(Line2D([], [], marker=marker, ls="", color=color, label=label))
    step = max(1, math.ceil(len(insts) / 30))
    ax.set_yticks(insts[::step], [f"inst {i}" for i in insts[::step]], fontsize=8)
    ax.set_ylim(max(insts) + 0.7, min(insts) - 0.7)
    ax.set_xlabel(time_label)
    ax.set_ylabel("institution")
    ax.set_title("Training spans (pull → commit) and commits")
    ax.grid(alpha=0.3, axis="x")
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(0, -0.14 if len(insts) < 15 else -0.08),
              ncol=math.ceil(len(handles) / math.ceil(len(handles) / 6)), fontsize=8, frameon=False)


def _staleness_panel(hx: Axes, stale: pd.Series) -> None:
    """Step 3: a histogram of the accepted commits' staleness, with its mean."""
    if len(stale):
        top = int(stale.max())
        bins = np.arange(-0.5, top + 1.5, max(1, math.ceil((top + 1) / 25)))
        hx.hist(stale, bins=bins, color="#4c72b0", edgecolor="white")
        hx.axvline(stale.mean(), color="#b2182b", ls="--", lw=1.4, label=f"mean {stale.mean():.1f}")
        hx.yaxis.set_major_locator(MaxNLocator(integer=True))
        hx.set_ylim(0, hx.get_ylim()[1] * 1.15)   # room for the legend above the bars
        hx.legend(fontsize=8, loc="upper right", frameon=True, framealpha=0.9)
    else:
        hx.text(0.5, 0.5, "no staleness recorded", ha="center", va="center", transform=hx.transAxes, color="0.4")
    hx.set_xlabel("staleness (commits merged between pull and commit)")
    hx.set_ylabel("accepted commits (count)")
    hx.set_title("Staleness")
    hx.grid(alpha=0.3, axis="y")


# 8. progress of one run -------------------------------------------------------------------------------------------
def plot_progress(history: pd.DataFrame, references: dict, out_dir: str | Path) -> FigureResult | None:
    """Mean ACC and AUC over the evaluated tasks at each main version, per strategy, with the references' levels.

    Args:
        history: evaluations during a run (``strategy``, ``task``, ``version``, ``acc``, ``auc``).
        references: ``summary["references"]`` (``{name: {acc, auc}}``), drawn as horizontal lines.
    """
    if history is None or history.empty or history["version"].nunique() < 2:
        return None
    means = history.groupby(["strategy", "version"], sort=False)[["acc", "auc"]].mean().reset_index()
    n_tasks = history.groupby("version")["task"].nunique()
    fig = Figure(figsize=(11, 4.4))
    axes = fig.subplots(1, 2)
    strategies = _strategies(history)
    for ax, metric, label in zip(axes, ("acc", "auc"), (ACC_LABEL, AUC_LABEL)):
        for s in strategies:
            g = means[means["strategy"] == s].sort_values("version")
            ax.plot(g["version"], g[metric], "-o", ms=4, color=strategy_color(s, strategies), label=s)
        for ref in REFERENCES:
            value = (references or {}).get(ref, {}).get(metric)
            if value is not None and not math.isnan(value):
                color, style = _REF_STYLE[ref]
                ax.axhline(value, color=color, ls=style, lw=1.3, label=f"{ref} (reference)")
        ax.set_xlabel("main version (accepted commits)")
        ax.set_ylabel(label.replace("mean over tasks", "mean over tasks seen"))
        versions = sorted(means["version"].unique())
        if len(versions) <= 12:
            ax.set_xticks(versions)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(nbins=10, integer=True))
        ax.grid(alpha=0.3)
    axes[0].set_title("Accuracy as commits arrive")
    axes[1].set_title("AUC as commits arrive")
    _fig_legend(fig, axes)
    varying = n_tasks.nunique() > 1
    caption = ("Progress of the run: ACC and macro AUC of each strategy's main branch at each evaluation, the mean "
               "over the tasks evaluated at that version"
               + (f" (their number grows from {n_tasks.iloc[0]} to {n_tasks.iloc[-1]} as new tasks arrive, so early "
                  "points average fewer tasks)" if varying else "")
               + "; horizontal lines: the references on all tasks at the end of the run.")
    return _save(fig, Path(out_dir), "progress", caption)


# 9. asynchrony: accuracy over virtual time, staleness and idle time -------------------------------------------------
def _step_mean(group: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """The mean over trials of step curves (``trial_id``, ``t_virtual``, ``acc``; each trial's curve holds from its
    point until its next): on the union of their times, each trial's value the last at or before the time."""
    grid = np.unique(group["t_virtual"].to_numpy(float))
    values = []
    for _, g in group.groupby("trial_id", sort=False):
        g = g.sort_values("t_virtual")
        t, acc = g["t_virtual"].to_numpy(float), g["acc"].to_numpy(float)
        idx = np.searchsorted(t, grid, side="right") - 1
        values.append(np.where(idx >= 0, acc[np.clip(idx, 0, None)], np.nan))
    return grid, np.nanmean(np.vstack(values), axis=0)


def _panel_values(df: pd.DataFrame, column: str) -> list:
    return sorted(df[column].dropna().unique()) if column in df.columns else [None]


def plot_time_to_accuracy(curves: pd.DataFrame, results: pd.DataFrame, out_dir: str | Path, x: str = "sigma",
                          by: str = "protocol", x_label: str = "σ", time_label: str = "virtual time (units)"
                          ) -> FigureResult | None:
    """Accuracy over virtual time: one panel per strategy (rows) × value of ``x`` (columns), one line per ``by``
    (protocol), the mean over seeds of the trials' step curves; a diamond marks the mean time to target (the first
    time a trial reaches ``TARGET`` of its final accuracy, ``results``' ``time_to_target``).

    Args:
        curves: one row per trial × strategy × point, ``trial_id``, ``strategy``, ``t_virtual``, ``acc`` and the
            ``x`` and ``by`` columns (``analysis.load.accuracy_over_time`` per run, with the foundation at t = 0).
        results: the study's rows (trial × strategy) with ``time_to_target`` and ``acc``.
    Returns:
        The figure's result, or None without curves.
    """
    if curves is None or curves.empty or by not in curves.columns:
        return None
    strategies, xs = _strategies(curves), _panel_values(curves, x)
    protocols = list(dict.fromkeys(curves[by]))
    fig = Figure(figsize=(3.6 * len(xs) + 1.2, 2.9 * len(strategies) + 1.2))
    axes = np.atleast_2d(fig.subplots(len(strategies), len(xs), squeeze=False, sharey="row"))
    for r, s in enumerate(strategies):
        for c, value in enumerate(xs):
            ax = axes[r, c]
            part = curves[(curves["strategy"] == s) & ((curves[x] == value) if value is not None else True)]
            for proto in protocols:
                g = part[part[by] == proto]
                if g.empty:
                    continue
                color = strategy_color(proto, protocols)
                t, acc = _step_mean(g)
                ax.step(t, acc, where="post", color=color, lw=1.6, label=proto)
                rows = results[(results["strategy"] == s) & (results[by] == proto)
                               & ((results[x] == value) if value is not None else True)]
                hit = rows["time_to_target"].dropna() if "time_to_target" in rows else pd.Series(dtype=float)
                if len(hit):
                    y = acc[max(0, np.searchsorted(t, hit.mean(), side="right") - 1)]
                    ax.plot([hit.mean()], [y], "D", color=color, ms=6, mec="black", mew=0.6, zorder=5)
            ax.set_title(f"{s}, {x_label} = {value:g}" if value is not None else s, fontsize=10)
            ax.grid(alpha=0.3)
            if r == len(strategies) - 1:
                ax.set_xlabel(time_label)
            if c == 0:
                ax.set_ylabel("ACC (mean over all tasks)")
    axes[0, 0].plot([], [], "D", color="0.5", mec="black", mew=0.6, ls="", label="time to target (mean)")
    _fig_legend(fig, list(axes.ravel()))
    n_seeds = curves["seed"].nunique() if "seed" in curves.columns else 1
    caption = (f"Accuracy against virtual time per protocol: each panel one strategy (rows) and one {x_label} "
               "(columns); lines: the main branch's ACC on every task of the cohort after each merge (the last merge "
               "of an instant, e.g. a round's barrier), from the foundation at t = 0, mean over "
               f"{n_seeds} seed(s) of the step curves; diamonds: the mean time to 90 % of the run's final accuracy "
               f"(FedScale's time-to-accuracy). x axis: {time_label}.")
    return _save(fig, Path(out_dir), "time_to_accuracy", caption)


def plot_staleness_idle(staleness: pd.DataFrame, results: pd.DataFrame, out_dir: str | Path, x: str = "sigma",
                        by: str = "protocol", x_label: str = "σ") -> FigureResult | None:
    """Staleness histograms of the accepted commits (one panel per value of ``x``, bars per ``by``: the mean over
    seeds of the commits per staleness) and the idle share of the fast institutions against ``x`` (last panel).

    Args:
        staleness: ``trial_id``, ``staleness``, ``count`` and the ``x``, ``by`` columns, per trial
            (``analysis.load.staleness_counts``).
        results: the study's rows with ``idle_share_fast`` and ``idle_share`` (one value per trial).
    """
    if staleness is None or staleness.empty or by not in staleness.columns:
        return None
    xs = _panel_values(staleness, x)
    protocols = list(dict.fromkeys(staleness[by]))
    fig = Figure(figsize=(3.4 * (len(xs) + 1) + 0.8, 3.8))
    axes = fig.subplots(1, len(xs) + 1, squeeze=False)[0]
    width = 0.8 / max(1, len(protocols))
    for ax, value in zip(axes, xs):
        part = staleness[(staleness[x] == value) if value is not None else np.ones(len(staleness), bool)]
        for k, proto in enumerate(protocols):
            g = part[part[by] == proto]
            if g.empty:
                continue
            per_run = g.groupby("staleness")["count"].sum() / g["trial_id"].nunique()
            ax.bar(per_run.index + (k - (len(protocols) - 1) / 2) * width, per_run.to_numpy(), width,
                   color=strategy_color(proto, protocols), label=proto)
        ax.set_title(f"staleness, {x_label} = {value:g}" if value is not None else "staleness", fontsize=10)
        ax.set_xlabel("staleness (commits)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_ylabel("accepted commits per run")
    idle = _per_trial(results, [x, by, "seed"]) if not results.empty else results
    ix = axes[-1]
    for proto in protocols:
        g = idle[idle[by] == proto] if by in idle.columns else idle.iloc[:0]
        color = strategy_color(proto, protocols)
        for col, style, marker in (("idle_share_fast", "-", "o"), ("idle_share", ":", "")):
            if col in g.columns and g[col].notna().any():
                _line_ci(ix, g.assign(**{col: 100 * g[col]}), x, col, proto if col == "idle_share_fast" else "",
                         color, style, marker)
    ix.set_xlabel(f"speed heterogeneity {x_label}")
    ix.set_ylabel("idle share of virtual time (%)")
    ix.set_title("idle time (solid: fast half, dotted: all)", fontsize=10)
    if x in idle.columns:
        ix.set_xticks(_panel_values(idle, x))
    ix.grid(alpha=0.3)
    fig.subplots_adjust(wspace=0.32)
    _fig_legend(fig, list(axes))
    caption = ("Left: staleness of the accepted commits (commits merged between a contribution's pull and its own "
               "merge), the mean number per run with each staleness, per protocol "
               f"(one panel per {x_label}); a synchronous round's commits are stale only by their place in the "
               "barrier's merge order, MedForge's start from the foundation and are never stale. Right: the share "
               "of the institutions' virtual time between their first pull and their last merge spent idle — "
               "waiting for a round's barrier or with nothing to do (sim.asynchrony.idle_times) — of the faster "
               f"half of the institutions (solid) and of all (dotted), against {x_label}. {_seed_note(idle)}")
    return _save(fig, Path(out_dir), "staleness_idle", caption)
