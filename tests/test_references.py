"""The references are like-for-like: ``individual`` is scored on the pooled test sets the strategies and ``base``
are scored on (one model per AUC, mean over the task's sites), ``individual_local`` keeps the site-local number,
and a site without an accepted commit counts as the foundation alone."""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

WITHOUT_COMMIT = 3          # the tiny cohort's second xray site never commits


def auc_by_hand(y: np.ndarray, proba: np.ndarray) -> float:
    """Macro one-vs-rest AUC as the Mann–Whitney probability P(score_pos > score_neg) + ½ P(tie), over the classes
    present (binary: the positive class); NaN when no class has both positives and negatives."""
    classes = [1] if proba.shape[1] == 2 else range(proba.shape[1])
    scores = []
    for c in classes:
        pos, neg = proba[y == c, c], proba[y != c, c]
        if len(pos) and len(neg):
            diff = pos[:, None] - neg[None, :]
            scores.append(float(np.mean(diff > 0) + 0.5 * np.mean(diff == 0)))
    return float(np.mean(scores)) if scores else float("nan")


def scores_by_hand(foundation, adapter, x: np.ndarray, y: np.ndarray, task: str, classes) -> tuple[float, float]:
    from sim.metrics import predict_proba

    proba = predict_proba(foundation, adapter, x, task, classes)
    return float(np.mean(proba.argmax(1) == y)), auc_by_hand(y, proba)


@pytest.fixture(scope="module")
def site_adapters(tiny_cfg, tiny_foundation, tiny_cohort, single_thread):
    """Each institution's adapter trained on its own (label-skewed) training split, except ``WITHOUT_COMMIT``."""
    from sim.train import train_adapter

    return {i.id: train_adapter(tiny_foundation, i.train, i.task, i.classes, tiny_cfg.lora, tiny_cfg.train,
                                seed=i.id).adapter
            for i in tiny_cohort.institutions if i.id != WITHOUT_COMMIT}


@pytest.fixture(scope="module")
def individual_records(tiny_foundation, tiny_cohort, site_adapters):
    from sim.evaluation import evaluate_individual

    return evaluate_individual(tiny_foundation, site_adapters, tiny_cohort)


def _by(records: list[dict], strategy: str) -> dict[str, dict]:
    return {r["task"]: r for r in records if r["strategy"] == strategy}


def test_cohort_sites_are_label_skewed(tiny_cohort):
    # Guard on the premise: a site's test split has another label mix than its task's pooled test set
    for task in tiny_cohort.tasks:
        pooled = np.bincount(tiny_cohort.task_split(task, "test").y, minlength=3) / len(
            tiny_cohort.task_split(task, "test"))
        sites = [np.bincount(i.test.y, minlength=3) / len(i.test) for i in tiny_cohort.institutions if i.task == task]
        assert max(np.abs(s - pooled).max() for s in sites) > 0.1


def test_individual_is_each_site_model_on_the_pooled_test_set(tiny_foundation, tiny_cohort, site_adapters,
                                                             individual_records):
    # Prepare: per task, every site's model (the foundation for the site without a commit) on the pooled test set
    got = _by(individual_records, "individual")
    assert set(got) == set(tiny_cohort.tasks)
    for task, rec in got.items():
        test, classes = tiny_cohort.task_split(task, "test"), tiny_cohort.task_classes[task]
        sites = [i for i in tiny_cohort.institutions if i.task == task]
        # Execute: the hand re-derivation — one model per ACC and per AUC, then the mean over the task's sites
        per_site = [scores_by_hand(tiny_foundation, site_adapters.get(i.id), test.x, test.y, task, classes)
                    for i in sites]
        # Assert
        assert rec["acc"] == pytest.approx(np.mean([a for a, _ in per_site]), abs=1e-9)
        assert rec["auc"] == pytest.approx(np.nanmean([u for _, u in per_site]), abs=1e-9)
        assert rec["n"] == len(test) and rec["n_sites"] == len(sites)
        assert rec["n_without_commit"] == sum(i.id == WITHOUT_COMMIT for i in sites)


