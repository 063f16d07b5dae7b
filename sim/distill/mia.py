"""Per-record membership inference against a distilled set: LiRA (Carlini et al., IEEE S&P 2022, arXiv 2112.03570).

The released artefact is the distilled set; the attacker trains the *target* adapter on it (the institution's LoRA
and train config, as the fidelity audit does) and asks, record by record, whether a real image was in the
institution's training split. Following "Membership Inference Attacks From First Principles":

* a record's **score** is the logit-scaled confidence of its true label, φ = log p_y − log(1 − p_y), queried on
  the image and its horizontal flip (the training augmentation's flip, Carlini et al. §VI-A's augmented queries);
* **offline LiRA** (default): shadow adapters are trained exactly like the target, each on the distilled set of a
  class-stratified half of the institution's real data (train ∪ held-out); the halves come in complementary pairs,
  so every record is out of one shadow per pair. A record's test statistic is (φ_target − μ_out) / σ, with μ_out
  the mean of its φ under the shadows that never saw it and σ one global standard deviation (the paper's choice
  below 64 shadows);
* **online LiRA**: the log likelihood ratio log N(φ; μ_in, σ) − log N(φ; μ_out, σ) of the shadows that did / did
  not hold the record;
* with **no shadows** it falls back to the global-threshold loss attack (Yeom et al., CSF 2018): the score is φ
  itself, one threshold for every record.

Power is reported as in the paper: TPR at a fixed low FPR, read off scikit-learn's ``roc_curve`` (the largest TPR
whose FPR does not exceed the target), with a 95 % Clopper–Pearson interval for the TPR (binomial over members;
the threshold is taken from the non-members as given). An FPR below 1 / n_nonmembers cannot be resolved: such an
operating point is reported as ``None`` with the smallest resolvable FPR, never as a number.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

__all__ = ["ATTACKS", "logit_confidence", "shadow_halves", "lira_offline", "lira_online", "loss_attack",
           "clopper_pearson", "tpr_at_fpr", "ShadowSet", "query_confidence", "train_shadows", "standardise"]

# attack name (``distill.audit_attack``) -> what the record says it did
ATTACKS = {"lira_offline": "offline LiRA (per-record OUT Gaussian, global σ)",
           "lira_online": "online LiRA (per-record IN/OUT Gaussians, global σ)",
           "loss": "global-threshold loss attack (no shadows)"}


def logit_confidence(proba: np.ndarray, y: np.ndarray) -> np.ndarray:
    """φ = log p_y − log Σ_{k≠y} p_k (n,) from softmax probabilities (n, K): Carlini et al.'s logit scaling.

    The complement is summed from the other classes rather than taken as 1 − p_y, so a confident prediction does
    not round to ±inf.
    """
    p = np.asarray(proba, np.float64)
    rows = np.arange(len(y))
    p_y = p[rows, y]
    others = p.copy()
    others[rows, y] = 0.0
    rest = others.sum(1)                                                        # Σ_{k≠y} p_k, no cancellation
    return np.log(np.maximum(p_y, 1e-300)) - np.log(np.maximum(rest, 1e-300))


def shadow_halves(y: np.ndarray, n_shadows: int, seed: int) -> np.ndarray:
    """(n_shadows, n) bool: shadow ``s`` holds the records marked True.

    Shadows ``2k`` and ``2k + 1`` hold complementary class-stratified halves of the ``n`` records (a fresh random
    split per pair), so every record is out of exactly one shadow of each pair.
    """
    rng = np.random.default_rng(seed)
    n = len(y)
    out = np.zeros((n_shadows, n), bool)
    for pair in range(0, n_shadows, 2):
        half = np.zeros(n, bool)
        for c in np.unique(y):
            idx = rng.permutation(np.flatnonzero(y == c))
            half[idx[: (len(idx) + rng.integers(2)) // 2]] = True    # odd class sizes: the extra record either way
        out[pair] = half
        if pair + 1 < n_shadows:
            out[pair + 1] = ~half
    return out


def _global_sigma(residuals: np.ndarray, values: np.ndarray) -> float:
    """Pooled standard deviation of the shadows' φ around their per-record means (finite entries only).

    With one shadow per record (2 shadows: one IN, one OUT each) the residuals are all 0; then the spread of
    ``values`` over records stands in. A global σ only scales one observable's scores (the ranking is that of
    φ − μ); it matters when two observables are compared.
    """
    r = residuals[np.isfinite(residuals)]
    if len(r) > 1 and r.std() > 1e-9:
        return float(r.std())
    v = values[np.isfinite(values)]
    return float(max(v.std(), 1e-6)) if len(v) > 1 else 1.0


def _masked_mean(conf: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per-record (and per-query) mean of ``conf`` (S, n, Q) over the shadows where ``mask`` (S, n) holds."""
    m = mask[..., None].astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (conf * m).sum(0) / m.sum(0)                                    # (n, Q); NaN where no shadow


def lira_offline(target: np.ndarray, shadows: np.ndarray, holds: np.ndarray) -> np.ndarray:
    """Offline LiRA scores (n,): mean over queries of (φ_target − μ_out) / σ_out.

    Args:
        target: φ of each record under the target adapter, (n, Q) (Q queries: image, flip).
        shadows: φ under each shadow, (S, n, Q).
        holds: (S, n) bool, shadow s was built from data holding record i.
    """
    out = ~holds
    mu = _masked_mean(shadows, out)                                             # (n, Q)
    sigma = _global_sigma(np.where(out[..., None], shadows - mu[None], np.nan), np.where(out[..., None], shadows,
                                                                                          np.nan))
    return np.nanmean((target - mu) / sigma, axis=1)


