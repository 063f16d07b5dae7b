"""Fidelity and privacy audit of one institution's distilled set.

**Fidelity** (is the set worth sending?): accuracy on the institution's real test split of an adapter trained
only on the distilled set, divided by the accuracy of one trained on its real training split, with the same
LoRA/train config and seed. ``gain_recovered`` also reports (acc_distilled − acc_base) / (acc_real − acc_base),
the share of the adapter's gain over the bare foundation that the distilled set keeps.

**Merged fidelity** (``merged_fidelity``): the merged accuracy on each institution's test split when the merge
coefficients are searched on the union of the distilled sets, divided by the same when they are searched on the
union of the institutions' real validation splits (same strategy, search config and seed).

**Privacy** (does the set leak patients?), two checks:

* **memorisation** (nearest neighbours, pixel space): distances invariant to a horizontal flip, as RMS pixel
  differences in [0, 1] units, in two views: full resolution and 4x4 average-pooled (a low-pass view, so that
  high-frequency noise added to a real image by the optimisation does not hide it). For each distilled image,
  ``d_train`` = distance to the nearest real *training* image (members) and ``d_hold`` = distance to the nearest
  *held-out* real image of the same institution (val + test: never distilled); ``ref`` = median distance from a
  held-out image to its nearest training image (how close two different patients' images naturally are). An
  image is **memorised** when, in either view, ``d_train < audit_near · ref`` (a near-copy) **and**
  ``d_train / d_hold < audit_ratio`` (specific to the training set, not a generic typical image).
* **membership inference** (``sim.distill.mia``, Carlini et al. 2022): the target is an adapter trained only on
  the distilled set (the one fidelity scores); every real record is scored by LiRA against ``audit_shadows``
  shadow adapters (0: the global-threshold loss attack). Members (a random subset of the training split, as many
  as there are non-members) vs non-members (the held-out split, same institution and distribution): TPR at 1 %
  and 0.1 % FPR with 95 % Clopper–Pearson intervals and AUC, for all members and for the **exposed** members (the
  training image nearest to each distilled image, in the closer of the two views: for a set of copies, its
  sources).
* ``flagged`` when ``memorised_fraction > audit_max_memorised`` (default 0: any near-copy of a patient image is a
  leak) or the TPR at 1 % FPR of all or of the exposed members exceeds ``audit_max_tpr`` (default 0.1: ten times
  the FPR).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from sim.config import DistillConfig, LoraConfig, TrainConfig
from sim.data.base import DistilledSet, Split, derive_seed, to_unit_float

__all__ = ["nearest_distances", "nearest_indices", "privacy_audit", "membership_audit", "audit_verdict", "fidelity",
           "audit_institution", "audit_fields", "point_text", "merged_fidelity", "real_proxy"]


def _nearest(queries: torch.Tensor, refs: torch.Tensor, flip: bool, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(distance, index) of each query's nearest reference; see ``nearest_distances``."""
    if len(refs) == 0 or len(queries) == 0:
        return torch.full((len(queries),), math.inf), torch.full((len(queries),), -1, dtype=torch.long)
    dim = queries[0].numel()
    r = refs.reshape(len(refs), -1).double()                                  # (m, D)
    dist, idx = [], []
    for i in range(0, len(queries), chunk):
        q = queries[i:i + chunk]
        views = [q, q.flip(-1)] if flip else [q]
        d = torch.stack([torch.cdist(v.reshape(len(v), -1).double(), r) for v in views]).amin(0)   # (n, m)
        best = d.min(1)
        dist.append(best.values / math.sqrt(dim))
        idx.append(best.indices)
    return torch.cat(dist).float(), torch.cat(idx)


def nearest_distances(queries: torch.Tensor, refs: torch.Tensor, flip: bool = True,
                      chunk: int = 1024) -> torch.Tensor:
    """For each query image (n, 3, S, S), the RMS pixel distance to its nearest image in ``refs`` (m, 3, S, S).

    With ``flip``, a query also matches a mirrored reference (min over both). ``inf`` when ``refs`` is empty.
    """
    return _nearest(queries, refs, flip, chunk)[0]


def nearest_indices(queries: torch.Tensor, refs: torch.Tensor, flip: bool = True, chunk: int = 1024) -> torch.Tensor:
    """For each query image, the index in ``refs`` of its nearest image (as ``nearest_distances``; −1 if empty)."""
    return _nearest(queries, refs, flip, chunk)[1]


