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
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
import uuid
from pathlib import Path

import ray
import yaml

from sim.config import SimConfig, config_to_dict
from sim.data import build_cohort
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
    """Acknowledgement refs in merge order, collected as they complete (so progress moves during submission)."""

    def __init__(self, progress: Progress) -> None:
        self.refs: list[ray.ObjectRef] = []
        self.results: dict[int, dict] = {}
        self.waiting: list[ray.ObjectRef] = []
        self.index: dict[ray.ObjectRef, int] = {}
        self.progress = progress

    def add(self, ref: ray.ObjectRef) -> None:
        self.index[ref] = len(self.refs)
        self.refs.append(ref)
        self.waiting.append(ref)

    def poll(self, timeout: float | None = 0) -> None:
        """Take in whatever acknowledgements are ready (``timeout=None``: wait for at least one)."""
        if not self.waiting:
            return
        done, self.waiting = ray.wait(self.waiting, num_returns=1 if timeout is None else len(self.waiting),
                                      timeout=timeout)
        for ref in done:
            self.results[self.index[ref]] = ray.get(ref)
            self.progress.update(1)

    def all(self) -> list[dict]:
        while self.waiting:
            self.poll(None)
        return [self.results[i] for i in range(len(self.refs))]


def submit_virtual(schedule: Schedule, institutions: dict, merge_actor, pull: str | None, acks: Acks,
                   window: int) -> None:
    """Step 3 (virtual clock): submit every event in virtual-time order.

    At most ``window`` contributions are in flight at once: Ray does not run queued tasks of different owners in
    submission order, so without the window the pool could train late contributions first while the merge actor
    waits for an early one. With it, the pool works in virtual-time order and merges and evaluations overlap
    training. The merge order never depends on it (commits are queued on the merge actor in schedule order).
    """
    pending: dict[str, ray.ObjectRef] = {}
    in_flight: list[ray.ObjectRef] = []
    by_id = {c.id: c for c in schedule.contributions}
    for ev in schedule.events():
        cid = ev["contribution"]
        if ev["event"] == "pull":
            while len(in_flight) >= window:
                _, in_flight = ray.wait(in_flight, num_returns=1, timeout=1.0, fetch_local=False)
                acks.poll()
            c = by_id[cid]
            pulled = [merge_actor.pull.remote(pull)] if pull else None
            [task_ref] = ray.get(institutions[c.institution].contribute.remote(c, pulled))
            pending[cid] = task_ref
            in_flight.append(task_ref)
        elif ev["event"] == "commit":
            acks.add(merge_actor.commit.remote([pending.pop(cid)]))
        acks.poll()


def run_simulation(cfg: SimConfig, out: str | Path, run_id: str | None = None) -> dict:
    """Run one simulation; writes the run dir ``out`` and returns ``summary.json``'s content."""
    from sim.model import load_foundation

    t_start = time.time()
    run_dir = Path(out)
    run_dir.mkdir(parents=True, exist_ok=True)
    run_id = run_id or f"run-{uuid.uuid4().hex[:8]}"
    # Step 1: config, cohort and schedule.
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    cfg_blob = json.dumps(config_to_dict(cfg))
    pull = pull_strategy(cfg)
    cohort = build_cohort(cfg.data, cfg.seed)
    schedule = build_schedule(cfg.schedule, len(cohort.institutions), cfg.seed)
    load_foundation(cfg.model, cfg.data.img_size)   # pretrain into the shared cache once, before any worker needs it
    # Step 2: Ray, the worker pool and the actors.
    started_ray = connect(cfg)
    pg, own_pg = worker_pool(cfg)
    options = task_options(cfg, pg)
    from actors.institution import Institution
    from actors.merge_actor import MergeActor

    t_actors = time.time()
    meta = {i.id: (i.task, tuple(i.classes)) for i in cohort.institutions}
    merge_actor = MergeActor.remote(str(run_dir.resolve()), cfg_blob, meta, options)
    institutions = {i.id: Institution.remote(i, cfg_blob, options) for i in cohort.institutions}
    ray.get([merge_actor.ping.remote()] + [a.ping.remote() for a in institutions.values()])
    startup_s = time.time() - t_actors
    try:
        # Step 3: the schedule.
        progress = Progress(len(schedule.contributions))
        if cfg.runtime.clock == "virtual":
            pending_acks = Acks(progress)
            submit_virtual(schedule, institutions, merge_actor, pull, pending_acks, window=cfg.runtime.workers + 1)
            acks = pending_acks.all()
        else:
            start = time.time() + 0.5
            runs = [a.run_wall.remote(schedule.for_institution(i), merge_actor, start, cfg.schedule.wall_scale, pull)
                    for i, a in institutions.items()]
            acks = [ack for part in ray.get(runs) for ack in part]
            progress.update(len(acks))
        progress.close()
        # Step 4: final evaluation and the main branch.
        final = ray.get(merge_actor.finish.remote())
        evals = [r for a in acks if "eval_ref" in a for part in ray.get(a.pop("eval_ref")) for r in part]
        evals += [r for part in ray.get(final["final_ref"]) for r in part]
        base, individual = ray.get(final["base_ref"]), ray.get(final["individual_ref"])
        records = ray.get(merge_actor.records.remote())
    finally:
        for a in list(institutions.values()) + [merge_actor]:
            ray.kill(a)
        if own_pg:
            ray.util.remove_placement_group(pg)
        if started_ray:
            ray.shutdown()
    wall_s = time.time() - t_start
    # Step 5: records and summary.
    return write_records(run_dir, cfg, run_id, schedule, acks, evals, base, individual, records, final["storage"],
                         wall_s, startup_s)


def write_records(run_dir: Path, cfg: SimConfig, run_id: str, schedule: Schedule, acks: list[dict],
                  evals: list[dict], base: list[dict], individual: list[dict], log: list[dict], storage: dict,
                  wall_s: float, startup_s: float) -> dict:
    """``events.parquet`` (schedule + log records), ``metrics.parquet`` (one row per eval × strategy × task) and
    ``summary.json``."""
    import pandas as pd

    from sim.evaluation import finite_mean, summarise_reference, summarise_strategies
    from sim.store import is_flat, json_safe

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
    accepted = [a for a in acks if a.get("event") == "accepted" and not a.get("duplicate")]
    merges = [r for r in log if r.get("event") == "merged"]
    busy = sum(a.get("task_s", 0.0) for a in acks) + sum(r.get("busy_s", 0.0) for r in evals + base + individual)
    summary = {
        "run_id": run_id, "n_institutions": cfg.data.institutions, "n_contributions": len(schedule.contributions),
        "commits_accepted": len(accepted), "commits_rejected": sum(a.get("event") == "rejected" for a in acks),
        "wall_s": wall_s, "startup_s": startup_s, "busy_s": busy,
        "parallel_efficiency": busy / (wall_s * max(1.0, cfg.runtime.workers * cfg.runtime.num_cpus)),
        "seed": cfg.seed, "clock": cfg.runtime.clock, "init_from": cfg.schedule.init_from,
        "strategies": summarise_strategies([r for r in evals if r["strategy"] in cfg.merge.strategies], merges,
                                           storage),
        "references": {"base": summarise_reference([r | {"version": -1} for r in base]),
                       "individual": summarise_reference(individual)},
        "staleness": {"mean": finite_mean([a.get("staleness") for a in accepted]),
                      "max": max([a.get("staleness") or 0 for a in accepted], default=0)},
    }
    (run_dir / "summary.json").write_text(json.dumps(json_safe(summary), indent=2))
    return summary
