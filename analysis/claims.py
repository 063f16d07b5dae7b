"""The seed papers' claims as data, each tested on a sweep's records: the paper's number, forgesim's, a verdict.

A ``Claim`` names its source (paper and table), the paper's numbers, how forgesim measures it from a sweep's
``results.parquet`` / ``orders.parquet`` (``analysis.load``) and which test of ``TESTS`` decides it. Every test
reduces the claim to per-trial differences (trials run on identical commits, so a difference is paired) and decides
on their mean's 95 % Student t interval over the trials (seeds), ``decide``:

* **holds**: the interval lies entirely on the claimed side of the threshold;
* **fails**: it lies entirely on the other side;
* **inconclusive**: it contains the threshold, or there is one trial only (no interval);
* **not testable here**: the sweep lacks what the claim needs (the reason names it).

Thresholds: "A beats B" is A − B > 0. "Collapse" (Med-LEGO: the other merges fall far below the task's own
adapter) is operational: a merge collapses when it recovers less than half of what ``individual`` gains over
``base``, (merge − base) / (individual − base) < 0.5. In Med-LEGO Table 1 (no zero-shot row there; chance level
stands in for base) those shares are 0.15-0.39 for TA, TIES, MagMax and LoRA averaging and 0.75 for its SVD merge.
Nothing here is hard-coded per sweep: the verdicts come from the records.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from analysis.load import REFERENCES, SweepData, t_quantile

__all__ = ["Claim", "ClaimData", "Estimate", "Finding", "CLAIMS", "TESTS", "VERDICTS", "COLLAPSE_SHARE",
           "claim_data", "decide", "estimate", "evaluate"]

VERDICTS = ("holds", "fails", "inconclusive", "not testable here")
COLLAPSE_SHARE = 0.5       # a merge collapses below this share of individual's gain over base
PROTOCOL = {"distill.method": "dm"}   # rows a claim reads when the sweep varies the distiller (MedForge: DM-DSA)


@dataclass(frozen=True)
class Claim:
    """One claim of a seed paper. ``paper``: the paper's numbers per subject (``""``: for every subject);
    ``measure``: how forgesim measures it; ``test``: a key of ``TESTS``; ``params``: the test's arguments
    (strategies, metric, ...); ``where``: config columns the rows must match when the sweep has them."""

    id: str
    source: str
    statement: str
    paper: dict[str, str]
    measure: str
    test: str
    params: dict = field(default_factory=dict)
    where: dict = field(default_factory=lambda: dict(PROTOCOL))

    def paper_number(self, subject: str) -> str:
        """The paper's number for ``subject``; for the whole claim (``""``), every subject's."""
        if subject in self.paper or "" in self.paper:
            return self.paper.get(subject, self.paper.get(""))
        return "; ".join(self.paper.values()) if not subject else "–"


@dataclass(frozen=True)
class Estimate:
    """Mean of ``n`` values with its two-sided 95 % t interval [lo, hi] (lo = hi = mean when n = 1)."""

    mean: float
    lo: float
    hi: float
    n: int

    def __str__(self) -> str:
        """``+mean [lo, hi]`` (a difference); the mean alone for one value (no interval)."""
        return f"{self.mean:+.3f}" + (f" [{self.lo:+.3f}, {self.hi:+.3f}]" if self.n > 1 else "")

    def plain(self) -> str:
        """``mean ± half-width`` (a level, not a difference); the mean alone for one value."""
        return f"{self.mean:.3f}" + (f" ± {(self.hi - self.lo) / 2:.3f}" if self.n > 1 else "")


@dataclass(frozen=True)
class Finding:
    """A claim's verdict for one subject (a strategy or distiller; ``""`` when the claim has one)."""

    claim: Claim
    subject: str
    measured: str
    n: int
    verdict: str
    reason: str

    @property
    def paper(self) -> str:
        return self.claim.paper_number(self.subject)


@dataclass(frozen=True)
class ClaimData:
    """What the tests read: one row per trial × strategy (``results.parquet``) and one per trial × order × strategy
    (``orders.parquet``; None when the sweep merged no orders)."""

    results: pd.DataFrame
    orders: pd.DataFrame | None = None


