"""One contribution of one institution: pull → local training → distillation → a ``Commit``.

This is the torch work an institution hands to a pooled worker (``actors.tasks``); it is plain Python and is
tested without Ray. The institution's private splits go in; only the adapter, the distilled set and a few local
numbers come out (``Commit``), which is all the merge actor ever sees.
"""
from __future__ import annotations

import math
import time

import torch

from sim.config import LoraConfig, SimConfig
from sim.data import Institution
from sim.distill import distill
from sim.metrics import evaluate
from sim.model import PEFT_PREFIX, Adapter, Foundation, target_module_names
from sim.schedule import Contribution
from sim.commit import Commit
from sim.train import train_adapter


def project_adapter(adapter: Adapter, foundation: Foundation, lora: LoraConfig) -> Adapter:
    """``adapter`` as a LoRA of the configured rank, modules and alpha — the start of a contribution that pulls main.

    A pulled branch may have another rank (svd, ΔW-space merges are dense). Per module, the best rank-r
    approximation of its ΔW (truncated SVD) is split evenly between the factors, with the configured scaling
    s = alpha / r: ``B = U_r √S_r / √s``, ``A = √S_r V_rᵀ / √s``, so ``s B A`` is that approximation. A branch that
    already has the configured form (fusion, lora_avg) is returned unchanged. Modules the branch does not adapt
    start fresh at zero (B = 0).
    """
    modules = target_module_names(lora, foundation.block_count())
    if (adapter.modules() == modules and all(adapter.rank(m) == lora.rank for m in modules)
            and all(abs(adapter.scaling(m) - lora.alpha / lora.rank) < 1e-9 for m in modules)):
        return adapter
    s, weights = lora.alpha / lora.rank, {}
    for m in modules:
        out_f, in_f = foundation.weight(m).shape
        if m in adapter.modules():
            u, sv, vh = torch.linalg.svd(adapter.delta(m).float(), full_matrices=False)   # (out, q), (q,), (q, in)
            k = min(lora.rank, sv.shape[0])
            root = (sv[:k] / s).sqrt()
            a = torch.zeros(lora.rank, in_f)
            b = torch.zeros(out_f, lora.rank)
            a[:k], b[:, :k] = root[:, None] * vh[:k], u[:, :k] * root
        else:
            a, b = torch.zeros(lora.rank, in_f), torch.zeros(out_f, lora.rank)
        weights[f"{PEFT_PREFIX}{m}.lora_A.weight"] = a
        weights[f"{PEFT_PREFIX}{m}.lora_B.weight"] = b
    # the head (and the task/head_counts meta that picks it) travels with the projected update
    meta = {k: adapter.meta[k] for k in ("task", "head_counts") if k in adapter.meta}
    return Adapter(weights, float(lora.alpha), foundation.fingerprint, head=adapter.head, meta=meta)


def contribute(foundation: Foundation, inst: Institution, cfg: SimConfig, contribution: Contribution,
               pulled: Adapter | None = None, pulled_version: int = 0) -> Commit:
    """Train an adapter on ``inst``'s private training split and distil it, as scheduled by ``contribution``.

    Args:
        foundation: the frozen backbone (cached per worker process).
        inst: the institution's private data.
        cfg: the run's config (lora, train, distill, model.head).
        contribution: its id, seed and virtual times.
        pulled: the main branch adapter pulled at ``t_pull`` (``schedule.init_from: main``); ``None`` = the foundation.
            For a free rider (``attacks.kind: free_rider``) it is instead the accepted adapter it copies
            (``MainState.pull_accepted``); ``None``: nothing to copy, so it contributes honestly from the foundation.
        pulled_version: the main version ``pulled`` is (or was pulled at), recorded so the merge actor can compute
            staleness.
    Returns:
        The ``Commit``: adapter, distilled set and local numbers (val accuracy, times, losses).
    """
    if contribution.institution != inst.id:
        raise ValueError(f"contribution {contribution.id} belongs to institution {contribution.institution}, "
                         f"not {inst.id}")
    from sim import attacks

    t0 = time.perf_counter()
    attack = attacks.attack_of(cfg, contribution)      # a malicious institution's contribution (``attacks:``)
    if attack in attacks.COPYING and pulled is None:
        attack = None                                   # a free rider with nothing to copy yet contributes honestly
    # Step 1: local training from the foundation or from the pulled main branch (a free rider copies instead).
    if attack in attacks.COPYING:
        adapter = attacks.free_ride(pulled, cfg.attacks.noise, cfg.seed, contribution.id)
        stats = {"train_s": 0.0, "loss_first": math.nan, "loss_last": math.nan}
    else:
        init = project_adapter(pulled, foundation, cfg.lora) if pulled is not None else None
        train = (attacks.poisoned_training(inst.train, len(inst.classes), attack, cfg.attacks, cfg.seed,
                                           contribution.id) if attack in attacks.TRAINING else inst.train)
        result = train_adapter(foundation, train, inst.task, inst.classes, cfg.lora, cfg.train, contribution.seed,
                               init=init, head=cfg.model.head)
        adapter, stats = result.adapter, result.stats
    # Step 2: the institution checks its adapter on its own validation split.
    local = evaluate(foundation, adapter, inst.val, inst.task, inst.classes)
    # Step 3: distil the private training split: what is sent instead of images.
    distilled = distill(inst.train, inst.task, inst.classes, cfg.distill, contribution.seed, foundation)
    audit = {}
    if cfg.distill.audit:             # fidelity reuses the adapter just trained on the real data (a copy is not)
        from sim.distill.audit import audit_fields, audit_institution

        real = None if attack in attacks.COPYING else adapter
        report = audit_institution(foundation, inst, distilled, cfg, contribution.seed, real_adapter=real)
        audit = audit_fields(report)
    if attack in attacks.UPDATE:
        adapter = attacks.attacked_update(adapter, attack, cfg.attacks)
    if attack in attacks.DISTILLED:
        distilled = attacks.mismatched_set(distilled, cfg.seed, contribution.id)
    meta = audit | {"train_s": stats["train_s"], "train_loss_first": stats["loss_first"],
            "train_loss_last": stats["loss_last"], "distill_s": distilled.meta["distill_s"],
            "val_acc": local["acc"], "val_auc": local["auc"], "busy_s": time.perf_counter() - t0,
            "straggler": contribution.straggler, "seed": contribution.seed} | ({"attack": attack} if attack else {})
    return Commit(contribution.id, inst.id, inst.task, tuple(inst.classes), adapter, distilled,
                  pulled_version, contribution.t_pull, contribution.t_commit, meta)
