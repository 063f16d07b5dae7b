"""Continual merges, space ΔW: commits are merged one at a time as they arrive, and arrival order is part of the result.

Each strategy is a pure step ``state_t = step(state_{t-1}, adapter_t)`` over a small immutable ``ContinualState``,
so a branch stores only the state, never the commits merged so far. ``τ_t = ΔW_t = s_t B_t A_t`` per module is the
task vector of commit t (t = 0, 1, …); ``M_t`` is the merged update after it. All definitions and defaults are
FusionBench's (``tanganke/fusion_bench``), whose continual baselines sit next to OPCM:

* ``opcm`` — Tang et al., "Merging Models on the Fly Without Retraining: A Sequential Approach to Scalable Continual
  Model Merging", NeurIPS 2025 (arXiv 2501.09522); FusionBench ``fusion_bench/method/opcm/opcm.py``
  (``OPCMForCLIP``), ``config/method/opcm/opcm.yaml`` (alpha 0.5). Each new τ_t is projected off the singular
  subspace of the merged update, the sum of projections is rescaled to the average task-vector norm.
* ``continual_task_arithmetic`` — ``fusion_bench/method/opcm/task_arithmetic.py``
  (``ContinualTaskArithmeticForCLIP``), ``config/method/opcm/task_arithmetic.yaml``: ``M_t = M_{t-1} + 0.3 τ_t``.
* ``continual_ties`` — ``fusion_bench/method/opcm/ties_merging.py`` (``ContinualTiesMergingForCLIP``),
  ``config/method/opcm/ties_merging.yaml``: TIES-Merging of the pair [merged so far, new], added to the merged so far.
* ``continual_weight_average`` — ``fusion_bench/method/opcm/weight_average.py`` (``ContinualWeightAverageForCLIP``):
  the running mean.
* ``continual_magmax`` — Marczak et al., "MagMax: Leveraging Model Merging for Seamless Continual Learning", ECCV 2024
  (arXiv 2407.06322); FusionBench ``fusion_bench/method/magmax/magmax.py`` (``MagMaxAlgorithm.run`` streams the
  models, holding only the running max-magnitude selection), ``config/method/magmax/magmax.yaml`` (λ 0.5).

The names follow FusionBench's classes (ContinualTaskArithmetic, ContinualTiesMerging, ContinualWeightAverage) and
this package's one-shot keys (``task_arithmetic``, ``ties``, ``magmax``). Continual task arithmetic, weight average
and MagMax give the same merge as their one-shot counterparts (sums, means and max-magnitude selections do not
depend on the order, up to MagMax's exact ties); continual TIES and OPCM do not.

Interface: ``start(strategy)``, ``step(state, adapter, **options)``, ``merged_deltas(state)``,
``merged_adapter(state, contributors)``; ``fold(strategy, adapters, weights, **options)`` folds ``step`` over a list,
and each strategy's function (``opcm(adapters, weights=None, **options)``, …) is that fold with the signature of
every other merge strategy. A ``None`` option takes its published default.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from sim.merge.base import build_adapter, check_density, dense_factors, rank_tolerance, scaled_factors
from sim.merge.specs import (CONTINUAL_MAGMAX_SCALE, CONTINUAL_TA_SCALE, CONTINUAL_TIES_DENSITY, CONTINUAL_TIES_SCALE,
                             OPCM_ALPHA, TIES_SCOPES)
from sim.model import Adapter

# The published defaults (FusionBench's) live with the specs, which import no torch.
TIES_DISJOINT = ("sum", "mean", "max")   # opcm/ties_merging.yaml merge_func (default sum)
ROWS = 128                               # rows of ΔW per block of the elementwise passes (MagMax)


@dataclass(frozen=True)
class ContinualState:
    """A continual branch after ``n`` commits: everything the next step needs, nothing of the commits themselves.

    ``tensors`` (float32) and ``scalars`` are what the strategy carries between commits, by name:

    * ``continual_task_arithmetic``, ``continual_ties``, ``continual_magmax``, ``continual_weight_average``:
      ``tensors[module]`` = the merged update M_t (out, in); the weight average also ``scalars["weight_sum"]``
      (Σ w, = n by default); continual TIES also M_t's own trim thresholds, as its step counted them:
      ``scalars["ties_threshold/<module>"]``, and ``["ties_threshold/density"]``, ``["ties_threshold/global"]``
      (1.0 global, 0.0 per module) that they are for; absent where a step could not count them (the next step then
      finds them by ``kth_largest``).
    * ``opcm``: the running sum of projected task vectors S_t = U K Vᵀ, factored: ``tensors[f"{module}/U"]``
      (out, p) and ``[f"{module}/V"]`` (in, q) orthonormal, ``[f"{module}/K"]`` (p, q), p, q ≤ Σ ranks; and
      ``scalars["norm_sum"]`` = Σ ‖τ_i‖ (whole task vectors), ``scalars["lambda"]`` = λ_t; M_t = S_t / λ_t.

    ``shapes`` = {module: (out, in)} in module order and ``base`` (the base fingerprint) check later commits. Treat
    the state as read-only: ``step`` never writes into it and returns a new one. To store it: the tensors as one
    safetensors file, the rest as JSON.
    """

    strategy: str
    n: int = 0
    base: str | None = None
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    scalars: dict[str, float] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------
# Shared pieces
# ------------------------------------------------------------------------------------------
def _shapes(adapter: Adapter) -> dict[str, tuple[int, int]]:
    """{module: (out, in)} of an adapter, in module order."""
    return {m: (adapter.factors(m)[1].shape[0], adapter.factors(m)[0].shape[1]) for m in adapter.modules()}


def _check(state: ContinualState, adapter: Adapter) -> dict[str, tuple[int, int]]:
    """The adapter's shapes; one ``ValueError`` unless it can join the branch (same base, modules, shapes)."""
    shapes = _shapes(adapter)
    if not shapes:
        raise ValueError("a continual merge needs an adapter with at least one LoRA module")
    if state.n == 0:
        return shapes
    if state.base and adapter.base_fingerprint and adapter.base_fingerprint != state.base:
        raise ValueError(f"adapter was trained on base {adapter.base_fingerprint}, the {state.strategy} branch on "
                         f"{state.base}")
    if list(shapes) != list(state.shapes):
        extra = sorted(set(shapes) ^ set(state.shapes))
        raise ValueError(f"adapter targets different modules than the {state.strategy} branch (differ in {extra[0]}"
                         f"{' and more' if len(extra) > 1 else ''})")
    for m, shape in shapes.items():
        if shape != state.shapes[m]:
            raise ValueError(f"module {m} has shape (out, in) {shape}; the {state.strategy} branch has "
                             f"{state.shapes[m]}")
    return shapes