def claim_data(sweep: SweepData, study: str | None = None) -> ClaimData:
    """The rows of ``study`` (all rows without a ``study`` column or with ``study=None``) and their orders."""
    res = sweep.results if sweep.results is not None else pd.DataFrame()
    if study is not None and "study" in res.columns:
        res = res[res["study"] == study]
    orders = sweep.orders
    if orders is not None and "trial_id" in orders.columns and "trial_id" in res.columns:
        orders = orders[orders["trial_id"].isin(res["trial_id"])]
    return ClaimData(res.reset_index(drop=True), orders)


# Estimates and the verdict rule -----------------------------------------------------------------------------------
def estimate(values: Sequence[float]) -> Estimate:
    """Mean and 95 % t interval of the finite ``values`` (NaN for none)."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    if len(v) == 0:
        return Estimate(math.nan, math.nan, math.nan, 0)
    mean = float(v.mean())
    half = t_quantile(len(v) - 1) * float(v.std(ddof=1)) / math.sqrt(len(v)) if len(v) > 1 else 0.0
    return Estimate(mean, mean - half, mean + half, len(v))


def decide(est: Estimate, threshold: float = 0.0, above: bool = True) -> tuple[str, str]:
    """The verdict on "mean > threshold" (``above``; else "mean < threshold") from the 95 % t interval."""
    side = ">" if above else "<"
    if est.n == 0:
        return "not testable here", "no trial has both numbers"
    if est.n < 2:
        return "inconclusive", "one trial: no confidence interval"
    lo, hi = (est.lo, est.hi) if above else (-est.hi, -est.lo)
    thr = threshold if above else -threshold
    ci = f"95 % CI [{est.lo:.3f}, {est.hi:.3f}]"
    if lo > thr:
        return "holds", f"{ci} {side} {threshold:g}"
    if hi < thr:
        return "fails", f"{ci} on the wrong side of {threshold:g}"
    return "inconclusive", f"{ci} contains {threshold:g}"


def _all(verdicts: Sequence[tuple[str, str]]) -> tuple[str, str]:
    """A conjunction: fails if one part fails, holds if all hold, else inconclusive (reasons joined)."""
    names = [v for v, _ in verdicts]
    verdict = "fails" if "fails" in names else "holds" if all(v == "holds" for v in names) else \
        "not testable here" if "not testable here" in names else "inconclusive"
    return verdict, "; ".join(r for _, r in verdicts)


# Reading the rows -------------------------------------------------------------------------------------------------
class NotTestable(Exception):
    """The sweep lacks what a claim needs; the message says what."""


def _rows(claim: Claim, data: ClaimData, vary: str = "") -> pd.DataFrame:
    """The claim's rows: those matching ``where`` (for the columns the sweep has), except the varied column."""
    df = data.results
    if df.empty or "strategy" not in df.columns:
        raise NotTestable("the sweep has no results rows")
    for column, value in claim.where.items():
        if column != vary and column in df.columns:
            df = df[df[column] == value]
    for column, value in claim.params.get("at", {}).items():
        if column not in df.columns or not (df[column] == value).any():
            ran = ", ".join(map(str, sorted(df[column].dropna().unique()))) if column in df.columns else "none"
            raise NotTestable(f"the sweep has no rows at {column} = {value} (it ran {ran})")
        df = df[df[column] == value]
    if df.empty:
        raise NotTestable(f"the sweep has no rows with {claim.where}")
    return df


def _wide(df: pd.DataFrame, strategies: Sequence[str], metric: str) -> pd.DataFrame:
    """trial × strategy table of ``metric``; a strategy the sweep did not run is not testable."""
    for s in strategies:
        if s not in set(df["strategy"]):
            raise NotTestable(f"the sweep has no {s} strategy")
    return df.pivot_table(index="trial_id", columns="strategy", values=metric, aggfunc="mean")


def _reference(df: pd.DataFrame, ref: str, metric: str) -> pd.Series:
    """The per-trial score of reference ``ref`` (``<ref>_<metric>``); missing or all-NaN is not testable."""
    col = f"{ref}_{metric}"
    if col not in df.columns or df[col].isna().all():
        hint = " (train.joint=false)" if ref == "joint" else ""
        raise NotTestable(f"the sweep has no {ref} reference{hint}")
    return df.drop_duplicates("trial_id").set_index("trial_id")[col]


