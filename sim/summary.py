"""A run's records and summary: ``events.parquet``, ``metrics.parquet`` and ``summary.json`` built from what it did.

Pure over its inputs (the schedule, the merge actor's log, the evaluations, the drivers' acknowledgements), so the
run dir's tables can be rebuilt and tested without Ray; ``RunRecords.write`` is the only part that touches disk.
Commit counts and staleness come from the log, not from the acknowledgements: the acknowledgements of one driver
miss what a resumed run's predecessor merged, and count a commit retried after a merge actor restart as a duplicate.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from sim.asynchrony import summarise_asynchrony, version_times
from sim.config import SimConfig
from sim.evaluation import finite_mean, summarise_reference, summarise_strategies
from sim.schedule import Schedule
from sim.records import is_flat, json_safe


@dataclass(frozen=True)
class FinalEvaluation:
    """The merge actor's final numbers: every evaluation record, the references' records and each branch's bytes.

    ``individual`` holds the records of both individual references (``sim.evaluation.evaluate_individual``), each
    naming its reference in ``strategy`` (``individual`` or ``individual_local``; untagged records are
    ``individual``).
    """

    evals: list[dict]
    base: list[dict]
    individual: list[dict]
    storage: dict

    def references(self) -> dict[str, list[dict]]:
        """Each reference's records by name, in the order the tables show them: base, individual (both always
        there), then individual_local when the records hold it."""
        out: dict[str, list[dict]] = {"base": [r | {"strategy": "base", "version": -1} for r in self.base],
                                      "individual": []}
        for r in self.individual:
            name = r.get("strategy", "individual")
            out.setdefault(name, []).append(r | {"strategy": name, "version": -1})
        return out


@dataclass(frozen=True)
class RunRecords:
    """The three tables of a run dir, as rows (``events``, ``metrics``) and the ``summary.json`` content."""

    events: list[dict]
    metrics: list[dict]
    summary: dict

    def write(self, run_dir: str | Path) -> dict:
        """Write ``events.parquet``, ``metrics.parquet`` and ``summary.json`` into ``run_dir``; returns the summary."""
        import pandas as pd

        run_dir = Path(run_dir)
        pd.DataFrame(self.events).to_parquet(run_dir / "events.parquet", index=False)
        pd.DataFrame(self.metrics).to_parquet(run_dir / "metrics.parquet", index=False)
        (run_dir / "summary.json").write_text(json.dumps(json_safe(self.summary), indent=2))
        return self.summary


def event_rows(run_id: str, schedule: Schedule, log: Sequence[dict]) -> list[dict]:
    """The schedule's events (no wall time), then the log's records with their flat fields only."""
    common = {"run_id": run_id}
    rows = [common | {"source": "schedule", "t_wall": math.nan} | e for e in schedule.events()]
    return rows + [common | {"source": "merge_actor"} | {k: v for k, v in r.items() if is_flat(v)} for r in log]


def metric_rows(run_id: str, final: FinalEvaluation, times: dict[int, float] | None = None) -> list[dict]:
    """One row per evaluation × strategy × task, the references as version -1; ``busy_s`` is left out (timing).

    ``t_virtual``: when main reached the evaluated version (``times``, ``sim.asynchrony.version_times``); NaN for
    the references and without ``times``.
    """
    common = {"run_id": run_id}
    times = times or {}
    rows = [common | {"t_virtual": times.get(int(r["version"]), math.nan)} | r for r in final.evals]
    rows += [common | {"event": "eval", "t_virtual": math.nan} | r for records in final.references().values()
             for r in records]
    return [{k: v for k, v in r.items() if k != "busy_s"} for r in rows]


def summarise_run(cfg: SimConfig, run_id: str, schedule: Schedule, acks: Sequence[dict], final: FinalEvaluation,
                  log: Sequence[dict], wall_s: float, startup_s: float, extra: dict | None = None) -> RunRecords:
    """The run's records and ``summary.json`` content.

    Args:
        cfg: the run's config.
        run_id: written on every row.
        schedule: the run's schedule (its events are the first rows of ``events``).
        acks: the drivers' acknowledgements (only their ``task_s`` is read: busy time).
        final: the merge actor's final evaluation.
        log: every record of the merge actor's log, in order.
        wall_s, startup_s: the run's wall time and the actors' start-up time.
        extra: more summary blocks (``faults``, ``resumed``); a ``faults`` block gets the log's fault counts.
    """
    accepted = list({r["id"]: r for r in log if r.get("event") == "accepted"}.values())
    merges = [r for r in log if r.get("event") == "merged"]
    evals = [r for r in final.evals if r["strategy"] in cfg.merge.strategies]
    asynchrony, targets = summarise_asynchrony(schedule, log, evals, cfg.schedule.protocol)
    busy = sum(a.get("task_s", 0.0) for a in acks) + sum(
        r.get("busy_s", 0.0) for r in final.evals + final.base + final.individual)
    summary = {
        "run_id": run_id, "n_institutions": cfg.data.institutions, "n_contributions": len(schedule.contributions),
        "commits_accepted": len(accepted), "commits_rejected": sum(r.get("event") == "rejected" for r in log),
        "wall_s": wall_s, "startup_s": startup_s, "busy_s": busy,
        "parallel_efficiency": busy / (wall_s * max(1.0, cfg.runtime.workers * cfg.runtime.num_cpus)),
        "seed": cfg.seed, "clock": cfg.runtime.clock, "init_from": cfg.schedule.init_from,
        "strategies": {s: block | {"time_to_target": targets.get(s, math.nan)}
                       for s, block in summarise_strategies(evals, merges, final.storage).items()},
        "references": {name: summarise_reference(records) for name, records in final.references().items()},
        "staleness": {"mean": finite_mean([a.get("staleness") for a in accepted]),
                      "max": max([a.get("staleness") or 0 for a in accepted], default=0)},
        "asynchrony": asynchrony,
    } | (extra or {})
    if "faults" in summary:
        summary["faults"] = summary["faults"] | fault_counts(log, accepted)
    if cfg.gate.checks or cfg.attacks.any:
        summary["gate"] = gate_counts(cfg, log, accepted)
    return RunRecords(event_rows(run_id, schedule, log), metric_rows(run_id, final, version_times(log)), summary)


def fault_counts(log: Sequence[dict], accepted: Sequence[dict]) -> dict:
    """What the faults cost, from the log: contributions made more than once, merge actor restarts."""
    return {"retried_contributions": sum((r.get("attempts") or 1) > 1 for r in accepted),
            "merge_actor_restarts": sum(r.get("event") == "restored" for r in log)}


def gate_counts(cfg: SimConfig, log: Sequence[dict], accepted: Sequence[dict]) -> dict:
    """The gate against the attacks, from the log: a malicious commit (``attack`` in its record, which the gate never
    reads) rejected by the gate is a true positive, an honest one rejected a false positive; rates over the
    malicious and the honest commits the gate saw, and its seconds per commit checked."""
    rejected = [r for r in log if r.get("event") == "rejected" and r.get("gate_failed")]
    seen = list(accepted) + rejected
    attacked = [r for r in seen if r.get("attack")]
    tp = sum(bool(r.get("attack")) for r in rejected)
    fp = len(rejected) - tp
    honest = len(seen) - len(attacked)
    gate_s = [r["gate_s"] for r in seen if isinstance(r.get("gate_s"), (int, float))]
    return {"checks": list(cfg.gate.checks), "attack": cfg.attacks.kind if cfg.attacks.any else "none",
            "malicious_commits": len(attacked), "honest_commits": honest, "rejected_by_gate": len(rejected),
            "true_positives": tp, "false_positives": fp,
            "tpr": tp / len(attacked) if attacked else math.nan, "fpr": fp / honest if honest else math.nan,
            "by_check": {c: sum(r.get("gate_failed") == c for r in rejected) for c in cfg.gate.checks},
            "gate_s_per_commit": finite_mean(gate_s) if gate_s else 0.0}