def _after(state: ContinualState, adapter: Adapter, shapes: dict[str, tuple[int, int]],
           tensors: dict[str, torch.Tensor], scalars: dict[str, float] | None = None) -> ContinualState:
    """The state one commit later."""
    return ContinualState(state.strategy, state.n + 1, state.base or adapter.base_fingerprint, dict(shapes),
                          tensors, dict(scalars or {}))


def _weight(weight: float | None, default: float) -> float:
    w = default if weight is None else float(weight)
    if not math.isfinite(w):
        raise ValueError(f"weight must be a finite number, got {weight!r}")
    return w


# ------------------------------------------------------------------------------------------
# Continual task arithmetic, weight average, MagMax
# ------------------------------------------------------------------------------------------
def _step_task_arithmetic(state: ContinualState, adapter: Adapter, *, weight: float | None = None) -> ContinualState:
    """Continual task arithmetic: ``M_t = M_{t-1} + λ τ_t``, ``M_0 = λ τ_0``, λ = ``weight`` (default 0.3).

    FusionBench ``fusion_bench/method/opcm/task_arithmetic.py`` (``ContinualTaskArithmeticForCLIP``:
    ``merged + scaling_factor · (task − pretrained)`` per parameter), ``config/method/opcm/task_arithmetic.yaml``
    scaling_factor 0.3. Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023 (arXiv 2212.04089).
    """
    shapes = _check(state, adapter)
    lam = _weight(weight, CONTINUAL_TA_SCALE)
    merged = {}
    for m in shapes:
        sb, a = scaled_factors(adapter, m, lam)
        merged[m] = sb @ a if state.n == 0 else torch.addmm(state.tensors[m], sb, a)
    return _after(state, adapter, shapes, merged)


def _step_weight_average(state: ContinualState, adapter: Adapter, *, weight: float | None = None) -> ContinualState:
    """Continual weight average: ``M_t = (W M_{t-1} + w τ_t) / (W + w)``, W = Σ of the earlier weights.

    With the default w = 1 that is FusionBench's ``(merged · t + task) / (t + 1)``, the running mean of the
    contributors (``fusion_bench/method/opcm/weight_average.py``, ``ContinualWeightAverageForCLIP``; it averages the
    weights θ, which is the same as averaging the task vectors, θ_0 being shared). A weight w > 0 makes it the
    running weighted mean.
    """
    shapes = _check(state, adapter)
    w = _weight(weight, 1.0)
    if w <= 0:
        raise ValueError(f"continual_weight_average needs a positive weight, got {weight!r}")
    before = state.scalars.get("weight_sum", 0.0)
    total = before + w
    merged = {}
    for m in shapes:
        sb, a = scaled_factors(adapter, m, w / total)
        merged[m] = sb @ a if state.n == 0 else torch.addmm(state.tensors[m], sb, a, beta=before / total)
    return _after(state, adapter, shapes, merged, {"weight_sum": total})


def _work(pool: dict, shape: tuple[int, int], n: int) -> list[torch.Tensor]:
    """``n`` float32 work tensors of ``shape``, allocated once per step and reused by every module of that shape.

    A fresh (out, in) tensor costs more than an elementwise pass over one (its pages are faulted in on first
    touch); a step allocates only the new state's tensors."""
    key = (tuple(shape), n)
    if key not in pool:
        pool[key] = [torch.empty(shape) for _ in range(n)]
    return pool[key]


def _blocks(n_rows: int) -> list[tuple[int, int]]:
    """Row ranges of ``ROWS`` rows: the elementwise passes over one block of ΔW stay in cache (~2× faster on CPU
    than passes over whole (out, in) tensors, which are memory-bound)."""
    return [(r0, min(r0 + ROWS, n_rows)) for r0 in range(0, n_rows, ROWS)]


def _magmax_module(prev: torch.Tensor | None, factors: Sequence[tuple[torch.Tensor, torch.Tensor]],
                   work: torch.Tensor) -> torch.Tensor:
    """One module's MagMax of ``prev`` (the selection so far; ``None``: none yet) and the λ-scaled task vectors
    ``sb @ a`` of ``factors``, in order; ``work``: a (ROWS, in) scratch tensor.

    Row block by row block (the block stays in the core's cache): its rows of each task vector are formed by one
    matmul and selected entry by entry (``kernels.take_larger``). One commit (a step) and many (a fold) run the same
    operations on every entry, so a fold is bit-identical to stepping through the same commits.
    """
    from sim.merge import kernels                       # numba (~70 MB) only in a process that merges

    sb0, a0 = factors[0]
    out = torch.empty(sb0.shape[0], a0.shape[1])
    for r0, r1 in _blocks(out.shape[0]):
        o, t = out[r0:r1], work[:r1 - r0]
        rest = factors
        if prev is None:
            torch.mm(sb0[r0:r1], a0, out=o)
            rest = factors[1:]
        else:
            o.copy_(prev[r0:r1])
        for sb, a in rest:
            torch.mm(sb[r0:r1], a, out=t)                  # λ τ, rows r0:r1
            kernels.take_larger(o, t)
    return out


