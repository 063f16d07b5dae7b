"""Fidelity and privacy audit of one institution's distilled set.

**Fidelity** (is the set worth sending?): accuracy on the institution's real test split of an adapter trained
only on the distilled set, divided by the accuracy of one trained on its real training split, with the same
LoRA/train config and seed. ``gain_recovered`` also reports (acc_distilled − acc_base) / (acc_real − acc_base),
the share of the adapter's gain over the bare foundation that the distilled set keeps.

**Merged fidelity** (``merged_fidelity``): the merged accuracy on each institution's test split when the merge
coefficients are searched on the union of the distilled sets, divided by the same when they are searched on the
union of the institutions' real validation splits (same strategy, search config and seed).

**Privacy** (does the set leak patients?), in pixel space, with distances invariant to a horizontal flip and
measured as RMS pixel differences in [0, 1] units, in two views: full resolution and 4x4 average-pooled (a
low-pass view, so that high-frequency noise added to a real image by the optimisation does not hide it):

* for each distilled image, ``d_train`` = distance to the nearest real *training* image (members) and
  ``d_hold`` = distance to the nearest *held-out* real image of the same institution (val + test: never
  distilled). ``ref`` = median distance from a held-out image to its nearest training image: how close two
  different patients' images naturally are.
* an image is **memorised** when, in either view, ``d_train < audit_near · ref`` (closer to a training image
  than real images come to each other: a near-copy) **and** ``d_train / d_hold < audit_ratio`` (far closer to a
  member than to any non-member: specific to the training set, not a generic typical image). Defaults 0.5, 0.5.
* **membership inference**: the attacker scores every real image by minus its distance to the nearest distilled
  image (in units of ``ref``, the closer of the two views) and guesses "member" for high scores; ``mia_auc`` is
  the ROC AUC of members (train) vs non-members (held-out). 0.5 = no leak. A set of copied real images gives its
  sources the top scores; as only they stand out, the AUC of a small copied set stays near 0.5 + share/2.
* ``flagged`` when ``memorised_fraction > audit_max_memorised`` (default 0: any near-copy of a patient image is
  a leak) or ``mia_auc > audit_max_auc`` (default 0.6).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from sim.config import DistillConfig, LoraConfig, TrainConfig
from sim.data.base import DistilledSet, Split, to_unit_float

__all__ = ["nearest_distances", "privacy_audit", "fidelity", "audit_institution", "merged_fidelity", "real_proxy"]


def nearest_distances(queries: torch.Tensor, refs: torch.Tensor, flip: bool = True,
                      chunk: int = 1024) -> torch.Tensor:
    """For each query image (n, 3, S, S), the RMS pixel distance to its nearest image in ``refs`` (m, 3, S, S).

    With ``flip``, a query also matches a mirrored reference (min over both). ``inf`` when ``refs`` is empty.
    """
    if len(refs) == 0 or len(queries) == 0:
        return torch.full((len(queries),), math.inf)
    dim = queries[0].numel()
    r = refs.reshape(len(refs), -1).double()                                  # (m, D)
    out = []
    for i in range(0, len(queries), chunk):
        q = queries[i:i + chunk]
        views = [q, q.flip(-1)] if flip else [q]
        d = torch.stack([torch.cdist(v.reshape(len(v), -1).double(), r) for v in views]).amin(0)   # (n, m)
        out.append(d.amin(1) / math.sqrt(dim))
    return torch.cat(out).float()


def _auc(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    if len(member_scores) == 0 or len(nonmember_scores) == 0:
        return math.nan
    labels = np.r_[np.ones(len(member_scores)), np.zeros(len(nonmember_scores))]
    return float(roc_auc_score(labels, np.r_[member_scores, nonmember_scores]))


# Pooling factors of the views the privacy audit compares images in: full resolution, and a low-pass view in which
# high-frequency perturbations of a real image (optimisation noise on a real init) no longer hide it.
AUDIT_POOLS = (1, 4)


def _view(x: torch.Tensor, pool: int) -> torch.Tensor:
    return x if pool == 1 else torch.nn.functional.avg_pool2d(x, pool)


def _scale_report(d: torch.Tensor, tr: torch.Tensor, ho: torch.Tensor, cfg: DistillConfig) -> dict:
    """Distances, natural spacing and the memorisation flags of one view (see module doc)."""
    d_train, d_hold = nearest_distances(d, tr), nearest_distances(d, ho)
    ref = float(nearest_distances(ho, tr).median())
    ratio = d_train / d_hold.clamp_min(1e-12)
    memorised = (d_train < cfg.audit_near * ref) & (ratio < cfg.audit_ratio)
    return {"d_train": d_train, "d_hold": d_hold, "ref": max(ref, 1e-12), "ratio": ratio, "memorised": memorised}


def privacy_audit(distilled: DistilledSet, train: Split, holdout: Split, cfg: DistillConfig) -> dict:
    """Nearest-neighbour memorisation check and a distance-based membership-inference attack (see module doc)."""
    if len(holdout) == 0:
        raise ValueError("privacy audit needs held-out real images (the institution's val/test splits)")
    d = torch.from_numpy(distilled.x).float()
    tr, ho = to_unit_float(train.x), to_unit_float(holdout.x)
    pools = [p for p in AUDIT_POOLS if d.shape[-1] // p >= 2]
    # Step 1: per view, how close distilled images come to members and to non-members, against the natural spacing.
    views = {p: _scale_report(_view(d, p), _view(tr, p), _view(ho, p), cfg) for p in pools}
    memorised = torch.stack([v["memorised"] for v in views.values()]).any(0)     # a near-copy in any view
    # Step 2: membership inference: members sit closer to the distilled set than non-members (in spacing units,
    # the closer of the views).
    def score(real: torch.Tensor) -> np.ndarray:
        return -torch.stack([nearest_distances(_view(real, p), _view(d, p)) / v["ref"]
                             for p, v in views.items()]).amin(0).numpy()
    member_scores, nonmember_scores = score(tr), score(ho)
    auc = _auc(member_scores, nonmember_scores) if len(d) else 0.5
    tpr = _tpr_at_fpr(member_scores, nonmember_scores, 0.01)
    # Step 3: the verdict.
    frac = float(memorised.float().mean()) if len(d) else 0.0
    reasons = []
    if frac > cfg.audit_max_memorised:
        reasons.append(f"{int(memorised.sum())} of {len(d)} distilled images are near-copies of training images")
    if auc > cfg.audit_max_auc:
        reasons.append(f"membership-inference AUC {auc:.3f} > {cfg.audit_max_auc}")
    full = views[1]
    return {
        "memorised_fraction": frac, "memorised": int(memorised.sum()), "mia_auc": auc, "mia_tpr_at_1pct_fpr": tpr,
        "flagged": bool(reasons), "reasons": reasons, "reference_nn_distance": full["ref"],
        "d_train_median": _median(full["d_train"]), "d_holdout_median": _median(full["d_hold"]),
        "ratio_median": _median(full["ratio"]),
        "views": {f"pool{p}": {"reference_nn_distance": v["ref"], "d_train_median": _median(v["d_train"]),
                               "ratio_median": _median(v["ratio"]), "memorised": int(v["memorised"].sum())}
                  for p, v in views.items()},
        "n_distilled": len(d), "n_members": len(tr), "n_nonmembers": len(ho),
        "thresholds": {"audit_near": cfg.audit_near, "audit_ratio": cfg.audit_ratio,
                       "audit_max_memorised": cfg.audit_max_memorised, "audit_max_auc": cfg.audit_max_auc,
                       "pools": pools},
        "per_image": {"d_train": _rounded(full["d_train"]), "d_holdout": _rounded(full["d_hold"]),
                      "ratio": _rounded(full["ratio"]), "memorised": memorised.tolist()},
    }


def _median(t: torch.Tensor) -> float:
    return float(t.median()) if len(t) else math.nan


def _rounded(t: torch.Tensor) -> list[float]:
    return [round(float(v), 5) for v in t]


def _tpr_at_fpr(members: np.ndarray, nonmembers: np.ndarray, fpr: float) -> float:
    """Share of members scored above the (1 − fpr) quantile of non-members: the attack's low-FPR power."""
    if len(members) == 0 or len(nonmembers) == 0:
        return math.nan
    return float(np.mean(members > np.quantile(nonmembers, 1 - fpr)))


