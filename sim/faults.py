"""Fault injection (``faults:`` in the config): which contributions meet which fault, and corrupted commits.

Pure and seeded: every draw comes from ``derive_rng(seed, "faults", <fault>, <contribution id>)``, so a config and
seed give the same faults in every run, on any number of workers or nodes, and a fault of one contribution does not
move the draws of another. The runtime (``actors/``) applies the plan:

* ``kill_institutions``: the driver kills the institution actor ``faults.kill_delay`` seconds after handing it the
  contribution; Ray restarts it, and the merge actor, finding the commit lost with its owner, has the contribution
  made again (same seed ⇒ the identical commit). Work is delayed, nothing else changes.
* ``kill_merge_actor_after``: the merge actor exits right after logging its n-th accepted commit, before the
  acknowledgement; Ray restarts it, it restores from the log, and the retried call is answered as a duplicate.
* ``slow``: the contribution's training task sleeps ``faults.slow_s`` seconds first.
* ``corrupt``: after its genuine commit, the institution also sends a corrupted copy (``corrupt_commit``); the merge
  actor must reject it with the reason of its kind and change nothing.

So every fault only delays work (the corrupted copies are rejected extras): with the virtual clock a faulty run ends
with the main branches and metrics of the fault-free run of the same seed.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

from sim.config import CORRUPT_KINDS, FaultsConfig
from sim.data.base import derive_rng

__all__ = ["CORRUPT_KINDS", "FaultPlan", "plan_faults", "killed", "corrupt_kind", "slow_seconds", "corrupt_commit",
           "expected_reason", "UNKNOWN_INSTITUTION"]

UNKNOWN_INSTITUTION = 1_000_000      # the institution id an ``unknown_institution`` corruption claims


def killed(faults: FaultsConfig, seed: int, contribution_id: str) -> bool:
    """Whether the institution is killed during this contribution."""
    return faults.kill_institutions > 0 and derive_rng(seed, "faults", "kill", contribution_id).random() < \
        faults.kill_institutions


def corrupt_kind(faults: FaultsConfig, seed: int, contribution_id: str) -> str | None:
    """The kind of the corrupted copy this contribution also sends, or ``None``."""
    if faults.corrupt <= 0:
        return None
    rng = derive_rng(seed, "faults", "corrupt", contribution_id)
    if rng.random() >= faults.corrupt:
        return None
    return faults.corrupt_kinds[int(rng.integers(len(faults.corrupt_kinds)))]


def slow_seconds(faults: FaultsConfig, seed: int, contribution_id: str) -> float:
    """Seconds this contribution's training task sleeps before working (0 if it is not slowed)."""
    if faults.slow <= 0 or derive_rng(seed, "faults", "slow", contribution_id).random() >= faults.slow:
        return 0.0
    return float(faults.slow_s)


@dataclass(frozen=True)
class FaultPlan:
    """The faults of one run, by contribution id."""

    killed: tuple[str, ...]              # contributions during which their institution is killed
    corrupt: dict[str, str]              # contribution id -> kind of its corrupted copy
    slow: dict[str, float]               # contribution id -> seconds its task sleeps
    kill_merge_actor_after: tuple[int, ...]

    def record(self) -> dict:
        return {"institutions_killed": len(self.killed), "corrupted_commits": len(self.corrupt),
                "slowed_tasks": len(self.slow), "merge_actor_kills": len(self.kill_merge_actor_after)}


def plan_faults(faults: FaultsConfig, seed: int, contribution_ids: Sequence[str]) -> FaultPlan:
    """Every fault of a run whose contributions have ids ``contribution_ids``."""
    kinds = {cid: corrupt_kind(faults, seed, cid) for cid in contribution_ids}
    slow = {cid: slow_seconds(faults, seed, cid) for cid in contribution_ids}
    return FaultPlan(tuple(cid for cid in contribution_ids if killed(faults, seed, cid)),
                     {cid: k for cid, k in kinds.items() if k}, {cid: s for cid, s in slow.items() if s > 0},
                     tuple(sorted(faults.kill_merge_actor_after)))


# Words the merge actor's rejection reason contains for each kind (tests and the fault report use them).
_REASONS = {"nan": "nan", "inf": "inf", "shape": "shape", "fingerprint": "fingerprint",
            "replay": "duplicate commit id", "unknown_institution": "unknown institution", "unsigned": "signature"}


def expected_reason(kind: str) -> str:
    """A phrase the rejection reason of a ``kind`` corruption contains (lower case)."""
    return _REASONS[kind]


def corrupt_commit(commit, kind: str, key: bytes | None):
    """A corrupted copy of ``commit`` (a ``sim.commit.Commit``), signed with the institution's ``key`` like a genuine
    one except for ``unsigned`` — so the merge actor must catch the corruption itself, not the signature.

    Kinds: ``nan``/``inf`` (one adapter tensor poisoned), ``shape`` (lora_A loses a column), ``fingerprint`` (another
    base model), ``replay`` (the commit's id again with other content), ``unknown_institution`` (an id outside the
    cohort), ``unsigned`` (a forged signature).
    """
    import torch

    from sim.commit import sign_commit

    if kind not in CORRUPT_KINDS:
        raise ValueError(f"unknown corruption kind {kind!r}; known: {', '.join(CORRUPT_KINDS)}")
    adapter = commit.adapter
    weights = dict(adapter.weights)
    first = sorted(weights)[0]
    if kind == "nan":
        weights[first] = weights[first] * torch.nan
    elif kind == "inf":
        weights[first] = weights[first].clone()
        weights[first].view(-1)[0] = torch.inf
    elif kind == "shape":
        a_key = next(k for k in sorted(weights) if k.endswith("lora_A.weight"))
        weights[a_key] = weights[a_key][:, :-1].clone()      # (r, in) -> (r, in - 1)
    elif kind == "replay":
        weights[first] = weights[first] + 1e-3                # same id, other content
    bad = dataclasses.replace(commit, adapter=dataclasses.replace(adapter, weights=weights),
                              meta=dict(commit.meta) | {"injected": kind})
    if kind == "fingerprint":
        bad = dataclasses.replace(bad, adapter=dataclasses.replace(bad.adapter, base_fingerprint="f" * 16))
    elif kind == "unknown_institution":
        bad = dataclasses.replace(bad, institution=UNKNOWN_INSTITUTION)
    if kind == "unsigned":
        return dataclasses.replace(bad, meta=bad.meta | {"signature": "0" * 64})
    return sign_commit(bad, key) if key is not None else bad