def _step_magmax(state: ContinualState, adapter: Adapter, *, weight: float | None = None) -> ContinualState:
    """Continual MagMax: per entry, keep whichever of M_{t-1} and λ τ_t has the larger magnitude (ties: the new).

    ``M_0 = λ τ_0``; λ = ``weight`` (default 0.5). FusionBench ``fusion_bench/method/magmax/magmax.py``
    (``MagMaxAlgorithm.run`` streams the models keeping ``where(|τ_new| >= |τ_max|, τ_new, τ_max)``, then
    θ_0 + scaling_factor · τ_max), ``config/method/magmax/magmax.yaml`` scaling_factor 0.5; ``>=`` is MagMax's
    released ``merge_max_abs`` (danielm1405/magmax). Selecting on λ τ_t against the stored λ-scaled selection is
    the same as selecting first and scaling after, and lets λ vary per commit as in the one-shot ``magmax``.
    """
    shapes = _check(state, adapter)
    lam = _weight(weight, CONTINUAL_MAGMAX_SCALE)
    merged, pool = {}, {}
    for m, shape in shapes.items():
        merged[m] = _magmax_module(state.tensors[m] if state.n else None, [scaled_factors(adapter, m, lam)],
                                   _work(pool, (ROWS, shape[1]), 1)[0])
    return _after(state, adapter, shapes, merged)


def _fold_magmax(adapters: Sequence[Adapter], weights: Sequence[float | None]) -> ContinualState:
    """``step`` folded over the adapters, each row block through all of them at once (``_magmax_module``): the
    same result, without a pass over the whole merged update per commit."""
    state, factors = start("continual_magmax"), []
    for adapter, w in zip(adapters, weights):
        shapes = _check(state, adapter)
        lam = _weight(w, CONTINUAL_MAGMAX_SCALE)
        factors.append([scaled_factors(adapter, m, lam) for m in shapes])
        state = _after(state, adapter, shapes, {})
    pool = {}
    merged = {m: _magmax_module(None, [f[j] for f in factors], _work(pool, (ROWS, shape[1]), 1)[0])
              for j, (m, shape) in enumerate(state.shapes.items())}
    return ContinualState(state.strategy, state.n, state.base, state.shapes, merged, {})


# ------------------------------------------------------------------------------------------
# Continual TIES
# ------------------------------------------------------------------------------------------
def _thresholds(vectors: Iterable[torch.Tensor], sizes: list[int], density: float, scope: str) -> list[float]:
    """Per module, the magnitude t such that |x| ≥ t keeps the k = int(density · size) largest entries.

    ``scope="global"``: one t for all modules together (the task vector flattened, as FusionBench's
    ``state_dict_to_vector`` + ``topk_values_mask`` do); ``"module"``: each module's own. Exact (an in-place
    ``numpy`` partition of the magnitudes: ~10× faster than ``torch.kthvalue``); ties with t are all kept (``>=``);
    k = 0 keeps nothing. FusionBench's ``topk_values_mask`` takes the (size − k)-th smallest magnitude and so keeps
    one entry more than k; this keeps exactly k, as ``sim.merge.delta.ties`` does. ``vectors`` (one per module, of
    ``sizes`` entries) are read one at a time.
    """
    if density >= 1:
        return [0.0] * len(sizes)
    mags = np.empty(sum(sizes), dtype=np.float32)
    ends = np.cumsum(sizes).tolist()
    for v, s, e in zip(vectors, [0] + ends[:-1], ends):
        np.abs(v.detach().reshape(-1).numpy(), out=mags[s:e])

    if scope == "global":
        return [kth_largest(mags, int(density * mags.size))] * len(sizes)
    return [kth_largest(mags[s:e], int(density * (e - s))) for s, e in zip([0] + ends[:-1], ends)]


BRACKET_SAMPLE = 1 << 16     # sampled magnitudes that bracket the k-th largest in ``kth_largest``
BRACKET_Z = 4.5              # bracket half-width in standard errors of the sample quantile (as ``sim.merge.streamed``)


def _bracket_of(sample: np.ndarray, k: int, n: int) -> tuple[float, float]:
    """(a, b), b < a: where the k-th largest of n values lies, from a seeded sample of them sorted descending — the
    sample quantile ± ``BRACKET_Z`` standard errors (±inf past the sample's ends)."""
    m = sample.size
    q = k / n
    se = math.sqrt(max(q * (1 - q), 1.0 / m) / m)
    hi, lo = math.floor((q - BRACKET_Z * se) * m), math.ceil((q + BRACKET_Z * se) * m)
    a = float(sample[hi - 1]) if hi >= 1 else math.inf
    b = float(sample[lo - 1]) if lo <= m else -math.inf
    return a, b


def _resolved(k: int, above: int, cand: np.ndarray) -> float | None:
    """The k-th largest value, given how many values lie above the bracket and the candidates inside it (reordered);
    ``None`` where the bracket missed it."""
    need = k - above
    if 1 <= need <= cand.size:
        cand.partition(cand.size - need)
        return float(cand[cand.size - need])
    return None


