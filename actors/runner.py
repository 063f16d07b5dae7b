"""``run_simulation(config, out)``: one simulation on Ray, from config to run dir.

Step 1  config, run dir, cohort and schedule (seeded; the driver never trains).
Step 2  connect to Ray (``--address``/``RAY_ADDRESS``: an existing cluster, code shipped with a runtime_env;
        else a local embedded Ray), reserve the worker pool as a placement group, start the actors.
Step 3  apply the schedule: with the virtual clock, events are submitted in virtual-time order — a pull is a merge
        actor call queued behind every earlier commit, a contribution depends on its pull through an object ref,
        and everything else runs in parallel on the pool; Ray runs actor calls from one caller in submission order,
        so the merge order is the schedule's whatever the number of workers. With the wall clock, institutions
        sleep scaled times and commit when done.
Step 4  final evaluation (every strategy, ``base``, ``individual``) and the main branch on disk.
Step 5  records → ``events.parquet``, ``metrics.parquet``, ``summary.json``.

Reliability: each institution gets a signing key derived from a per-run secret that only the merge actor also
holds; ``faults:`` in the config injects kills, corrupted copies and slow tasks (``sim.faults``), which only delay
work. ``resume=True`` continues a run dir whose driver died: the merge actor restores from the log, contributions
it already has (accepted, or rejected for a reason of their own) are skipped, and pulls made before the crash are
answered at the version they saw then, so the run ends as an uninterrupted one would (virtual clock).
"""
from __future__ import annotations

import json
import math
import os
import secrets
import sys
import threading
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Callable

import ray
import yaml

from sim.config import SimConfig, config_to_dict
from sim.data import build_cohort
from sim.faults import FaultPlan, plan_faults
from sim.schedule import Schedule, build_schedule

PACKAGES = ("sim", "actors", "experiments", "analysis")


def pull_strategy(cfg: SimConfig) -> str | None:
    """The branch contributions pull with ``init_from: main`` (``None`` with ``init_from: base``)."""
    if cfg.schedule.init_from != "main":
        return None
    name = getattr(cfg.schedule, "pull_strategy", "") or next(
        (s for s in cfg.merge.strategies if s != "mixture"), "")
    if not name or name == "mixture":
        raise ValueError("schedule.init_from=main needs a parameter-space strategy to pull (schedule.pull_strategy "
                         "or a non-mixture entry in merge.strategies)")
    if name not in cfg.merge.strategies:
        raise ValueError(f"schedule.pull_strategy {name!r} is not one of merge.strategies "
                         f"({', '.join(cfg.merge.strategies)})")
    return name


def connect(cfg: SimConfig) -> bool:
    """Connect to Ray; returns True if this call started it (and should shut it down)."""
    if ray.is_initialized():
        return False
    address = cfg.runtime.address or os.environ.get("RAY_ADDRESS")
    if address:
        root = Path(__file__).resolve().parents[1]
        env = {"py_modules": [str(root / p) for p in PACKAGES if (root / p).is_dir()]}
        ray.init(address=address, runtime_env=env, log_to_driver=False)
    else:
        cpus = max(os.cpu_count() or 1, math.ceil(cfg.runtime.workers * cfg.runtime.num_cpus))
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    return True


def worker_pool(cfg: SimConfig, timeout_s: float = 120.0):
    """The pool as a placement group: ``runtime.workers`` bundles of ``num_cpus`` CPUs (+ ``num_gpus`` GPUs)."""
    from ray.util.placement_group import placement_group

    bundle = {"CPU": cfg.runtime.num_cpus} | ({"GPU": cfg.runtime.num_gpus} if cfg.runtime.num_gpus else {})
    current = ray.util.get_current_placement_group()
    if current is not None:     # inside a Tune trial: use the trial's reservation
        return current, False
    pg = placement_group([dict(bundle) for _ in range(cfg.runtime.workers)], strategy="PACK")
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        ray.util.remove_placement_group(pg)
        raise RuntimeError(f"the cluster cannot reserve {cfg.runtime.workers} workers of {bundle} "
                           f"(runtime.workers, runtime.num_cpus, runtime.num_gpus); available: "
                           f"{ray.available_resources()}")
    return pg, True


def task_options(cfg: SimConfig, pg) -> dict:
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return {"num_cpus": cfg.runtime.num_cpus, "num_gpus": cfg.runtime.num_gpus,
            "scheduling_strategy": PlacementGroupSchedulingStrategy(pg, placement_group_capture_child_tasks=True)}


