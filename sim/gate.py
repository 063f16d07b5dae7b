"""Forge CI: the checks a commit must pass before it changes any branch (``gate:``), run by the merge actor.

An open-source project does not merge a pull request because its author holds a key; it runs CI. Each check
returns pass/fail with its measured value (``Check``); ``MainState.receive`` rejects a commit that fails one, with
the reason in the log, and main does not change. The checks (``gate.checks``):

* ``norm`` — the update's Frobenius norm ‖ΔW‖ (every module) against the accepted commits of its task: the robust
  z-score of log ‖ΔW‖, (x − median) / max(1.4826 · MAD, ``norm_spread``), must lie within ±``norm_z`` (Iglewicz &
  Hoaglin's modified z-score, 3.5 their cut-off). On the log scale a scaled update is a shift (× 10: +2.3); the
  spread floor keeps a few near-equal norms from making every other honest norm an outlier. A task with fewer than
  ``min_history`` accepted commits is judged against all accepted commits. At the cold start, with fewer than
  that in all, there is nothing to judge against: ``gate.cold_start: hold`` (the default) holds the arriving commits
  (``MainState``: logged ``held``, merged into nothing) until each can be judged against ``min_history`` others
  (accepted or held; ``held_norms``), then takes them on in arrival order; ``pass`` lets them through unjudged (an
  attacker among the first commits is then never checked). Catches a scaled update.
* ``cosine`` — cosine similarity of the flattened ΔW to the mean update of the task's accepted commits must be at
  least ``min_cosine`` (FoolsGold's and FLTrust's signal, Fung et al. 2020, Cao et al. NDSS 2021; here against the
  task's consensus rather than a server's own update). Catches a sign-flipped update. Judges from ``min_history``
  accepted commits of the task on.
* ``duplicate`` — the largest cosine similarity of the flattened ΔW to any accepted commit's (any institution,
  any task) must be at most ``max_cosine`` (default 0.99). ``cosine`` only flags *low* similarity; a free rider's
  resubmitted copy (``attacks.kind: free_rider``, 1 % noise on its factors) scores about 0.9999 against the commit
  it copied, where honest updates trained on different data stay well below 0.99 (Lin et al. 2019 detect free riders
  from statistics of their updates, STD-DAGMM; a near copy of an accepted update is the plainest such signal). Exact and cheap: ⟨ΔW, ΔW'⟩ =
  Σ_modules s s' Σ (BᵀB') ⊙ (A A'ᵀ) from the LoRA factors, so the gate keeps the accepted adapters (which main
  holds anyway), never a dense copy of each. With ``init_from: main`` honest commits share the pulled start, and
  a long run of small local steps could bring two of them near ``max_cosine``: raise it there.
* ``fit`` — the commit's adapter must fit the distilled set it sent: accuracy ≥ ``min_fit`` on it. A set not made
  from the adapter's data (``distill_mismatch``) or an adapter trained on other labels (``label_flip``) fails.
* ``regression`` — merged into a tentative copy of main's ``gate_branch`` (``SimConfig.gate_branch``), the commit
  must not lower the accuracy on the other tasks' distilled sets received so far by more than ``max_drop`` (the
  largest drop of a task, each task the mean over its sets), and must change its own task's accuracy (its sets
  received so far and its own) by at least ``min_gain``.

Pure over its inputs (no Ray): the gate keeps only what it needs of the accepted commits — their norms, per
task the sum of their flattened updates, and for ``duplicate`` their adapters (``accept``; a restarted merge actor replays it from the log). The values
go to the log as flat fields ``gate_<check>``; a failure also as ``gate_failed``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from sim.config import SimConfig
from sim.data.base import DistilledSet
from sim.metrics import accuracy, predict_proba
from sim.model import Adapter, Foundation

MAD_SCALE = 1.4826      # MAD × 1.4826 estimates σ for normal data (Iglewicz & Hoaglin 1993)


@dataclass(frozen=True)
class Check:
    """One check's outcome: ``value`` measured, ``passed``, and the reason when it failed (or could not judge)."""

    name: str
    passed: bool
    value: float
    reason: str | None = None