def _merges(df: pd.DataFrame, claim: Claim) -> list[str]:
    """The claim's subjects: its ``subjects`` param, or every merge strategy the rows hold."""
    return list(claim.params.get("subjects") or [s for s in dict.fromkeys(df["strategy"]) if s not in REFERENCES])


# The tests --------------------------------------------------------------------------------------------------------
def greater(claim: Claim, data: ClaimData) -> list[Finding]:
    """Strategy ``a`` beats ``b`` in ``metric``: the paired per-trial difference a − b > 0."""
    a, b, metric = claim.params["a"], claim.params["b"], claim.params.get("metric", "acc")
    wide = _wide(_rows(claim, data), (a, b), metric)
    diff = estimate((wide[a] - wide[b]).dropna())
    verdict, why = decide(diff)
    measured = f"{a} {estimate(wide[a]).plain()}, {b} {estimate(wide[b]).plain()}; Δ {diff}"
    return [Finding(claim, "", measured, diff.n, verdict, why)]


def narrower_orders(claim: Claim, data: ClaimData) -> list[Finding]:
    """``a``'s range (max − min over a trial's merge orders) of ``metric`` is narrower than ``b``'s: b − a > 0."""
    a, b, metric = claim.params["a"], claim.params["b"], claim.params.get("metric", "auc")
    trials = set(_rows(claim, data)["trial_id"])
    orders = data.orders
    if orders is None or orders.empty:
        raise NotTestable("the sweep has no merge orders (orders.parquet)")
    orders = orders[orders["trial_id"].isin(trials)] if "trial_id" in orders.columns else orders
    if orders.empty or orders.groupby("trial_id")["order"].nunique().max() < 2:
        raise NotTestable("the sweep merged fewer than 2 orders per trial")
    span = orders.groupby(["trial_id", "strategy"])[metric].agg(lambda v: v.max() - v.min()).unstack()
    for s in (a, b):
        if s not in span.columns:
            raise NotTestable(f"the sweep's orders have no {s} strategy")
    diff = estimate((span[b] - span[a]).dropna())
    verdict, why = decide(diff)
    n_orders = int(orders.groupby("trial_id")["order"].nunique().min())
    measured = (f"{metric.upper()} range over {n_orders} orders: {a} {estimate(span[a]).plain()}, "
                f"{b} {estimate(span[b]).plain()}; Δ ({b} − {a}) {diff}")
    return [Finding(claim, "", measured, diff.n, verdict, why)]


def best_distiller(claim: Claim, data: ClaimData) -> list[Finding]:
    """Distiller ``best`` beats every other distiller the sweep ran, in ``strategy``'s ``metric``, paired by seed."""
    column, best = "distill.method", claim.params["best"]
    strategy, metric = claim.params.get("strategy", "mixture"), claim.params.get("metric", "acc")
    df = _rows(claim, data, vary=column)
    if column not in df.columns:
        raise NotTestable("the sweep does not vary distill.method")
    df = df[df["strategy"] == strategy]
    if df.empty:
        raise NotTestable(f"the sweep has no {strategy} strategy")
    keys = [c for c in ("seed", "contributors", "rank", "ipc", "partition") if c in df.columns]
    wide = df.pivot_table(index=keys, columns=column, values=metric, aggfunc="mean")
    others = [m for m in wide.columns if m != best]
    if best not in wide.columns or not others:
        raise NotTestable(f"the sweep has no {best} and alternative distillers to compare")
    out = []
    for other in others:
        diff = estimate((wide[best] - wide[other]).dropna())
        measured = (f"{strategy} {metric.upper()}: {best} {estimate(wide[best]).plain()}, {other} "
                    f"{estimate(wide[other]).plain()}; Δ {diff}")
        out.append(Finding(claim, other, measured, diff.n, *decide(diff)))
    return out