class Progress:
    """Commits merged / total with ETA: a tqdm bar on a terminal, else a log line to stderr every ~10 %."""

    def __init__(self, total: int) -> None:
        from tqdm import tqdm

        self.total, self.done, self.t0, self.next_line = total, 0, time.time(), 0.1
        self.bar = tqdm(total=total, desc="commits merged", unit="commit", dynamic_ncols=True) \
            if sys.stderr.isatty() else None

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.total and self.done / self.total >= self.next_line - 1e-9:
            elapsed = time.time() - self.t0
            eta = elapsed / self.done * (self.total - self.done) if self.done else math.nan
            print(f"forgesim: {self.done}/{self.total} commits merged, {elapsed:.0f}s elapsed, ETA {eta:.0f}s",
                  file=sys.stderr, flush=True)
            while self.next_line <= self.done / self.total + 1e-9:
                self.next_line += 0.1

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Acks:
    """Calls to the merge actor in merge order, **one in flight at a time**, their acknowledgements collected as they
    complete (so progress moves during submission).

    Why one at a time: Ray does not keep the order of an actor's queued calls across a restart (the calls pending on
    a killed merge actor reach its new process in any order), so with several queued a restart could merge commits
    in another order, answer a pull at another version, or deadlock (a commit whose training waits for a pull queued
    behind it). With one call in flight only that call is retried, and the merge order is the submission order. It
    costs one driver round trip per commit; the pipeline is otherwise unchanged (training is not gated by it).
    """

    def __init__(self, progress: Progress) -> None:
        self.queue: deque[tuple[int, Callable[[], ray.ObjectRef], bool]] = deque()
        self.current: tuple[int, ray.ObjectRef, bool] | None = None
        self.results: dict[int, dict] = {}
        self.n = 0
        self.progress = progress

    def add(self, call: Callable[[], ray.ObjectRef], count: bool = True) -> None:
        """Queue ``call`` (it submits one merge actor call and returns its ref); ``count``: a commit of the schedule
        (not an injected extra), counted by the progress bar."""
        self.queue.append((self.n, call, count))
        self.n += 1
        self._start()

    def _start(self) -> None:
        if self.current is None and self.queue:
            index, call, count = self.queue.popleft()
            self.current = (index, call(), count)

    def pending(self) -> list[ray.ObjectRef]:
        """The ref of the call in flight, if any (to wait on together with training refs)."""
        return [self.current[1]] if self.current is not None else []

    def poll(self, timeout: float | None = 0) -> None:
        """Take in whatever acknowledgements are ready, starting the next call after each (``timeout=None``: wait for
        the call in flight)."""
        while self.current is not None:
            index, ref, count = self.current
            done, _ = ray.wait([ref], timeout=timeout, fetch_local=True)
            if not done:
                return
            self.results[index] = ray.get(ref)
            if count:
                self.progress.update(1)
            self.current, timeout = None, 0
            self._start()

    def drain(self) -> None:
        """Wait until every queued call has been answered."""
        while self.current is not None:
            self.poll(None)

    def all(self) -> list[dict]:
        self.drain()
        return [self.results[i] for i in range(self.n)]


class Killer:
    """Fault injection (``faults.kill_institutions``): kills institution actors ``delay`` seconds after it is asked,
    from timer threads, so the kill lands while the contribution is under way. Ray restarts them."""

    def __init__(self) -> None:
        self.timers: list[threading.Timer] = []
        self.kills = 0

    def _kill(self, actor) -> None:
        ray.kill(actor, no_restart=False)
        self.kills += 1

    def kill_later(self, actor, delay: float) -> None:
        timer = threading.Timer(delay, self._kill, (actor,))
        timer.daemon = True
        timer.start()
        self.timers.append(timer)

    def stop(self) -> None:
        for t in self.timers:
            t.cancel()


