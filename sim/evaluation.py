"""Evaluation of the main branches during a run, the references, and the derived metrics (forgetting, BWT).

Records are flat dicts (one per evaluation × strategy × task): ``{event: "eval", version, strategy, task, acc, auc,
n, infer_s}``. A merged predictor is scored on each task's *pooled* test set (the union of the test splits of every
institution holding the task), on that task's classes. References: ``base`` (the foundation alone, every task)
and ``individual`` (each institution's own latest adapter on its own test split, pooled per task).
"""
from __future__ import annotations

import math
import time
from typing import Mapping, Sequence

import numpy as np

from sim.data import Cohort
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


def evaluate_predictor(foundation: Foundation, predictor, cohort: Cohort, tasks: Sequence[str]) -> list[dict]:
    """``{task, acc, auc, n, infer_s}`` of one predictor (adapter, mixture or ``None`` = base) on each task."""
    out = []
    if tasks:
        _warm_up(foundation, cohort.task_split(tasks[0], "test").x)
    for task in tasks:
        test, classes = cohort.task_split(task, "test"), cohort.task_classes[task]
        t0 = time.perf_counter()
        proba = predict_proba(foundation, predictor, test.x, task, classes)
        infer_s = time.perf_counter() - t0     # before the metrics: their first call imports scikit-learn
        out.append({"task": task, "acc": accuracy(test.y, proba), "auc": macro_auc(test.y, proba), "n": len(test),
                    "infer_s": infer_s})
    return out


def evaluate_snapshot(foundation: Foundation, snapshot: Mapping[str, object], cohort: Cohort, tasks: Sequence[str],
                      version: int) -> list[dict]:
    """Every strategy's predictor at main ``version`` on every task seen so far: one record per strategy × task."""
    records = []
    for strategy, predictor in snapshot.items():
        for rec in evaluate_predictor(foundation, predictor, cohort, tasks):
            records.append({"event": "eval", "version": version, "strategy": strategy} | rec)
    return records


def evaluate_individual(foundation: Foundation, adapters: Mapping[int, Adapter], cohort: Cohort) -> list[dict]:
    """The ``individual`` reference: each institution's own adapter on its own test split, pooled per task."""
    by_task: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    infer_s = {}
    for inst in cohort.institutions:
        if inst.id not in adapters:
            continue
        t0 = time.perf_counter()
        proba = predict_proba(foundation, adapters[inst.id], inst.test.x, inst.task, inst.classes)
        infer_s[inst.task] = infer_s.get(inst.task, 0.0) + time.perf_counter() - t0
        by_task.setdefault(inst.task, []).append((inst.test.y, proba))
    records = []
    for task, parts in by_task.items():
        y, proba = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        records.append({"task": task, "acc": accuracy(y, proba), "auc": macro_auc(y, proba), "n": len(y),
                        "infer_s": infer_s[task]})
    return records


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
    one merge update (one commit); infer_ms_per_image is from the final evaluation.
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
        }
    return out


def summarise_reference(records: Sequence[dict]) -> dict:
    """``{acc, auc, per_task}`` of a reference's records (one per task)."""
    return {"acc": finite_mean(r["acc"] for r in records), "auc": finite_mean(r["auc"] for r in records),
            "per_task": {r["task"]: {"acc": r["acc"], "auc": r["auc"]} for r in records}}


def finite_mean(values) -> float:
    """Mean of the values that are neither None nor NaN; NaN when there are none."""
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(vals)) if vals else math.nan