def best_strategy(claim: Claim, data: ClaimData) -> list[Finding]:
    """Strategy ``best`` beats each of ``subjects`` (those the sweep ran; at least one) in ``metric``."""
    best, metric = claim.params["best"], claim.params.get("metric", "acc")
    df = _rows(claim, data)
    ran = [s for s in claim.params["subjects"] if s in set(df["strategy"])]
    if not ran:
        raise NotTestable(f"the sweep ran none of {', '.join(claim.params['subjects'])}")
    wide = _wide(df, (best, *ran), metric)
    out = []
    for other in ran:
        diff = estimate((wide[best] - wide[other]).dropna())
        measured = f"{best} {estimate(wide[best]).plain()}, {other} {estimate(wide[other]).plain()}; Δ {diff}"
        out.append(Finding(claim, other, measured, diff.n, *decide(diff)))
    return out


def collapse(claim: Claim, data: ClaimData) -> list[Finding]:
    """Each subject recovers less than ``COLLAPSE_SHARE`` of individual's gain over base (trials where individual
    beats base)."""
    metric = claim.params.get("metric", "acc")
    df = _rows(claim, data)
    base, indiv = _reference(df, "base", metric), _reference(df, "individual", metric)
    gain = indiv - base
    if not (gain > 0).any():
        raise NotTestable("individual does not beat base in any trial")
    subjects = _merges(df, claim)
    if not set(subjects) & set(df["strategy"]):
        raise NotTestable(f"the sweep ran none of {', '.join(subjects)}")
    out = []
    for s in subjects:
        if s not in set(df["strategy"]):
            out.append(Finding(claim, s, "–", 0, "not testable here", f"the sweep has no {s} strategy"))
            continue
        score = df[df["strategy"] == s].set_index("trial_id")[metric]
        share = estimate(((score - base) / gain)[gain > 0].dropna())
        measured = f"share of individual's gain over base {share.plain()}"
        out.append(Finding(claim, s, measured, share.n, *decide(share, COLLAPSE_SHARE, above=False)))
    return out


def between(claim: Claim, data: ClaimData) -> list[Finding]:
    """Each merge strategy scores above base and below individual: both paired differences > 0."""
    metric = claim.params.get("metric", "acc")
    df = _rows(claim, data)
    base, indiv = _reference(df, "base", metric), _reference(df, "individual", metric)
    out = []
    for s in _merges(df, claim):
        score = df[df["strategy"] == s].set_index("trial_id")[metric]
        over, under = estimate((score - base).dropna()), estimate((indiv - score).dropna())
        verdict, why = _all([decide(over), decide(under)])
        measured = f"{s} − base {over}; individual − {s} {under}"
        out.append(Finding(claim, s, measured, min(over.n, under.n), verdict, why))
    return out


def upper_bound(claim: Claim, data: ClaimData) -> list[Finding]:
    """The joint reference scores above each merge strategy: joint − strategy > 0."""
    metric = claim.params.get("metric", "acc")
    df = _rows(claim, data)
    joint = _reference(df, "joint", metric)
    out = []
    for s in _merges(df, claim):
        score = df[df["strategy"] == s].set_index("trial_id")[metric]
        diff = estimate((joint - score).dropna())
        measured = f"joint {estimate(joint).plain()}, {s} {estimate(score).plain()}; Δ {diff}"
        out.append(Finding(claim, s, measured, diff.n, *decide(diff)))
    return out


TESTS: dict[str, Callable[[Claim, ClaimData], list[Finding]]] = {
    "greater": greater, "narrower_orders": narrower_orders, "best_distiller": best_distiller,
    "best_strategy": best_strategy, "collapse": collapse, "between": between, "upper_bound": upper_bound}


# The claims -------------------------------------------------------------------------------------------------------
_MF = "MedForge (Tan et al., arXiv 2502.16055)"
_ML = "Med-LEGO (Zhu et al., arXiv 2503.01164)"
# Med-LEGO Table 1: mean ACC over its 7 MedMNIST datasets (computed from the table), and the share of LoRA's gain
# over chance level (0.239) each merge recovers; LoRA (individual) 0.878.
_ML_MEANS = {"lora_avg": ("LoRA averaging", 0.488, 0.39), "task_arithmetic": ("Task Arithmetic", 0.445, 0.32),
             "ties": ("TIES", 0.487, 0.39), "magmax": ("MagMax", 0.332, 0.15), "svd": ("SVD (Med-LEGO)", 0.720, 0.75)}
