"""The ΔW-space trims and combinations streamed through row blocks of every contributor at once, with exact top-k.

A TIES, DARE or magnitude-prune merge of N adapters touches N dense updates ``ΔW_i = s_i B_i A_i`` (out, in) per
module, about a billion numbers at N = 50 on ViT-B/16's qkv projections. Formed one contributor at a time and
trimmed with a sort (or ``torch.kthvalue``), most of the time went to the selection and to passes over tensors far
larger than the cache. Here:

* ``stack_module``: a module's factors, padded to one rank (zero rows and columns add nothing), as ``SB`` (N, out, r)
  and ``A`` (N, r, in); ``row_blocks`` forms a block of ``ROWS`` output rows of every ΔW_i as one batched matmul
  (N, ROWS, in) into a reused buffer, so every per-entry operation runs on data in cache.
* Exact k-th magnitudes (``TopK``): the k-th largest |x| of a group (one contributor's whole task vector, or one
  module of it) is bracketed between two values ``b < a`` read off an i.i.d. sample of the group's entries (4.5
  standard errors of the sample quantile either side), each sampled entry a length-r dot product. The merging
  pass itself counts the entries above ``a`` (certainly kept) and collects the few in ``(b, a]`` (candidates); the
  k-th largest is then the (k − count)-th largest candidate, and the candidates at or above it are added to the
  merge afterwards. A bracket that misses (the k-th largest outside ``(b, a]``) is widened to the whole group and
  the merge redone: the result is always the exact definition (every entry with |x| ≥ the k-th largest |x| is kept,
  ties included), only rarely slower.
* ``Sums``: what the combinations need per entry: ``Σ w_i x_i`` (task arithmetic after a trim or drop) or TIES'
  ``S = Σ x_i``, ``P = Σ w_i max(x_i, 0)``, ``Q = Σ w_i min(x_i, 0)`` and, for the disjoint mean, the counts of
  positive and negative entries: the elected sign is that of S, and the agreeing entries' weighted sum is P where
  S ≥ 0, else Q (zeros never agree).

The per-entry work of a block (trim or drop, count, candidates, sums) is one compiled pass over it
(``kernels.BlockTrim``, ``kernels.drop_block``): as a dozen torch operations it cost several times the matmul that
forms the block. DARE's drop is drawn by a counter-based generator keyed by (seed, module, contributor, entry).
``benchmarks/merge_latency.py`` prints the times; ``tests/test_streamed.py`` checks the selection against a sort,
ties and bracket misses included.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from sim.merge.base import scaled_factors
from sim.model import Adapter

ROWS = 32            # output rows per block: N = 50 blocks of (32, 768) floats stay within the cache
SAMPLE_GLOBAL = 1 << 17   # sampled entries per contributor for a whole-task-vector threshold
SAMPLE_MODULE = 1 << 16   # sampled entries per contributor and module for a per-module threshold
Z = 4.5              # bracket half-width in standard errors of the sample quantile
COMBINES = ("sum", "ties_sum", "ties_mean")


def stack_module(adapters: Sequence[Adapter], module: str, w: torch.Tensor | None = None,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(SB (N, out, r), A (N, r, in)) with SB_i @ A_i = w_i ΔW_i (w default 1; factors formed in float32, stored
    as ``dtype``); ranks padded with zeros to the largest, which add nothing."""
    r = max(a.rank(module) for a in adapters)
    first_a, first_b = adapters[0].factors(module)
    n, out_f, in_f = len(adapters), first_b.shape[0], first_a.shape[1]
    sb, aa = torch.zeros(n, out_f, r, dtype=dtype), torch.zeros(n, r, in_f, dtype=dtype)
    for i, ad in enumerate(adapters):
        b, a = scaled_factors(ad, module, 1.0 if w is None else float(w[i]))
        sb[i, :, :b.shape[1]], aa[i, :a.shape[0]] = b, a
    return sb, aa