def update_vector(adapter: Adapter) -> torch.Tensor:
    """The update ΔW of every module, flattened in module order (float32)."""
    return torch.cat([adapter.delta(m).float().reshape(-1) for m in adapter.modules()])


def factored_inner(x: Adapter, y: Adapter) -> float:
    """⟨ΔW_x, ΔW_y⟩ summed over the modules both adapt, from the factors (float64): per module
    s_x s_y Σ (B_xᵀ B_y) ⊙ (A_x A_yᵀ) = tr((s_x B_x A_x)ᵀ s_y B_y A_y), without forming ΔW."""
    total = 0.0
    others = set(y.modules())
    for m in x.modules():
        if m not in others:
            continue
        (ax, bx), (ay, by) = ((t.double() for t in a.factors(m)) for a in (x, y))
        total += x.scaling(m) * y.scaling(m) * float(((bx.T @ by) * (ax @ ay.T)).sum())
    return total


def update_cosine(x: Adapter, y: Adapter) -> float:
    """Cosine similarity of two adapters' flattened updates (``factored_inner``); 0 when either update is 0."""
    denom = math.sqrt(max(factored_inner(x, x), 0.0) * max(factored_inner(y, y), 0.0))
    return factored_inner(x, y) / denom if denom > 0 else 0.0


def robust_z(x: float, history: Sequence[float], floor: float = 0.0) -> float:
    """(x − median) / max(1.4826 · MAD, ``floor``) of ``history``; ±inf for a value off a history whose spread is 0,
    0 on it."""
    h = np.asarray(history, dtype=np.float64)
    med = float(np.median(h))
    spread = max(MAD_SCALE * float(np.median(np.abs(h - med))), floor)
    if spread == 0.0:
        return 0.0 if x == med else math.copysign(math.inf, x - med)
    return (x - med) / spread


def set_accuracy(foundation: Foundation, predictor, sets: Sequence[DistilledSet]) -> float:
    """Mean over ``sets`` of the predictor's accuracy on each (each on its own task's classes)."""
    return float(np.mean([accuracy(ds.y, predict_proba(foundation, predictor, ds.x, ds.task, ds.classes))
                          for ds in sets]))


