"""The claims side by side: verdicts on hand-made sweep records against hand-computed t intervals, the claims table
in the report of a sweep dir, the paper-protocol presets and their merge orders. (The presets' smoke sweeps take
minutes on a shared 2-core machine, so they are run by hand: ``forgesim sweep medforge --smoke`` then
``forgesim report DIR --claims``.)"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.claims import CLAIMS, ClaimData, claim_data, decide, estimate, evaluate
from analysis.load import load_sweep

T975_2 = 4.303        # Student t, 0.975 quantile, 2 degrees of freedom (3 seeds)


def ci(values) -> tuple[float, float, float]:
    """Mean and 95 % t interval of 3 values, by hand."""
    v = np.asarray(values, float)
    half = T975_2 * v.std(ddof=1) / math.sqrt(len(v))
    return v.mean(), v.mean() - half, v.mean() + half


def results(scores: dict[str, list[float]], base=(0.2, 0.25, 0.3), individual=(0.9, 0.85, 0.95),
            joint=(0.95, 0.9, 0.97), auc_offset: dict[str, float] | None = None, **columns) -> pd.DataFrame:
    """results.parquet rows of a 3-seed sweep: one row per trial (seed) × strategy."""
    rows = []
    for seed in range(3):
        for s, accs in scores.items():
            acc = accs[seed]
            rows.append({"trial_id": f"t{seed}", "study": "hand", "seed": seed, "ipc": 20, "strategy": s, "acc": acc,
                         "auc": acc + (auc_offset or {}).get(s, 0.0), "base_acc": base[seed], "base_auc": base[seed],
                         "individual_acc": individual[seed], "individual_auc": individual[seed],
                         "joint_acc": joint[seed], "joint_auc": joint[seed]} | columns)
    return pd.DataFrame(rows)


def findings(data: ClaimData, claim_id: str) -> dict[str, object]:
    """The findings of one claim, by subject."""
    claim = next(c for c in CLAIMS if c.id == claim_id)
    return {f.subject: f for f in evaluate(data, [claim])}


# ------------------------------------------------------------------------------------------
# The verdict rule
# ------------------------------------------------------------------------------------------
def test_estimate_is_the_t_interval_and_decide_reads_it_against_the_threshold():
    # Prepare
    values = [0.05, 0.04, 0.06]
    mean, lo, hi = ci(values)
    # Execute
    est = estimate(values)
    # Assert: a hand-computed interval; holds above 0, fails below its lower end, inconclusive inside it
    assert (est.mean, est.lo, est.hi, est.n) == pytest.approx((mean, lo, hi, 3))
    assert decide(est)[0] == "holds" and lo > 0
    assert decide(est, threshold=hi + 0.01)[0] == "fails"
    assert decide(est, threshold=mean)[0] == "inconclusive"
    assert decide(est, threshold=hi + 0.01, above=False)[0] == "holds"
    assert decide(estimate([0.3]))[0] == "inconclusive" and decide(estimate([]))[0] == "not testable here"


# ------------------------------------------------------------------------------------------
# Claims on hand-made records
# ------------------------------------------------------------------------------------------
def test_mixture_beats_fusion_holds_fails_or_is_inconclusive_from_the_paired_interval():
    # Prepare: differences +0.05, +0.04, +0.06 in ACC (CI above 0); in AUC −0.05, −0.06, −0.04 (below 0)
    fusion = [0.70, 0.71, 0.69]
    df = results({"fusion": fusion, "mixture": [0.75, 0.75, 0.75]}, auc_offset={"mixture": -0.10})
    # Execute
    acc, auc = findings(ClaimData(df), "medforge.mixture_acc")[""], findings(ClaimData(df), "medforge.mixture_auc")[""]
    # Assert
    mean, lo, hi = ci([0.05, 0.04, 0.06])
    assert lo > 0 and acc.verdict == "holds" and acc.n == 3 and f"Δ {mean:+.3f} [{lo:+.3f}, {hi:+.3f}]" in acc.measured
    assert auc.verdict == "fails"
    # ...and differences +0.05, −0.03, 0.00 straddle 0
    mixed = results({"fusion": fusion, "mixture": [0.75, 0.68, 0.69]})
    assert findings(ClaimData(mixed), "medforge.mixture_acc")[""].verdict == "inconclusive"
    # ...and a sweep without fusion cannot test it
    none = findings(ClaimData(results({"svd": fusion})), "medforge.mixture_acc")[""]
    assert none.verdict == "not testable here" and "no mixture strategy" in none.reason


def test_order_range_claim_reads_the_range_over_each_trials_orders():
    # Prepare: per trial, fusion's AUC spans 0.10 over 6 orders, mixture's 0.01 / 0.02 / 0.03
    df = results({"fusion": [0.7] * 3, "mixture": [0.8] * 3})
    rows = []
    for seed, spread in enumerate((0.01, 0.02, 0.03)):
        for order in range(6):
            for s, span in (("fusion", 0.10), ("mixture", spread)):
                rows.append({"trial_id": f"t{seed}", "seed": seed, "order": order, "strategy": s, "acc": 0.5,
                             "auc": 0.8 + span * order / 5})
    orders = pd.DataFrame(rows)
    # Execute
    found = findings(ClaimData(df, orders), "medforge.order_range")[""]
    no_orders = findings(ClaimData(df), "medforge.order_range")[""]
    # Assert: Δ = fusion − mixture range = 0.09, 0.08, 0.07 per trial
    mean, lo, hi = ci([0.09, 0.08, 0.07])
    assert found.verdict == "holds" and lo > 0 and f"Δ (fusion − mixture) {mean:+.3f} [{lo:+.3f}, {hi:+.3f}]" in \
        found.measured and "over 6 orders" in found.measured
    assert no_orders.verdict == "not testable here" and "no merge orders" in no_orders.reason


def test_distiller_claim_pairs_seeds_across_trials_and_needs_ipc_20():
    # Prepare: one trial per seed × distill.method; mixture ACC dm 0.80/0.82/0.81, random 0.70/0.72/0.69,
    # herding 0.80/0.85/0.78 (straddles dm)
    parts = []
    for method, accs in (("dm", [0.80, 0.82, 0.81]), ("random", [0.70, 0.72, 0.69]), ("herding", [0.80, 0.85, 0.78])):
        part = results({"mixture": accs, "fusion": [0.6] * 3}, **{"distill.method": method})
        part["trial_id"] = part["trial_id"] + method
        parts.append(part)
    df = pd.concat(parts, ignore_index=True)
    # Execute
    found = findings(ClaimData(df), "medforge.dm_dsa")
    at_5 = findings(ClaimData(df.assign(ipc=5)), "medforge.dm_dsa")[""]
    # Assert
    assert found["random"].verdict == "holds" and ci([0.10, 0.10, 0.12])[1] > 0
    assert found["herding"].verdict == "inconclusive" and ci([0.0, -0.03, 0.03])[1] < 0 < ci([0.0, -0.03, 0.03])[2]
    assert at_5.verdict == "not testable here" and "no rows at ipc = 20 (it ran 5)" in at_5.reason
    # ...and the other claims read the dm (DM-DSA) trials only: 3 trials, not 9
    assert findings(ClaimData(df), "medforge.mixture_acc")[""].n == 3


def test_medlego_svd_best_and_collapse_use_individuals_gain_over_base():
    # Prepare: base 0.2/0.25/0.3, individual 0.9/0.85/0.95; svd recovers ~75 %, ties ~20 %, magmax ~50 %
    base, indiv = np.array([0.2, 0.25, 0.3]), np.array([0.9, 0.85, 0.95])
    shares = {"svd": [0.75, 0.74, 0.76], "ties": [0.2, 0.25, 0.15], "magmax": [0.45, 0.55, 0.5]}
    df = results({s: list(base + np.array(v) * (indiv - base)) for s, v in shares.items()})
    # Execute
    best, gone = findings(ClaimData(df), "medlego.svd_best"), findings(ClaimData(df), "medlego.collapse")
    # Assert: only the merges the sweep ran; hand-computed shares against 0.5
    assert set(best) == {"ties", "magmax"} and best["ties"].verdict == "holds" and best["magmax"].verdict == "holds"
    assert ci(shares["ties"])[2] < 0.5 and gone["ties"].verdict == "holds"
    assert gone["magmax"].verdict == "inconclusive"                  # its interval contains 0.5
    assert gone["lora_avg"].verdict == "not testable here" and "no lora_avg strategy" in gone["lora_avg"].reason
    assert ci(shares["ties"])[0] == pytest.approx(float(gone["ties"].measured.split()[-3]), abs=1e-3)
    # ...and a sweep of none of Table 1's merges cannot test either claim
    other = ClaimData(results({"fusion": [0.5] * 3}))
    assert findings(other, "medlego.svd_best")[""].verdict == "not testable here"
    assert findings(other, "medlego.collapse")[""].verdict == "not testable here"


def test_between_and_joint_upper_bound_per_strategy():
    # Prepare: fusion between base and individual, mixture above individual, ties below base on seed 0 only
    df = results({"fusion": [0.5, 0.5, 0.6], "mixture": [0.95, 0.9, 0.99], "ties": [0.1, 0.3, 0.35]})
    # Execute
    mid, top = findings(ClaimData(df), "general.between"), findings(ClaimData(df), "general.joint_upper")
    no_joint = findings(ClaimData(df.assign(joint_acc=np.nan)), "general.joint_upper")[""]
    # Assert
    assert mid["fusion"].verdict == "holds" and mid["mixture"].verdict == "fails"
    assert mid["ties"].verdict == "inconclusive"                      # ties − base: −0.1, +0.05, +0.05
    assert top["fusion"].verdict == "holds" and ci([0.45, 0.4, 0.37])[1] > 0
    assert top["mixture"].verdict == "inconclusive"                   # joint − mixture: 0, 0, −0.02
    assert no_joint.verdict == "not testable here" and "no joint reference (train.joint=false)" in no_joint.reason


# ------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------
def write_sweep(path: Path, df: pd.DataFrame, study: str) -> Path:
    from analysis.layout import write_layout
    from experiments.presets import get_study

    path.mkdir(parents=True)
    df.assign(study=study).to_parquet(path / "results.parquet", index=False)
    write_layout(path, get_study(study, smoke=True).layout())
    return path


def test_a_sweep_report_shows_the_claims_table_in_md_and_html(tmp_path, capsys):
    from analysis import build_report
    from experiments.cli import main

    # Prepare
    df = results({"fusion": [0.70, 0.71, 0.69], "mixture": [0.75, 0.75, 0.75]})
    sweep = write_sweep(tmp_path / "sweep", df, "medforge")
    # Execute
    html = build_report(sweep)
    code = main(["report", str(sweep), "--out", str(tmp_path / "rep"), "--claims"])
    # Assert: the section and its verdicts, in both renderings and on stdout
    md = (html.parent / "report.md").read_text()
    assert "## Claims side by side" in md and "| Mixture beats Fusion in ACC |" in md and "**holds**" in md
    assert "not testable here" in md and "the sweep has no merge orders" in md
    page = html.read_text()
    assert "<caption>Claims side by side</caption>" in page and "<b>holds</b>" in page
    out = capsys.readouterr().out
    assert code == 0 and "Mixture beats Fusion in ACC" in out and out.strip().endswith("report.html")
    # ...and claim_data keeps the study's rows only
    assert len(claim_data(load_sweep(sweep), "other").results) == 0


def test_report_claims_flag_needs_a_sweep_dir(tmp_path, capsys):
    from experiments.cli import main

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "summary.json").write_text("{}")
    assert main(["report", str(tmp_path / "run"), "--claims"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--claims needs a sweep dir" in err


# ------------------------------------------------------------------------------------------
# The paper-protocol presets
# ------------------------------------------------------------------------------------------
def test_paper_presets_follow_the_protocols():
    from experiments.presets import get_study

    # Execute
    mf, ml = get_study("medforge"), get_study("medlego")
    # Assert: MedForge 3 tasks × 1 institution, rank 16 / alpha 16, IPC 20, NGOpt budget 40, 6 orders, distillers
    assert (mf.base.data.n_tasks, mf.base.data.institutions, mf.base.lora.rank, mf.base.lora.alpha) == (3, 3, 16, 16)
    assert (mf.base.distill.ipc, mf.base.merge.optimizer, mf.base.merge.budget, mf.orders) == (20, "NGOpt", 40, 6)
    assert set(mf.base.merge.strategies) == {"fusion", "mixture"} and mf.base.train.joint
    assert mf.grid["distill.method"] == ("dm", "random", "herding") and mf.grid["seed"] == (0, 1, 2)
    # ...and only the dm (DM-DSA) trials replay the orders the order claim reads
    assert [mf.orders_of(p) for p in mf.points()] == [6 if p["distill.method"] == "dm" else 0 for p in mf.points()]
    # Med-LEGO: one institution per task, linear heads, Table 1's merges that forgesim has
    assert ml.base.data.institutions == ml.base.data.n_tasks == 5 and ml.base.model.head == "linear"
    assert set(ml.base.merge.strategies) == {"lora_avg", "task_arithmetic", "ties", "magmax", "svd"}
    assert ml.base.lora.rank == 4 and ml.base.train.joint and ml.grid["seed"] == (0, 1, 2)


def test_distinct_orders_enumerates_every_permutation_of_few_commits():
    from itertools import permutations

    from experiments.sweep import distinct_orders
    from sim.replay import permutation

    # Execute
    ids = distinct_orders(3, 6, seed=0)
    many = distinct_orders(12, 20, seed=0)
    # Assert: 3 commits → all 3! orders, once each, order 0 first; more orders than n! are capped at n!
    assert ids[0] == 0 and sorted(tuple(permutation(3, k, 0)) for k in ids) == sorted(permutations(range(3)))
    assert distinct_orders(3, 20, seed=0) == ids and len(distinct_orders(2, 6, seed=0)) == 2
    assert many == list(range(20))          # many commits: the seeded orders are already distinct