def kth_largest(x: np.ndarray, k: int) -> float:
    """The k-th largest value of the 1-d array ``x`` (``inf`` for k = 0); ``x`` may be reordered.

    Exact: a seeded sample brackets it between b < a (``_bracket_of``); one pass counts the entries above a and
    collects those in (b, a] (``kernels.bracket``), whose (k − count)-th largest it then is — a partition of about
    1 % of ``x`` instead of all of it. A bracket that misses (or a small array) partitions ``x`` itself.
    """
    n = x.size
    if k <= 0:
        return math.inf
    if n <= 4 * BRACKET_SAMPLE:
        x.partition(n - k)
        return float(x[n - k])
    sample = np.sort(x[np.random.default_rng(0).integers(0, n, BRACKET_SAMPLE)])[::-1]      # descending
    a, b = _bracket_of(sample, k, n)
    from sim.merge.kernels import bracket               # numba (~70 MB) only in a process that merges

    above, cand = bracket(x, a, b)
    t = _resolved(k, above, cand)
    if t is not None:
        return t
    x.partition(n - k)                                                               # the bracket missed
    return float(x[n - k])


def _trim(x: torch.Tensor, t: float, out: torch.Tensor) -> torch.Tensor:
    """``out`` = x with the entries |x| < t set to 0 (``out`` may be x). ``hardshrink`` keeps |x| > λ, with λ the
    float32 just below t: one vectorised float op instead of a boolean mask and a product (~4× faster on CPU)."""
    if t <= 0:
        return out.copy_(x)
    return torch.hardshrink(x, float(np.nextafter(np.float32(t), np.float32(0))), out=out)


def _disjoint_(q0: torch.Tensor, q1: torch.Tensor, sign: torch.Tensor, how: str) -> torch.Tensor:
    """TIES' disjoint merge of two trimmed vectors y0, y1 given as ``q = y · sign``, in place in ``q0`` (``q1`` is
    overwritten too): the entries whose sign is the elected ``sign`` (±1; 0 keeps none), summed (``"sum"``),
    averaged over those kept (``"mean"``) or the largest magnitude (``"max"``), with that sign.

    FusionBench ``fusion_bench/method/ties_merging/ties_merging_utils.py`` ``disjoint_merge``; ``relu(y · sign)`` is
    |y| where y agrees with the elected sign and 0 elsewhere.
    """
    p0, p1 = q0.relu_(), q1.relu_()
    if how == "sum":
        p0.add_(p1)
    elif how == "mean":
        kept = p0.sign().add_(p1.sign()).clamp_(min=1)            # p ≥ 0: sign(p) counts the kept entries
        p0.add_(p1).div_(kept)
    else:
        torch.maximum(p0, p1, out=p0)
    return p0.mul_(sign)


class _Groups:
    """The threshold groups of continual TIES on a task vector of modules of ``sizes`` entries: one group of all
    modules (``scope="global"``) or one per module, with k = int(density · entries) per group.

    Each group of more than 4 · ``BRACKET_SAMPLE`` entries has a fixed seeded sample of its positions (``idx[j]``:
    module j's share, local flat positions), whose values bracket the group's k-th largest magnitude, as in
    ``kth_largest``. A smaller group takes every entry as a candidate.
    """

    def __init__(self, sizes: list[int], density: float, scope: str):
        self.key = (tuple(sizes), density, scope)
        self.members = [list(range(len(sizes)))] if scope == "global" else [[j] for j in range(len(sizes))]
        self.group_of = [g for g, members in enumerate(self.members) for _ in members]
        self.n = [sum(sizes[j] for j in members) for members in self.members]
        self.k = [int(density * n) for n in self.n]
        self.idx: list[np.ndarray | None] = [None] * len(sizes)
        for g, members in enumerate(self.members):
            if self.n[g] <= 4 * BRACKET_SAMPLE:
                continue
            pos, start = np.random.default_rng(0).integers(0, self.n[g], BRACKET_SAMPLE), 0
            for j in members:
                self.idx[j] = pos[(pos >= start) & (pos < start + sizes[j])] - start
                start += sizes[j]

    def brackets(self, samples: list[np.ndarray | None]) -> list[tuple[float, float]]:
        """Per module, its group's bracket (a, b) of magnitudes from the magnitudes at the sampled positions:
        (inf, −inf) collects every entry (a small group), (inf, inf) none (k = 0)."""
        out = []
        for g, members in enumerate(self.members):
            if self.k[g] == 0:
                out.append((math.inf, math.inf))
            elif self.idx[members[0]] is None:
                out.append((math.inf, -math.inf))
            else:
                sample = np.sort(np.concatenate([samples[j] for j in members]))[::-1]
                out.append(_bracket_of(sample, self.k[g], self.n[g]))
        return [out[g] for g in self.group_of]

    def resolve(self, above: list[int], cands: list[np.ndarray]) -> list[float] | None:
        """Per module, its group's k-th largest magnitude from the counts above the bracket and the candidates;
        ``None`` if a bracket missed."""
        out = []
        for g, members in enumerate(self.members):
            if self.k[g] == 0:
                out.append(math.inf)
                continue
            t = _resolved(self.k[g], sum(above[j] for j in members), np.concatenate([cands[j] for j in members]))
            if t is None:
                return None
            out.append(t)
        return [out[g] for g in self.group_of]


class _TiesScratch:
    """What consecutive continual TIES steps of one fold reuse: τ buffers, counting buffers, the threshold groups,
    and (``free``) the merged tensors of two steps back as the next outputs. A fresh one per call of ``step``."""

    def __init__(self):
        self.taus: dict[str, torch.Tensor] = {}
        self.counted: dict[tuple[int, int], object] = {}
        self.free: dict[str, torch.Tensor] = {}
        self.groups: _Groups | None = None

    def tau(self, m: str, shape: tuple[int, int]) -> torch.Tensor:
        if m not in self.taus:
            self.taus[m] = torch.empty(shape)
        return self.taus[m]

    def counter(self, shape: tuple[int, int]):
        from sim.merge.kernels import Counted               # numba (~70 MB) only in a process that merges

        if shape not in self.counted:
            self.counted[shape] = Counted(shape)
        return self.counted[shape]

    def groups_for(self, sizes: list[int], density: float, scope: str) -> _Groups:
        if self.groups is None or self.groups.key != (tuple(sizes), density, scope):
            self.groups = _Groups(sizes, density, scope)
        return self.groups

    def out(self, m: str, shape: tuple[int, int]) -> torch.Tensor:
        t = self.free.pop(m, None)
        return t if t is not None and tuple(t.shape) == tuple(shape) else torch.empty(shape)


