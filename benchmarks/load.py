"""Load on the merge actor: many institutions committing at once, with the merge actor killed under them.

    .venv/bin/python benchmarks/load.py [--institutions 50] [--commits 500] [--strategies lora_avg,svd]
                                        [--kill-merge-after 150,350] [--corrupt 0.05] [--out DIR]

``--institutions`` light committer actors (no torch in them, like ``Institution``) each send their share of the
``--commits`` commits to one ``MergeActor``, all at once: each sends its next commit as soon as the previous one is
acknowledged, so up to N commits wait at the merge actor. The commits are valid, signed commits made up front in the
driver (seeded LoRA adapters of the tiny test foundation, 2 real images per class as the distilled set) and held in
the object store: this measures the commit path — authenticate, validate, fsync'ed log, merge into every branch,
acknowledge — not training. With ``--corrupt p`` a share of the commits is followed by a corrupted copy (kinds of
``sim.faults``), which must be rejected; ``--kill-merge-after`` kills the merge actor right after it logs those
accepted counts (``faults.kill_merge_actor_after``): Ray restarts it, it restores from the log, and the calls in
flight are retried.

Prints: wall clock; commits lost (acknowledged or sent, but not in the log: must be 0) and duplicated (accepted more
than once in the log: must be 0); the acknowledgement latency the committers see (submit → ack, p50/p95/p99) and the
merge actor's own time per commit; merge actor restarts; peak memory (PSS and RSS sum of the driver and every process
it started — its local Ray — sampled every 0.5 s).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ray  # noqa: E402

from sim.config import (DataConfig, FaultsConfig, LoraConfig, MergeConfig, ModelConfig, RuntimeConfig,  # noqa: E402
                        SimConfig, config_to_dict)

from benchmarks.procmem import PeakMemory, this_process_tree  # noqa: E402


@ray.remote(num_cpus=0)
class Committer:
    """One institution under load: sends its commits one after the other, each as soon as the last is acknowledged.
    Commits arrive as ``[[ref], ...]`` and are passed on as refs, so this process never loads them (no torch)."""

    def run(self, merge_actor, wrapped: list, start: float) -> list[dict]:
        time.sleep(max(0.0, start - time.time()))
        out = []
        for w in wrapped:
            t0 = time.perf_counter()
            ack = ray.get(merge_actor.commit.remote(w))
            out.append({"id": ack.get("id"), "event": ack.get("event"), "duplicate": bool(ack.get("duplicate")),
                        "injected": ack.get("injected"), "latency_s": time.perf_counter() - t0,
                        "ack_s": ack.get("ack_s")})
        return out


def load_config(n: int, strategies: tuple[str, ...], kill_after: tuple[int, ...]) -> SimConfig:
    """The tiny test foundation (2 blocks, width 32, 16 px) and a small cohort: the commit path, not the model."""
    cache = os.environ.get("FORGESIM_CACHE")
    return SimConfig(
        data=DataConfig(n_tasks=4, institutions=n, img_size=16, train_per_class=8, val_per_class=2,
                        test_per_class=2),
        model=ModelConfig(patch_size=4, embed_dim=32, depth=2, num_heads=2, pretrain_steps=30, pretrain_batch=32,
                          cache_dir=cache),
        lora=LoraConfig(rank=4, alpha=8.0),
        merge=MergeConfig(strategies=strategies),
        runtime=RuntimeConfig(workers=1, eval_every=0),
        faults=FaultsConfig(kill_merge_actor_after=kill_after))


def make_commits(cfg: SimConfig, per_institution: int, secret: bytes, corrupt: float) -> list[list]:
    """Per institution, its signed commits (and corrupted copies right after some), in sending order."""
    import torch

    from sim.data import build_cohort
    from sim.data.base import DistilledSet, derive_rng
    from sim.faults import corrupt_commit
    from sim.model import load_foundation, new_adapter
    from sim.commit import Commit, institution_key, sign_commit

    foundation = load_foundation(cfg.model, cfg.data.img_size)
    cohort = build_cohort(cfg.data, cfg.seed)
    kinds = [k for k in cfg.faults.corrupt_kinds if k != "replay"] + ["replay"]
    out = []
    for inst in cohort.institutions:
        key, mine = institution_key(secret, inst.id), []
        idx = np.concatenate([np.flatnonzero(inst.train.y == c)[:2] for c in range(len(inst.classes))])
        x = inst.train.x[idx].astype(np.float32) / (255.0 if inst.train.x.dtype == np.uint8 else 1.0)
        distilled = DistilledSet(inst.task, tuple(inst.classes), x, inst.train.y[idx].astype(np.int64), "random")
        for k in range(per_institution):
            adapter = new_adapter(foundation, cfg.lora, seed=1000 * inst.id + k)
            g = torch.Generator().manual_seed(1000 * inst.id + k)
            adapter.weights = {name: (0.05 * torch.randn(t.shape, generator=g) if name.endswith("lora_B.weight") else t)
                               for name, t in adapter.weights.items()}
            commit = sign_commit(Commit(f"inst{inst.id:03d}-{k:02d}", inst.id, inst.task, tuple(inst.classes), adapter,
                                        distilled, 0, float(k), float(k) + 0.5), key)
            mine.append([ray.put(commit)])
            rng = derive_rng(cfg.seed, "load", "corrupt", commit.id)
            if rng.random() < corrupt:
                mine.append([ray.put(corrupt_commit(commit, kinds[int(rng.integers(len(kinds)))], key))])
        out.append(mine)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--institutions", type=int, default=50)
    ap.add_argument("--commits", type=int, default=500, help="genuine commits in all (split evenly)")
    ap.add_argument("--strategies", default="lora_avg,svd")
    ap.add_argument("--kill-merge-after", default="150,350", help="accepted counts; empty = no kill")
    ap.add_argument("--corrupt", type=float, default=0.05)
    ap.add_argument("--out", help="keep the run dir here (default: a temp dir, deleted)")
    args = ap.parse_args()
    n, per = args.institutions, max(1, args.commits // args.institutions)
    kill_after = tuple(int(v) for v in args.kill_merge_after.split(",") if v.strip())
    cfg = load_config(n, tuple(args.strategies.split(",")), kill_after)
    run_dir = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="forgesim-load-"))
    if run_dir.exists():
        shutil.rmtree(run_dir)
    print(f"{os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB; {n} institutions x {per} "
          f"commits = {n * per}; strategies {cfg.merge.strategies}; merge actor killed after {kill_after or 'never'}; "
          f"corrupted copies p={args.corrupt}")
    sampler = PeakMemory(this_process_tree, period=0.5)
    sampler.start()
    ray.init(num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False)
    try:
        from actors.merge_actor import MergeActor
        from sim.commit_log import CommitLog

        # Step 1: the commits, made and signed up front; the merge actor and the committers, started and answering.
        secret = os.urandom(32)
        t0 = time.time()
        commits = make_commits(cfg, per, secret, args.corrupt)
        make_s = time.time() - t0
        from sim.data import build_cohort

        meta = {i.id: (i.task, tuple(i.classes)) for i in build_cohort(cfg.data, cfg.seed).institutions}
        merge_actor = MergeActor.remote(str(run_dir), json.dumps(config_to_dict(cfg)), meta, {}, secret)
        committers = [Committer.remote() for _ in range(n)]
        t1 = time.time()
        ray.get([merge_actor.ping.remote()] + [c.__ray_ready__.remote() for c in committers])
        startup_s = time.time() - t1
        # Step 2: everyone commits at once.
        start = time.time() + 1.0
        results = ray.get([c.run.remote(merge_actor, w, start) for c, w in zip(committers, commits)])
        wall_s = time.time() - start
        # Step 3: the log is the truth: every genuine commit in it once, every injected copy rejected.
        log = CommitLog(run_dir, create=False).read()
    finally:
        ray.shutdown()
        peak_rss, peak_pss = sampler.stop()
    acks = [a for part in results for a in part]
    genuine = [a for a in acks if not a["injected"]]
    sent_ids = {f"inst{i:03d}-{k:02d}" for i in range(n) for k in range(per)}
    accepted = [r["id"] for r in log if r.get("event") == "accepted"]
    acked = {a["id"] for a in genuine if a["event"] == "accepted"}
    lost = len(sent_ids - set(accepted)) + len(acked - set(accepted))
    duplicated = len(accepted) - len(set(accepted))
    wrongly_accepted = sum(a["event"] != "rejected" for a in acks if a["injected"])
    restarts = sum(r.get("event") == "restored" for r in log)
    lat = np.array([a["latency_s"] for a in acks]) * 1000
    own = np.array([a["ack_s"] for a in acks if a["ack_s"] is not None]) * 1000
    figures = {
        "institutions": n, "commits_sent": len(sent_ids), "corrupted_copies": len(acks) - len(genuine),
        "wall_s": round(wall_s, 2), "commits_per_s": round(len(acks) / wall_s, 1), "startup_s": round(startup_s, 2),
        "make_commits_s": round(make_s, 1), "lost": lost, "duplicated": duplicated,
        "injected_accepted": wrongly_accepted, "merge_actor_restarts": restarts,
        "retried_acks_marked_duplicate": sum(a["duplicate"] for a in genuine),
        "ack_latency_ms": {q: round(float(np.percentile(lat, p)), 1) for q, p in (("p50", 50), ("p95", 95),
                                                                                  ("p99", 99))},
        "merge_actor_ms_per_commit": {q: round(float(np.percentile(own, p)), 1) for q, p in (("p50", 50),
                                                                                           ("p95", 95))},
        "peak_memory_gb": {"pss": round(peak_pss / 2**30, 2), "rss_sum": round(peak_rss / 2**30, 2)},
    }
    print(f"wall {wall_s:.1f}s for {len(acks)} commits ({figures['commits_per_s']}/s), start-up {startup_s:.1f}s")
    print(f"lost {lost}  duplicated {duplicated}  corrupted copies accepted {wrongly_accepted}  "
          f"merge actor restarts {restarts}")
    print("ack latency ms p50 {p50}  p95 {p95}  p99 {p99}".format(**figures["ack_latency_ms"]))
    print("merge actor ms per commit p50 {p50}  p95 {p95}".format(**figures["merge_actor_ms_per_commit"]))
    print(f"peak memory {figures['peak_memory_gb']['pss']} GB PSS ({figures['peak_memory_gb']['rss_sum']} GB RSS sum)")
    print(json.dumps(figures))
    if not args.out:
        shutil.rmtree(run_dir, ignore_errors=True)
    if lost or duplicated or wrongly_accepted:
        sys.exit(1)


if __name__ == "__main__":
    main()
