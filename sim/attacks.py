"""Malicious institutions (``attacks:``): registered, signed like everyone, and committing updates meant to hurt main.

Who attacks is drawn from the seed: ``round(attacks.share × N)`` institutions (``malicious``), each attacking every
contribution from merge position ``attacks.start`` on (its position in the schedule's merge order: the accepted
commits before it in a fault-free run). The kinds (``attacks.kind``):

* ``scale`` — the update ΔW multiplied by ``attacks.scale`` (the model-replacement boost of Bagdasaryan et al.,
  "How To Backdoor Federated Learning", AISTATS 2020): B ← k B;
* ``sign_flip`` — the update negated (Blanchard et al., "Machine Learning with Adversaries: Byzantine Tolerant
  Gradient Descent", NeurIPS 2017; Fang et al., USENIX Security 2020, use it as the untargeted baseline): B ← −B;
* ``label_flip`` — trained on permuted labels, class c → c + 1 mod K (Tolpegin et al., "Data Poisoning Attacks
  Against Federated Learning Systems", ESORICS 2020); the distilled set is made from the true labels, as an
  attacker who distils honestly would;
* ``backdoor`` — BadNets (Gu et al., 2017): a ``trigger_size``² white square in the bottom-right corner of
  ``poison_rate`` of the training images, whose labels become ``target_class`` (``stamp`` makes triggered test
  images for the attack success rate);
* ``distill_mismatch`` — the commit's distilled set is not made from the adapter's data: uniform noise images with
  the set's labels (what a free-riding or careless institution might send).

Everything is a pure function of the config, the seed and the contribution, so an attacked run is deterministic per
seed; ``contribute`` applies the attack and marks the commit's ``meta["attack"]`` with its kind — a record for the
measures (gate true/false positives), which the merge actor and the gate never read to decide.
"""
from __future__ import annotations

import dataclasses
from functools import lru_cache

import numpy as np

from sim.config import AttacksConfig, SimConfig
from sim.data.base import DistilledSet, Split, derive_rng

TRAINING = ("label_flip", "backdoor")          # change what the adapter is trained on
UPDATE = ("scale", "sign_flip")                # change the trained update
DISTILLED = ("distill_mismatch",)              # change the distilled set sent with it


def malicious(attacks: AttacksConfig, n_institutions: int, seed: int) -> frozenset[int]:
    """The malicious institutions: ``round(share × N)`` of ``0 .. N-1``, drawn from ``(seed, "attacks")``."""
    if not attacks.any:
        return frozenset()
    k = int(round(attacks.share * n_institutions))
    return frozenset(int(i) for i in derive_rng(seed, "attacks").choice(n_institutions, k, replace=False))


@lru_cache(maxsize=8)
def _positions(schedule_cfg, n_institutions: int, seed: int) -> dict[str, int]:
    from sim.schedule import build_schedule

    return {c.id: k for k, c in enumerate(build_schedule(schedule_cfg, n_institutions, seed).contributions)}


def attack_of(cfg: SimConfig, contribution) -> str | None:
    """The attack ``contribution`` carries (its kind), or ``None`` for an honest one."""
    if contribution.institution not in malicious(cfg.attacks, cfg.data.institutions, cfg.seed):
        return None
    position = _positions(cfg.schedule, cfg.data.institutions, cfg.seed).get(contribution.id, 0)
    return cfg.attacks.kind if position >= cfg.attacks.start else None


def _check_target(attacks: AttacksConfig, n_classes: int) -> None:
    if attacks.target_class >= n_classes:
        raise ValueError(f"attacks.target_class must be < the {n_classes} classes of the task, got "
                         f"{attacks.target_class}")


def stamp(x: np.ndarray, size: int) -> np.ndarray:
    """Images ``x`` (n, 3, S, S) with the trigger: a ``size`` × ``size`` square at full intensity in the bottom-right
    corner (255 for uint8 images, 1 for float)."""
    out = x.copy()
    out[:, :, -size:, -size:] = 255 if out.dtype == np.uint8 else 1.0
    return out


def poisoned_training(train: Split, n_classes: int, kind: str, attacks: AttacksConfig, seed: int,
                      contribution_id: str) -> Split:
    """The training split an attacker of ``kind`` trains on (``TRAINING`` kinds): labels permuted, or a seeded
    ``poison_rate`` of the images stamped and relabelled ``target_class``."""
    if kind == "label_flip":
        return Split(train.x, (train.y + 1) % n_classes)
    if kind == "backdoor":
        _check_target(attacks, n_classes)
        n = len(train.y)
        pick = derive_rng(seed, "backdoor", contribution_id).choice(n, max(1, int(round(attacks.poison_rate * n))),
                                                                   replace=False)
        x, y = train.x.copy(), train.y.copy()
        x[pick] = stamp(train.x[pick], attacks.trigger_size)
        y[pick] = attacks.target_class
        return Split(x, y)
    raise ValueError(f"{kind} is not a training-time attack ({', '.join(TRAINING)})")


def attacked_update(adapter, kind: str, attacks: AttacksConfig):
    """The adapter an attacker of an ``UPDATE`` kind commits: ΔW = s B A scaled by ``attacks.scale`` or negated,
    through B (A, the alphas and the head unchanged)."""
    factor = {"scale": attacks.scale, "sign_flip": -1.0}[kind]
    weights = {k: (v * factor if ".lora_B." in k else v) for k, v in adapter.weights.items()}
    return dataclasses.replace(adapter, weights=weights, meta=dict(adapter.meta))


def mismatched_set(distilled: DistilledSet, seed: int, contribution_id: str) -> DistilledSet:
    """A distilled set not made from the adapter's data: uniform noise images in [0, 1] with the set's labels."""
    rng = derive_rng(seed, "distill_mismatch", contribution_id)
    x = rng.random(distilled.x.shape, dtype=np.float32)
    return dataclasses.replace(distilled, x=x, meta=dict(distilled.meta) | {"attack": "distill_mismatch"})


def attack_success(foundation, predictor, split: Split, task: str, classes, attacks: AttacksConfig) -> float:
    """Backdoor attack success rate of ``predictor`` on ``task``: the share of the test images whose class is not
    ``target_class``, stamped with the trigger, that it sends to ``target_class`` (Gu et al.'s BadNets measure)."""
    from sim.metrics import predict_proba

    _check_target(attacks, len(classes))
    others = split.y != attacks.target_class
    if not others.any():
        return float("nan")
    proba = predict_proba(foundation, predictor, stamp(split.x[others], attacks.trigger_size), task, classes)
    return float((proba.argmax(axis=1) == attacks.target_class).mean())
