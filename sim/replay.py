"""Commit replay: re-merge a run's accepted commits in other orders, without retraining (merge-order studies).

A run with ``schedule.init_from: base`` has commits that do not depend on each other (every adapter starts from
the foundation), so its log can be merged again in any order: what changes is only what the merge does with the
order (MedForge's sequential Fusion/Mixture searches two coefficients per arriving commit, on the distilled sets
received so far). Order 0 is the original order and reproduces the run's final metrics; order k ≥ 1 is a seeded
permutation (``derive_seed(seed, "order", k)``). Each order builds its branches with ``sim.branches.MainBranches``
exactly as the merge actor did (same merge seeds per sequence position) and is evaluated with
``sim.evaluation.evaluate_snapshot`` on every task of the run.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import yaml

from sim.branches import MainBranches
from sim.commit import Commit
from sim.commit_log import CommitLog
from sim.config import SimConfig, config_from_dict
from sim.data.base import derive_seed


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
                 strategies: Sequence[str], proxy_cache=None,
                 on_step: Callable[[int, str, object], None] | None = None) -> dict[str, tuple[object, float]]:
    """Merge ``commits`` in ``order`` into one branch per strategy: ``{strategy: (predictor, merge seconds)}``.

    ``proxy_cache``: a ``sim.merge.mixture.ProbabilityCache`` shared by the orders of one replay — each adapter's
    probabilities on each distilled set do not depend on the order, so the mixture search computes them once.
    ``on_step(step, strategy, predictor)`` is called after every merge step (step = commits merged, 1..n); the time
    it takes is not counted as merge time.
    """
    out = {}
    for s in strategies:
        branches = MainBranches((s,), cfg, foundation)
        if proxy_cache is not None:
            branches.share_probability_cache(proxy_cache)
        merge_s = 0.0
        for position, i in enumerate(order):
            t0 = time.perf_counter()
            branches.add(commits[i], position + 1, 0)
            merge_s += time.perf_counter() - t0
            if on_step is not None:
                on_step(position + 1, s, branches.predictor(s))
        out[s] = (branches.predictor(s), merge_s)
    return out


def step_rows(order_id: int, step: int, strategy: str, records: list[dict], seen: set[str]) -> list[dict]:
    """Per-step rows of one order and strategy: one per task, ``seen`` when a commit of it was merged by ``step``."""
    return [{"order": order_id, "strategy": strategy, "step": step, "task": r["task"], "acc": r["acc"],
             "auc": r["auc"], "seen": r["task"] in seen} for r in records]


def replay(run_dir: str | Path, orders: int | Sequence[int], strategies: Sequence[str] | None = None, foundation=None,
           cohort=None, loaded: tuple[SimConfig, list[Commit]] | None = None,
           per_step: bool | Sequence[str] = False) -> tuple[list[dict], list[dict], dict]:
    """Re-merge ``run_dir``'s commits in ``orders`` orders (a count: orders ``0..orders-1``; or the order indices,
    so that parts of one study can run in parallel).

    Returns ``(rows, per_task_rows, info)``: one row per order × strategy (``order, strategy, acc, auc, merge_s``),
    one per order × strategy × task, and ``{permutations, strategies, n_commits}``. ``per_step``: also evaluate every
    branch after every merge step, on every task of the run (OPCM's protocol, Tang et al. 2025: accuracy on the tasks
    merged so far and forgetting, per step, over orders); ``info["steps"]`` then holds one row per order × strategy ×
    step × task (``step_rows``). ``per_step`` may also name the strategies to score per step (the others are
    scored at the end only), as a full study does to bound the cost of scoring N steps × orders.
    """
    import torch

    from sim.data import build_cohort
    from sim.merge import get_spec
    from sim.merge.mixture import ProbabilityCache
    from sim.model import load_foundation

    order_ids = list(range(orders)) if isinstance(orders, int) else [int(k) for k in orders]
    if not order_ids or min(order_ids) < 0:
        raise ValueError(f"--orders must be >= 1 (order indices >= 0), got {orders}")
    cfg, commits = loaded or load_replayable(run_dir)
    strategies = tuple(strategies or cfg.merge.strategies)
    for s in strategies:
        get_spec(s)
    torch.set_num_threads(cfg.runtime.threads)
    foundation = foundation or load_foundation(cfg.model, cfg.data.img_size, cfg.runtime.device, cfg.runtime.precision)
    cohort = cohort or build_cohort(cfg.data, cfg.seed)
    tasks = list(dict.fromkeys(c.task for c in commits))
    rows, per_task, perms = [], [], []
    proxy_cache, evaluator = ProbabilityCache(), ReplayEvaluator(foundation, cohort, tasks)
    steps: list[dict] = []
    stepped = set(strategies) if per_step is True else set(per_step or ()) & set(strategies)
    for k in order_ids:
        order = permutation(len(commits), k, cfg.seed)
        perms.append(order)
        on_step = _step_recorder(steps, evaluator, commits, order, k, stepped) if stepped else None
        merged = replay_order(cfg, commits, order, foundation, strategies, proxy_cache, on_step)
        records = evaluator.records({s: p for s, (p, _) in merged.items()}, len(commits))
        for s in strategies:
            mine = [r for r in records if r["strategy"] == s]
            rows.append({"order": k, "strategy": s, "acc": float(np.mean([r["acc"] for r in mine])),
                         "auc": float(np.nanmean([r["auc"] for r in mine])), "merge_s": merged[s][1],
                         "first": commits[order[0]].id})
            per_task += [{"order": k, "strategy": s, "task": r["task"], "acc": r["acc"], "auc": r["auc"]}
                         for r in mine]
    info = {"permutations": perms, "strategies": list(strategies), "n_commits": len(commits),
            "commit_ids": [c.id for c in commits]}
    return rows, per_task, info | ({"steps": steps} if per_step else {})


def _step_recorder(steps: list[dict], evaluator: "ReplayEvaluator", commits: Sequence[Commit], order: Sequence[int],
                   order_id: int, stepped: set[str]) -> Callable[[int, str, object], None]:
    """``replay_order``'s ``on_step`` for ``per_step``: evaluate a ``stepped`` strategy's branch on every task, append
    ``step_rows``."""
    def on_step(step: int, strategy: str, predictor) -> None:
        if strategy not in stepped:
            return
        seen = {commits[i].task for i in order[:step]}
        steps.extend(step_rows(order_id, step, strategy, evaluator.records({strategy: predictor}, step), seen))
    return on_step


class ReplayEvaluator:
    """``evaluate_snapshot`` for many orders of the same commits: a mixture's members' test features do not depend
    on the order (only its weights do), so they are computed once per adapter and test split (``sim.features``,
    the evaluator's own store) and each order's mixture is scored from them, split by split as a run's evaluation
    scores it, so the numbers are the ones a run gives. Other predictors are evaluated as in a run, and a merged
    adapter that another order already produced bit for bit (an order-invariant merge such as ``svd``, or the same
    prefix of two orders scored per step) takes that evaluation's records instead of a second pass over the test
    sets."""

    def __init__(self, foundation, cohort, tasks: Sequence[str]) -> None:
        from sim.features import FeatureStore

        self.foundation, self.cohort, self.tasks = foundation, cohort, list(tasks)
        self.store = FeatureStore(max_bytes=2 << 30)
        self._adapter_records: dict[str, list[dict]] = {}      # Adapter.content_hash -> its records on self.tasks

    def records(self, snapshot: dict, version: int) -> list[dict]:
        from sim.evaluation import evaluate_predictor
        from sim.merge import Mixture
        from sim.model import Adapter

        out = []
        for strategy, predictor in snapshot.items():
            if isinstance(predictor, Mixture):
                recs = evaluate_predictor(self.foundation, predictor, self.cohort, self.tasks, self.store)
            elif isinstance(predictor, Adapter):
                key = predictor.content_hash()
                if key not in self._adapter_records:
                    self._adapter_records[key] = evaluate_predictor(self.foundation, predictor, self.cohort, self.tasks)
                recs = self._adapter_records[key]
            else:
                recs = evaluate_predictor(self.foundation, predictor, self.cohort, self.tasks)
            out += [{"event": "eval", "version": version, "strategy": strategy} | r for r in recs]
        return out


# ------------------------------------------------------------------------------------------
# Subset replay: a smaller community built from a larger one's log (nested cohorts)
# ------------------------------------------------------------------------------------------
# The config names of ``sim.cache.commit_config``'s top-level values, for messages.
TOP_LEVEL = {"seed": "seed", "device": "the device kind (runtime.device)", "threads": "runtime.threads",
             "precision": "runtime.precision"}


def subset_mismatch(source: SimConfig, cfg: SimConfig) -> str | None:
    """Why a run of ``cfg`` cannot be built from the log of a run of ``source`` by keeping its first
    ``cfg.data.institutions`` institutions (``None``: it can).

    It can when every commit of the smaller run is a commit of the larger one: each adapter starts from the
    foundation (``schedule.init_from: base``), institution i's data, site shift and arrival stream come from
    ``(seed, i)`` alone (``data.partition: per_institution``), no fault is injected, and everything that makes a
    commit — seed, data (but the community size), model, LoRA, training, distillation, schedule, device kind and
    threads — is the same, and the merge order is the schedule's (``runtime.clock: virtual``). The merges, the evaluation schedule and the strategies may differ: they are redone.
    """
    from sim.cache import commit_config
    from sim.config import config_to_dict

    if source.schedule.init_from != "base" or cfg.schedule.init_from != "base":
        return "schedule.init_from is main: each commit depends on the main it pulled, so a smaller community's " \
               "commits are not the larger one's"
    if "sync_rounds" in (source.schedule.protocol, cfg.schedule.protocol):
        return "schedule.protocol is sync_rounds: a round's barrier waits for the slowest member of the whole " \
               "community, so a smaller community's schedule is not the larger one's"
    if cfg.data.partition != "per_institution":
        return f"data.partition is {cfg.data.partition}: institution i's data depend on the community size"
    if "wall" in (source.runtime.clock, cfg.runtime.clock):
        return "runtime.clock is wall: the merge order is the order the commits happened to arrive in"
    if source.faults.any or cfg.faults.any:
        return "faults are injected: which contribution fails depends on the whole community's plan"
    if source.attacks.any or cfg.attacks.any or source.gate.checks or cfg.gate.checks:
        return "attacks or the gate are on: who attacks and what the gate accepts depend on the whole community"
    if cfg.data.institutions > source.data.institutions:
        return f"{cfg.data.institutions} institutions are more than the source run's {source.data.institutions}"
    made = {}
    for c in (source, cfg):                  # what makes a commit (the commit cache's key), and the schedule
        parts = commit_config(c) | {"schedule": config_to_dict(c.schedule)}
        parts["data"].pop("institutions")
        parts.setdefault("precision", "fp32")    # the cache key leaves the default out
        made[c is cfg] = parts
    a, b = made[False], made[True]
    for name in sorted(a, key=lambda k: (isinstance(a[k], dict), k)):
        x, y = a[name], b[name]
        if x == y:
            continue
        if not isinstance(x, dict):
            return f"{TOP_LEVEL[name]} differs ({x!r} in the source run, {y!r} here)"
        field = next(k for k in sorted(set(x) | set(y)) if x.get(k) != y.get(k))
        return f"{name}.{field} differs ({x.get(field)!r} in the source run, {y.get(field)!r} here)"
    return None


def replay_subset(source_dir: str | Path, cfg: SimConfig, out: str | Path, foundation=None, cohort=None,
                  run_id: str | None = None) -> dict:
    """Build the run of ``cfg`` (a community of ``cfg.data.institutions``) from the run dir ``source_dir`` of a
    larger community, without training: writes the run dir ``out`` and returns its ``summary.json`` content.

    The smaller run's commits are the larger run's commits of institutions ``0 .. N-1``, in the larger run's merge
    order (its schedule restricted to them, which is checked). They are received by a ``sim.main_state.MainState``
    exactly as the merge actor receives them (same validation, merge seeds by sequence number, log and commit dirs),
    evaluated every ``runtime.eval_every`` accepted commits and at the end on ``cfg``'s own cohort, with the
    references (base, individual) of that cohort — what a fresh run of ``cfg`` computes (a test checks that the
    numbers are the same, bit for bit). ``subset_mismatch`` says when a run cannot be built this way; that, or a
    source whose log holds a rejected contribution of those institutions, is an error.

    ``summary.json`` records ``replayed_from`` (the source run dir, its community size and contributions); its
    ``wall_s`` is the replay's.
    """
    import torch

    from sim.config import config_to_dict
    from sim.data import cached_cohort
    from sim.evaluation import evaluate_individual, evaluate_snapshot
    from sim.features import shared_store
    from sim.main_state import MainState
    from sim.merge.base import base_reference
    from sim.model import load_foundation
    from sim.schedule import build_schedule
    from sim.summary import FinalEvaluation, summarise_run

    t0 = time.time()
    source_dir, run_dir = Path(source_dir), Path(out)
    source, every = load_run(source_dir)
    why = subset_mismatch(source, cfg)
    if why:
        raise ValueError(f"cannot build this run from {source_dir}: {why}")
    n = cfg.data.institutions
    records = CommitLog(source_dir).read()
    rejected = [r for r in records if r.get("event") == "rejected" and r.get("institution") is not None
                and int(r["institution"]) < n]
    if rejected:
        raise ValueError(f"cannot build this run from {source_dir}: its log rejected {rejected[0].get('id')} of "
                         f"institution {rejected[0]['institution']} ({rejected[0].get('reason')}); run it fresh")
    # Step 1: the smaller run's schedule is the larger one's, restricted to its institutions.
    schedule = build_schedule(cfg.schedule, n, cfg.seed)
    big = build_schedule(source.schedule, source.data.institutions, source.seed)
    kept = [c for c in big.contributions if c.institution < n]
    if [(c.id, c.t_pull, c.t_commit) for c in schedule.contributions] != [(c.id, c.t_pull, c.t_commit) for c in kept]:
        raise ValueError(f"cannot build this run from {source_dir}: the schedule of {n} institutions is not the "
                         f"larger schedule restricted to them (schedule.arrival {cfg.schedule.arrival!r})")
    commits = [c for c in every if c.institution < n]
    wanted = {c.id for c in schedule.contributions}
    if {c.id for c in commits} != wanted:
        missing = sorted(wanted - {c.id for c in commits})
        raise ValueError(f"cannot build this run from {source_dir}: its log lacks the commit of {missing[0]}")
    # Step 2: the merge actor's loop, in-process, with the evaluations it schedules.
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    torch.set_num_threads(cfg.runtime.threads)
    foundation = foundation or load_foundation(cfg.model, cfg.data.img_size, cfg.runtime.device, cfg.runtime.precision)
    cohort = cohort or cached_cohort(cfg.data, cfg.seed)
    meta = {i.id: (i.task, tuple(i.classes)) for i in cohort.institutions}
    state = MainState(run_dir, cfg, meta, foundation)
    store = shared_store(cfg.runtime.feature_cache)      # the larger run's test features, when it kept them
    counts = (store.read, store.computed, store.hits)
    evals: dict[int, list[dict]] = {}
    every = cfg.runtime.eval_every
    for commit in commits:
        ack = state.receive(commit)
        if ack["event"] != "accepted":
            raise ValueError(f"cannot build this run from {source_dir}: {commit.id} was rejected here "
                             f"({ack.get('reason')})")
        if every and state.version % every == 0:
            evals[state.version] = evaluate_snapshot(foundation, state.branches.snapshot(), cohort,
                                                     state.tasks_to_score(), state.version, store)
    # Step 3: ``MergeActor.finish``: main on disk, the final evaluation, the references.
    version, tasks = state.version, state.tasks_to_score()
    state.save_main()
    final = evals.get(version) or evaluate_snapshot(foundation, state.branches.snapshot(), cohort, tasks, version,
                                                    store)
    latest = state.latest_adapters()
    base = evaluate_snapshot(foundation, {"base": base_reference(list(latest.values()))}, cohort, tasks, version)
    individual = evaluate_individual(foundation, latest, cohort, tasks, store)
    periodic = [r for v in sorted(evals) if v != version for r in evals[v]]
    evaluated = FinalEvaluation(periodic + final, base, individual, state.storage_bytes())
    extra = {"replayed_from": {"run_dir": str(source_dir.resolve()), "n_institutions": source.data.institutions,
                               "n_contributions": len(big.contributions)},
             "institution_actors": {"actors": 0, "institutions_per_actor": 0},
             # test features (an adapter on a split, ``sim.features``): read from the feature cache's dir,
             # computed here, found in this process's memory (a worker that evaluated the larger run)
             "features": {"read": store.read - counts[0], "computed": store.computed - counts[1],
                          "in_memory": store.hits - counts[2]}}
    summary = summarise_run(cfg, run_id or run_dir.name, schedule, [], evaluated, state.records(),
                            time.time() - t0, 0.0, extra)
    return summary.write(run_dir)
