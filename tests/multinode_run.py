"""Run one simulation on a 2-node ``ray.cluster_utils.Cluster`` and lose a worker node half-way (test helper).

    python tests/multinode_run.py CONFIG.yaml RUN_DIR [--remove-after K]

The head has no CPUs (the driver and the zero-CPU actors may live there); a worker node with 2 CPUs holds the torch
worker pool. After K accepted commits (default 2) the worker node is killed without warning and a fresh one joins:
the placement group moves there, lost tasks and objects are made again, actors that lived on the dead node restart.
Prints one JSON line: when the node was removed and how many nodes are alive at the end. Run by
``tests/test_faults.py`` in its own process, since a test session has its own Ray already.
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors.runner import LOCAL_SYSTEM_CONFIG, run_simulation  # noqa: E402
from sim.config import load_config  # noqa: E402


def accepted(run_dir: Path) -> int:
    try:
        return sum('"event": "accepted"' in line for line in (run_dir / "log.jsonl").read_text().splitlines())
    except OSError:
        return 0


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("config")
    p.add_argument("run_dir")
    p.add_argument("--remove-after", type=int, default=2)
    args = p.parse_args()
    cfg, run_dir = load_config(args.config), Path(args.run_dir)
    # A dead node is noticed after health_check_failure_threshold missed checks (default 5 x 3 s; here about 2 s).
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False,
        "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 4} | LOCAL_SYSTEM_CONFIG})
    worker = cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    report: dict = {}
    result: dict = {}

    def simulate() -> None:
        try:
            result["summary"] = run_simulation(cfg, run_dir)
        except BaseException as exc:  # noqa: BLE001 — reported below
            result["error"] = repr(exc)

    # The simulation runs in a thread: starting a node installs signal handlers, which only the main thread may do.
    sim = threading.Thread(target=simulate, daemon=True)
    sim.start()
    try:
        while sim.is_alive() and accepted(run_dir) < args.remove_after:
            time.sleep(0.1)
        if sim.is_alive():
            report["removed_after_accepted"] = accepted(run_dir)
            cluster.remove_node(worker, allow_graceful=False)
            cluster.add_node(num_cpus=2)
            report["replaced_at"] = time.time()
        sim.join()
        if "error" in result:
            raise RuntimeError(result["error"])
        summary = result["summary"]
        report |= {"nodes_alive_at_end": sum(n["Alive"] for n in ray.nodes()),
                   "commits_accepted": summary["commits_accepted"], "wall_s": summary["wall_s"]}
    finally:
        ray.shutdown()
        cluster.shutdown()
    print(json.dumps(report))
    return 0 if "removed_after_accepted" in report else 1


if __name__ == "__main__":
    sys.exit(main())
