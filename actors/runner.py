"""``run_simulation(config, out)``: one simulation on Ray, from config to run dir.

Step 1  config, run dir, cohort and schedule (seeded; the driver never trains).
Step 2  connect to Ray (``--address``/``RAY_ADDRESS``: an existing cluster, code shipped with a runtime_env;
        else a local embedded Ray), reserve the worker pool as a placement group, start the actors.
Step 3  apply the schedule with the clock's driver (``actors.drivers``, one ``submit(schedule)``): the virtual
        clock submits events in virtual-time order, so the merge order is the schedule's whatever the number of
        workers; the wall clock starts contributions at scaled times and merges commits in arrival order. Either
        way the driver only forwards, to the institution actors and the merge actor.
Step 4  final evaluation (every strategy, ``base``, ``individual``) and the main branch on disk.
Step 5  records → ``events.parquet``, ``metrics.parquet``, ``summary.json`` (``sim.summary``).

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
import time
import uuid
from pathlib import Path

import ray
import yaml

from actors.drivers import DRIVERS, Killer, RunActors
from sim.config import SimConfig, config_to_dict
from sim.data import build_cohort
from sim.faults import plan_faults
from sim.progress import Progress
from sim.schedule import build_schedule

PACKAGES = ("sim", "actors", "experiments", "analysis")


# A local Ray started here keeps a run's idle pooled workers: by default Ray kills an idle worker after 1 s as soon as
# the node holds more worker processes than CPUs, and a run's actors (institutions, merge actor) count, so the pool's
# workers died between tasks and every task after a pause started a new one (a torch + timm + peft import, seconds of
# CPU each). What a run computes is unchanged; the workers go when Ray shuts down.
# Only the idle-kill delay changes: raising ``num_workers_soft_limit`` as well made Ray prestart that many workers and
# slowed a run's start-up on 2 cores.
LOCAL_SYSTEM_CONFIG = {"idle_worker_killing_time_threshold_ms": 600_000}


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
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False,
                 _system_config=dict(LOCAL_SYSTEM_CONFIG))
    return True


def pool_shortfall(bundle: dict[str, float], workers: int, nodes: list[dict]) -> str | None:
    """Why the cluster's nodes (``ray.nodes()``) can never hold ``workers`` bundles ``bundle``, or ``None``.

    A bundle sits on one node, so each alive node holds ``min_r floor(node[r] / bundle[r])`` of them; the cluster's
    total (not what is free now: other work may be holding resources, and the pool then waits for them) must reach
    ``workers``."""
    alive = [n.get("Resources", {}) for n in nodes if n.get("Alive", True)]
    needed = {r: amount for r, amount in bundle.items() if amount > 0}

    def room(res: dict) -> int:
        return min((int(res.get(r, 0.0) / amount + 1e-9) for r, amount in needed.items()), default=workers)

    fits = sum(room(res) for res in alive)
    if fits >= workers:
        return None
    total = {r: sum(res.get(r, 0.0) for res in alive) for r in bundle}
    fields = {"CPU": "runtime.num_cpus", "GPU": "runtime.num_gpus"}
    short = [r for r in needed if workers * needed[r] > total[r] + 1e-9] or list(needed)
    message = (f"the worker pool does not fit this cluster: runtime.workers={workers} workers of "
               f"{', '.join(f'{fields.get(r, r)}={needed[r]:g}' for r in short)} {'/'.join(short)} each; the "
               f"cluster has {', '.join(f'{total[r]:g} {r}' for r in bundle)} on {len(alive)} node(s), room for "
               f"{fits} such worker(s)")
    if needed.get("GPU") and not total["GPU"]:
        message += ("; it has no GPU: run on the CPU (runtime.device=cpu, runtime.num_gpus=0) or join a cluster "
                    "with GPUs (--address)")
    return message


def pool_bundle(cfg: SimConfig) -> dict[str, float]:
    """One pooled worker's reservation: ``runtime.num_cpus`` CPUs (+ ``runtime.num_gpus`` GPUs)."""
    return {"CPU": cfg.runtime.num_cpus} | ({"GPU": cfg.runtime.num_gpus} if cfg.runtime.num_gpus else {})


def check_pool_fits(cfg: SimConfig) -> None:
    """A ``ValueError`` at once (the CLI's exit code 2) when the connected cluster can never hold the worker pool,
    rather than a placement group that waits for GPUs that are not there."""
    shortfall = pool_shortfall(pool_bundle(cfg), cfg.runtime.workers, ray.nodes())
    if shortfall:
        raise ValueError(shortfall)


def worker_pool(cfg: SimConfig, timeout_s: float = 120.0):
    """The pool as a placement group: ``runtime.workers`` bundles of ``num_cpus`` CPUs (+ ``num_gpus`` GPUs).

    A pool the cluster can never hold (more GPUs than it has, say) is a ``ValueError`` at once, naming the fields
    (``pool_shortfall``); one it holds but cannot reserve within ``timeout_s`` (other work holds the resources) is a
    ``RuntimeError``."""
    from ray.util.placement_group import placement_group

    bundle = pool_bundle(cfg)
    current = ray.util.get_current_placement_group()
    if current is not None:     # inside a Tune trial: use the trial's reservation
        return current, False
    check_pool_fits(cfg)
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


