"""Evaluation of the main branches during a run, the references, and the derived metrics (forgetting, BWT).

Records are flat dicts (one per evaluation × strategy × task): ``{event: "eval", version, strategy, task, acc, auc,
n, infer_s}``. A merged predictor is scored on each task's *pooled* test set (the union of the test splits of every
institution holding the task), on that task's classes, and so are the references ``base`` (the foundation alone)
and ``individual`` (each site's latest adapter, mean over the task's sites); ``individual_local`` scores each
site's adapter on its own test split instead (``evaluate_individual``).
"""
from __future__ import annotations

import math
import time
from typing import Mapping, Sequence

import numpy as np

from sim.data import Cohort
from sim.features import FeatureStore
from sim.merge.base import base_reference
from sim.metrics import accuracy, macro_auc, predict_proba
from sim.model import Adapter, Foundation


_WARM: set[int] = set()


def _warm_up(foundation: Foundation, x: np.ndarray) -> None:
    """One untimed pass through the base and the adapter path per foundation and process: the first call imports
    peft (and transformers) and initialises kernels — seconds that would be billed to whichever predictor is
    scored first as inference time."""
    if id(foundation) not in _WARM:
        from sim.config import LoraConfig
        from sim.model import new_adapter

        for adapter in (None, new_adapter(foundation, LoraConfig(), 0)):     # B = 0: ΔW = 0
            predict_proba(foundation, adapter, x[:2], "warm-up", ("a", "b"))
        _WARM.add(id(foundation))


def test_splits(cohort: Cohort, task: str) -> list[np.ndarray]:
    """The images of each test split that ``task``'s pooled test set concatenates, in its order."""
    return [inst.test.x for inst in cohort.institutions if inst.task == task]


def evaluate_predictor(foundation: Foundation, predictor, cohort: Cohort, tasks: Sequence[str],
                       store: FeatureStore | None = None) -> list[dict]:
    """``{task, acc, auc, n, infer_s}`` of one predictor (adapter, mixture or ``None`` = base) on each task.

    A mixture is scored split by split from its members' features (``sim.features``; ``store``: where they are
    kept, default this process's in-memory store), so a community nested in a larger one reads the larger run's;
    ``infer_s`` is then the forward passes' measured seconds, wherever they ran."""
    from sim.features import mixture_task_proba, shared_store
    from sim.merge.mixture import Mixture

    out = []
    if tasks:
        _warm_up(foundation, cohort.task_split(tasks[0], "test").x)
    for task in tasks:
        test, classes = cohort.task_split(task, "test"), cohort.task_classes[task]
        t0 = time.perf_counter()
        if isinstance(predictor, Mixture):
            proba, infer_s = mixture_task_proba(foundation, store or shared_store(), predictor,
                                                test_splits(cohort, task), task, classes)
        else:
            proba = predict_proba(foundation, predictor, test.x, task, classes)
            infer_s = time.perf_counter() - t0     # before the metrics: their first call imports scikit-learn
        out.append({"task": task, "acc": accuracy(test.y, proba), "auc": macro_auc(test.y, proba), "n": len(test),
                    "infer_s": infer_s})
    return out


def evaluate_snapshot(foundation: Foundation, snapshot: Mapping[str, object], cohort: Cohort, tasks: Sequence[str],
                      version: int, store: FeatureStore | None = None) -> list[dict]:
    """Every strategy's predictor at main ``version`` on every task seen so far: one record per strategy × task
    (``store``: as in ``evaluate_predictor``)."""
    records = []
    for strategy, predictor in snapshot.items():
        for rec in evaluate_predictor(foundation, predictor, cohort, tasks, store):
            records.append({"event": "eval", "version": version, "strategy": strategy} | rec)
    return records


def evaluate_individual(foundation: Foundation, adapters: Mapping[int, Adapter], cohort: Cohort,
                        tasks: Sequence[str] | None = None, store: FeatureStore | None = None) -> list[dict]:
    """The two individual references: one record per reference × task, ``strategy`` naming the reference.

    ``individual`` is like-for-like with ``base`` and every merge strategy: per task, each of the task's
    institutions' latest accepted adapter is scored on the task's *pooled* test set (the same images, classes and
    ``n`` the strategies are scored on), and ACC and AUC are the means over the task's institutions of each
    model's own ACC and AUC. An AUC is computed from one model's probabilities only: pooling the probabilities
    of different models would rank one model's scores against another's, and their calibrations differ. This is
    the specialist row of the merging papers' tables (Med-LEGO, Zhu et al. 2025, Table 1; FusionBench's
    per-task fine-tuned models, Tang et al. 2024): the expert scored on the test set the merge is scored on.

    ``individual_local`` is the site-local number: each institution's adapter on its own test split (which shares
    the site's label skew and appearance shift), ACC and AUC per site, then the mean over the task's institutions
    (again one model per AUC). It is what a site sees at home and is not comparable to the pooled numbers.

    An institution without an accepted commit has no adapter: it counts as the foundation alone (its individual
    model is ``base``), in both references, so every site of a task counts; ``n_sites`` and ``n_without_commit``
    record how many. ``tasks``: the tasks to score (default: those of ``adapters``, in first-seen order); a task
    no institution holds raises ``ValueError``.

    Each model is scored split by split from its features (``sim.features``, ``store`` as in
    ``evaluate_predictor``): the pooled set's splits are the sites' own, so the two references share them, and a
    community nested in a larger one reads the larger run's; ``infer_s`` is the forward passes' measured seconds.
    """
    from sim.features import model_proba, shared_store

    store = store or shared_store()
    if tasks is None:
        by_id = {inst.id: inst.task for inst in cohort.institutions}
        tasks = list(dict.fromkeys(by_id[i] for i in adapters if i in by_id))
    if tasks:
        _warm_up(foundation, cohort.task_split(tasks[0], "test").x)
    records = []
    for task in tasks:
        test, sites = cohort.task_split(task, "test"), [i for i in cohort.institutions if i.task == task]
        common = {"task": task, "n": len(test), "n_sites": len(sites),
                  "n_without_commit": sum(i.id not in adapters for i in sites)}
        # a site without a commit is the foundation alone: with linear heads, the task's contributors' average head
        fallback = base_reference([adapters[i.id] for i in sites if i.id in adapters])
        models = [adapters.get(i.id, fallback) for i in sites]
        classes, splits = cohort.task_classes[task], [i.test.x for i in sites]
        pooled = [_score(model_proba(foundation, store, m, splits, task, classes), test) for m in models]
        local = [_score(model_proba(foundation, store, m, [i.test.x], task, classes), i.test)
                 for m, i in zip(models, sites)]
        records.append({"strategy": "individual"} | common | _mean_scores(pooled)
                       | {"infer_s": float(np.mean([s[2] for s in pooled]))})   # one model's time on n images
        records.append({"strategy": "individual_local"} | common | _mean_scores(local)
                       | {"infer_s": float(sum(s[2] for s in local))})          # the sites' splits add up to n
    return records