def lira_online(target: np.ndarray, shadows: np.ndarray, holds: np.ndarray) -> np.ndarray:
    """Online LiRA scores (n,): Σ over queries of log N(φ; μ_in, σ_in) − log N(φ; μ_out, σ_out)."""
    mu_in, mu_out = _masked_mean(shadows, holds), _masked_mean(shadows, ~holds)
    s_in = _global_sigma(np.where(holds[..., None], shadows - mu_in[None], np.nan),
                         np.where(holds[..., None], shadows, np.nan))
    s_out = _global_sigma(np.where(~holds[..., None], shadows - mu_out[None], np.nan),
                          np.where(~holds[..., None], shadows, np.nan))
    log_in = -0.5 * ((target - mu_in) / s_in) ** 2 - math.log(s_in)
    log_out = -0.5 * ((target - mu_out) / s_out) ** 2 - math.log(s_out)
    return np.nansum(log_in - log_out, axis=1)


def loss_attack(target: np.ndarray) -> np.ndarray:
    """Global-threshold scores (n,): mean φ over queries (higher confidence = lower loss = 'member')."""
    return np.asarray(target, np.float64).mean(1)


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper–Pearson) two-sided interval of a binomial proportion k / n."""
    from scipy.stats import beta

    if n == 0:
        return math.nan, math.nan
    a = (1 - level) / 2
    lo = 0.0 if k == 0 else float(beta.ppf(a, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - a, k + 1, n - k))
    return lo, hi


def tpr_at_fpr(members: np.ndarray, nonmembers: np.ndarray, fpr: float) -> dict:
    """TPR of the scores at FPR ≤ ``fpr`` (``roc_curve``), its 95 % Clopper–Pearson interval and sample counts.

    ``tpr`` is ``None`` (with ``resolvable: False``) when ``fpr`` < 1 / n_nonmembers: with that few non-members
    the only operating point below ``fpr`` is FPR = 0, which is a different number.
    """
    from sklearn.metrics import roc_curve

    n_m, n_n = len(members), len(nonmembers)
    rec = {"fpr": fpr, "n_members": n_m, "n_nonmembers": n_n,
           "min_resolvable_fpr": 1 / n_n if n_n else math.nan, "resolvable": bool(n_n) and fpr * n_n >= 1}
    if not rec["resolvable"] or n_m == 0:
        return rec | {"tpr": None, "ci": None, "fpr_achieved": None, "threshold": None}
    labels = np.r_[np.ones(n_m), np.zeros(n_n)]
    f, t, thr = roc_curve(labels, np.r_[members, nonmembers], drop_intermediate=False)
    i = int(np.flatnonzero(f <= fpr + 1e-12)[-1])                     # the last (highest-TPR) point within budget
    k = int(round(t[i] * n_m))
    return rec | {"tpr": k / n_m, "ci": list(clopper_pearson(k, n_m)), "fpr_achieved": float(f[i]),
                  "threshold": float(thr[i])}


@dataclass(frozen=True)
class ShadowSet:
    """The attacker's shadows, for every candidate record: φ under each shadow adapter (S, n, Q), the data
    observable of each shadow's distilled set (S, n, V) and who held what (S, n)."""

    conf: np.ndarray
    data: np.ndarray
    holds: np.ndarray


def query_confidence(foundation, adapter, x: np.ndarray, y: np.ndarray, task: str,
                     classes: Sequence[str]) -> np.ndarray:
    """φ (n, 2) of uint8 images ``x`` under ``adapter``: the image and its horizontal flip."""
    from sim.metrics import predict_proba

    views = (x, np.ascontiguousarray(x[..., ::-1]))
    return np.stack([logit_confidence(predict_proba(foundation, adapter, v, task, classes), y) for v in views], 1)


def train_shadows(foundation, x: np.ndarray, y: np.ndarray, task: str, classes: Sequence[str], cfg,
                  n_shadows: int, seed: int, data_observable: Callable[[np.ndarray], np.ndarray]) -> ShadowSet:
    """Distil each shadow's half of the records (``cfg.distill``), train an adapter on it like the target
    (``cfg.lora``, ``cfg.train``, ``cfg.model.head``), and observe every record under both: φ under the adapter
    and ``data_observable(distilled pixels)`` (n, V) of the shadow's distilled set."""
    from sim.data.base import Split, derive_seed
    from sim.distill.api import distill
    from sim.train import train_adapter

    holds = shadow_halves(y, n_shadows, derive_seed(seed, "mia-halves"))
    conf, data = [], []
    for s, half in enumerate(holds):
        s_seed = derive_seed(seed, "mia-shadow", s)
        ds = distill(Split(x[half], y[half]), task, classes, cfg.distill, s_seed, foundation)
        adapter = train_adapter(foundation, ds.split, task, classes, cfg.lora, cfg.train, s_seed,
                                head=cfg.model.head).adapter
        conf.append(query_confidence(foundation, adapter, x, y, task, classes))
        data.append(data_observable(ds.x))
    return ShadowSet(np.stack(conf), np.stack(data), holds)


def standardise(scores: np.ndarray, nonmembers: np.ndarray) -> np.ndarray:
    """Scores in units of the non-members' spread (mean 0, std 1 over ``nonmembers``), so that two observables'
    scores can be combined by their maximum."""
    ref = scores[nonmembers]
    return (scores - ref.mean()) / max(float(ref.std()), 1e-12)