def submit_virtual(schedule: Schedule, institutions: dict, merge_actor, pull: str | None, acks: Acks,
                   window: int, cfg: SimConfig | None = None, plan: FaultPlan | None = None, killer: Killer | None = None,
                   skip: frozenset[str] = frozenset(), pull_versions: dict[str, int] | None = None) -> None:
    """Step 3 (virtual clock): submit every event in virtual-time order.

    At most ``window`` contributions are in flight at once: Ray does not run queued tasks of different owners in
    submission order, so without the window the pool could train late contributions first while the merge actor
    waits for an early one. With it, the pool works in virtual-time order and merges and evaluations overlap
    training. The merge order never depends on it (commits reach the merge actor one at a time in schedule order,
    see ``Acks``).

    Each commit call carries its source (institution, contribution, pull), so the merge actor can have a lost
    contribution made again without changing the order. ``skip``: contributions the log already has (resume);
    ``pull_versions``: past main versions to pull at (resume). ``plan``/``killer``: fault injection.
    """
    pending: dict[str, tuple] = {}
    in_flight: list[ray.ObjectRef] = []
    by_id = {c.id: c for c in schedule.contributions}
    pull_versions = pull_versions or {}
    killed = set(plan.killed) if plan is not None else set()
    for ev in schedule.events():
        cid = ev["contribution"]
        if cid in skip:
            continue
        if ev["event"] == "pull":
            while len(in_flight) >= window:
                ready, _ = ray.wait(in_flight + acks.pending(), num_returns=1, timeout=1.0, fetch_local=False)
                in_flight = [r for r in in_flight if r not in ready]
                acks.poll()
            c = by_id[cid]
            pulled = None
            if pull:      # main as of this point of the schedule: every commit before it answered first
                acks.drain()
                pull_ref = merge_actor.pull.remote(pull, pull_versions.get(cid))
                ray.wait([pull_ref], fetch_local=False)
                pulled = [pull_ref]
            institution = institutions[c.institution]
            refs = ray.get(institution.contribute.remote(c, pulled))
            if cid in killed and killer is not None:
                killer.kill_later(institution, cfg.faults.kill_delay)
            pending[cid] = (c, pulled, refs, institution)
            in_flight.append(refs[0])
        elif ev["event"] == "commit":
            c, pulled, refs, institution = pending.pop(cid)
            for index, ref in enumerate(refs):      # the genuine commit, then a corrupted copy if one is planned
                note = {"injected": plan.corrupt.get(cid, "corrupt")} if index else None
                acks.add(lambda ref=ref, source=(institution, c, pulled, index), note=note:
                         merge_actor.commit.remote([ref], source, note), count=not index)
        acks.poll()


def run_simulation(cfg: SimConfig, out: str | Path, run_id: str | None = None, resume: bool = False) -> dict:
    """Run one simulation; writes the run dir ``out`` and returns ``summary.json``'s content.

    ``resume``: ``out`` is the run dir of this config whose driver died; continue it (see the module docstring).
    """
    from sim.model import load_foundation
    from sim.commit import institution_key
    from sim.commit_log import CommitLog, resume_point

    t_start = time.time()
    run_dir = Path(out)
    run_dir.mkdir(parents=True, exist_ok=True)
    run_id = run_id or f"run-{uuid.uuid4().hex[:8]}"
    # Step 1: config, cohort, schedule, faults and, when resuming, what the log already holds.
    if not resume:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    cfg_blob = json.dumps(config_to_dict(cfg))
    pull = pull_strategy(cfg)
    cohort = build_cohort(cfg.data, cfg.seed)
    schedule = build_schedule(cfg.schedule, len(cohort.institutions), cfg.seed)
    plan = plan_faults(cfg.faults, cfg.seed, [c.id for c in schedule.contributions])
    skip, pull_versions = frozenset(), {}
    if resume:
        skip, pull_versions = resume_point(schedule, CommitLog(run_dir).read())
        if cfg.runtime.clock == "wall":
            pull_versions = {}
    load_foundation(cfg.model, cfg.data.img_size)   # pretrain into the shared cache once, before any worker needs it
    # Step 2: Ray, the worker pool and the actors; a per-run secret authenticates the institutions' commits.
    started_ray = connect(cfg)
    pg, own_pg = worker_pool(cfg)
    options = task_options(cfg, pg)
    from actors.institution import Institution
    from actors.merge_actor import MergeActor

    t_actors = time.time()
    secret = secrets.token_bytes(32)
    meta = {i.id: (i.task, tuple(i.classes)) for i in cohort.institutions}
    merge_actor = MergeActor.remote(str(run_dir.resolve()), cfg_blob, meta, options, secret,
                                    pull if pull_versions else None)
    # An institution's data go in as an object ref held here for the whole run: Ray restarts a killed institution
    # from its constructor arguments, which must still be in the object store then.
    private = {i.id: ray.put(i) for i in cohort.institutions}
    institutions = {i.id: Institution.remote(private[i.id], cfg_blob, options, institution_key(secret, i.id))
                    for i in cohort.institutions}
    ray.get([merge_actor.ping.remote()] + [a.ping.remote() for a in institutions.values()])
    startup_s = time.time() - t_actors
    killer = Killer()
    try:
        # Step 3: the schedule.
        progress = Progress(len(schedule.contributions) - len(skip))
        if cfg.runtime.clock == "virtual":
            pending_acks = Acks(progress)
            submit_virtual(schedule, institutions, merge_actor, pull, pending_acks, cfg.runtime.workers + 1, cfg,
                           plan, killer, skip, pull_versions)
            acks = pending_acks.all()
        else:
            start = time.time() + 0.5
            for c in schedule.contributions:          # kills land kill_delay s into the contribution's wall time
                if c.id in plan.killed and c.id not in skip:
                    killer.kill_later(institutions[c.institution],
                                      start - time.time() + c.t_pull * cfg.schedule.wall_scale + cfg.faults.kill_delay)
            runs = [a.run_wall.remote(schedule.for_institution(i), merge_actor, start, cfg.schedule.wall_scale, pull,
                                      sorted(skip))
                    for i, a in institutions.items()]
            acks = [ack for part in ray.get(runs) for ack in part]
            progress.update(len(acks))
        progress.close()
        killer.stop()
        # Step 4: final evaluation and the main branch.
        final = ray.get(merge_actor.finish.remote())
        records = ray.get(merge_actor.records.remote())
    finally:
        killer.stop()
        for a in list(institutions.values()) + [merge_actor]:
            ray.kill(a)
        if own_pg:
            ray.util.remove_placement_group(pg)
        if started_ray:
            ray.shutdown()
    wall_s = time.time() - t_start
    # Step 5: records and summary.
    extra = {"faults": plan.record() | {"institution_kills_done": killer.kills}} if cfg.faults.any else {}
    if resume:
        extra["resumed"] = {"skipped": len(skip), "contributions_run": len(schedule.contributions) - len(skip)}
    return write_records(run_dir, cfg, run_id, schedule, acks, final["evals"], final["base"], final["individual"],
                         records, final["storage"], wall_s, startup_s, extra)


