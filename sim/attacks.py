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
  the set's labels (what a free-riding or careless institution might send);
* ``free_rider`` — trains nothing: it resubmits another institution's accepted adapter with Gaussian noise (Lin et
  al., "Free-riders in Federated Learning: Attacks and Defenses", arXiv 1911.12560, 2019; Fraboni et al.,
  "Free-rider Attacks on Model Aggregation in Federated Learning", AISTATS 2021, whose *disguised* free riders add
  noise to what they received so as not to send an exact copy). What it can see: main's log of accepted commits,
  public as a forge's history is (MedForge's contributors commit their modules to a shared repository). At its pull
  the merge actor answers ``MainState.pull_accepted`` instead of main's branch — one accepted commit of another
  institution *of its own task*, drawn from ``(seed, contribution id)`` (``copy_source``): the same task makes the
  copy look like its own work, and its linear head scores the right classes. It commits ``free_ride`` of that
  adapter — each LoRA factor F plus N(0, (``attacks.noise`` · RMS(F))²) entries, so ‖noise‖ ≈ noise · ‖F‖
  (default 0.01: forgesim's; neither paper gives a level relative to a LoRA factor, and 1 % keeps the copy's
  accuracy while no entry is the original's) — with a distilled set of its own training data, made honestly:
  training is what it saves, distilling its real images is cheap cover (``fit`` and ``regression`` score its own
  task, where the copied adapter does well). Before ``attacks.start``, or while no other institution has an accepted
  commit of its task, it contributes honestly (trained from the foundation). The gate's ``duplicate`` check
  (``gate.max_cosine``) catches it: its update's cosine to the copied commit's is about 1.

Everything is a pure function of the config, the seed and the contribution, so an attacked run is deterministic per
seed; ``contribute`` applies the attack and marks the commit's ``meta["attack"]`` with its kind — a record for the
measures (gate true/false positives), which the merge actor and the gate never read to decide.
"""
from __future__ import annotations

import dataclasses
from functools import lru_cache
from typing import Sequence

import numpy as np

from sim.config import AttacksConfig, SimConfig
from sim.data.base import DistilledSet, Split, derive_rng

TRAINING = ("label_flip", "backdoor")          # change what the adapter is trained on
UPDATE = ("scale", "sign_flip")                # change the trained update
DISTILLED = ("distill_mismatch",)              # change the distilled set sent with it
COPYING = ("free_rider",)                      # train nothing: commit a copy of an accepted adapter


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


def copy_source(commits: Sequence, institution: int, task: str, seed: int, contribution_id: str):
    """The adapter a free rider copies: one of the accepted ``commits`` (in acceptance order) of another institution
    on ``task``, drawn from ``(seed, "free_rider", contribution_id)``; ``None`` when there is none."""
    pool = [c for c in commits if c.institution != institution and c.task == task]
    if not pool:
        return None
    return pool[int(derive_rng(seed, "free_rider", contribution_id).integers(len(pool)))].adapter


def free_ride(adapter, noise: float, seed: int, contribution_id: str):
    """``adapter`` with Gaussian noise on each LoRA factor F: F + ε, ε_ij ~ N(0, (noise · RMS(F))²), drawn in key
    order from ``(seed, "free_rider_noise", contribution_id)``; alphas, base and head unchanged (a copy of them)."""
    import torch

    rng = derive_rng(seed, "free_rider_noise", contribution_id)
    weights = {}
    for key in sorted(adapter.weights):
        f = adapter.weights[key].detach().to(torch.float32)
        rms = float(f.pow(2).mean().sqrt()) if f.numel() else 0.0
        eps = torch.from_numpy(rng.standard_normal(tuple(f.shape), dtype=np.float32))
        weights[key] = (f + (noise * rms) * eps).contiguous()
    head = None if adapter.head is None else {k: v.clone() for k, v in adapter.head.items()}
    return dataclasses.replace(adapter, weights=weights, head=head, alpha_pattern=dict(adapter.alpha_pattern),
                               meta=dict(adapter.meta))


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