def test_individual_local_is_each_site_model_on_its_own_test_split(tiny_foundation, tiny_cohort, site_adapters,
                                                                  individual_records):
    # Prepare / Execute: the old site-local number, but computed per site (one model per AUC), mean over sites
    got = _by(individual_records, "individual_local")
    for task, rec in got.items():
        sites = [i for i in tiny_cohort.institutions if i.task == task]
        per_site = [scores_by_hand(tiny_foundation, site_adapters.get(i.id), i.test.x, i.test.y, task, i.classes)
                    for i in sites]
        # Assert
        assert rec["acc"] == pytest.approx(np.mean([a for a, _ in per_site]), abs=1e-9)
        assert rec["auc"] == pytest.approx(np.nanmean([u for _, u in per_site]), abs=1e-9)
        assert rec["n"] == sum(len(i.test) for i in sites)


def test_site_without_commit_counts_as_the_foundation(tiny_foundation, tiny_cohort, site_adapters):
    from sim.evaluation import evaluate_individual

    # Prepare: one of xray's two sites has an adapter; then neither has one
    xray = [i for i in tiny_cohort.institutions if i.task == "xray"]
    test, classes = tiny_cohort.task_split("xray", "test"), tiny_cohort.task_classes["xray"]
    base_acc, base_auc = scores_by_hand(tiny_foundation, None, test.x, test.y, "xray", classes)
    one = {i.id: site_adapters[i.id] for i in xray if i.id != WITHOUT_COMMIT}
    # Execute: asked for xray explicitly, also with no adapter at all for it
    rec = _by(evaluate_individual(tiny_foundation, one, tiny_cohort, ["xray"]), "individual")["xray"]
    none = _by(evaluate_individual(tiny_foundation, {}, tiny_cohort, ["xray"]), "individual")["xray"]
    # Assert: the missing site is the foundation alone, and counted
    (inst,) = one
    own_acc, own_auc = scores_by_hand(tiny_foundation, one[inst], test.x, test.y, "xray", classes)
    assert rec["acc"] == pytest.approx((own_acc + base_acc) / 2, abs=1e-9)
    assert rec["auc"] == pytest.approx((own_auc + base_auc) / 2, abs=1e-9)
    assert (rec["n_sites"], rec["n_without_commit"]) == (2, 1)
    assert none["acc"] == pytest.approx(base_acc, abs=1e-9) and none["n_without_commit"] == 2
    with pytest.raises(ValueError, match="no institution holds task 'nope'"):
        evaluate_individual(tiny_foundation, one, tiny_cohort, ["nope"])


def test_individual_scored_task_by_task_is_the_same_as_at_once(tiny_foundation, tiny_cohort, site_adapters,
                                                                 individual_records):
    """The merge actor's final evaluation scores the individual references in one task per scored task, so they
    spread over the pool; every record (scores, n, sites, sites without a commit) is the one-call record."""
    from sim.evaluation import evaluate_individual

    tasks = list(dict.fromkeys(r["task"] for r in individual_records))
    split = [r for task in tasks for r in evaluate_individual(tiny_foundation, site_adapters, tiny_cohort, [task])]
    timing = {"infer_s"}
    assert len(tasks) == 2 and len(split) == len(individual_records) == 4
    for got, want in zip(split, individual_records):
        assert {k: v for k, v in got.items() if k not in timing} == {k: v for k, v in want.items() if k not in timing}


