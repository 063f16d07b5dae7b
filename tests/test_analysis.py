"""analysis: figures from small hand-made records tables, the report from a synthetic run dir and sweep dir,
``forgesim report`` and the HTML report in headless Chromium (skipped where chromium is not installed)."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import yaml

from analysis import build_report
from analysis import figures as F
from analysis.browser import broken_images, chromium_version, find_chromium, screenshot
from analysis.load import (contributions, dir_kind, eval_history, load_run, load_sweep, mean_ci,
                           strategy_task_table, study_rows)
from analysis.report import task_table
from experiments.cli import main

STRATEGIES = ("fusion", "mixture", "svd")
TASKS = ("xray", "histology")


# Records builders ---------------------------------------------------------------------------------------------------
def sweep_results() -> pd.DataFrame:
    """Scaling (2, 4, 8, 16 contributors), IPC, rank and forgetting studies, 3 seeds, 3 strategies.

    Mixture's gain over Fusion is 8 − 0.5·n pp and its extra inference 0.9·(n − 1) ms: 0.13, 0.45 ms/pp at n = 2, 4
    (pays), 1.58 ms/pp at 8 and no gain at 16 (does not pay): it stops paying at n = 8.
    """
    rows, trial = [], 0
    for study, x, values in (("scaling", "contributors", (2, 4, 8, 16)), ("ipc", "ipc", (1, 5, 10)),
                             ("rank", "rank", (2, 4, 8, 16)), ("forgetting", "contributors", (8,))):
        for v in values:
            for seed in range(3):
                trial += 1
                n = v if x == "contributors" else 8
                noise = 0.01 * (seed - 1)
                base = {"trial_id": f"t{trial:03d}", "study": study, "seed": seed, "contributors": n,
                        "rank": v if x == "rank" else 8, "ipc": v if x == "ipc" else 5, "wall_s": 10.0,
                        "base_acc": 0.40, "base_auc": 0.60, "individual_acc": 0.90 + noise, "individual_auc": 0.97,
                        "joint_acc": 0.85, "joint_auc": 0.95, "distill_fidelity": 0.5 + 0.04 * v if x == "ipc" else
                        math.nan, "mia_auc": 0.5 + 0.01 * v if x == "ipc" else math.nan}
                if x == "ipc":      # the membership attack's TPR at 1 % FPR, pooled with its interval
                    for prefix, tpr in (("mia", 0.02 + 0.01 * v), ("mia_exposed", 0.1 + 0.05 * v)):
                        base |= {f"{prefix}_tpr_at_1pct_fpr": tpr, f"{prefix}_tpr_at_1pct_fpr_lo": tpr / 2,
                                 f"{prefix}_tpr_at_1pct_fpr_hi": min(1.0, 2 * tpr)}
                    base |= {"mia_n_members": 145, "mia_exposed_n_members": 30, "mia_n_nonmembers": 145}
                fusion_acc = 0.55 + noise
                accs = {"fusion": fusion_acc, "mixture": fusion_acc + (8 - 0.5 * n) / 100, "svd": 0.50 + noise}
                infer = {"fusion": 0.9, "mixture": 0.9 * n, "svd": 0.9}
                for s in STRATEGIES:
                    rows.append(base | {"strategy": s, "acc": accs[s], "auc": accs[s] + 0.2,
                                        "forgetting": 0.05 + 0.02 * STRATEGIES.index(s) + noise,
                                        "bwt": -0.01 * STRATEGIES.index(s), "merge_s": 0.01 * n,
                                        "storage_bytes": 49152 * (n if s == "mixture" else 1) * base["rank"] / 8,
                                        "infer_ms_per_image": infer[s]})
    return pd.DataFrame(rows)


def orders_table() -> tuple[pd.DataFrame, pd.DataFrame]:
    """6 merge orders × 3 strategies; fusion's AUC spans 0.70..0.75 (range 0.05), svd's is constant."""
    rows, per_task = [], []
    for order in range(6):
        for s in STRATEGIES:
            auc = {"fusion": 0.70 + 0.01 * order, "mixture": 0.80 + 0.002 * order, "svd": 0.72}[s]
            rows.append({"order": order, "strategy": s, "acc": auc - 0.2, "auc": auc})
            per_task += [{"order": order, "strategy": s, "task": t, "acc": auc - 0.2, "auc": auc} for t in TASKS]
    return pd.DataFrame(rows), pd.DataFrame(per_task)


def run_records() -> tuple[dict, pd.DataFrame, pd.DataFrame, dict]:
    """A tiny run: 2 institutions × 2 contributions, one commit rejected, evaluations at versions 1 and 3."""
    metrics = []
    for version, seen in ((1, TASKS[:1]), (3, TASKS)):
        for s in STRATEGIES[:2]:
            for t in seen:
                acc = 0.6 + 0.1 * (t == "xray") - 0.05 * (version == 3) * (s == "fusion")
                metrics.append({"run_id": "r1", "event": "eval", "version": version, "strategy": s, "task": t,
                                "acc": acc, "auc": acc + 0.2, "n": 40, "infer_s": 0.04})
    for ref, acc in (("base", 0.4), ("individual", 0.9)):
        metrics += [{"run_id": "r1", "event": "eval", "version": -1, "strategy": ref, "task": t, "acc": acc,
                     "auc": acc + 0.05, "n": 40, "infer_s": 0.02} for t in TASKS]
    metrics = pd.DataFrame(metrics)
    final = metrics[metrics["version"] == 3]
    block = lambda g: {"acc": g["acc"].mean(), "auc": g["auc"].mean(),   # noqa: E731
                       "per_task": {r.task: {"acc": r.acc, "auc": r.auc} for r in g.itertuples()}}
    summary = {"run_id": "r1", "n_institutions": 2, "n_contributions": 4, "commits_accepted": 3,
               "commits_rejected": 1, "wall_s": 12.0, "startup_s": 1.0, "busy_s": 20.0, "parallel_efficiency": 0.83,
               "seed": 0, "clock": "virtual", "init_from": "base", "staleness": {"mean": 0.67, "max": 1},
               "strategies": {s: block(final[final["strategy"] == s]) | {
                   "forgetting": 0.05 if s == "fusion" else 0.0, "bwt": -0.05 if s == "fusion" else None,
                   "storage_bytes": 49152 * (1 + 2 * (s == "mixture")), "merge_s": 0.1, "merge_s_total": 0.3,
                   "infer_ms_per_image": 1.0, "version": 3} for s in STRATEGIES[:2]},
               "references": {r: block(metrics[metrics["strategy"] == r]) for r in ("base", "individual")}}
    sched = []
    for inst, spans in ((0, ((0.1, 1.0), (1.0, 2.2))), (1, ((0.3, 1.5), (1.6, 2.0)))):
        for k, (t0, t1) in enumerate(spans):
            cid = f"inst{inst:03d}-{k:02d}"
            sched += [{"source": "schedule", "event": "pull", "t_virtual": t0, "institution": inst,
                       "contribution": cid},
                      {"source": "schedule", "event": "commit", "t_virtual": t1, "institution": inst,
                       "contribution": cid}]
    actor = [{"source": "merge_actor", "event": "accepted", "id": cid, "institution": inst, "task": TASKS[inst],
              "seq": seq, "version": seq, "staleness": st, "pulled_version": seq - 1 - st, "t_pull": t0,
              "t_commit": t1} for seq, (cid, inst, st, t0, t1) in enumerate(
        (("inst000-00", 0, 0, 0.1, 1.0), ("inst001-00", 1, 1, 0.3, 1.5), ("inst001-01", 1, 1, 1.6, 2.0)), start=1)]
    actor += [{"source": "merge_actor", "event": "rejected", "id": "inst000-01", "reason": "nan in adapter"},
              {"source": "merge_actor", "event": "merged", "seq": 1, "id": "inst000-00", "strategy": "svd",
               "merge_s": 0.1, "storage_bytes": 1000}]
    events = pd.DataFrame(sched + actor).assign(run_id="r1")
    config = {"seed": 0, "data": {"name": "synthetic", "n_tasks": 2}, "lora": {"rank": 8},
              "distill": {"method": "dm", "ipc": 5}, "schedule": {"train_time": 1.0}, "runtime": {"clock": "virtual"}}
    return summary, metrics, events, config


def write_run(path, with_nan: bool = True):
    summary, metrics, events, config = run_records()
    path.mkdir(parents=True)
    (path / "summary.json").write_text(json.dumps(summary))    # JSON null stands for NaN
    metrics.to_parquet(path / "metrics.parquet")
    events.to_parquet(path / "events.parquet")
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    return path


def write_sweep(path, with_run: bool = True):
    path.mkdir(parents=True)
    results = sweep_results()
    if with_run:   # the forgetting study's first trial kept its run dir
        write_run(path / "trials" / "t-forget")
        results["run_dir"] = np.where(results["study"] == "forgetting", "trials/t-forget", None)
    results.to_parquet(path / "results.parquet")
    orders, per_task = orders_table()
    orders.to_parquet(path / "orders.parquet")
    per_task.to_parquet(path / "orders_per_task.parquet")
    return path


def assert_written(result: F.FigureResult) -> None:
    assert [p.suffix for p in result.paths] == [".png", ".pdf"]
    assert all(p.is_file() and p.stat().st_size > 1000 for p in result.paths)
    assert result.png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.caption


# Tables and statistics ----------------------------------------------------------------------------------------------
def test_mean_ci_is_a_t_interval_over_seeds():
    # Prepare: values 1, 2, 3 → mean 2, sd 1, t(0.975, 2) = 4.303
    df = pd.DataFrame({"x": [1, 1, 1, 2], "v": [1.0, 2.0, 3.0, 5.0]})
    # Execute
    stats = mean_ci(df, ["x"], "v").set_index("x")
    # Assert
    assert stats.loc[1, "mean"] == 2.0 and stats.loc[1, "n"] == 3
    assert stats.loc[1, "hi"] - 2.0 == pytest.approx(4.303 / math.sqrt(3))
    assert stats.loc[2, "lo"] == stats.loc[2, "hi"] == 5.0   # one seed: no band


def test_mixture_breakeven_rule():
    table = F.mixture_breakeven(study_rows(sweep_results(), "scaling", "contributors")).set_index("contributors")
    assert table.loc[2, "gain_pp"] == pytest.approx(7.0) and table.loc[2, "extra_ms"] == pytest.approx(0.9)
    assert table.loc[8, "ms_per_pp"] == pytest.approx(6.3 / 4.0)
    assert list(table["pays"]) == [True, True, False, False]
    assert math.isnan(table.loc[16, "ms_per_pp"])            # no gain: no price per point


def test_task_table_marks_best_strategy_not_references():
    summary, *_ = run_records()
    wide = strategy_task_table(summary)
    assert [p for p, _ in wide.index] == ["fusion", "mixture", "base", "individual"]
    table = task_table(summary)
    mean_acc = [c for c, (g, s) in enumerate(table.columns) if g == "mean" and s.startswith("ACC")][0]
    # mixture beats fusion on the mean; individual (0.9) is higher still but is a reference, not ranked
    assert (1, mean_acc) in table.bold and (3, mean_acc) not in table.bold
    assert table.italic_rows == {2, 3}
    assert table.rows[1][mean_acc] == "65.0"


def test_contributions_join_schedule_and_verdicts():
    *_, events, _ = run_records()
    c = contributions(events).set_index("id")
    assert c.loc["inst000-01", "status"] == "rejected" and c.loc["inst000-01", "t_commit"] == 2.2
    assert c.loc["inst001-01", "status"] == "accepted" and c.loc["inst001-01", "task"] == "histology"
    assert len(c) == 4


# Figures ------------------------------------------------------------------------------------------------------------
def test_plot_scaling(tmp_path):
    result = F.plot_scaling(study_rows(sweep_results(), "scaling", "contributors"), tmp_path)
    assert_written(result)
    assert result.axes_labels == [("contributors (institutions)", F.ACC_LABEL),
                                  ("contributors (institutions)", F.AUC_LABEL)]
    assert result.legend_labels == ["fusion", "mixture", "svd", "base (reference)", "individual (reference)",
                                    "joint (reference)"]
    assert "3 seeds" in result.caption


def test_plot_cost_marks_where_mixture_stops_paying(tmp_path):
    result = F.plot_cost(study_rows(sweep_results(), "scaling", "contributors"), tmp_path)
    assert_written(result)
    assert result.notes["breakeven"] == 8
    ylabels = [y for _, y in result.axes_labels]
    assert ylabels == ["storage of the merged predictor (MB)", "merge time per commit (s)",
                       "inference time (ms / image)", "Mixture − Fusion ACC (percentage points)"]
    assert {"fusion", "mixture", "svd", "Mixture stops paying (n ≥ 8)"} <= set(result.legend_labels)
    assert "from 8 contributors on" in result.caption


def test_plot_orders(tmp_path):
    orders, _ = orders_table()
    result = F.plot_orders(orders, tmp_path)
    assert_written(result)
    assert result.axes_labels == [("merge strategy", "final " + F.AUC_LABEL),
                                  ("merge strategy", "final " + F.ACC_LABEL)]
    assert result.legend_labels == ["one merge order", "original order (0)"]
    assert F._order_range(orders[orders["strategy"] == "fusion"], "auc") == pytest.approx(0.05)


def test_plot_forgetting_heatmaps_and_bars(tmp_path):
    summary, metrics, *_ = run_records()
    bars = pd.DataFrame([{"strategy": s, "forgetting": v["forgetting"], "bwt": v["bwt"]}
                         for s, v in summary["strategies"].items()])
    result = F.plot_forgetting(eval_history(metrics), bars, tmp_path)
    assert_written(result)
    assert ("main version (accepted commits)", "task") in result.axes_labels
    assert ("", "test accuracy (fraction)") in result.axes_labels                        # colour bar
    assert ("merge strategy", "accuracy change (fraction)") in result.axes_labels
    assert result.legend_labels == ["forgetting (best earlier − final ACC)", "BWT (final − first ACC)"]


def test_plot_ipc_with_fidelity_and_privacy(tmp_path):
    result = F.plot_ipc(study_rows(sweep_results(), "ipc", "ipc"), tmp_path)
    assert_written(result)
    assert [y for _, y in result.axes_labels] == [F.ACC_LABEL, "distillation fidelity (ACC distilled / ACC real)",
                                                  "membership-inference TPR at 1% FPR"]
    assert {x for x, _ in result.axes_labels} == {"images per class (IPC)"}
    assert {"fusion", "distilled sets (all strategies)", "TPR = FPR 1% (no membership leak)"} <= set(
        result.legend_labels)


def test_plot_rank(tmp_path):
    result = F.plot_rank(study_rows(sweep_results(), "rank", "rank"), tmp_path)
    assert_written(result)
    assert result.axes_labels == [("LoRA rank r", F.ACC_LABEL), ("LoRA rank r", "storage of the merged predictor (MB)")]
    assert {"fusion", "mixture", "svd", "base (reference)"} <= set(result.legend_labels)


def test_plot_timeline(tmp_path):
    *_, events, _ = run_records()
    result = F.plot_timeline(contributions(events), tmp_path, "virtual time (units)")
    assert_written(result)
    assert result.axes_labels == [("virtual time (units)", "institution"),
                                  ("staleness (commits merged between pull and commit)", "accepted commits (count)")]
    assert {"training: xray", "training: histology", "commit accepted", "commit rejected", "mean 0.7"} <= set(
        result.legend_labels)


def test_plot_progress(tmp_path):
    summary, metrics, *_ = run_records()
    result = F.plot_progress(eval_history(metrics), summary["references"], tmp_path)
    assert_written(result)
    assert result.axes_labels[0][0] == "main version (accepted commits)"
    assert result.legend_labels == ["fusion", "mixture", "base (reference)", "individual (reference)"]


def test_figures_absent_without_their_data(tmp_path):
    one_point = sweep_results().query("study == 'scaling' and contributors == 4")
    assert F.plot_scaling(one_point, tmp_path) is None and F.plot_cost(one_point, tmp_path) is None
    assert F.plot_ipc(pd.DataFrame(), tmp_path) is None and F.plot_rank(one_point, tmp_path) is None
    assert F.plot_orders(orders_table()[0].query("order == 0"), tmp_path) is None
    assert F.plot_forgetting(None, None, tmp_path) is None
    assert F.plot_timeline(contributions(pd.DataFrame()), tmp_path) is None
    assert not list(tmp_path.iterdir())


# Reports and the CLI ------------------------------------------------------------------------------------------------
def test_report_from_run_dir(tmp_path):
    run = write_run(tmp_path / "run")
    assert dir_kind(run) == "run" and load_run(run).strategies == ["fusion", "mixture"]
    html = build_report(run)
    assert html == run / "report" / "report.html"
    figs = sorted(p.name for p in (run / "report" / "figures").iterdir())
    assert figs == sorted(f"{n}.{ext}" for n in ("progress", "forgetting", "timeline") for ext in ("png", "pdf"))
    md = (run / "report" / "report.md").read_text()
    assert "![Figure 1: progress](figures/progress.png)" in md
    assert "| fusion |" in md and "| *individual (reference)* |" in md and "**65.0**" in md
    assert "| commits accepted / rejected | 3 / 1 |" in md
    text = html.read_text()
    assert text.count("data:image/png;base64,") == 3 and "figures/" not in text.split("<body>")[1]


def test_report_from_sweep_dir(tmp_path):
    sweep = write_sweep(tmp_path / "sweep")
    data = load_sweep(sweep)
    assert dir_kind(sweep) == "sweep" and data.run_dirs("forgetting") == [sweep / "trials" / "t-forget"]
    html = build_report(sweep, tmp_path / "out")
    names = {p.stem for p in (tmp_path / "out" / "figures").glob("*.png")}
    assert names == {"scaling", "cost", "orders", "forgetting", "ipc", "rank"}
    md = (tmp_path / "out" / "report.md").read_text()
    assert "Merge-order sensitivity" in md and "Mixture vs Fusion" in md and "trials/t-forget" in md
    assert html.read_text().count("data:image/png;base64,") == 6


def test_cli_report(tmp_path, capsys):
    run = write_run(tmp_path / "run")
    code = main(["report", str(run), "--out", str(tmp_path / "rep")])
    assert code == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "rep" / "report.html")
    assert (tmp_path / "rep" / "report.md").is_file() and (tmp_path / "rep" / "figures" / "timeline.pdf").is_file()


@pytest.mark.parametrize("make, expected", [
    (lambda p: p, "is neither a run dir (no summary.json) nor a sweep dir"),
    (lambda p: p / "missing", "does not exist"),
])
def test_cli_report_bad_dir(tmp_path, capsys, make, expected):
    (tmp_path / "notes.txt").write_text("not a run")
    code = main(["report", str(make(tmp_path))])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("forgesim: error: ") and expected in err
    assert not (tmp_path / "report").exists()


def test_cli_report_bad_records(tmp_path, capsys):
    (tmp_path / "summary.json").write_text("{not json")
    assert main(["report", str(tmp_path)]) == 2
    assert "summary.json is not valid JSON" in capsys.readouterr().err


def test_analysis_never_imports_the_simulation():
    import subprocess
    import sys

    code = ("import sys, analysis, analysis.browser; "
            "print(sorted(m for m in ('torch', 'ray', 'sim', 'actors') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


# The HTML in a real browser -----------------------------------------------------------------------------------------
@pytest.mark.skipif(find_chromium() is None, reason="chromium is not installed (Debian: apt-get install chromium)")
def test_html_report_renders_in_chromium(tmp_path, record_property):
    # the browser that ran, for the suite's closing summary (tests/conftest.py): a CI log shows this test ran in it
    record_property("browser", f"{chromium_version()} ({find_chromium()})")
    html = build_report(write_run(tmp_path / "run"))
    total, broken = broken_images(html)
    assert total == 3 and broken == []
    shot = screenshot(html, tmp_path / "shot.png", height=1500)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    # the check does see a broken image
    bad = tmp_path / "bad.html"
    bad.write_text('<html><head></head><body><img alt="gone" src="missing.png"></body></html>')
    assert broken_images(bad) == (1, ["gone"])


# Shaping and layouts ------------------------------------------------------------------------------------------------
def test_shaping_functions_return_the_frames_the_figures_draw():
    # Prepare
    summary, metrics, events, _ = run_records()
    bars = pd.DataFrame([{"strategy": s, "forgetting": v["forgetting"], "bwt": v["bwt"]}
                         for s, v in summary["strategies"].items()])
    # Execute
    df, breakeven = F.cost_frames(study_rows(sweep_results(), "scaling", "contributors"))
    heat, bar_stats = F.forgetting_frames(eval_history(metrics), bars)
    spans, stale = F.timeline_frames(contributions(events))
    # Assert
    assert (df["storage_mb"] == df["storage_bytes"] / 1e6).all() and list(breakeven["contributors"]) == [2, 4, 8, 16]
    assert list(heat.columns) == [1, 3] and list(heat.loc["fusion"].index) == ["xray", "histology"]
    assert math.isnan(heat.loc[("mixture", "histology"), 1]) and heat.loc[("fusion", "xray"), 3] == pytest.approx(0.65)
    assert list(bar_stats.index) == ["fusion", "mixture"] and bar_stats.loc["fusion", ("forgetting", "mean")] == 0.05
    assert len(spans) == 4 and (spans["t_end"] >= spans["t_pull"]).all() and list(stale) == [0, 1, 1]


def test_strategy_colours_follow_the_records_order():
    assert F.strategy_color("b", ["b", "a"]) == F.strategy_color("a", ["a", "b"]) != F.strategy_color("b", ["a", "b"])
    assert F.strategy_color("new", ["a", "b"]) == F.strategy_color("c", ["a", "b", "c"])


def test_sweep_report_shows_the_sections_of_the_layout_record(tmp_path):
    from analysis.layout import Section, StudyLayout, read_layouts, write_layout

    # Prepare: the sweep dir's records say it is the IPC study, with a tables-only section
    sweep = write_sweep(tmp_path / "sweep", with_run=False)
    layout = StudyLayout("ipc", "ipc", "images", "images per class", {"seed": "seed", "ipc": "distill.ipc"},
                         (Section("Budget", "ipc", ("acc",)), Section("Budget, AUC", tables=("auc",))))
    write_layout(sweep, layout)
    # Execute
    build_report(sweep, tmp_path / "out")
    # Assert: only that study's sections (the orders of orders.parquet are not in its layout)
    assert read_layouts(sweep) == (layout,)
    assert {p.stem for p in (tmp_path / "out" / "figures").glob("*.png")} == {"ipc"}
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Budget" in md and "## Budget, AUC" in md and "AUC (%) by images" in md and "Scaling" not in md


def test_a_layout_naming_an_unknown_figure_is_refused(tmp_path):
    from analysis.layout import Section, StudyLayout
    from analysis.report import check_layout

    with pytest.raises(ValueError, match="study 'toy': unknown figure 'scatter'; known: scaling"):
        check_layout(StudyLayout("toy", sections=(Section("Toy", "scatter"),)))
    with pytest.raises(ValueError, match="unknown table 'medians'"):
        check_layout(StudyLayout("toy", sections=(Section("Toy", tables=("medians",)),)))


def test_strategies_table_per_dataset_with_order_ranges():
    from analysis.report import strategies_table

    # Prepare: two datasets × two seeds (one trial each) × two strategies; orders of two trials with known ranges
    rows = pd.DataFrame([{"trial_id": f"{d}{seed}", "dataset": d, "seed": seed, "strategy": s, "acc": acc,
                          "auc": acc + 0.1, "storage_bytes": 2048.0, "infer_ms_per_image": 0.5, "merge_s": 0.25}
                         for d, base in (("synthetic", 0.5), ("digits", 0.7)) for seed in (0, 1)
                         for s, acc in (("ties", base + 0.02 * seed), ("svd", base - 0.1))])
    orders = pd.DataFrame([{"trial_id": t, "seed": 0, "order": k, "strategy": "ties", "acc": a, "auc": a}
                           for t, accs in (("synthetic0", (0.5, 0.6)), ("synthetic1", (0.5, 0.7)))
                           for k, a in enumerate(accs)])
    # Execute
    table = strategies_table(rows, orders)
    # Assert: one row per dataset × strategy; ACC mean ± sd over seeds; the order range is the mean of per-trial
    # ranges (10 and 20 points), absent where nothing was replayed; the best ACC per dataset is bold
    by = {(r[0], r[1]): r for r in table.rows}
    assert list(by) == [("synthetic", "ties"), ("synthetic", "svd"), ("digits", "ties"), ("digits", "svd")]
    assert by["synthetic", "ties"][2] == "51.0 ± 1.4" and by["synthetic", "ties"][4] == "15.0"
    assert by["digits", "ties"][4] == "–" and by["synthetic", "svd"][6] == "2.000"
    assert table.bold == {(0, 2), (2, 2)}


# The asynchrony study: accuracy over virtual time, staleness and idle time --------------------------------------------
def test_time_to_accuracy_figure_has_one_line_per_protocol(tmp_path):
    plot_time_to_accuracy, plot_staleness_idle = F.plot_time_to_accuracy, F.plot_staleness_idle

    # Prepare: two protocols, two σ, one strategy, two seeds each
    rows, curves, stale = [], [], []
    for proto in ("medforge", "sync_rounds"):
        for sigma in (0.0, 1.0):
            for seed in (0, 1):
                trial = f"{proto}-{sigma}-{seed}"
                curves += [{"trial_id": trial, "seed": seed, "sigma": sigma, "protocol": proto, "strategy": "ties",
                            "t_virtual": t, "acc": a} for t, a in ((0.0, 0.3), (1.0 + seed, 0.5), (3.0, 0.6))]
                rows.append({"trial_id": trial, "seed": seed, "sigma": sigma, "protocol": proto, "strategy": "ties",
                             "acc": 0.6, "time_to_target": 3.0, "idle_share": 0.1, "idle_share_fast": 0.2})
                stale += [{"trial_id": trial, "seed": seed, "sigma": sigma, "protocol": proto, "staleness": s,
                           "count": 2} for s in (0, 1)]
    # Execute
    acc = plot_time_to_accuracy(pd.DataFrame(curves), pd.DataFrame(rows), tmp_path)
    idle = plot_staleness_idle(pd.DataFrame(stale), pd.DataFrame(rows), tmp_path)
    # Assert: a legend entry per protocol (and the target marker), one panel per σ
    assert acc.legend_labels == ["medforge", "sync_rounds", "time to target (mean)"]
    assert [lab for lab, _ in acc.axes_labels].count("virtual time (units)") == 2
    assert idle.legend_labels == ["medforge", "sync_rounds"] and idle.png.stat().st_size > 0


def test_mean_of_step_curves_by_hand():
    _step_mean = F._step_mean

    # Prepare: trial a: 0.2 from 0, 0.6 from 2; trial b: 0.4 from 0, 0.8 from 1
    df = pd.DataFrame({"trial_id": ["a", "a", "b", "b"], "t_virtual": [0.0, 2.0, 0.0, 1.0],
                       "acc": [0.2, 0.6, 0.4, 0.8]})
    # Execute
    t, acc = _step_mean(df)
    # Assert: at 0 (0.2 + 0.4) / 2, at 1 (0.2 + 0.8) / 2, at 2 (0.6 + 0.8) / 2
    assert list(t) == [0.0, 1.0, 2.0] and np.allclose(acc, [0.3, 0.5, 0.7])


def test_accuracy_over_time_keeps_the_last_version_of_an_instant():
    from analysis.load import accuracy_over_time

    # Prepare: versions 1 and 2 merged together at t=3 (a barrier), version 3 at t=5; a reference row (version -1)
    rows = [{"event": "eval", "strategy": "ties", "version": v, "task": task, "acc": acc, "t_virtual": t}
            for v, t, accs in ((1, 3.0, (0.9, 0.9)), (2, 3.0, (0.4, 0.6)), (3, 5.0, (0.7, 0.9)))
            for task, acc in zip(TASKS, accs)]
    rows.append({"event": "eval", "strategy": "base", "version": -1, "task": "xray", "acc": 0.1, "t_virtual": np.nan})
    # Execute
    over = accuracy_over_time(pd.DataFrame(rows))
    # Assert: the mean over tasks of version 2 stands for t=3 (version 1 is main in passing), version 3 for t=5
    assert over[["t_virtual", "version"]].values.tolist() == [[3.0, 2], [5.0, 3]]
    assert np.allclose(over["acc"], [0.5, 0.8]) and set(over["strategy"]) == {"ties"}
    # ...records without virtual time (written before they carried it) give no curve
    assert accuracy_over_time(pd.DataFrame(rows).drop(columns="t_virtual")).empty


def test_asynchrony_table_means_over_seeds():
    from analysis.report import asynchrony_table

    # Prepare: one protocol at σ 0.5, two seeds; ties reaches 90 % at 2 and 4, ACC 50 and 60 %
    rows = pd.DataFrame([{"trial_id": f"t{seed}", "seed": seed, "sigma": 0.5, "protocol": "sync_rounds",
                          "strategy": "ties", "acc": acc, "time_to_target": ttt, "t_end": 9.0, "staleness_mean": 1.5,
                          "stale_rejected": 0.0, "idle_share_fast": fast, "idle_share": 0.25}
                         for seed, acc, ttt, fast in ((0, 0.5, 2.0, 0.4), (1, 0.6, 4.0, 0.6))])
    # Execute
    table = asynchrony_table(rows)
    # Assert: mean ± sd (ddof 1) of each cell
    assert table.rows == [["sync_rounds", "0.5", "3.00 ± 1.41", "55.0 ± 7.1", "9.00 ± 0.00", "1.50 ± 0.00",
                           "0.0 ± 0.0", "50.0 ± 14.1", "25.0 ± 0.0"]]
    assert asynchrony_table(rows.drop(columns="time_to_target")) is None