THRESHOLD = "ties_threshold"       # ``scalars`` of a continual TIES state: M_t's own trim thresholds, for the next


def _carried(state: ContinualState, modules: list[str], density: float, scope: str) -> list[float] | None:
    """M_{t-1}'s trim thresholds as its step counted them, if for this density and scope."""
    sc = state.scalars
    if sc.get(f"{THRESHOLD}/density") != density or sc.get(f"{THRESHOLD}/global") != float(scope == "global"):
        return None
    try:
        return [sc[f"{THRESHOLD}/{m}"] for m in modules]
    except KeyError:
        return None


def _step_ties(state: ContinualState, adapter: Adapter, *, weight: float | None = None, density: float | None = None,
               disjoint: str = "sum", scope: str = "global", _scratch: _TiesScratch | None = None) -> ContinualState:
    """Continual TIES-Merging: ``M_t = M_{t-1} + λ · TIES(M_{t-1}, τ_t)``, ``M_0 = λ τ_0`` (no trim).

    The merged update so far is one more task vector: the pair [M_{t-1}, τ_t] is TIES-merged — each trimmed to its
    top ``density`` (default 0.2) entries by magnitude over the whole task vector (``scope="global"``) or per module,
    the sign of their sum elected per entry (where it is exactly 0, the sign of the sum of all elected signs:
    FusionBench's ``resolve_zero_signs(..., "majority")``), the agreeing entries merged by ``disjoint`` (default
    ``"sum"``; ``"mean"``, ``"max"``) — and λ = ``weight`` (default 0.5) times that is *added* to M_{t-1}. With
    ``"sum"`` the trimmed M_{t-1} is thus added to itself: its top entries grow by 1 + λ per commit wherever the
    new task vector does not oppose them (FusionBench's definition, kept as it is).
    FusionBench ``fusion_bench/method/opcm/ties_merging.py`` (``ContinualTiesMergingForCLIP``),
    ``config/method/opcm/ties_merging.yaml`` (scaling_factor 0.5, threshold 20, merge_func sum); TIES: Yadav et al.,
    "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023 (arXiv 2306.01708).

    Cost: per module, two compiled passes that form τ_t's rows from its factors in cache (τ_t is never stored). One
    counts τ_t against a sampled bracket of its threshold; the other (``kernels.Counted.ties``) reads M_{t-1},
    trims both, elects, merges and writes M_t — and counts M_t against the
    bracket of *its* threshold, taken from the step's own values at the sampled positions, so the next step starts
    with M_t's exact thresholds (carried in ``scalars``). Exact: a bracket that misses, or an exact cancellation
    (resolved after the pass), falls back to ``kth_largest`` over the whole vector.
    """
    if disjoint not in TIES_DISJOINT:
        raise ValueError(f"continual_ties disjoint merge must be one of {', '.join(TIES_DISJOINT)}, got {disjoint!r}")
    if scope not in TIES_SCOPES:
        raise ValueError(f"continual_ties scope must be one of {', '.join(TIES_SCOPES)}, got {scope!r}")
    d = check_density(density, CONTINUAL_TIES_DENSITY)
    shapes = _check(state, adapter)
    lam = _weight(weight, CONTINUAL_TIES_SCALE)
    modules = list(shapes)
    factors = [scaled_factors(adapter, m, 1.0) for m in modules]     # τ_t = sb @ a per module
    if state.n == 0:
        return _after(state, adapter, shapes, {m: lam * (sb @ a) for m, (sb, a) in zip(modules, factors)})
    from sim.merge import kernels                       # numba (~70 MB) only in a process that merges

    scratch = _scratch or _TiesScratch()
    prevs = [state.tensors[m] for m in modules]
    sizes = [o * i for o, i in shapes.values()]
    groups = scratch.groups_for(sizes, d, scope)
    counters = [scratch.counter(shapes[m]) for m in modules]
    t_prev = _carried(state, modules, d, scope) or _thresholds(prevs, sizes, d, scope)
    # τ_t's thresholds: its values at the sampled positions bracket them, one counting pass resolves them.
    taus = [None] * len(modules)                        # τ_t as a tensor: only where a fallback needs it

    def tau(j: int) -> torch.Tensor:
        if taus[j] is None:
            taus[j] = kernels.tau(*factors[j], scratch.tau(modules[j], shapes[modules[j]]))
        return taus[j]

    samples = [None if ix is None else kernels.tau_at(*f, ix) for ix, f in zip(groups.idx, factors)]
    if d >= 1:
        t_new = [0.0] * len(modules)
    else:
        brackets = groups.brackets([None if y is None else np.abs(y) for y in samples])
        counted = [c.magnitudes(*f, hi, lo) for c, f, (hi, lo) in zip(counters, factors, brackets)]
        t_new = (groups.resolve([n for n, _ in counted], [c for _, c in counted])
                 or _thresholds((tau(j) for j in range(len(modules))), sizes, d, scope))
    # M_t's own thresholds, for the next step: its values at the sampled positions bracket them.
    brackets = [(math.inf, math.inf)] * len(modules)
    if d < 1:
        brackets = groups.brackets([None if ix is None else kernels.ties_entries(
            prevs[j].reshape(-1).numpy()[ix], samples[j], t_prev[j], t_new[j], lam, disjoint)
            for j, ix in enumerate(groups.idx)])
    merged, votes, above, cands, cancelled = {}, [], [], [], []
    for j, m in enumerate(modules):
        merged[m] = scratch.out(m, shapes[m])
        stats, cand = counters[j].ties(prevs[j], *factors[j], t_prev[j], t_new[j], lam, disjoint, merged[m],
                                       *brackets[j])
        votes.append(float(stats[0]))
        above.append(int(stats[2]))
        cands.append(cand)
        if stats[1]:
            cancelled.append(j)
    # Step 4: exact cancellations, with the majority sign.
    for j in cancelled:
        merged[modules[j]] = _resolve_cancelled(merged[modules[j]], prevs[j], tau(j), t_prev[j], t_new[j], lam,
                                                _majority(votes, j, scope), disjoint)
    t_next = None if cancelled or d >= 1 else groups.resolve(above, cands)
    scalars = {}
    if t_next is not None and all(math.isfinite(t) for t in t_next):
        scalars = {f"{THRESHOLD}/density": d, f"{THRESHOLD}/global": float(scope == "global"),
                   **{f"{THRESHOLD}/{m}": t for m, t in zip(modules, t_next)}}
    return _after(state, adapter, shapes, merged, scalars)