def run_simulation(cfg: SimConfig, out: str | Path, run_id: str | None = None, resume: bool = False) -> dict:
    """Run one simulation; writes the run dir ``out`` and returns ``summary.json``'s content.

    ``resume``: ``out`` is the run dir of this config whose driver died; continue it (see the module docstring).
    """
    from sim.commit_log import CommitLog, resume_point
    from sim.model import prepare_foundation

    t_start = time.time()
    run_dir = Path(out)
    run_dir.mkdir(parents=True, exist_ok=True)
    run_id = run_id or f"run-{uuid.uuid4().hex[:8]}"
    # Step 1: config, cohort, schedule, faults and, when resuming, what the log already holds.
    if not resume:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    cfg_blob = json.dumps(config_to_dict(cfg))
    pull = cfg.pull_branch
    cohort = build_cohort(cfg.data, cfg.seed)
    schedule = build_schedule(cfg.schedule, len(cohort.institutions), cfg.seed)
    plan = plan_faults(cfg.faults, cfg.seed, [c.id for c in schedule.contributions])
    skip, pull_versions = frozenset(), {}
    if resume:
        skip, pull_versions = resume_point(schedule, CommitLog(run_dir).read())
        if cfg.runtime.clock == "wall":
            pull_versions = {}
    # pretrain into the shared cache once, before any worker needs it; a prototype file must fit every task
    prepare_foundation(cfg.model, cfg.data.img_size, cohort.task_classes)
    # Step 2: Ray, the worker pool and the actors; a per-run secret authenticates the institutions' commits.
    started_ray = connect(cfg)
    try:
        pg, own_pg = worker_pool(cfg)
    except Exception:
        if started_ray:
            ray.shutdown()
        raise
    options = task_options(cfg, pg)
    t_actors = time.time()
    merge_actor, institutions, _private = start_actors(cfg, cfg_blob, cohort, run_dir, options,
                                                       pull if pull_versions else None)
    startup_s = time.time() - t_actors
    killer = Killer()
    try:
        # Step 3: the schedule, applied by the clock's driver (virtual: schedule order; wall: arrival order).
        progress = Progress(len(schedule.contributions) - len(skip))
        run = RunActors(cfg, institutions, merge_actor, pull, plan, killer, skip, pull_versions)
        acks = DRIVERS[cfg.runtime.clock](run, progress).submit(schedule)
        progress.close()
        killer.stop()
        # Step 4: final evaluation and the main branch.
        final = ray.get(merge_actor.finish.remote())
        records = ray.get(merge_actor.records.remote())
    finally:
        killer.stop()
        for a in {id(a): a for a in list(institutions.values()) + [merge_actor]}.values():
            ray.kill(a)
        if own_pg:
            ray.util.remove_placement_group(pg)
        if started_ray:
            ray.shutdown()
    wall_s = time.time() - t_start
    # Step 5: records and summary.
    extra = {"faults": plan.record() | {"institution_kills_done": killer.kills}} if cfg.faults.any else {}
    per_actor = hosted_per_actor(cfg, len(cohort.institutions))
    extra["institution_actors"] = {"actors": math.ceil(len(cohort.institutions) / per_actor),
                                   "institutions_per_actor": per_actor}
    if resume:
        extra["resumed"] = {"skipped": len(skip), "contributions_run": len(schedule.contributions) - len(skip)}
    from sim.summary import FinalEvaluation, summarise_run

    evaluated = FinalEvaluation(final["evals"], final["base"], final["individual"], final["storage"])
    return summarise_run(cfg, run_id, schedule, acks, evaluated, records, wall_s, startup_s, extra).write(run_dir)


def start_actors(cfg: SimConfig, cfg_blob: str, cohort, run_dir: Path, options: dict, history: str | None):
    """Step 2's actors: ``(merge actor, {id: institution actor}, {id: ref to its private data})``, all answering.

    A per-run secret authenticates the institutions' commits: each institution gets a key derived from it, and only
    the merge actor holds the secret. ``history``: the branch whose past versions the merge actor must answer
    pulls at (a resumed virtual run), else ``None``.
    """
    from actors.institution import Institution
    from actors.merge_actor import MergeActor
    from sim.commit import institution_key

    secret = secrets.token_bytes(32)
    meta = {i.id: (i.task, tuple(i.classes)) for i in cohort.institutions}
    merge_actor = MergeActor.remote(str(run_dir.resolve()), cfg_blob, meta, options, secret, history)
    # An institution's data go in as an object ref held for the whole run (the caller keeps the third value): Ray
    # restarts a killed actor from its constructor arguments, which must still be in the object store then.
    private = {i.id: ray.put(i) for i in cohort.institutions}
    per_actor = hosted_per_actor(cfg, len(cohort.institutions))
    institutions, hosts = {}, []
    for start in range(0, len(cohort.institutions), per_actor):
        group = [i.id for i in cohort.institutions[start:start + per_actor]]
        host = Institution.remote([private[i] for i in group], cfg_blob, options,
                                  {i: institution_key(secret, i) for i in group})
        hosts.append(host)
        institutions |= {i: host for i in group}
    ray.get([merge_actor.ping.remote()] + [h.ping.remote() for h in hosts])
    return merge_actor, institutions, private


def hosted_per_actor(cfg: SimConfig, n_institutions: int) -> int:
    """Institutions per ``Institution`` actor: ``runtime.institutions_per_actor``, or for 0 ceil(N / 2) (at most two
    actors: their calls return at once, and each process costs a second of start-up and ~0.17 GB)."""
    k = cfg.runtime.institutions_per_actor or math.ceil(n_institutions / 2)
    return max(1, min(k, n_institutions))
