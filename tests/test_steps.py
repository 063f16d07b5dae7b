"""Per-step scores of replayed merge orders (``analysis.steps``), against numbers worked out by hand."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis.steps import order_steps, step_summary


def rows(order: int, table: list[tuple[int, str, float, bool]], strategy: str = "opcm") -> list[dict]:
    return [{"order": order, "strategy": strategy, "step": s, "task": t, "acc": a, "auc": a, "seen": seen}
            for s, t, a, seen in table]


# Two tasks a, b; order 0 merges a then b, order 1 b then a (each step evaluates both tasks).
ORDER0 = [(1, "a", 0.8, True), (1, "b", 0.3, False), (2, "a", 0.6, True), (2, "b", 0.7, True)]
ORDER1 = [(1, "a", 0.2, False), (1, "b", 0.9, True), (2, "a", 0.5, True), (2, "b", 0.6, True)]


def test_accuracy_on_the_tasks_merged_so_far_and_forgetting_per_order():
    # Execute
    per = order_steps(pd.DataFrame(rows(0, ORDER0) + rows(1, ORDER1))).set_index(["order", "step"])
    # Assert: step 1 scores only the merged task and has no forgetting; step 2 averages both and forgetting is the
    # drop of the task merged at step 1 from its step-1 accuracy (order 0: a 0.8 -> 0.6; order 1: b 0.9 -> 0.6)
    assert per.loc[(0, 1), "acc_seen"] == pytest.approx(0.8) and np.isnan(per.loc[(0, 1), "forgetting"])
    assert per.loc[(0, 2), "acc_seen"] == pytest.approx(0.65) and per.loc[(0, 2), "forgetting"] == pytest.approx(0.2)
    assert per.loc[(1, 1), "acc_seen"] == pytest.approx(0.9)
    assert per.loc[(1, 2), "acc_seen"] == pytest.approx(0.55) and per.loc[(1, 2), "forgetting"] == pytest.approx(0.3)


def test_summary_is_mean_and_sd_over_orders_per_strategy_and_step():
    # Prepare: a second strategy that forgets nothing
    flat = [(s, t, 0.5, seen) for s, t, _, seen in ORDER0]
    steps = pd.DataFrame(rows(0, ORDER0) + rows(1, ORDER1) + rows(0, flat, "ta") + rows(1, flat, "ta"))
    # Execute
    summary = step_summary(steps).set_index(["strategy", "step"])
    # Assert
    assert summary.loc[("opcm", 1), "acc_seen_mean"] == pytest.approx(0.85)
    assert summary.loc[("opcm", 1), "acc_seen_sd"] == pytest.approx(np.std([0.8, 0.9], ddof=1))
    assert summary.loc[("opcm", 2), "forgetting_mean"] == pytest.approx(0.25)
    assert summary.loc[("opcm", 2), "forgetting_sd"] == pytest.approx(np.std([0.2, 0.3], ddof=1))
    assert summary.loc[("ta", 2), "forgetting_mean"] == pytest.approx(0.0) and summary.loc[("ta", 2), "orders"] == 2
    assert list(dict.fromkeys(step_summary(steps)["strategy"])) == ["opcm", "ta"]


def test_missing_columns_are_named():
    with pytest.raises(ValueError, match="missing seen"):
        order_steps(pd.DataFrame(rows(0, ORDER0)).drop(columns="seen"))


def test_steps_table_shows_first_middle_and_last_step():
    from analysis.report import steps_table

    # Execute
    table = steps_table(pd.DataFrame(rows(0, ORDER0) + rows(1, ORDER1)))
    # Assert: steps 1 and 2 (the middle of two steps is step 1), then the last step's forgetting, in %
    assert [c[1] for c in table.columns] == ["strategy", "step 1", "step 2", "forgetting at step 2 (pp)"]
    sd1, sd2 = 100 * np.std([0.8, 0.9], ddof=1), 100 * np.std([0.65, 0.55], ddof=1)
    assert table.rows == [["opcm", f"85.0 ± {sd1:.1f}", f"60.0 ± {sd2:.1f}", f"25.0 ± {100 * np.std([.2, .3], ddof=1):.1f}"]]