# Pooling factors of the views the privacy audit compares images in: full resolution, and a low-pass view in which
# high-frequency perturbations of a real image (optimisation noise on a real init) no longer hide it.
AUDIT_POOLS = (1, 4)


def _view(x: torch.Tensor, pool: int) -> torch.Tensor:
    return x if pool == 1 else torch.nn.functional.avg_pool2d(x, pool)


def _scale_report(d: torch.Tensor, tr: torch.Tensor, ho: torch.Tensor, cfg: DistillConfig) -> dict:
    """Distances, natural spacing and the memorisation flags of one view (see module doc)."""
    (d_train, nearest), d_hold = _nearest(d, tr, True, 1024), nearest_distances(d, ho)
    ref = float(nearest_distances(ho, tr).median())
    ratio = d_train / d_hold.clamp_min(1e-12)
    memorised = (d_train < cfg.audit_near * ref) & (ratio < cfg.audit_ratio)
    return {"d_train": d_train, "nearest": nearest, "d_hold": d_hold, "ref": max(ref, 1e-12), "ratio": ratio,
            "memorised": memorised}


def privacy_audit(distilled: DistilledSet, train: Split, holdout: Split, cfg: DistillConfig) -> dict:
    """Nearest-neighbour memorisation check, and the exposed members (see module doc)."""
    if len(holdout) == 0:
        raise ValueError("privacy audit needs held-out real images (the institution's val/test splits)")
    d = torch.from_numpy(distilled.x).float()
    tr, ho = to_unit_float(train.x), to_unit_float(holdout.x)
    pools = [p for p in AUDIT_POOLS if d.shape[-1] // p >= 2]
    # Step 1: per view, how close distilled images come to members and to non-members, against the natural spacing.
    views = {p: _scale_report(_view(d, p), _view(tr, p), _view(ho, p), cfg) for p in pools}
    memorised = torch.stack([v["memorised"] for v in views.values()]).any(0)     # a near-copy in any view
    # Step 2: each distilled image's nearest member in the view where it comes closest (in spacing units).
    rel = torch.stack([v["d_train"] / v["ref"] for v in views.values()])          # (views, n_distilled)
    nearest = torch.stack([v["nearest"] for v in views.values()]).gather(0, rel.argmin(0, keepdim=True))[0]
    full = views[1]
    return {
        "memorised_fraction": float(memorised.float().mean()) if len(d) else 0.0, "memorised": int(memorised.sum()),
        "reference_nn_distance": full["ref"],
        "d_train_median": _median(full["d_train"]), "d_holdout_median": _median(full["d_hold"]),
        "ratio_median": _median(full["ratio"]),
        "views": {f"pool{p}": {"reference_nn_distance": v["ref"], "d_train_median": _median(v["d_train"]),
                               "ratio_median": _median(v["ratio"]), "memorised": int(v["memorised"].sum())}
                  for p, v in views.items()},
        "exposed_members": sorted({int(i) for i in nearest if i >= 0}),
        "n_distilled": len(d), "n_members": len(tr), "n_nonmembers": len(ho),
        "per_image": {"d_train": _rounded(full["d_train"]), "d_holdout": _rounded(full["d_hold"]),
                      "ratio": _rounded(full["ratio"]), "memorised": memorised.tolist(),
                      "nearest_member": nearest.tolist()},
    }


def _median(t: torch.Tensor) -> float:
    return float(t.median()) if len(t) else math.nan


def _rounded(t: torch.Tensor) -> list[float]:
    return [round(float(v), 5) for v in t]


# The operating points the membership audit reports (Carlini et al. report TPR at 1 % and 0.1 % FPR).
MIA_FPRS = {"1pct": 0.01, "0p1pct": 0.001}


def _operating_points(scores: np.ndarray, members: np.ndarray, nonmembers: np.ndarray) -> dict:
    """TPR at each ``MIA_FPRS`` point and the AUC of ``scores[members]`` vs ``scores[nonmembers]``."""
    from sim.distill.mia import tpr_at_fpr
    from sim.metrics import binary_auc

    m, n = scores[members], scores[nonmembers]
    auc = binary_auc(np.r_[np.ones(len(m), bool), np.zeros(len(n), bool)], np.r_[m, n]) if len(m) and len(n) else None
    return {"auc": auc, **{name: tpr_at_fpr(m, n, f) for name, f in MIA_FPRS.items()}}


def _data_observable(candidates: torch.Tensor, refs: dict[int, float]):
    """``distilled pixels -> (n, V)``: minus each candidate's distance to the nearest distilled image, per view, in
    units of the view's natural spacing ``refs[pool]`` (the released set's own per-record observable)."""
    views = {p: _view(candidates, p) for p in refs}

    def observe(distilled_x: np.ndarray) -> np.ndarray:
        d = torch.from_numpy(distilled_x).float()
        return np.stack([-nearest_distances(views[p], _view(d, p)).numpy() / refs[p] for p in refs], 1)
    return observe


def membership_audit(foundation, target_adapter, distilled: DistilledSet, train: Split, holdout: Split,
                     privacy: dict, cfg, seed: int) -> dict:
    """Per-record membership inference of the training split (see ``sim.distill.mia``).

    Two observables of each record, each calibrated per record by the same shadows: ``model``, φ under
    ``target_adapter`` (trained only on the distilled set); ``data``, its distance to the released distilled set
    itself. ``combined`` is one attack whose score is the larger of the two standardised scores. Without shadows
    only ``model`` is attacked (global threshold): an uncalibrated distance would score the exposed members, who
    are chosen as the members nearest to the set, above non-members even when nothing leaks. ``cfg`` is the
    ``SimConfig`` (shadows use its ``distill``, ``lora``, ``train`` and head); ``privacy`` is ``privacy_audit``'s
    report (the exposed members and each view's natural spacing).
    """
    from sim.distill import mia

    d, task, classes = cfg.distill, distilled.task, distilled.classes
    # Step 1: the candidates: every member and non-member, observed under the target adapter and the released set.
    x, y = np.concatenate([train.x, holdout.x]), np.concatenate([train.y, holdout.y])
    observe = _data_observable(to_unit_float(x), {int(k[4:]): v["reference_nn_distance"]
                                                  for k, v in privacy["views"].items()})
    target = {"model": mia.query_confidence(foundation, target_adapter, x, y, task, classes),
              "data": observe(distilled.x)}
    # Step 2: the attack's score of every candidate per observable, then the combined score.
    attack = d.audit_attack if d.audit_shadows > 0 else "loss"
    nonmembers = np.arange(len(train), len(x))
    if attack == "loss":        # uncalibrated distances would favour the exposed members, who are chosen by them
        scores = {"model": mia.loss_attack(target["model"])}
        scores["combined"] = scores["model"]
    else:
        sh = mia.train_shadows(foundation, x, y, task, classes, cfg, d.audit_shadows, seed, observe)
        fn = mia.lira_offline if attack == "lira_offline" else mia.lira_online
        scores = {"model": fn(target["model"], sh.conf, sh.holds), "data": fn(target["data"], sh.data, sh.holds)}
        scores["combined"] = np.maximum(*(mia.standardise(scores[k], nonmembers) for k in ("model", "data")))
    # Step 3: members vs non-members of the same institution, equal counts (a seeded subset of the members).
    rng = np.random.default_rng(derive_seed(seed, "mia-members"))
    members = np.sort(rng.permutation(len(train))[:min(len(train), len(nonmembers))])
    exposed = np.asarray(privacy["exposed_members"], int)
    return {"attack": attack, "attack_description": mia.ATTACKS[attack],
            "shadows": d.audit_shadows if attack != "loss" else 0,
            "ci": "95% Clopper-Pearson (TPR, binomial over members)",
            **{name: {"all": _operating_points(sc, members, nonmembers),
                      "exposed": _operating_points(sc, exposed, nonmembers)} for name, sc in scores.items()}}


def audit_verdict(report: dict, cfg: DistillConfig) -> list[str]:
    """The reasons the set is flagged (empty: not flagged), from the memorisation check and the attack."""
    reasons = []
    if report["memorised_fraction"] > cfg.audit_max_memorised:
        reasons.append(f"{report['memorised']} of {report['n_distilled']} distilled images are near-copies of "
                       "training images")
    for group in ("all", "exposed"):
        point = report["mia"]["combined"][group]["1pct"]
        if point["tpr"] is not None and point["tpr"] > cfg.audit_max_tpr:
            reasons.append(f"membership inference ({report['mia']['attack']}, combined) finds {point['tpr']:.2f} of "
                           f"{point['n_members']} {group} members at FPR {point['fpr_achieved']:.3f} "
                           f"> distill.audit_max_tpr {cfg.audit_max_tpr}")
    return reasons


def audit_fields(report: dict) -> dict:
    """The flat fields of an audit for a commit record. ``mia_*``: the combined attack, all members;
    ``mia_exposed_*``: its exposed members; ``mia_model_exposed_*`` / ``mia_data_exposed_*``: each observable
    alone. ``None`` where an FPR is not resolvable with the held-out images there are."""
    mia = report["mia"]
    out = {"distill_fidelity": report.get("fidelity"), "memorised_fraction": report["memorised_fraction"],
           "mia_attack": mia["attack"], "mia_shadows": mia["shadows"], "mia_auc": mia["combined"]["all"]["auc"],
           "mia_exposed_auc": mia["combined"]["exposed"]["auc"], "distill_flagged": report["flagged"]}
    for name, group, prefix in (("combined", "all", "mia"), ("combined", "exposed", "mia_exposed"),
                                ("model", "exposed", "mia_model_exposed"), ("data", "exposed", "mia_data_exposed")):
        empty = {"tpr": None, "ci": None, "n_members": None}            # ``data`` needs shadows
        for point in MIA_FPRS:
            p = mia[name][group][point] if name in mia else empty
            ci = p["ci"] or (None, None)
            out |= {f"{prefix}_tpr_at_{point}_fpr": p["tpr"], f"{prefix}_tpr_at_{point}_fpr_lo": ci[0],
                    f"{prefix}_tpr_at_{point}_fpr_hi": ci[1]}
        out[f"{prefix}_n_members"] = mia[name][group]["1pct"]["n_members"] if name in mia else None
    out["mia_n_nonmembers"] = mia["combined"]["all"]["1pct"]["n_nonmembers"]
    return out


def point_text(p: dict) -> str:
    """One operating point of the membership attack (``report["mia"][observable][group][point]``) as text: the
    TPR with its 95 % Clopper-Pearson interval at the FPR achieved, or the smallest FPR the held-out images can
    resolve when they are too few for this one."""
    if p["tpr"] is None:
        return f"n/a (min FPR {p['min_resolvable_fpr']:.4f})"
    return f"{p['tpr']:.3f} [{p['ci'][0]:.3f}, {p['ci'][1]:.3f}] at {p['fpr_achieved']:.4f}"


def fidelity(foundation, distilled: DistilledSet, train: Split, test: Split, lora: LoraConfig,
             train_cfg: TrainConfig, seed: int, head: str = "prototype", real_adapter=None,
             distilled_adapter=None) -> dict:
    """Accuracy on ``test`` of an adapter trained on ``distilled`` ÷ that of one trained on ``train``.

    Both adapters use ``lora``, ``train_cfg`` and ``seed``; pass ``real_adapter`` / ``distilled_adapter`` to reuse
    ones already trained (``distilled_adapter``: as ``distilled_target`` returns it).
    """
    from sim.metrics import evaluate
    from sim.train import train_adapter

    task, classes = distilled.task, distilled.classes
    if real_adapter is None:
        real_adapter = train_adapter(foundation, train, task, classes, lora, train_cfg, seed, head=head).adapter
    real = evaluate(foundation, real_adapter, test, task, classes)
    from sim.merge.base import base_reference

    base = evaluate(foundation, base_reference([real_adapter]), test, task, classes)   # linear: the real head
    if distilled_adapter is None:
        distilled_adapter = distilled_target(foundation, distilled, lora, train_cfg, seed, head)
    dist = evaluate(foundation, distilled_adapter, test, task, classes)
    gain = real["acc"] - base["acc"]
    return {"fidelity": dist["acc"] / real["acc"] if real["acc"] > 0 else math.nan,
            "gain_recovered": (dist["acc"] - base["acc"]) / gain if abs(gain) > 1e-9 else math.nan,
            "acc_distilled": dist["acc"], "acc_real": real["acc"], "acc_base": base["acc"],
            "auc_distilled": dist["auc"], "auc_real": real["auc"], "n_test": real["n"]}


def distilled_target(foundation, distilled: DistilledSet, lora: LoraConfig, train_cfg: TrainConfig, seed: int,
                     head: str = "prototype"):
    """The adapter trained only on ``distilled`` (None, the bare foundation, for an empty set): what fidelity
    scores and what the membership attacker queries."""
    from sim.train import train_adapter

    if len(distilled) == 0:
        return None
    return train_adapter(foundation, distilled.split, distilled.task, distilled.classes, lora, train_cfg, seed,
                         head=head).adapter


def audit_institution(foundation, inst, distilled: DistilledSet, cfg, seed: int, with_fidelity: bool = True,
                      real_adapter=None) -> dict:
    """Privacy audit (+ fidelity) of ``distilled`` against institution ``inst`` (a ``sim.data.Institution``).

    ``cfg`` is the ``SimConfig``: its ``distill`` thresholds and attack, ``lora``/``train`` settings and model head
    are used. One adapter is trained on the distilled set and serves both fidelity and the membership attack.
    """
    holdout = Split.concat([inst.val, inst.test])
    report = {"institution": inst.id, "task": inst.task, "method": distilled.method, "ipc": distilled.meta.get("ipc"),
              **privacy_audit(distilled, inst.train, holdout, cfg.distill)}
    target = distilled_target(foundation, distilled, cfg.lora, cfg.train, seed, cfg.model.head)
    report["mia"] = membership_audit(foundation, target, distilled, inst.train, holdout, report, cfg, seed)
    report["reasons"] = audit_verdict(report, cfg.distill)
    report["flagged"] = bool(report["reasons"])
    report["thresholds"] = {f: getattr(cfg.distill, f) for f in ("audit_near", "audit_ratio", "audit_max_memorised",
                                                                 "audit_max_tpr", "audit_shadows", "audit_attack")}
    if with_fidelity:
        report |= fidelity(foundation, distilled, inst.train, inst.test, cfg.lora, cfg.train, seed,
                           head=cfg.model.head, real_adapter=real_adapter, distilled_adapter=target)
    else:
        report["fidelity"] = None
    report |= {k: v for k, v in audit_fields(report).items() if k not in report}
    return report


def real_proxy(inst) -> DistilledSet:
    """An institution's real validation split wrapped as proxy data (the non-private reference for the search)."""
    return DistilledSet(inst.task, tuple(inst.classes), to_unit_float(inst.val.x).numpy(), inst.val.y.astype(np.int64),
                        method="real_val", meta={"institution": inst.id})


def merged_fidelity(foundation, institutions: Sequence, adapters: Sequence, distilled: Sequence[DistilledSet],
                    merge_cfg, strategy: str = "fusion", seed: int = 0) -> dict:
    """Merged accuracy with coefficients searched on the distilled sets ÷ with them searched on real val data.

    ``institutions[i]`` trained ``adapters[i]`` and sent ``distilled[i]``, in arrival order. Both merges use
    ``strategy`` (one that searches coefficients: fusion or mixture), ``merge_cfg`` and ``seed``; only the proxy
    data differ (the distilled sets vs the institutions' real validation splits). As in a run, a sequential search's
    stage i sees only the sets of institutions 0..i (``sim.merge.api.ArrivedProxy``, keyed by institution id); a
    global one sees all. Each merged predictor is scored on every institution's real test split.
    """
    from sim.merge import merge
    from sim.merge.api import ArrivedProxy
    from sim.metrics import evaluate

    if not (len(institutions) == len(adapters) == len(distilled)) or not institutions:
        raise ValueError("merged fidelity needs one adapter and one distilled set per institution")
    sources = tuple(inst.id for inst in institutions)
    results = {}
    for proxy_name, sets in (("distilled", list(distilled)), ("real_val", [real_proxy(i) for i in institutions])):
        results[proxy_name] = merge(strategy, list(adapters), cfg=merge_cfg, foundation=foundation,
                                    proxy=ArrivedProxy(tuple(sets), sources), seed=seed, search=True)
    per_inst = {}
    for inst in institutions:
        acc = {name: evaluate(foundation, res.merged, inst.test, inst.task, inst.classes)["acc"]
               for name, res in results.items()}
        per_inst[inst.id] = {"task": inst.task, "acc_distilled_search": acc["distilled"],
                             "acc_real_search": acc["real_val"],
                             "merged_fidelity": acc["distilled"] / acc["real_val"] if acc["real_val"] > 0 else math.nan}
    ratios = [v["merged_fidelity"] for v in per_inst.values()]
    return {"strategy": strategy, "merged_fidelity": float(np.nanmean(ratios)) if ratios else math.nan,
            "per_institution": per_inst,
            "coefficients_distilled": _coeffs(results["distilled"].coefficients),
            "coefficients_real_val": _coeffs(results["real_val"].coefficients)}


def _coeffs(c) -> list | None:
    return None if c is None else np.asarray(c).round(6).tolist()