def _majority(votes: list[float], j: int, scope: str) -> float:
    """The sign that FusionBench's ``resolve_zero_signs`` gives entries of no elected sign: that of Σ elected signs."""
    return float(np.sign(sum(votes) if scope == "global" else votes[j]))


def _resolve_cancelled(merged: torch.Tensor, prev: torch.Tensor, tau: torch.Tensor, t_prev: float, t_new: float,
                       lam: float, majority: float, how: str) -> torch.Tensor:
    """``merged`` with the entries where the trimmed M_{t-1} and τ_t cancel exactly merged under ``majority``.

    FusionBench keeps, where the elected sign is s: the entries > 0 if s > 0, else those < 0 (a majority of 0 thus
    keeps the negative entry, and ``"max"`` multiplies it by 0).
    """
    y0, y1 = _trim(prev, t_prev, out=torch.empty_like(prev)), _trim(tau, t_new, out=tau)
    idx = ((y0 + y1) == 0) & (y0 != 0)
    sign = torch.full((int(idx.sum()),), majority if majority != 0 else -1.0)
    agg = _disjoint_(y0[idx] * sign, y1[idx] * sign, sign, how)
    if how == "max" and majority == 0:
        agg.zero_()
    out = merged.clone()
    out[idx] = prev[idx] + lam * agg
    return out


