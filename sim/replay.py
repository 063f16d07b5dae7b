"""Commit replay: re-merge a run's accepted commits in other orders, without retraining (merge-order studies).

A run with ``schedule.init_from: base`` has commits that do not depend on each other (every adapter starts from
the foundation), so its log can be merged again in any order: what changes is only what the merge does with the
order (MedForge's sequential Fusion/Mixture searches two coefficients per arriving commit, on the distilled sets
received so far). Order 0 is the original order and reproduces the run's final metrics; order k ≥ 1 is a seeded
permutation (``derive_seed(seed, "order", k)``). Each order builds its branches with ``sim.store.MainBranches``
exactly as the merge actor did (same merge seeds per sequence position) and is evaluated with
``sim.evaluation.evaluate_snapshot`` on every task of the run.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import numpy as np
import yaml

from sim.config import SimConfig, config_from_dict
from sim.data.base import derive_seed
from sim.store import Commit, CommitLog, MainBranches


def load_run(run_dir: str | Path) -> tuple[SimConfig, list[Commit]]:
    """The config and accepted commits (in merge order) of a run dir; errors name what is missing."""
    run_dir = Path(run_dir)
    cfg_file = run_dir / "config.yaml"
    if not cfg_file.is_file() or not (run_dir / "log.jsonl").is_file():
        raise ValueError(f"{run_dir} is not a run dir (needs config.yaml and log.jsonl)")
    cfg = config_from_dict(yaml.safe_load(cfg_file.read_text()))
    log = CommitLog(run_dir)
    commits = log.load_commits(log.read())
    if not commits:
        raise ValueError(f"{run_dir}: the log has no accepted commit to replay")
    return cfg, commits


def load_replayable(run_dir: str | Path) -> tuple[SimConfig, list[Commit]]:
    """``load_run``, refusing runs whose commits depend on their order (``init_from: main``)."""
    run_dir = Path(run_dir)
    cfg_file = run_dir / "config.yaml"
    if cfg_file.is_file():
        init_from = (yaml.safe_load(cfg_file.read_text()) or {}).get("schedule", {}).get("init_from", "base")
        if init_from != "base":
            raise ValueError(f"{run_dir}: replay needs a run with schedule.init_from=base (this run pulled from "
                             f"main, so each commit depends on the order it was made in)")
    return load_run(run_dir)


def permutation(n: int, order: int, seed: int) -> list[int]:
    """Order 0: the original ``0..n-1``; order k: a permutation seeded by (seed, "order", k)."""
    if order == 0:
        return list(range(n))
    return np.random.default_rng(derive_seed(seed, "order", order)).permutation(n).tolist()


def replay_order(cfg: SimConfig, commits: Sequence[Commit], order: Sequence[int], foundation,
                 strategies: Sequence[str]) -> dict[str, tuple[object, float]]:
    """Merge ``commits`` in ``order`` into one branch per strategy: ``{strategy: (predictor, merge seconds)}``."""
    out = {}
    for s in strategies:
        branches = MainBranches((s,), cfg, foundation)
        t0 = time.perf_counter()
        for position, i in enumerate(order):
            update, _ = branches.propose(commits[i], position + 1, 0)
            branches.apply(update)
        out[s] = (branches.merged[s], time.perf_counter() - t0)
    return out


def replay(run_dir: str | Path, orders: int, strategies: Sequence[str] | None = None, foundation=None,
           cohort=None, loaded: tuple[SimConfig, list[Commit]] | None = None) -> tuple[list[dict], list[dict], dict]:
    """Re-merge ``run_dir``'s commits in ``orders`` orders.

    Returns ``(rows, per_task_rows, info)``: one row per order × strategy (``order, strategy, acc, auc, merge_s``),
    one per order × strategy × task, and ``{permutations, strategies, n_commits}``.
    """
    import torch

    from sim.data import build_cohort
    from sim.evaluation import evaluate_snapshot
    from sim.merge import get_strategy
    from sim.model import load_foundation

    if orders < 1:
        raise ValueError(f"--orders must be >= 1, got {orders}")
    cfg, commits = loaded or load_replayable(run_dir)
    strategies = tuple(strategies or cfg.merge.strategies)
    for s in strategies:
        get_strategy(s)
    torch.set_num_threads(cfg.runtime.threads)
    foundation = foundation or load_foundation(cfg.model, cfg.data.img_size, cfg.runtime.device)
    cohort = cohort or build_cohort(cfg.data, cfg.seed)
    tasks = list(dict.fromkeys(c.task for c in commits))
    rows, per_task, perms = [], [], []
    for k in range(orders):
        order = permutation(len(commits), k, cfg.seed)
        perms.append(order)
        merged = replay_order(cfg, commits, order, foundation, strategies)
        records = evaluate_snapshot(foundation, {s: p for s, (p, _) in merged.items()}, cohort, tasks, len(commits))
        for s in strategies:
            mine = [r for r in records if r["strategy"] == s]
            rows.append({"order": k, "strategy": s, "acc": float(np.mean([r["acc"] for r in mine])),
                         "auc": float(np.nanmean([r["auc"] for r in mine])), "merge_s": merged[s][1],
                         "first": commits[order[0]].id})
            per_task += [{"order": k, "strategy": s, "task": r["task"], "acc": r["acc"], "auc": r["auc"]}
                         for r in mine]
    return rows, per_task, {"permutations": perms, "strategies": list(strategies), "n_commits": len(commits),
                            "commit_ids": [c.id for c in commits]}