def test_strategies_and_references_are_scored_on_identical_sets(tiny_cfg, tiny_foundation, tiny_cohort,
                                                                site_adapters, individual_records):
    from sim.evaluation import evaluate_snapshot
    from sim.merge import get_strategy
    from sim.schedule import build_schedule
    from sim.summary import FinalEvaluation, metric_rows, summarise_run

    # Prepare: two merged predictors of the committed adapters, the base, and the individual references
    adapters = list(site_adapters.values())
    snapshot = {"lora_avg": get_strategy("lora_avg")(adapters), "mixture": get_strategy("mixture")(adapters)}
    tasks = list(tiny_cohort.tasks)
    evals = evaluate_snapshot(tiny_foundation, snapshot, tiny_cohort, tasks, len(adapters))
    base = evaluate_snapshot(tiny_foundation, {"base": None}, tiny_cohort, tasks, len(adapters))
    final = FinalEvaluation(evals, base, individual_records, {})
    cfg = tiny_cfg.replace(merge=dataclasses.replace(tiny_cfg.merge, strategies=("lora_avg", "mixture")))
    schedule = build_schedule(cfg.schedule, len(tiny_cohort.institutions), cfg.seed)
    # Execute
    rows = pd.DataFrame(metric_rows("r", final))
    summary = summarise_run(cfg, "r", schedule, [], final, [], 1.0, 0.0).summary
    # Assert: one test-set size per task over every strategy and every reference, the pooled one
    assert set(rows["strategy"]) == {"lora_avg", "mixture", "base", "individual", "individual_local"}
    sizes = rows.groupby("task")["n"].unique()
    for task in tasks:
        assert list(sizes[task]) == [len(tiny_cohort.task_split(task, "test"))]
    refs = summary["references"]
    assert list(refs) == ["base", "individual", "individual_local"]
    assert refs["individual"]["n_without_commit"] == 1 and refs["individual"]["n_sites"] == 4
    for name in ("individual", "individual_local"):
        expected = _by(individual_records, name)
        assert refs[name]["acc"] == pytest.approx(np.mean([r["acc"] for r in expected.values()]))
        assert {t: v["n"] for t, v in refs[name]["per_task"].items()} == {t: r["n"] for t, r in expected.items()}


# The readers of the references -------------------------------------------------------------------------------------
def _sweep_rows() -> pd.DataFrame:
    """Two strategies over 2, 4 contributors × 2 seeds, with the four reference columns."""
    rows = []
    for n in (2, 4):
        for seed in (0, 1):
            refs = {"base_acc": 0.4, "base_auc": 0.6, "individual_acc": 0.7, "individual_auc": 0.8,
                    "individual_local_acc": 0.9, "individual_local_auc": 0.95, "joint_acc": 0.85, "joint_auc": 0.9}
            rows += [{"trial_id": f"{n}-{seed}", "seed": seed, "contributors": n, "strategy": s, "acc": a,
                      "auc": a + 0.1} | refs for s, a in (("fusion", 0.5), ("svd", 0.6))]
    return pd.DataFrame(rows)


def test_individual_local_is_a_reference_everywhere_the_references_are_read(tmp_path):
    from analysis import figures as F
    from analysis.load import RunData, eval_history, reference_scores
    from analysis.report import task_table

    # Prepare: a summary and metrics as a run writes them now
    block = {"acc": 0.7, "auc": 0.8, "per_task": {"xray": {"acc": 0.7, "auc": 0.8, "n": 48}}}
    summary = {"strategies": {"svd": {"acc": 0.6, "auc": 0.7, "per_task": {"xray": {"acc": 0.6, "auc": 0.7}}}},
               "references": {"base": block, "individual": block, "individual_local": block | {"acc": 0.99}}}
    metrics = pd.DataFrame([{"strategy": s, "version": v, "task": "xray", "acc": 0.5, "auc": 0.6, "event": "eval"}
                            for s, v in (("svd", 4), ("base", -1), ("individual_local", -1))])
    # Execute
    run = RunData(tmp_path, {}, metrics, pd.DataFrame())
    table = task_table(summary)
    scaling = F.plot_scaling(_sweep_rows(), tmp_path)
    # Assert: never a strategy, never ranked, a named column and a reference curve of its own
    assert run.strategies == ["svd"] and set(eval_history(metrics)["strategy"]) == {"svd"}
    assert reference_scores(summary, ("individual_local",)) == {"individual_local_acc": 0.99,
                                                                 "individual_local_auc": 0.8}
    names = [r[0] for r in table.rows]
    local = names.index("individual_local (reference)")
    assert local in table.italic_rows and not any(r == local for r, _ in table.bold)
    assert "individual_local" in table.note and "pooled test set" in table.note
    assert scaling.legend_labels == ["fusion", "svd", "base (reference)", "individual (reference)",
                                     "individual_local (reference)", "joint (reference)"]