@dataclass
class Gate:
    """The configured checks and what they remember of the accepted commits."""

    cfg: SimConfig
    foundation: Foundation
    norms: list[float] = field(default_factory=list)
    norm_tasks: list[str] = field(default_factory=list)
    task_sums: dict[str, torch.Tensor] = field(default_factory=dict)
    task_counts: dict[str, int] = field(default_factory=dict)
    accepted: list[tuple[str, int, Adapter]] = field(default_factory=list)   # (id, institution, adapter), duplicate
    _last: tuple | None = field(default=None, repr=False)      # (commit, its update vector), see ``_vector``

    @property
    def checks(self) -> tuple[str, ...]:
        return self.cfg.gate.checks

    # -- the checks that need no merge ------------------------------------------------------
    def precheck(self, commit, held_norm: Check | None = None) -> list[Check]:
        """``norm``, ``cosine``, ``duplicate`` and ``fit`` of ``commit`` (those configured), in that order;
        ``held_norm``: its norm check when already judged (a commit held at the cold start, ``held_norms``)."""
        g, out = self.cfg.gate, []
        vector = self._vector(commit)
        if "norm" in self.checks and held_norm is not None:
            out.append(held_norm)
        elif "norm" in self.checks:
            norm = float(vector.norm())
            own = [n for n, t in zip(self.norms, self.norm_tasks) if t == commit.task]
            history, scope = (own, f"task {commit.task}'s") if len(own) >= g.min_history else (self.norms, "all")
            if len(history) < g.min_history:
                out.append(Check("norm", True, math.nan, f"{len(self.norms)} accepted norms, fewer than "
                                                         f"gate.min_history {g.min_history}"))
            else:
                out.append(self._norm_check(norm, history, f"{scope} accepted commits"))
        if "cosine" in self.checks:
            n = self.task_counts.get(commit.task, 0)
            if n < g.min_history:
                out.append(Check("cosine", True, math.nan, f"{n} accepted commits of task {commit.task}, fewer "
                                                           f"than gate.min_history {g.min_history}"))
            else:
                mean = self.task_sums[commit.task] / n
                cos = float(torch.nn.functional.cosine_similarity(vector, mean, dim=0))
                ok = cos >= g.min_cosine
                out.append(Check("cosine", ok, cos, None if ok else
                                 f"cosine {cos:.3f} to the mean update of task {commit.task}'s {n} accepted commits "
                                 f"is below gate.min_cosine {g.min_cosine:g}"))
        if "duplicate" in self.checks:
            out.append(self.duplicate(commit))
        if "fit" in self.checks:
            acc = set_accuracy(self.foundation, commit.adapter, [commit.distilled])
            ok = acc >= g.min_fit
            out.append(Check("fit", ok, acc, None if ok else f"the adapter scores {acc:.3f} on its own distilled "
                                                             f"set, below gate.min_fit {g.min_fit:g}"))
        return out

    def _norm_check(self, norm: float, history: Sequence[float], scope: str) -> Check:
        """The robust z of log ``norm`` against the log of the norms ``history`` (``scope`` names them)."""
        g = self.cfg.gate
        z = robust_z(math.log(max(norm, 1e-30)), [math.log(max(n, 1e-30)) for n in history], g.norm_spread)
        ok = abs(z) <= g.norm_z
        return Check("norm", ok, z, None if ok else f"update norm {norm:.4g} has robust z {z:.2f} (log scale, "
                                                    f"against {scope}), beyond ±gate.norm_z {g.norm_z:g}")

    # -- the cold start ----------------------------------------------------------------------
    def holds(self) -> bool:
        """Whether an arriving commit is held (``gate.cold_start: hold``): ``norm`` is checked and fewer than
        ``gate.min_history`` commits are accepted, so there is no history to judge its norm against yet."""
        g = self.cfg.gate
        return "norm" in self.checks and g.cold_start == "hold" and len(self.norms) < g.min_history

    def quorum(self, held: int) -> bool:
        """Whether ``held`` commits can be judged: each against ``gate.min_history`` others (accepted or held), as
        a commit after the cold start is judged against ``min_history`` accepted ones."""
        return len(self.norms) + held >= self.cfg.gate.min_history + 1

    def held_norms(self, commits: Sequence) -> list[Check]:
        """The ``norm`` checks of the held ``commits``, judged together once there is a ``quorum``: each one's robust
        z against the log norms of every accepted commit and every *other* held one (leave one out: a scaled update
        inside its own sample would widen the MAD it is divided by; among three, × 10 against two honest norms 2×
        apart scores z 2.0 with itself in the sample and 4.8 without). Fewer than ``min_history`` others (a run that
        ends holding them): they pass unjudged, as with ``cold_start: pass``. A majority of attackers among the
        first commits is not caught."""
        g = self.cfg.gate
        norms = [float(update_vector(c.adapter).norm()) for c in commits]
        if not self.quorum(len(commits)):
            return [Check("norm", True, math.nan, f"the run ended with {len(self.norms) + len(norms)} commits held "
                                                  f"or accepted, too few for gate.min_history {g.min_history} "
                                                  f"others each: not judged") for _ in commits]
        out = []
        for i, n in enumerate(norms):
            others = self.norms + norms[:i] + norms[i + 1:]
            out.append(self._norm_check(n, others, f"the {len(others)} other commits held or accepted at the cold "
                                                   f"start"))
        return out

    def duplicate(self, commit) -> Check:
        """The largest cosine of ``commit``'s update to an accepted commit's must be at most ``gate.max_cosine``;
        ``value``: that cosine (NaN, passing, before any commit is accepted)."""
        g = self.cfg.gate
        if not self.accepted:
            return Check("duplicate", True, math.nan, "no accepted commit to compare with")
        cosines = [update_cosine(commit.adapter, a) for _, _, a in self.accepted]
        k = int(np.argmax(cosines))
        cos, (cid, inst, _) = cosines[k], self.accepted[k]
        ok = cos <= g.max_cosine
        return Check("duplicate", ok, cos, None if ok else
                     f"cosine {cos:.4f} to accepted commit {cid} (institution {inst}) is above gate.max_cosine "
                     f"{g.max_cosine:g}: a near copy of it")

    # -- the check on a tentative merge ------------------------------------------------------
    def regression(self, commit, before, after, received: Sequence[DistilledSet]) -> Check:
        """Main's ``gate_branch`` ``before`` and ``after`` merging ``commit`` on the distilled sets ``received`` so
        far (the latest of each institution) plus the commit's own: the largest drop on another task, and the
        change on its own task. ``value``: that largest drop."""
        g = self.cfg.gate
        by_task: dict[str, list[DistilledSet]] = {}
        for ds in list(received) + [commit.distilled]:
            by_task.setdefault(ds.task, []).append(ds)
        drops = {t: set_accuracy(self.foundation, before, sets) - set_accuracy(self.foundation, after, sets)
                 for t, sets in by_task.items() if t != commit.task}
        own = by_task[commit.task]
        gain = set_accuracy(self.foundation, after, own) - set_accuracy(self.foundation, before, own)
        worst = max(drops, key=drops.get) if drops else None
        drop = drops[worst] if worst else 0.0
        if drop > g.max_drop:
            return Check("regression", False, drop, f"merged into {self.cfg.gate_branch} it lowers task {worst}'s "
                                                    f"distilled sets by {drop:.3f}, more than gate.max_drop "
                                                    f"{g.max_drop:g}")
        if gain < g.min_gain:
            return Check("regression", False, drop, f"merged into {self.cfg.gate_branch} it changes its own task "
                                                    f"{commit.task}'s distilled sets by {gain:+.3f}, less than "
                                                    f"gate.min_gain {g.min_gain:g}")
        return Check("regression", True, drop)

    # -- memory ------------------------------------------------------------------------------
    def _vector(self, commit) -> torch.Tensor | None:
        """The commit's flattened update when norm or cosine is checked (else ``None``), formed once: ``precheck``
        and then ``accept`` of the same commit read the same vector."""
        if not {"norm", "cosine"} & set(self.checks):
            return None
        if self._last is None or self._last[0] is not commit:
            self._last = (commit, update_vector(commit.adapter))
        return self._last[1]

    def accept(self, commit) -> None:
        """Remember an accepted commit (its norm and its task's update sum; for ``duplicate``, its adapter)."""
        if "duplicate" in self.checks:
            self.accepted.append((commit.id, commit.institution, commit.adapter))
        vector = self._vector(commit)
        if vector is None:
            return
        self.norms.append(float(vector.norm()))
        self.norm_tasks.append(commit.task)
        if commit.task in self.task_sums and self.task_sums[commit.task].shape == vector.shape:
            self.task_sums[commit.task] += vector
        else:
            self.task_sums[commit.task] = vector.clone()
        self.task_counts[commit.task] = self.task_counts.get(commit.task, 0) + 1


def log_fields(checks: Sequence[Check]) -> dict:
    """The log's flat fields of ``checks``: ``gate_<name>`` = value, and ``gate_failed`` = the first failed one."""
    out = {f"gate_{c.name}": c.value for c in checks}
    failed = next((c for c in checks if not c.passed), None)
    return out | ({"gate_failed": failed.name} if failed else {})


def failure(checks: Sequence[Check]) -> str | None:
    """The rejection reason of the first failed check (``None`` when all passed)."""
    failed = next((c for c in checks if not c.passed), None)
    return None if failed is None else f"gate {failed.name}: {failed.reason}"