_ML_OTHERS = ("lora_avg", "task_arithmetic", "ties", "magmax")

CLAIMS: tuple[Claim, ...] = (
    Claim("medforge.mixture_acc", f"{_MF}, Table 1", "Mixture beats Fusion in ACC",
          {"": "Mixture 0.909 vs Fusion 0.806"},
          "final ACC (mean over tasks) of each trial's mixture and fusion branches; paired difference",
          "greater", {"a": "mixture", "b": "fusion", "metric": "acc"}),
    Claim("medforge.mixture_auc", f"{_MF}, Table 1", "Mixture beats Fusion in AUC",
          {"": "Mixture 0.941 vs Fusion 0.892"},
          "final macro AUC (mean over tasks) of each trial's mixture and fusion branches; paired difference",
          "greater", {"a": "mixture", "b": "fusion", "metric": "auc"}),
    Claim("medforge.order_range", f"{_MF}, Table 2", "Mixture's AUC range over merge orders is narrower than Fusion's",
          {"": "AUC over orders: Mixture 0.907–0.931 (range 0.024), Fusion 0.846–0.892 (range 0.046)"},
          "per trial, max − min of the AUC over its replayed merge orders (orders.parquet); paired difference",
          "narrower_orders", {"a": "mixture", "b": "fusion", "metric": "auc"}),
    Claim("medforge.dm_dsa", f"{_MF}, Table 3", "DM-DSA distilled sets beat the alternatives at IPC 20",
          {"": "Mixture ACC: DM-DSA 0.909 vs 0.875 for the alternative distillation"},
          "Mixture ACC of the trials at IPC 20 per distill.method (dm = DM with DSA), paired by seed",
          "best_distiller", {"best": "dm", "strategy": "mixture", "metric": "acc", "at": {"ipc": 20}}),
    Claim("medlego.svd_best", f"{_ML}, Table 1", "the SVD merge has the best average ACC among the merges",
          {s: f"SVD 0.720 vs {name} {acc:.3f}" for s, (name, acc, _) in _ML_MEANS.items() if s != "svd"},
          "final ACC (mean over tasks) of svd and each other Table 1 merge the sweep ran; paired difference",
          "best_strategy", {"best": "svd", "subjects": _ML_OTHERS, "metric": "acc"}),
    Claim("medlego.collapse", f"{_ML}, Table 1", "TA, TIES, MagMax and LoRA averaging collapse cross-domain",
          {s: f"{name} {acc:.3f}: share {share:.2f} of LoRA's gain over chance" for s, (name, acc, share)
           in _ML_MEANS.items()},
          f"per trial, (merge − base) / (individual − base) of the final ACC; collapse: < {COLLAPSE_SHARE:g}",
          "collapse", {"subjects": _ML_OTHERS, "metric": "acc"}),
    Claim("general.between", f"{_MF}, Table 1; {_ML}, Table 1", "merged models sit between base and individual",
          {"": "Med-LEGO merges 0.332–0.720, between chance 0.239 and LoRA (individual) 0.878"},
          "per trial, strategy − base and individual − strategy of the final ACC; both must be > 0",
          "between", {"metric": "acc"}),
    Claim("general.joint_upper", f"{_ML}, Table 1 (multi-task row)", "joint training is the upper bound of merging",
          {"": "Med-LEGO's multi-task model (PMC-CLIP) 0.277 is below every merge (0.332–0.720)"},
          "per trial, joint − strategy of the final ACC (train.joint)", "upper_bound", {"metric": "acc"}),
)


def evaluate(data: ClaimData, claims: Sequence[Claim] = CLAIMS) -> list[Finding]:
    """Every claim's findings on ``data``; a claim the sweep cannot test is one "not testable here" finding."""
    out = []
    for claim in claims:
        try:
            out += TESTS[claim.test](claim, data)
        except NotTestable as exc:
            out.append(Finding(claim, "", "–", 0, "not testable here", str(exc)))
    return out
