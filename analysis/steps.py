"""Per-step scores of replayed merge orders (``forgesim replay --per-step``, ``orders_steps.parquet``).

OPCM's protocol (Tang et al., "Merging Models on the Fly Without Retraining", NeurIPS 2025, arXiv 2501.09522, §5):
after every merge step t of an order, the merged model's average accuracy on the tasks merged so far, reported as
mean ± sd over orders of the tasks. Here a step merges one commit, a "task merged so far" is a task one of whose
commits is among the first t, and every order of every trial counts once.

Forgetting at step t (Chaudhry et al., "Riemannian Walk for Incremental Learning", ECCV 2018, eq. 8) is the mean,
over the tasks merged before step t, of the drop from their best accuracy at an earlier step: ``max_{l<t, j seen at
l} acc_j(l) − acc_j(t)``; it is undefined (NaN) at the first step and while no task was merged before.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

STEP_COLUMNS = {"order", "strategy", "step", "task", "acc", "seen"}


def _keys(steps: pd.DataFrame) -> list[str]:
    """The columns that name one replayed order: the trial's (a sweep's rows) and the order's."""
    return [c for c in ("trial_id", "order") if c in steps.columns]


def order_steps(steps: pd.DataFrame) -> pd.DataFrame:
    """One row per order × strategy × step: ``acc_seen`` (mean ACC over the tasks merged so far) and
    ``forgetting`` (see the module docstring)."""
    missing = STEP_COLUMNS - set(steps.columns)
    if missing:
        raise ValueError(f"per-step rows need the columns {', '.join(sorted(STEP_COLUMNS))}; missing "
                         f"{', '.join(sorted(missing))}")
    out = []
    for key, g in steps.groupby(_keys(steps) + ["strategy"], sort=False):
        best: dict[str, float] = {}                # task -> best ACC at an earlier step where it was seen
        for step, rows in g.sort_values("step").groupby("step", sort=True):
            seen = rows[rows["seen"].astype(bool)]
            drops = [best[t] - a for t, a in zip(rows["task"], rows["acc"]) if t in best]
            out.append(dict(zip(_keys(steps) + ["strategy"], key if isinstance(key, tuple) else (key,)))
                       | {"step": int(step), "acc_seen": float(seen["acc"].mean()) if len(seen) else np.nan,
                          "forgetting": float(np.mean(drops)) if drops else np.nan})
            for t, a in zip(seen["task"], seen["acc"]):
                best[t] = max(best.get(t, -np.inf), a)
    return pd.DataFrame(out)


def _sd(v: pd.Series) -> float:
    """Sample sd (ddof 1) of the defined values; 0 for one value, NaN for none."""
    n = int(v.notna().sum())
    return float(v.std(ddof=1)) if n > 1 else (0.0 if n else np.nan)


def step_summary(steps: pd.DataFrame) -> pd.DataFrame:
    """Per strategy × step, over every replayed order: ``acc_seen_mean``, ``acc_seen_sd``, ``forgetting_mean``,
    ``forgetting_sd`` (sd with ddof 1; 0 for a single order) and ``orders`` (how many orders); strategies in the
    order they first appear, steps ascending."""
    per = order_steps(steps)
    rows = [{"strategy": strategy, "step": step, "acc_seen_mean": float(g["acc_seen"].mean()),
             "acc_seen_sd": _sd(g["acc_seen"]), "forgetting_mean": float(g["forgetting"].mean())
             if g["forgetting"].notna().any() else np.nan, "forgetting_sd": _sd(g["forgetting"]), "orders": len(g)}
            for (strategy, step), g in per.groupby(["strategy", "step"], sort=False)]
    rank = {s: i for i, s in enumerate(dict.fromkeys(per["strategy"]))}
    out = pd.DataFrame(rows)
    return out.iloc[np.lexsort((out["step"].to_numpy(), out["strategy"].map(rank).to_numpy()))].reset_index(drop=True)