def row_blocks(sb: torch.Tensor, a: torch.Tensor, rows: int = ROWS) -> Iterator[tuple[int, torch.Tensor]]:
    """(r0, X) with X (N, rows, in) = the rows r0:r0+rows of every ΔW_i; X is a reused buffer (copy to keep it).

    The same factors give the same float32 values on every pass, so a threshold counted on one pass is the one a
    later pass trims with."""
    n, out_f, _ = sb.shape
    buf = torch.empty(n, rows, a.shape[2])
    for r0 in range(0, out_f, rows):
        x = buf[:, :min(rows, out_f - r0)]
        torch.bmm(sb[:, r0:r0 + rows], a, out=x)
        yield r0, x


# ------------------------------------------------------------------------------------------
# Exact k-th largest magnitude per group, bracketed by a sample
# ------------------------------------------------------------------------------------------
@dataclass
class TopK:
    """Per-group brackets and counts for the k = int(density · size) largest |x| of each group.

    Groups: ``scope="global"`` — contributor i's whole task vector (every module); ``"module"`` — contributor i's
    module j (group i · M + j). ``a``/``b`` (N, M): per contributor and module, the bracket of its group;
    ``above`` (G,): entries counted above ``a``; ``cand[j]``: module j's candidates, per block (contributor,
    flat position, value) as numpy arrays.
    """

    k: torch.Tensor            # (G,) int64 entries each group keeps
    a: torch.Tensor            # (N, M) float32, certainly kept: |x| > a
    b: torch.Tensor            # (N, M) float32, candidates: b < |x| <= a
    scope: str

    def __post_init__(self) -> None:
        self.above = np.zeros(self.k.shape[0], dtype=np.int64)
        self.cand: dict[int, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
        self.missed: list[int] = []
        self._trim = None                                     # kernels.BlockTrim of the last block shape

    def group(self, contributor: np.ndarray | int, module: int) -> np.ndarray | int:
        """The group of contributor(s) in module ``module``: the contributor (global scope) or i · M + j."""
        return contributor if self.scope == "global" else contributor * self.a.shape[1] + module

    def collect(self, j: int, r0: int, x: torch.Tensor, w: torch.Tensor, combine: str, out: torch.Tensor) -> None:
        """Trim block (r0, X) of module j in one fused pass (``kernels.BlockTrim``): the entries with |x| > a are
        counted per group and added, weighted by ``w``, to ``out`` (the block's slice of ``Sums.buf``); the
        candidates, b < |x| <= a (x ≠ 0), are stored."""
        from sim.merge.kernels import BlockTrim          # numba (~70 MB) only in a process that merges

        n, rows, in_f = x.shape
        if self._trim is None or self._trim.shape != (n, rows * in_f):
            self._trim = BlockTrim(n, rows * in_f)
        counts, who, pos, vals = self._trim(x, self.a[:, j].contiguous(), self.b[:, j].contiguous(),
                                            w.contiguous(), combine, out.numpy(), r0 * in_f)
        if who.size:
            self.cand.setdefault(j, []).append((who, pos, vals))
        np.add.at(self.above, self.group(np.arange(n), j), counts)

    def module_candidates(self, j: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Module j's candidates, all blocks: (contributor, flat position, value)."""
        parts = self.cand.get(j, [])
        if not parts:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
        return tuple(np.concatenate(c) for c in zip(*parts))

    def resolve(self) -> tuple[np.ndarray, list[int]]:
        """(t (G,), missed groups): the exact k-th largest |x| of every group whose bracket held it."""
        from sim.merge.kernels import kth_by_group

        for j, parts in self.cand.items():                   # one array per module
            self.cand[j] = [self.module_candidates(j)]
        n_groups = self.k.shape[0]
        k = self.k.numpy()
        need = k - self.above
        if self.scope == "global":                           # a group spans every module
            groups = [who for [(who, _, _)] in self.cand.values()]
            vals = [v for [(_, _, v)] in self.cand.values()]
            group = np.concatenate(groups) if groups else np.zeros(0, np.int64)
            val = np.concatenate(vals) if vals else np.zeros(0, np.float32)
            count, kth = kth_by_group(np.asarray(group, np.int64), val, n_groups, need)
        else:                                                # module j's groups are i · M + j: one module at a time
            n, n_mod = self.a.shape
            count, kth = np.zeros(n_groups, np.int64), np.zeros(n_groups, np.float32)
            for j in range(n_mod):
                who, _, val = self.cand[j][0] if j in self.cand else self.module_candidates(j)
                mine = np.arange(n) * n_mod + j
                count[mine], kth[mine] = kth_by_group(np.asarray(who, np.int64), val, n, need[mine])
        t = np.full(n_groups, np.inf, dtype=np.float32)
        missed = []
        for g in range(n_groups):
            if k[g] == 0:
                continue                                                    # keeps nothing: t = inf
            if need[g] > count[g] and self.reaches_bottom(g):
                t[g] = 0.0                  # the rest are zeros (never stored): keep every nonzero entry
            elif need[g] < 1 or need[g] > count[g]:
                missed.append(g)
            else:
                t[g] = kth[g]
        return t, missed

    def reaches_bottom(self, g: int) -> bool:
        """Whether group g's bracket reaches below 0, so that every nonzero entry was counted or stored."""
        b = self.b[g] if self.scope == "global" else self.b.view(-1)[g:g + 1]
        return bool((b < 0).all())

    def contributor_thresholds(self, t: np.ndarray, j: int) -> np.ndarray:
        """Module j's k-th magnitude per contributor, from the groups' ``t``."""
        return t[self.group(np.arange(self.a.shape[0]), j)]


def _bracket(sample: torch.Tensor, k: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) per row of ``sample`` (rows, m) of |x|: the k-th largest of n entries lies in (b, a] with high
    probability (the sample quantile ± ``Z`` standard errors); a = inf / b = −1 where the bracket reaches an end."""
    rows, m = sample.shape
    if k == 0 or m == 0:                                     # keeps nothing: no entry kept, none a candidate
        return torch.full((rows,), math.inf), torch.full((rows,), math.inf)
    q = k / n
    se = math.sqrt(max(q * (1 - q), 1.0 / m) / m)
    hi_pos, lo_pos = math.floor((q - Z * se) * m), math.ceil((q + Z * se) * m)      # descending positions
    from sim.merge.kernels import row_order_stats

    wanted = ([m - lo_pos - 1] if lo_pos < m else []) + ([m - hi_pos] if hi_pos >= 1 else [])   # ascending
    stats = row_order_stats(sample, wanted).unbind(1) if wanted else ()
    a = torch.full((rows,), math.inf) if hi_pos < 1 else stats[-1]
    b = torch.full((rows,), -1.0) if lo_pos >= m else stats[0]
    return a, b


def _sample(sb: torch.Tensor, a: torch.Tensor, m: int, g: torch.Generator) -> torch.Tensor:
    """|x| at m i.i.d. positions (uniform over the module's entries) of every ΔW_i of one module: (N, m), each
    entry a length-r dot product (``kernels.sample_entries``)."""
    from sim.merge.kernels import sample_entries

    n, out_f, _ = sb.shape
    in_f = a.shape[2]
    if m == 0 or out_f == 0 or in_f == 0:
        return torch.zeros(n, 0)
    rows = torch.randint(0, out_f, (m,), generator=g)
    cols = torch.randint(0, in_f, (m,), generator=g)
    return sample_entries(sb, a, rows, cols)


def plan_topk(stacks: Sequence[tuple[torch.Tensor, torch.Tensor]], density: float, scope: str) -> TopK:
    """Brackets for every group's k-th largest |x| from a seeded sample (the result does not depend on it)."""
    n = stacks[0][0].shape[0]
    sizes = [sb.shape[1] * a.shape[2] for sb, a in stacks]
    g = torch.Generator().manual_seed(0)
    if scope == "global":
        total = sum(sizes)
        k = int(density * total)
        per = [round(SAMPLE_GLOBAL * s / max(total, 1)) for s in sizes]
        sample = torch.cat([_sample(sb, a, mj, g) for (sb, a), mj in zip(stacks, per)], dim=1)
        a_i, b_i = _bracket(sample, k, total)
        a_t, b_t = a_i[:, None].expand(n, len(stacks)), b_i[:, None].expand(n, len(stacks))
        ks = torch.full((n,), k, dtype=torch.int64)
    else:
        cols_a, cols_b, ks = [], [], []
        for (sb, a), s in zip(stacks, sizes):
            kj = int(density * s)
            aj, bj = _bracket(_sample(sb, a, min(SAMPLE_MODULE, s), g), kj, s)
            cols_a.append(aj)
            cols_b.append(bj)
            ks.append(kj)
        a_t, b_t = torch.stack(cols_a, 1), torch.stack(cols_b, 1)
        ks = torch.tensor(ks, dtype=torch.int64).repeat(n)                  # group i·M + j
    return TopK(ks, a_t.contiguous(), b_t.contiguous(), scope)


def widen(plan: TopK, groups: Sequence[int]) -> TopK:
    """The same plan with ``groups``' brackets opened to every entry (after a miss)."""
    a, b = plan.a.clone(), plan.b.clone()
    m = a.shape[1]
    for gi in groups:
        i, j = (gi, slice(None)) if plan.scope == "global" else divmod(gi, m)
        a[i, j], b[i, j] = math.inf, -1.0
    return TopK(plan.k, a, b, plan.scope)


# ------------------------------------------------------------------------------------------
# Per-entry sums over the contributors
# ------------------------------------------------------------------------------------------
class Sums:
    """One module's running combination of kept entries: ``sum`` Σ w_i x_i, or TIES' S, P, Q (and counts)."""

    def __init__(self, out_f: int, in_f: int, combine: str):
        if combine not in COMBINES:
            raise ValueError(f"combine must be one of {', '.join(COMBINES)}, got {combine!r}")
        self.combine, self.shape = combine, (out_f, in_f)
        names = {"sum": ("wx",), "ties_sum": ("s", "p", "q"), "ties_mean": ("s", "p", "q", "cp", "cn")}[combine]
        self.buf = torch.zeros(len(names), out_f * in_f)             # the sums, one row each (the fused pass's out)
        self.t = dict(zip(names, self.buf.unbind(0)))

    def add_block(self, r0: int, k: torch.Tensor, w: torch.Tensor, tmp: torch.Tensor) -> None:
        """Add block K (N, rows, in) of kept (trimmed, dropped) entries at rows r0..; ``w`` (N,)."""
        n, rows, in_f = k.shape
        sl = slice(r0 * in_f, (r0 + rows) * in_f)
        flat = k.reshape(n, -1)
        if self.combine == "sum":
            self.t["wx"][sl] += w @ flat
            return
        sw = torch.stack((torch.ones_like(w), w)) @ flat                   # (2, E): Σ x_i, Σ w_i x_i in one read
        pos = w @ torch.clamp_min(k, 0, out=tmp).reshape(n, -1)            # Σ w_i max(x_i, 0)
        self.t["s"][sl] += sw[0]
        self.t["p"][sl] += pos
        self.t["q"][sl] += sw[1] - pos                                     # Σ w_i min(x_i, 0)
        if self.combine == "ties_mean":
            sgn = torch.sign(k, out=tmp).reshape(n, -1)
            ones = torch.ones(n)
            diff = ones @ sgn                                               # (#positive − #negative)
            nonzero = ones @ sgn.mul_(sgn)                                  # (#positive + #negative)
            self.t["cp"][sl] += (nonzero + diff) * 0.5                      # exact: small integers
            self.t["cn"][sl] += (nonzero - diff) * 0.5

    def result(self) -> torch.Tensor:
        """The merged ΔW (out, in)."""
        if self.combine == "sum":
            return self.t["wx"].view(self.shape)
        positive = self.t["s"] >= 0                                          # elected sign: + on ties (peft's)
        if self.combine == "ties_sum":
            merged = torch.where(positive, self.t["p"], self.t["q"])
        else:
            merged = torch.where(positive, self.t["p"] / self.t["cp"].clamp_min(1),
                                 self.t["q"] / self.t["cn"].clamp_min(1))
        return merged.view(self.shape)


# ------------------------------------------------------------------------------------------
# The merges
# ------------------------------------------------------------------------------------------
def trimmed_merge(stacks: Sequence[tuple[torch.Tensor, torch.Tensor]], w: torch.Tensor, density: float, scope: str,
                  combine: str) -> list[torch.Tensor]:
    """Merged ΔW per module after keeping each group's int(density · size) largest-magnitude entries.

    ``w`` (N, M): weight of contributor i in module j, applied after the trim. ``density >= 1`` keeps every entry.
    """
    if density >= 1:
        return _pass(stacks, w, None, combine)
    plan = plan_topk(stacks, density, scope)
    merged = _pass(stacks, w, plan, combine)
    if merged is None:                                                       # a bracket missed: widen, redo
        merged = _pass(stacks, w, widen(plan, plan.missed), combine)
    return merged


def _pass(stacks: Sequence[tuple[torch.Tensor, torch.Tensor]], w: torch.Tensor, plan: TopK | None,
          combine: str) -> list[torch.Tensor] | None:
    """One streamed pass: certainly-kept entries summed, candidates collected, then resolved and added.

    ``None`` (with ``plan.missed`` set) when a bracket missed its group's k-th magnitude."""
    sums = []
    for j, (sb, a) in enumerate(stacks):
        in_f = a.shape[2]
        acc = Sums(sb.shape[1], in_f, combine)
        tmp = None
        for r0, x in row_blocks(sb, a):
            if plan is None:
                if tmp is None or tmp.shape != x.shape:
                    tmp = torch.empty_like(x)
                acc.add_block(r0, x, w[:, j], tmp)
                continue
            plan.collect(j, r0, x, w[:, j], combine, acc.buf[:, r0 * in_f:(r0 + x.shape[1]) * in_f])
        sums.append(acc)
    if plan is None:
        return [acc.result() for acc in sums]
    thresholds, missed = plan.resolve()
    if missed:
        plan.missed = missed
        return None
    from sim.merge.kernels import add_kept

    for j, [(who, pos, v)] in plan.cand.items():            # the candidates at or above their group's k-th magnitude
        add_kept(who, pos, v, plan.contributor_thresholds(thresholds, j), w[:, j], combine, sums[j].buf.numpy())
    return [acc.result() for acc in sums]


def dropped_merge(stacks: Sequence[tuple[torch.Tensor, torch.Tensor]], w: torch.Tensor, density: float,
                  seeds: Sequence[int], combine: str) -> list[torch.Tensor]:
    """DARE: each entry of each ΔW_i kept with probability ``density`` and rescaled by 1 / density, then combined.

    The drop is a Bernoulli(density) per entry from a counter-based generator (``kernels.drop_block``): entry e of
    contributor i in module j is kept when SplitMix64(key_ij + e · golden) < ⌊density · 2^64⌋, key_ij drawn from
    the module's seed ``seeds[j]``; so P(keep) is density to 2^-64, each contributor's mask depends only on
    (seed, module, i, e), and the draw and the sums are one fused pass.
    """
    from sim.merge.kernels import contributor_keys, drop_block, keep_threshold

    if density >= 1:
        return _pass(stacks, w, None, combine)                              # nothing dropped, nothing rescaled
    threshold = keep_threshold(density)
    out = []
    for j, (sb, a) in enumerate(stacks):
        in_f = a.shape[2]
        keys = contributor_keys(int(seeds[j]), sb.shape[0])
        acc = Sums(sb.shape[1], in_f, combine)
        wj = (w[:, j] / density).contiguous()                               # the rescale, folded into the weights
        for r0, x in row_blocks(sb, a):
            drop_block(x, keys, r0 * in_f, threshold, wj, combine,
                       acc.buf[:, r0 * in_f:(r0 + x.shape[1]) * in_f].numpy())
        out.append(acc.result())
    return out