def _score(scored: tuple[np.ndarray, float], split) -> tuple[float, float, float]:
    """``(acc, auc, seconds)`` of one model's ``(probabilities, seconds)`` on ``split``."""
    proba, seconds = scored
    return accuracy(split.y, proba), macro_auc(split.y, proba), seconds


def _mean_scores(scores: Sequence[tuple[float, float, float]]) -> dict:
    """Means over models of their ACC and AUC (a model whose AUC is undefined, NaN, is left out of the AUC)."""
    return {"acc": finite_mean(s[0] for s in scores), "auc": finite_mean(s[1] for s in scores)}


def forgetting_bwt(history: Mapping[str, Sequence[float]]) -> tuple[float, float]:
    """Forgetting and backward transfer from each task's accuracy over the evaluations since it was first seen.

    ``history[task]`` = accuracies in evaluation order, the first taken when the task was first evaluated, the last
    the final one. Forgetting (Chaudhry et al. 2018) = mean over tasks of (best earlier accuracy − final accuracy);
    BWT (Lopez-Paz & Ranzato 2017) = mean over tasks of (final − first accuracy). Tasks evaluated only once do not
    count; NaN when no task was evaluated twice.
    """
    forget, bwt = [], []
    for accs in history.values():
        accs = [a for a in accs if not math.isnan(a)]
        if len(accs) < 2:
            continue
        forget.append(max(accs[:-1]) - accs[-1])
        bwt.append(accs[-1] - accs[0])
    return (float(np.mean(forget)) if forget else math.nan), (float(np.mean(bwt)) if bwt else math.nan)


def summarise_strategies(evals: Sequence[dict], merges: Sequence[dict], storage: Mapping[str, int]) -> dict:
    """``summary.json``'s ``strategies`` block from eval records and per-commit merge records.

    acc/auc are the means over tasks of the *final* evaluation (the highest version); merge_s is the mean time of
    one merge update (one commit); infer_ms_per_image is from the final evaluation; asr (under a backdoor attack)
    the mean over tasks of the final evaluation's attack success.
    """
    out = {}
    for strategy in dict.fromkeys(r["strategy"] for r in evals):
        rows = [r for r in evals if r["strategy"] == strategy]
        final_v = max(r["version"] for r in rows)
        final = [r for r in rows if r["version"] == final_v]
        history: dict[str, list[float]] = {}
        for r in sorted(rows, key=lambda r: r["version"]):
            history.setdefault(r["task"], []).append(r["acc"])
        forgetting, bwt = forgetting_bwt(history)
        times = [m["merge_s"] for m in merges if m.get("strategy") == strategy and "merge_s" in m]
        n_images = sum(r["n"] for r in final)
        out[strategy] = {
            "acc": finite_mean(r["acc"] for r in final), "auc": finite_mean(r["auc"] for r in final),
            "per_task": {r["task"]: {"acc": r["acc"], "auc": r["auc"]} for r in final},
            "forgetting": forgetting, "bwt": bwt, "storage_bytes": int(storage.get(strategy, 0)),
            "merge_s": finite_mean(times), "merge_s_total": float(sum(times)),
            "infer_ms_per_image": 1000 * sum(r["infer_s"] for r in final) / max(1, n_images),
            "version": final_v,
        } | ({"asr": finite_mean(r["asr"] for r in final)} if any("asr" in r for r in final) else {})
    return out


def summarise_reference(records: Sequence[dict]) -> dict:
    """``{acc, auc, per_task}`` of a reference's records (one per task): means over tasks, like a strategy's.

    ``per_task`` also carries each task's ``n`` (test images) and, for the individual references, ``n_sites`` and
    ``n_without_commit``; their sums over tasks are added at the top level.
    """
    counts = ("n", "n_sites", "n_without_commit")
    out = {"acc": finite_mean(r["acc"] for r in records), "auc": finite_mean(r["auc"] for r in records),
           "per_task": {r["task"]: {"acc": r["acc"], "auc": r["auc"]} | {k: int(r[k]) for k in counts if k in r}
                        for r in records}}
    return out | {k: sum(int(r[k]) for r in records) for k in counts[1:] if records and all(k in r for r in records)}


def finite_mean(values) -> float:
    """Mean of the values that are neither None nor NaN; NaN when there are none."""
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(vals)) if vals else math.nan