def write_records(run_dir: Path, cfg: SimConfig, run_id: str, schedule: Schedule, acks: list[dict],
                  evals: list[dict], base: list[dict], individual: list[dict], log: list[dict], storage: dict,
                  wall_s: float, startup_s: float, extra: dict | None = None) -> dict:
    """``events.parquet`` (schedule + log records), ``metrics.parquet`` (one row per eval × strategy × task) and
    ``summary.json``. Commit counts and staleness come from the log (the acknowledgements of this driver miss what a
    resumed run's predecessor merged, and count a commit retried after a merge actor restart as a duplicate)."""
    import pandas as pd

    from sim.evaluation import finite_mean, summarise_reference, summarise_strategies
    from sim.records import is_flat, json_safe

    common = {"run_id": run_id}
    events = [common | {"source": "schedule", "t_wall": math.nan} | e for e in schedule.events()]
    events += [common | {"source": "merge_actor"} | {k: v for k, v in r.items() if is_flat(v)} for r in log]
    pd.DataFrame(events).to_parquet(run_dir / "events.parquet", index=False)
    metric_rows = [common | r for r in evals]
    metric_rows += [common | {"event": "eval", "version": -1, "strategy": "base"} | r for r in base]
    metric_rows += [common | {"event": "eval", "version": -1, "strategy": "individual"} | r for r in individual]
    for r in metric_rows:
        r.pop("busy_s", None)
    pd.DataFrame(metric_rows).to_parquet(run_dir / "metrics.parquet", index=False)
    accepted = list({r["id"]: r for r in log if r.get("event") == "accepted"}.values())
    merges = [r for r in log if r.get("event") == "merged"]
    faults = {"retried_contributions": sum((r.get("attempts") or 1) > 1 for r in accepted),
              "merge_actor_restarts": sum(r.get("event") == "restored" for r in log)}
    busy = sum(a.get("task_s", 0.0) for a in acks) + sum(r.get("busy_s", 0.0) for r in evals + base + individual)
    summary = {
        "run_id": run_id, "n_institutions": cfg.data.institutions, "n_contributions": len(schedule.contributions),
        "commits_accepted": len(accepted), "commits_rejected": sum(r.get("event") == "rejected" for r in log),
        "wall_s": wall_s, "startup_s": startup_s, "busy_s": busy,
        "parallel_efficiency": busy / (wall_s * max(1.0, cfg.runtime.workers * cfg.runtime.num_cpus)),
        "seed": cfg.seed, "clock": cfg.runtime.clock, "init_from": cfg.schedule.init_from,
        "strategies": summarise_strategies([r for r in evals if r["strategy"] in cfg.merge.strategies], merges,
                                           storage),
        "references": {"base": summarise_reference([r | {"version": -1} for r in base]),
                       "individual": summarise_reference(individual)},
        "staleness": {"mean": finite_mean([a.get("staleness") for a in accepted]),
                      "max": max([a.get("staleness") or 0 for a in accepted], default=0)},
    } | (extra or {})
    if "faults" in summary:
        summary["faults"] |= faults
    (run_dir / "summary.json").write_text(json.dumps(json_safe(summary), indent=2))
    return summary