# ------------------------------------------------------------------------------------------
# OPCM
# ------------------------------------------------------------------------------------------
def _extend_basis(q: torch.Tensor, x: torch.Tensor, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """([q, q_new], c): an orthonormal basis of span(q) + span(x) and x's coordinates in it, x = [q, q_new] c.

    ``q`` (d, p) orthonormal, ``x`` (d, r). Classical Gram-Schmidt twice (orthogonal to round-off), then the thin
    SVD of the residual keeps only directions above the rank tolerance (``rank_tolerance`` of ‖x‖_F) of a float32
    matrix of ``shape``: what is left is round-off.
    """
    c = q.T @ x                                                  # (p, r)
    res = x - q @ c
    c2 = q.T @ res
    res = res - q @ c2
    u, s, vh = torch.linalg.svd(res, full_matrices=False)       # (d, r), (r,), (r, r)
    scale = float(torch.linalg.vector_norm(x))                  # ‖x‖_F ≥ σ_max(x): a slightly stricter tolerance
    keep = s > rank_tolerance(scale, shape) if scale > 0 else torch.zeros_like(s, dtype=torch.bool)
    keep &= torch.arange(s.shape[0]) < x.shape[0] - q.shape[1]  # never more than d directions in all
    return torch.cat([q, u[:, keep]], 1), torch.cat([c + c2, s[keep, None] * vh[keep]], 0)


def _core_svd(k: torch.Tensor, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of the core ``k`` (p, q) at its numerical rank ρ: (U_k (p, ρ), σ (ρ,) descending, V_k (q, ρ)).

    From the eigenvectors of the Gram matrix of the shorter side (about half the time of an SVD); σ_i = ‖k v_i‖,
    accurate to round-off of k itself, and ρ counts those above the rank tolerance of a float32 matrix of ``shape``.
    """
    p, q = k.shape
    if p == 0 or q == 0:
        return k.new_zeros(p, 0), k.new_zeros(0), k.new_zeros(q, 0)
    tall = p >= q
    vec = torch.linalg.eigh(k.T @ k if tall else k @ k.T)[1].flip(1)    # (q, q) or (p, p), descending
    w = k @ vec if tall else k.T @ vec                                  # columns σ_i u_i (or σ_i v_i)
    s, order = w.norm(dim=0).sort(descending=True)
    rho = int((s > rank_tolerance(float(s[0]), shape)).sum()) if float(s[0]) > 0 else 0
    s, order = s[:rho], order[:rho]
    other, vec = w[:, order] / s, vec[:, order]
    return (other, s, vec) if tall else (vec, s, other)


def _split_rank(s: torch.Tensor, alpha: float) -> int:
    """FusionBench's split rank: the first index whose cumulative share of the singular values exceeds ``alpha``.

    ``(s.cumsum(0) / s.sum() > alpha).float().argmax()``: the leading ``split`` singular directions (0 if there are
    none) form the block that a new task vector must stay off.
    """
    if s.numel() == 0:
        return 0
    s64 = s.double()
    above = (torch.cumsum(s64, 0) / s64.sum()) > alpha
    return int(above.float().argmax()) if bool(above.any()) else 0


def _project_module(u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sb: torch.Tensor, a: torch.Tensor,
                    alpha: float, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One module's OPCM step in factored form: S = u k vᵀ, τ = sb a → (u', k', v') with u' k' v'ᵀ = S + P(τ).

    P(τ) = τ − Σ_{i,j<split} (u_iᵀ τ v_j) u_i v_jᵀ − Σ_{split≤i<ρ} (u_iᵀ τ v_i) u_i v_iᵀ over the singular triplets
    (u_i, σ_i, v_i) of S (FusionBench's ``merge_linear_weights``: ``P = Uᵀ τ V``, diagonal and top-left
    split × split block zeroed, ``U P Vᵀ``). With no S yet (empty u, v), P(τ) = τ.
    """
    p, q = k.shape
    u2, cb = _extend_basis(u, sb, shape)                        # τ = (u2 cb)(v2 ca)ᵀ
    v2, ca = _extend_basis(v, a.T, shape)
    k2 = k.new_zeros(u2.shape[1], v2.shape[1])
    k2[:p, :q] = k
    k2 += cb @ ca.T                                             # + τ in the new bases, (p', q')
    if p and q:
        uk, s, vk = _core_svd(k, shape)                         # S's singular vectors: u uk, v vk
        split = _split_rank(s, alpha)
        bu, av = uk.T @ cb[:p], vk.T @ ca[:q]                   # (ρ, r): u_iᵀ sb, v_iᵀ aᵀ
        diag = (bu * av).sum(1)                                 # (ρ,): P_ii = u_iᵀ τ v_i
        left = torch.cat([uk[:, :split] @ bu[:split], uk[:, split:] * diag[split:]], 1)   # (p, r + ρ − split)
        right = torch.cat([vk[:, :split] @ av[:split], vk[:, split:]], 1)                 # (q, r + ρ − split)
        k2[:p, :q] -= left @ right.T                            # the block P[:split, :split] and the diagonal
    return u2, k2, v2


def _step_opcm(state: ContinualState, adapter: Adapter, *, alpha: float | None = None,
               weight: float | None = None) -> ContinualState:
    """OPCM (Tang et al. 2025): project τ_t off the merged update's singular subspace, rescale the sum to the mean norm.

    Per module, with (u_i, σ_i, v_i) the singular triplets of the merged update M_{t-1} (the same as those of S_{t-1},
    a positive multiple), ``split`` = the first index where Σ_{j≤i} σ_j / Σ σ > ``alpha`` (default 0.5) and
    ``P(τ) = τ − Σ_{i,j<split} (u_iᵀτv_j) u_i v_jᵀ − Σ_{i≥split} (u_iᵀτv_i) u_i v_iᵀ``:
    ``S_t = S_{t-1} + P(τ_t)`` (S_0 = τ_0), ``λ_t = ‖S_t‖ / mean_{i≤t} ‖τ_i‖`` over whole task vectors (every module)
    and ``M_t = S_t / λ_t`` (M_0 = τ_0, λ_0 = 1). So ‖M_t‖ is the mean task-vector norm.

    FusionBench ``fusion_bench/method/opcm/opcm.py`` (``OPCMForCLIP.run``, ``merge_linear_weights``; the same in
    ``opcm_general.py``), ``config/method/opcm/opcm.yaml`` alpha 0.5. It stores M_t and forms
    ``(λ_{t-1} M_{t-1} + P(τ_t)) / λ_t``, which is S_t / λ_t. One difference: FusionBench zeroes the diagonal over
    all min(out, in) pairs of a full SVD; past M's numerical rank those pairs are an arbitrary basis of its null
    space (a sum of LoRA updates has rank ≤ Σ r_i, where FusionBench's fully fine-tuned updates are full rank and
    the two agree), so here the diagonal runs over the numerical rank only and P is a function of M alone.
    ``weight`` (default 1, FusionBench has none) scales τ_t before everything, its norm included.
    S is carried factored (orthonormal bases U, V and a core K), so a step costs one eigendecomposition of a
    core of side ≤ Σ r_i instead of an SVD of every dense (out, in) update.
    """
    a_ = OPCM_ALPHA if alpha is None else float(alpha)
    if not 0 <= a_ < 1:
        raise ValueError(f"opcm alpha must be in [0, 1), got {alpha!r}")
    shapes = _check(state, adapter)
    w = _weight(weight, 1.0)
    tensors, norm2, s_norm2 = {}, 0.0, 0.0
    for m, shape in shapes.items():
        sb, a = scaled_factors(adapter, m, w)
        norm2 += float(((sb.T @ sb) * (a @ a.T)).sum().double())          # ‖sb a‖_F² = tr(sbᵀsb · a aᵀ)
        if state.n == 0:
            u, k, v = sb.new_zeros(shape[0], 0), sb.new_zeros(0, 0), sb.new_zeros(shape[1], 0)
        else:
            u, k, v = (state.tensors[f"{m}/{part}"] for part in "UKV")
        u, k, v = _project_module(u, k, v, sb, a, a_, shape)
        tensors.update({f"{m}/U": u, f"{m}/K": k, f"{m}/V": v})
        s_norm2 += float(k.double().square().sum())
    norm_sum = state.scalars.get("norm_sum", 0.0) + math.sqrt(max(norm2, 0.0))
    mean_norm = norm_sum / (state.n + 1)
    lam = 1.0 if state.n == 0 or s_norm2 == 0 or mean_norm == 0 else math.sqrt(s_norm2) / mean_norm
    return _after(state, adapter, shapes, tensors, {"norm_sum": norm_sum, "lambda": lam})


# ------------------------------------------------------------------------------------------
# The interface
# ------------------------------------------------------------------------------------------
STEPS: dict[str, Callable[..., ContinualState]] = {
    "opcm": _step_opcm,
    "continual_task_arithmetic": _step_task_arithmetic,
    "continual_ties": _step_ties,
    "continual_weight_average": _step_weight_average,
    "continual_magmax": _step_magmax,
}


def start(strategy: str) -> ContinualState:
    """An empty branch of a continual strategy; a typo lists the known names."""
    if strategy not in STEPS:
        raise ValueError(f"unknown continual merge strategy {strategy!r}; known: {', '.join(STEPS)}")
    return ContinualState(strategy)


def step(state: ContinualState, adapter: Adapter, **options) -> ContinualState:
    """Merge one arriving commit into a continual branch; returns the new state (``state`` is not changed).

    Options (each ``None`` → its published default): ``opcm``: ``alpha``, ``weight``; ``continual_task_arithmetic``,
    ``continual_magmax``, ``continual_weight_average``: ``weight``; ``continual_ties``: ``weight``, ``density``,
    ``disjoint``, ``scope``.
    """
    if state.strategy not in STEPS:
        raise ValueError(f"unknown continual merge strategy {state.strategy!r}; known: {', '.join(STEPS)}")
    return STEPS[state.strategy](state, adapter, **options)


def merged_deltas(state: ContinualState) -> dict[str, torch.Tensor]:
    """The branch's merged update M_t per module, (out, in) float32 (fresh tensors, safe to modify)."""
    if state.n == 0:
        raise ValueError(f"the {state.strategy} branch has no commit yet")
    if state.strategy != "opcm":
        return {m: state.tensors[m].clone() for m in state.shapes}
    lam = state.scalars["lambda"]
    out = {}
    for m in state.shapes:
        u, k, v = (state.tensors[f"{m}/{part}"] for part in "UKV")
        out[m] = (u @ (k / lam)) @ v.T
    return out


def merged_adapter(state: ContinualState, contributors: Sequence[Adapter]) -> Adapter:
    """The branch's merged model as an ``Adapter``: M_t per module at its numerical rank (``dense_factors``), scaling 1.

    ``contributors`` supply the per-task linear heads (``build_adapter`` averages them per task): every adapter
    merged so far, or [the previous merged adapter, the new one] (an already merged adapter counts as the
    ``meta["head_counts"]`` heads it averaged). ``meta["n_contributors"]`` is the branch's commit count.
    """
    factors = {}
    for m, delta in merged_deltas(state).items():
        a, b = dense_factors(delta)
        factors[m] = (a, b, 1.0)
    merged = build_adapter(factors, contributors, state.strategy)
    merged.meta["n_contributors"] = state.n
    return merged


def fold(strategy: str, adapters: Sequence[Adapter], weights: Sequence[float] | None = None, **options) -> Adapter:
    """Merge ``adapters`` in the given order, one ``step`` each; ``weights`` (N,): the per-commit ``weight`` option.

    The same result as stepping through them; MagMax goes through each row block of every commit at once, continual
    TIES reuses its buffers from step to step."""
    if len(adapters) == 0:
        raise ValueError("merge needs at least one adapter")
    if weights is not None:
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (len(adapters),):
            raise ValueError(f"continual merges take one weight per adapter ({len(adapters)}), got shape {w.shape}")
    if weights is not None and options.get("weight") is not None:
        raise ValueError("give continual merges either weights (one per adapter) or one weight, not both")
    one = options.pop("weight", None)
    per_commit = [one] * len(adapters) if weights is None else [float(x) for x in w]
    if strategy == "continual_magmax" and not options:
        return merged_adapter(_fold_magmax(adapters, per_commit), adapters)
    state = start(strategy)
    if strategy == "continual_ties":               # consecutive steps reuse their buffers
        scratch = _TiesScratch()
        for adapter, wi in zip(adapters, per_commit):
            before, state = state, _step_ties(state, adapter, weight=wi, **options, _scratch=scratch)
            scratch.free = dict(before.tensors)     # state t−1 is dead once state t exists
        return merged_adapter(state, adapters)
    for adapter, wi in zip(adapters, per_commit):
        state = step(state, adapter, **options, weight=wi)
    return merged_adapter(state, adapters)


def opcm(adapters: Sequence[Adapter], weights: Sequence[float] | None = None, *, alpha: float | None = None) -> Adapter:
    """OPCM over ``adapters`` in order (``_step_opcm``): alpha default 0.5, weights default 1."""
    return fold("opcm", adapters, weights, alpha=alpha)


def continual_task_arithmetic(adapters: Sequence[Adapter], weights: Sequence[float] | None = None) -> Adapter:
    """Continual task arithmetic over ``adapters`` in order (``_step_task_arithmetic``): weights default 0.3."""
    return fold("continual_task_arithmetic", adapters, weights)


def continual_ties(adapters: Sequence[Adapter], weights: Sequence[float] | None = None, *,
                   density: float | None = None, disjoint: str = "sum", scope: str = "global") -> Adapter:
    """Continual TIES over ``adapters`` in order (``_step_ties``): weights 0.5, density 0.2, disjoint sum."""
    return fold("continual_ties", adapters, weights, density=density, disjoint=disjoint, scope=scope)


def continual_weight_average(adapters: Sequence[Adapter], weights: Sequence[float] | None = None) -> Adapter:
    """The running (weighted) mean of ``adapters``' updates (``_step_weight_average``): weights default 1."""
    return fold("continual_weight_average", adapters, weights)


def continual_magmax(adapters: Sequence[Adapter], weights: Sequence[float] | None = None) -> Adapter:
    """Continual MagMax over ``adapters`` in order (``_step_magmax``): weights default 0.5."""
    return fold("continual_magmax", adapters, weights)