def fidelity(foundation, distilled: DistilledSet, train: Split, test: Split, lora: LoraConfig,
             train_cfg: TrainConfig, seed: int, head: str = "prototype", real_adapter=None) -> dict:
    """Accuracy on ``test`` of an adapter trained on ``distilled`` ÷ that of one trained on ``train``.

    Both adapters use ``lora``, ``train_cfg`` and ``seed``; pass ``real_adapter`` to reuse the real-data one.
    """
    from sim.metrics import evaluate
    from sim.train import train_adapter

    task, classes = distilled.task, distilled.classes
    if real_adapter is None:
        real_adapter = train_adapter(foundation, train, task, classes, lora, train_cfg, seed, head=head).adapter
    real = evaluate(foundation, real_adapter, test, task, classes)
    base = evaluate(foundation, None, test, task, classes)
    if len(distilled) == 0:
        dist = {"acc": base["acc"], "auc": base["auc"]}
    else:
        adapter = train_adapter(foundation, distilled.split, task, classes, lora, train_cfg, seed, head=head).adapter
        dist = evaluate(foundation, adapter, test, task, classes)
    gain = real["acc"] - base["acc"]
    return {"fidelity": dist["acc"] / real["acc"] if real["acc"] > 0 else math.nan,
            "gain_recovered": (dist["acc"] - base["acc"]) / gain if abs(gain) > 1e-9 else math.nan,
            "acc_distilled": dist["acc"], "acc_real": real["acc"], "acc_base": base["acc"],
            "auc_distilled": dist["auc"], "auc_real": real["auc"], "n_test": real["n"]}


def audit_institution(foundation, inst, distilled: DistilledSet, cfg, seed: int, with_fidelity: bool = True,
                      real_adapter=None) -> dict:
    """Privacy audit (+ fidelity) of ``distilled`` against institution ``inst`` (a ``sim.data.Institution``).

    ``cfg`` is the ``SimConfig``: its ``distill`` thresholds, ``lora``/``train`` settings and model head are used.
    """
    holdout = Split.concat([inst.val, inst.test])
    report = {"institution": inst.id, "task": inst.task, "method": distilled.method, "ipc": distilled.meta.get("ipc"),
              **privacy_audit(distilled, inst.train, holdout, cfg.distill)}
    if with_fidelity:
        report |= fidelity(foundation, distilled, inst.train, inst.test, cfg.lora, cfg.train, seed,
                           head=cfg.model.head, real_adapter=real_adapter)
    else:
        report["fidelity"] = None
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
