"""Fused per-entry passes for the streamed ΔW-space merges, compiled with numba.

``sim.merge.streamed`` forms a block of rows of every contributor's ΔW_i at once (one batched matmul) and then has
to trim, count, collect candidates and add up the kept entries. As separate torch operations that is about ten
passes over each block, each a kernel launch, on tensors larger than the core's cache, and ``nonzero`` alone is a
slow single-threaded scan. Here one compiled pass does it all: per chunk of entries (a thread each), per
contributor in order, per entry: the magnitude test against the bracket (``|x| > a``: kept; ``b < |x| <= a``, x ≠ 0:
a candidate), the kept entry added to the combination's sums, the kept count and the candidate written to the
chunk's own slots. Every entry is handled by one thread and the contributors are added in a fixed order, so the
result does not depend on the number of threads. The comparisons are float32 comparisons of the very values torch
formed, so the selection is the exact one of ``streamed``; only the summation order (float64 here, per entry)
differs from a matmul's.

The continual merges (``sim.merge.continual``) have their own passes: MagMax's selection of one block of rows
(``take_larger``), and continual TIES' step over one module (``Counted``), which forms τ's rows from the factors in
cache, trims, elects, merges, writes M_t and counts it against the bracket of the next step's threshold at once.

Modes (``MODES``): ``sum`` — Σ w_i x_i; ``ties_sum`` — S = Σ x_i, P = Σ w_i max(x_i, 0), Q = Σ w_i min(x_i, 0);
``ties_mean`` — S, P, Q and the numbers of positive and negative kept entries.
"""
from __future__ import annotations

import numpy as np
import numba as nb
import torch

MODES = {"sum": 0, "ties_sum": 1, "ties_mean": 2}
CHUNK = 1024          # entries per thread's chunk: its five float64 sums stay in L1
BRACKET_CHUNK = 1 << 16   # values per chunk of ``bracket``'s passes
NETWORK_CHUNK = 256   # entries per chunk of a selection network: N = 50 planes of 256 floats (50 KB) stay in L2


@nb.njit(inline="always")
def _add_sums(out, e0, mode, s, p, q, cp, cn):   # pragma: no cover - compiled
    """A chunk's per-entry sums (float64) added to ``out``'s rows from entry e0: the rows ``mode`` has."""
    for e in range(s.size):
        out[0, e0 + e] += s[e]
    if mode > 0:
        for e in range(s.size):
            out[1, e0 + e] += p[e]
            out[2, e0 + e] += q[e]
    if mode == 2:
        for e in range(s.size):
            out[3, e0 + e] += cp[e]
            out[4, e0 + e] += cn[e]


@nb.njit(parallel=True, cache=True, nogil=True)
def _trim_block(x, a, b, w, mode, out, counts, cand_n, cand_pos, cand_val, chunk):   # pragma: no cover - compiled
    n, e_total = x.shape
    n_chunks = (e_total + chunk - 1) // chunk
    for c in nb.prange(n_chunks):
        e0 = c * chunk
        m = min(e0 + chunk, e_total) - e0
        s = np.zeros(m)                   # float64 per entry, rounded once into ``out`` (float32)
        p = np.zeros(m)
        q = np.zeros(m)
        cp = np.zeros(m)
        cn = np.zeros(m)
        padded = (m + 7) // 8 * 8
        flag = np.zeros(padded, np.uint8)
        words = flag.view(np.uint64)      # 8 flags a word: most words are 0 and skipped at once
        for i in range(n):
            ai, bi, wi = a[i], b[i], np.float64(w[i])
            xi = x[i, e0:e0 + m]
            kept = 0
            # Branch-free loops (they vectorise): the kept entries' sums, and the candidates' flags.
            if mode == 0:
                for e in range(m):
                    keep = abs(xi[e]) > ai
                    kept += keep
                    s[e] += wi * np.float64(xi[e]) if keep else 0.0
            elif mode == 1:
                for e in range(m):
                    keep = abs(xi[e]) > ai
                    kept += keep
                    vd = np.float64(xi[e]) if keep else 0.0
                    s[e] += vd
                    p[e] += wi * max(vd, 0.0)
                    q[e] += wi * min(vd, 0.0)
            else:
                for e in range(m):
                    keep = abs(xi[e]) > ai
                    kept += keep
                    vd = np.float64(xi[e]) if keep else 0.0
                    s[e] += vd
                    p[e] += wi * max(vd, 0.0)
                    q[e] += wi * min(vd, 0.0)
                    cp[e] += 1.0 if vd > 0 else 0.0
                    cn[e] += 1.0 if vd < 0 else 0.0
            counts[c, i] = kept
            for e in range(m):
                v = xi[e]
                av = abs(v)
                flag[e] = (av > bi) & (av <= ai) & (v != 0)
            nc = 0
            for k in range(padded // 8):
                if words[k]:
                    for e in range(8 * k, min(8 * k + 8, m)):
                        if flag[e]:
                            cand_pos[c, i, nc] = e0 + e
                            cand_val[c, i, nc] = xi[e]
                            nc += 1
            cand_n[c, i] = nc
        _add_sums(out, e0, mode, s, p, q, cp, cn)


@nb.njit(cache=True, nogil=True)
def _compact(cand_n, cand_pos, cand_val, offset):   # pragma: no cover - compiled
    """The candidates, ordered by contributor, then position: (who, offset + position in the block, value)."""
    total = cand_n.sum()
    who = np.empty(total, np.int64)
    pos = np.empty(total, np.int64)
    val = np.empty(total, np.float32)
    k = 0
    n_chunks, n = cand_n.shape
    for i in range(n):
        for c in range(n_chunks):
            for t in range(cand_n[c, i]):
                who[k] = i
                pos[k] = offset + cand_pos[c, i, t]
                val[k] = cand_val[c, i, t]
                k += 1
    return who, pos, val


@nb.njit(parallel=True, cache=True, nogil=True)
def _kth_by_group(group, val, n_groups, need):   # pragma: no cover - compiled
    """Per group g: how many candidates it has, and the need[g]-th largest |value| among them (0 where
    need[g] is not in 1..count)."""
    count = np.zeros(n_groups, np.int64)
    for c in range(group.size):
        count[group[c]] += 1
    start = np.zeros(n_groups + 1, np.int64)
    for g in range(n_groups):
        start[g + 1] = start[g] + count[g]
    grouped = np.empty(group.size, np.float32)
    fill = start[:-1].copy()
    for c in range(group.size):
        g = group[c]
        grouped[fill[g]] = abs(val[c])
        fill[g] += 1
    kth = np.zeros(n_groups, np.float32)
    for g in nb.prange(n_groups):
        cnt = count[g]
        if 1 <= need[g] <= cnt:
            seg = np.partition(grouped[start[g]:start[g + 1]], cnt - need[g])
            kth[g] = seg[cnt - need[g]]
    return count, kth


def kth_by_group(group: np.ndarray, val: np.ndarray, n_groups: int, need: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(candidates per group (G,), the need[g]-th largest |value| of group g's candidates (G,) float32, 0 where
    need[g] is outside 1..count); ``group`` (C,) int64 in 0..G−1, ``val`` (C,) float32."""
    _set_threads()
    return _kth_by_group(group, val, n_groups, need.astype(np.int64))


@nb.njit(cache=True, nogil=True)
def _add_kept(who, pos, val, threshold, w, mode, out):   # pragma: no cover - compiled
    for c in range(who.size):
        v = val[c]
        i = who[c]
        if abs(v) >= threshold[i]:
            vd = np.float64(v)
            wi = np.float64(w[i])
            e = pos[c]
            if mode == 0:
                out[0, e] += wi * vd
            else:
                out[0, e] += vd
                if v > 0:
                    out[1, e] += wi * vd
                else:
                    out[2, e] += wi * vd
                if mode == 2:
                    if v > 0:
                        out[3, e] += 1.0
                    elif v < 0:
                        out[4, e] += 1.0


def add_kept(who: np.ndarray, pos: np.ndarray, val: np.ndarray, threshold: np.ndarray, w: torch.Tensor, mode: str,
             out: np.ndarray) -> None:
    """Add the candidates (contributor, flat position, value) with |value| >= threshold[contributor] to a
    module's sums ``out`` (rows, E) float32, weighted by w (N,), as ``mode`` says."""
    _add_kept(who, pos, val, threshold.astype(np.float32), w.contiguous().numpy(), MODES[mode], out)


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


@nb.njit(inline="always")
def _splitmix64(z):   # pragma: no cover - compiled
    """The SplitMix64 output function (Steele, Lea and Flood, "Fast splittable pseudorandom number generators",
    OOPSLA 2014) of a uint64."""
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


@nb.njit(parallel=True, cache=True, nogil=True)
def _drop_block(x, keys, pos0, threshold, w, mode, out, chunk):   # pragma: no cover - compiled
    n, e_total = x.shape
    n_chunks = (e_total + chunk - 1) // chunk
    for c in nb.prange(n_chunks):
        e0 = c * chunk
        m = min(e0 + chunk, e_total) - e0
        s = np.zeros(m)
        p = np.zeros(m)
        q = np.zeros(m)
        cp = np.zeros(m)
        cn = np.zeros(m)
        for i in range(n):
            key, wi = keys[i], np.float64(w[i])
            xi = x[i, e0:e0 + m]
            base = np.uint64(pos0 + e0)
            for e in range(m):
                u = _splitmix64(key + (base + np.uint64(e)) * _GOLDEN)
                vd = np.float64(xi[e]) if u < threshold else 0.0
                if mode == 0:
                    s[e] += wi * vd
                else:
                    s[e] += vd
                    p[e] += wi * max(vd, 0.0)
                    q[e] += wi * min(vd, 0.0)
                    cp[e] += 1.0 if vd > 0 else 0.0
                    cn[e] += 1.0 if vd < 0 else 0.0
        _add_sums(out, e0, mode, s, p, q, cp, cn)


@nb.njit(parallel=True, cache=True, nogil=True)
def _network_block(x, pairs, k, out, chunk):   # pragma: no cover - compiled
    n, e_total = x.shape
    n_chunks = (e_total + chunk - 1) // chunk
    kept = n - 2 * k
    for c in nb.prange(n_chunks):
        e0 = c * chunk
        m = min(e0 + chunk, e_total) - e0
        v = np.empty((n, m), np.float32)
        for i in range(n):
            v[i, :] = x[i, e0:e0 + m]
        for t in range(pairs.shape[0]):                  # compare-exchange: v_i <- min, v_j <- max
            vi, vj = v[pairs[t, 0]], v[pairs[t, 1]]
            for e in range(m):
                lo = min(vi[e], vj[e])
                vj[e] = max(vi[e], vj[e])
                vi[e] = lo
        for e in range(m):                               # the kept values, summed in ascending order (float32)
            acc = v[k, e]
            for i in range(k + 1, n - k):
                acc += v[i, e]
            out[e0 + e] = acc / np.float32(kept)


def network_block(x: torch.Tensor, pairs: np.ndarray, k: int) -> torch.Tensor:
    """The mean over dim 0 of x (N, rows, in) without its k smallest and k largest values per entry, the values
    ordered by the compare-exchange ``pairs`` (P, 2) of a selection network: chunks of entries, each ordered in
    the core's cache. Bit-identical to ``robust.trimmed_block``'s torch passes (same network, same float32 sum)."""
    _set_threads()
    n = x.shape[0]
    out = torch.empty(x.shape[1:])
    _network_block(x.reshape(n, -1).numpy(), pairs, k, out.view(-1).numpy(), NETWORK_CHUNK)
    return out


@nb.njit(parallel=True, cache=True, nogil=True)
def _bracket_counts(x, a, b, chunk):   # pragma: no cover - compiled
    n_chunks = (x.size + chunk - 1) // chunk
    above = np.zeros(n_chunks, np.int64)
    inside = np.zeros(n_chunks, np.int64)
    for c in nb.prange(n_chunks):
        na = 0
        ni = 0
        for e in range(c * chunk, min((c + 1) * chunk, x.size)):     # branch-free: it vectorises
            v = x[e]
            na += np.int32(v > a)
            ni += np.int32((v > b) & (v <= a))
        above[c] = na
        inside[c] = ni
    return above, inside


@nb.njit(parallel=True, cache=True, nogil=True)
def _bracket_collect(x, a, b, starts, out, chunk):   # pragma: no cover - compiled
    n_chunks = (x.size + chunk - 1) // chunk
    for c in nb.prange(n_chunks):
        e0 = c * chunk
        m = min(e0 + chunk, x.size) - e0
        padded = (m + 7) // 8 * 8
        flag = np.zeros(padded, np.uint8)
        words = flag.view(np.uint64)      # 8 flags a word: most words are 0 and skipped at once
        for e in range(m):
            v = x[e0 + e]
            flag[e] = (v > b) & (v <= a)
        k = starts[c]
        for w in range(padded // 8):
            if words[w]:
                for e in range(8 * w, min(8 * w + 8, m)):
                    if flag[e]:
                        out[k] = x[e0 + e]
                        k += 1


def bracket(x: np.ndarray, a: float, b: float) -> tuple[int, np.ndarray]:
    """(how many values of the 1-d float array ``x`` are > a, the values in (b, a] in their order): two parallel
    passes, counts then copies, instead of numpy's boolean masks over all of ``x``. ``a``, ``b``: values of ``x``
    (or ±inf), so exact in its dtype."""
    _set_threads()
    x = np.ascontiguousarray(x)
    a_x, b_x = x.dtype.type(a), x.dtype.type(b)
    above, inside = _bracket_counts(x, a_x, b_x, BRACKET_CHUNK)
    starts = np.concatenate(([0], np.cumsum(inside)[:-1])).astype(np.int64)
    out = np.empty(int(inside.sum()), x.dtype)
    _bracket_collect(x, a_x, b_x, starts, out, BRACKET_CHUNK)
    return int(above.sum()), out


@nb.njit(parallel=True, cache=True, nogil=True)
def _sample_entries(sb, at, rows, cols, out):   # pragma: no cover - compiled
    n, _, r = sb.shape
    for i in nb.prange(n):
        for t in range(rows.size):
            acc = np.float32(0)
            for q in range(r):
                acc += sb[i, rows[t], q] * at[i, cols[t], q]
            out[i, t] = abs(acc)


def sample_entries(sb: torch.Tensor, a: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """|x_i[row_t, col_t]| of x_i = sb_i @ a_i for every contributor i and sampled position t: (N, m), each a
    length-r dot product of a row of sb_i and a column of a_i (no block formed)."""
    _set_threads()
    out = torch.empty(sb.shape[0], rows.numel())
    _sample_entries(sb.contiguous().numpy(), a.transpose(1, 2).contiguous().numpy(), rows.numpy(), cols.numpy(),
                    out.numpy())
    return out


@nb.njit(parallel=True, cache=True, nogil=True)
def _row_order_stats(x, idx):   # pragma: no cover - compiled
    rows = x.shape[0]
    out = np.empty((rows, idx.size), x.dtype)
    for r in nb.prange(rows):
        v = x[r].copy()
        lo = 0
        for t in range(idx.size):                 # ascending indices: each partition works on what is right of the last
            part = np.partition(v[lo:], idx[t] - lo)
            v[lo:] = part
            out[r, t] = v[idx[t]]
            lo = idx[t]
    return out


def row_order_stats(x: torch.Tensor, idx: list[int]) -> torch.Tensor:
    """The values of each row of x (rows, m) at ascending sorted positions ``idx`` (0-based, increasing): (rows,
    len(idx)), ``torch.kthvalue`` for several k at once, rows in parallel."""
    _set_threads()
    return torch.from_numpy(_row_order_stats(x.contiguous().numpy(), np.asarray(idx, dtype=np.int64)))


# ------------------------------------------------------------------------------------------
# Continual merges (``sim.merge.continual``): one pass per module and commit
# ------------------------------------------------------------------------------------------
HOW = {"sum": 0, "mean": 1, "max": 2}    # continual TIES' disjoint merges
STATS = 3                                # per chunk: Σ elected signs, exact cancellations, |value| > a


@nb.njit(inline="always")
def _ties_entry(p, y, t0, t1, lam, how):   # pragma: no cover - compiled
    """One entry of a continual TIES step, float32: (M_{t-1} + λ · TIES(M_{t-1}, τ_t), elected sign, exact
    cancellation). y0, y1: p and y trimmed (kept where |·| ≥ t; t ≤ 0 keeps all); the sign of y0 + y1 is elected;
    the agreeing |y0 s|, |y1 s| are summed, averaged over those kept or the larger taken, times the sign."""
    zero = np.float32(0)
    y0 = p if (t0 <= zero) or (abs(p) >= t0) else zero
    y1 = y if (t1 <= zero) or (abs(y) >= t1) else zero
    total = y0 + y1
    sg = np.float32(1) if total > zero else (np.float32(-1) if total < zero else zero)
    p0 = max(y0 * sg, zero)
    p1 = max(y1 * sg, zero)
    if how == 0:
        agg = p0 + p1
    elif how == 1:
        agg = (p0 + p1) / np.float32(max((p0 > zero) + (p1 > zero), 1))
    else:
        agg = max(p0, p1)
    return p + lam * (agg * sg), sg, (sg == zero) & (y0 != zero)


@nb.njit(inline="always")
def _collect(x, e0, m, flag, c, cand_n, cand_val):   # pragma: no cover - compiled
    """The flagged |x[e0 + e]| of a chunk, in order, into the chunk's candidate slots (8 flags a word: most words
    are 0 and skipped at once)."""
    words = flag.view(np.uint64)
    nc = 0
    for w in range((m + 7) // 8):
        if words[w]:
            for e in range(8 * w, min(8 * w + 8, m)):
                if flag[e]:
                    cand_val[c, nc] = abs(x[e0 + e])
                    nc += 1
    cand_n[c] = nc


@nb.njit(inline="always")
def _tau_row(sb, a, r, row):   # pragma: no cover - compiled
    """Row r of τ = sb @ a (sb (out, k), a (k, in)) into ``row`` (in,), float32, summed over k in order (0 +
    sb[r, 0] a[0] + sb[r, 1] a[1] + …): the same value as ``_tau_at``'s for every entry. Eight terms are added per
    sweep of the row, which stays in L1 (about twice as fast as a sweep per term)."""
    n = row.size
    k = sb.shape[1]
    for e in range(n):
        row[e] = np.float32(0)
    q = 0
    while q + 8 <= k:
        s0, s1, s2, s3 = sb[r, q], sb[r, q + 1], sb[r, q + 2], sb[r, q + 3]
        s4, s5, s6, s7 = sb[r, q + 4], sb[r, q + 5], sb[r, q + 6], sb[r, q + 7]
        a0, a1, a2, a3, a4, a5, a6, a7 = a[q], a[q + 1], a[q + 2], a[q + 3], a[q + 4], a[q + 5], a[q + 6], a[q + 7]
        for e in range(n):
            row[e] = (((((((row[e] + s0 * a0[e]) + s1 * a1[e]) + s2 * a2[e]) + s3 * a3[e]) + s4 * a4[e])
                       + s5 * a5[e]) + s6 * a6[e]) + s7 * a7[e]
        q += 8
    while q < k:
        s, aq = sb[r, q], a[q]
        for e in range(n):
            row[e] += s * aq[e]
        q += 1


@nb.njit(inline="always")
def _count_row(x, flag, hi, lo):   # pragma: no cover - compiled
    """How many |x| > hi; flag = lo < |x| <= hi. Branch-free with 32-bit counts and 8-bit flags: it vectorises (a
    64-bit count in the caller's loop does not)."""
    above = np.int32(0)
    for e in range(x.size):
        av = abs(x[e])
        above += np.int32(av > hi)
        flag[e] = np.uint8(av > lo) & np.uint8(av <= hi)
    return above


@nb.njit(inline="always")
def _row_chunk(c, rows, n_rows, n_in):   # pragma: no cover - compiled
    """Chunk c of ``rows`` rows of n_in entries: (first row, end row, entries, its zeroed flags, padded to words)."""
    r0 = c * rows
    r1 = min(r0 + rows, n_rows)
    m = (r1 - r0) * n_in
    return r0, r1, m, np.zeros((m + 7) // 8 * 8, np.uint8)


@nb.njit(inline="always")
def _ties_row(p, y, o, flag, t0, t1, lam, how, hi, lo):   # pragma: no cover - compiled
    """One row of ``_ties_rows``: o = the step's entries, flags of lo < |o| <= hi; (Σ signs, cancellations, |o| > hi)."""
    votes = np.int32(0)
    lost = np.int32(0)
    for e in range(p.size):
        v, sg, cancel = _ties_entry(p[e], y[e], t0, t1, lam, how)
        o[e] = v
        votes += np.int32(sg)
        lost += np.int32(cancel)
    return votes, lost, _count_row(o, flag, hi, lo)      # the row is still in L1


@nb.njit(parallel=True, cache=True, nogil=True, error_model="numpy")
def _ties_rows(prev, sb, a, t0, t1, lam, how, out, hi, lo, rows, stats, cand_n, cand_val):   # pragma: no cover
    n_rows, n_in = prev.shape
    n_chunks = (n_rows + rows - 1) // rows
    for c in nb.prange(n_chunks):
        r0, r1, m, flag = _row_chunk(c, rows, n_rows, n_in)
        tau = np.empty(n_in, np.float32)
        votes = 0
        lost = 0
        above = 0
        for r in range(r0, r1):
            _tau_row(sb, a, r, tau)
            f0 = (r - r0) * n_in
            v, n_lost, n_above = _ties_row(prev[r], tau, out[r], flag[f0:f0 + n_in], t0, t1, lam, how, hi, lo)
            votes += v
            lost += n_lost
            above += n_above
        stats[c, 0] = votes
        stats[c, 1] = lost
        stats[c, 2] = above
        _collect(out.reshape(-1), r0 * n_in, m, flag, c, cand_n, cand_val)


@nb.njit(parallel=True, cache=True, nogil=True)
def _abs_rows(sb, a, hi, lo, rows, stats, cand_n, cand_val):   # pragma: no cover - compiled
    n_rows, n_in = sb.shape[0], a.shape[1]
    n_chunks = (n_rows + rows - 1) // rows
    for c in nb.prange(n_chunks):
        r0, r1, m, flag = _row_chunk(c, rows, n_rows, n_in)
        tau = np.empty(m, np.float32)
        above = 0
        for r in range(r0, r1):
            f0 = (r - r0) * n_in
            row = tau[f0:f0 + n_in]
            _tau_row(sb, a, r, row)
            above += _count_row(row, flag[f0:f0 + n_in], hi, lo)
        stats[c, 2] = above
        _collect(tau, 0, m, flag, c, cand_n, cand_val)


@nb.njit(parallel=True, cache=True, nogil=True)
def _tau_full(sb, a, out):   # pragma: no cover - compiled
    for r in nb.prange(out.shape[0]):
        _tau_row(sb, a, r, out[r])


@nb.njit(cache=True, nogil=True)
def _tau_at(sb, a, idx):   # pragma: no cover - compiled
    n_in = a.shape[1]
    out = np.empty(idx.size, np.float32)
    for t in range(idx.size):
        r, e = idx[t] // n_in, idx[t] % n_in
        acc = np.float32(0)
        for q in range(sb.shape[1]):
            acc += sb[r, q] * a[q, e]
        out[t] = acc
    return out


@nb.njit(cache=True, nogil=True, error_model="numpy")
def _ties_entries(p, y, t0, t1, lam, how):   # pragma: no cover - compiled
    out = np.empty(p.size, np.float32)
    for e in range(p.size):
        out[e] = abs(_ties_entry(p[e], y[e], t0, t1, lam, how)[0])
    return out


@nb.njit(parallel=True, cache=True, nogil=True)
def _take_larger(cur, new):   # pragma: no cover - compiled
    rows = cur.shape[0]
    for r in nb.prange(rows):
        cr, nr = cur[r], new[r]
        for e in range(cr.size):
            cr[e] = nr[e] if abs(nr[e]) >= abs(cr[e]) else cr[e]


def take_larger(cur: torch.Tensor, new: torch.Tensor) -> None:
    """MagMax's selection in place: cur = new where |new| >= |cur| (ties: the new), else cur; both (rows, in)
    float32 with contiguous rows."""
    _set_threads()
    _take_larger(cur.numpy(), new.numpy())


class Counted:
    """One module's passes of a continual TIES step, each counted against a bracket (lo, hi] of magnitudes: the
    chunks' stats and the candidates |value| in (lo, hi], in buffers reused for every module of its shape.

    τ = sb @ a is never stored: each pass forms its rows from the factors (k multiply-adds an entry, summed in
    order), in the core's cache, so a pass reads only M_{t-1} and writes only M_t. ``tau`` and ``tau_at`` give
    the same float32 values.
    """

    def __init__(self, shape: tuple[int, int], entries: int = BRACKET_CHUNK):
        self.shape = tuple(shape)
        self.rows = max(1, entries // shape[1])          # rows per chunk
        n_chunks = -(-shape[0] // self.rows)
        self.stats = np.zeros((n_chunks, STATS), np.int64)
        self.cand_n = np.zeros(n_chunks, np.int64)
        self.cand_val = np.empty((n_chunks, self.rows * shape[1]), np.float32)

    def _result(self) -> tuple[np.ndarray, np.ndarray]:
        cand = np.concatenate([self.cand_val[c, :n] for c, n in enumerate(self.cand_n.tolist())])
        return self.stats.sum(0), cand

    def ties(self, prev: torch.Tensor, sb: torch.Tensor, a: torch.Tensor, t0: float, t1: float, lam: float,
             how: str, out: torch.Tensor, hi: float, lo: float) -> tuple[np.ndarray, np.ndarray]:
        """out = continual TIES of (prev, τ = sb @ a) entry by entry (``_ties_entry``), one parallel pass; returns
        (Σ elected signs, exact cancellations, |out| > hi), and the |out| in (lo, hi]."""
        _set_threads()
        f32 = np.float32
        _ties_rows(prev.contiguous().numpy(), sb.contiguous().numpy(), a.contiguous().numpy(), f32(t0), f32(t1), f32(lam), HOW[how], out.numpy(),
                   f32(hi), f32(lo), self.rows, self.stats, self.cand_n, self.cand_val)
        return self._result()

    def magnitudes(self, sb: torch.Tensor, a: torch.Tensor, hi: float, lo: float) -> tuple[int, np.ndarray]:
        """(how many |τ| > hi, the |τ| in (lo, hi]) of τ = sb @ a, one parallel pass."""
        _set_threads()
        self.stats[:] = 0
        _abs_rows(sb.contiguous().numpy(), a.contiguous().numpy(), np.float32(hi), np.float32(lo), self.rows, self.stats, self.cand_n,
                  self.cand_val)
        stats, cand = self._result()
        return int(stats[2]), cand


def tau(sb: torch.Tensor, a: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = sb @ a (float32, contiguous), formed as ``Counted``'s passes form it."""
    _set_threads()
    _tau_full(sb.contiguous().numpy(), a.contiguous().numpy(), out.numpy())
    return out


def tau_at(sb: torch.Tensor, a: torch.Tensor, idx: np.ndarray) -> np.ndarray:
    """(sb @ a) at the flat positions ``idx``, as ``Counted``'s passes form them."""
    return _tau_at(sb.contiguous().numpy(), a.contiguous().numpy(), idx.astype(np.int64))


def ties_entries(p: np.ndarray, y: np.ndarray, t0: float, t1: float, lam: float, how: str) -> np.ndarray:
    """|continual TIES| of the entry pairs (p, y) (float32 arrays): ``Counted.ties``' values at sampled positions."""
    f32 = np.float32
    return _ties_entries(p.astype(f32), y.astype(f32), f32(t0), f32(t1), f32(lam), HOW[how])


def keep_threshold(p: float) -> int:
    """T = ⌊p · 2^64⌋ exactly (p a float64 in [0, 1)): a uniform 64-bit integer is below T with probability
    T / 2^64, within 2^-64 of p."""
    from fractions import Fraction
    return int(Fraction(p) * (1 << 64))


def contributor_keys(seed: int, n: int) -> np.ndarray:
    """One 64-bit stream key per contributor from a module's seed (SplitMix64 of seed + (i + 1) · golden ratio)."""
    g = int(_GOLDEN)
    out = np.empty(n, np.uint64)
    for i in range(n):
        z = (seed + (i + 1) * g) & ((1 << 64) - 1)
        z = ((z ^ (z >> 30)) * int(_MIX1)) & ((1 << 64) - 1)
        z = ((z ^ (z >> 27)) * int(_MIX2)) & ((1 << 64) - 1)
        out[i] = z ^ (z >> 31)
    return out


def drop_block(x: torch.Tensor, keys: np.ndarray, pos0: int, threshold: int, w: torch.Tensor, mode: str,
               out: np.ndarray) -> None:
    """DARE's drop on block x (N, E) at flat position ``pos0`` of its module: entry e of contributor i is kept when
    SplitMix64(key_i + (pos0 + e) · golden) < ``threshold``, and the kept entries, weighted by w (N,), are added
    to ``out`` (rows, E) float32 as ``mode`` says (``sum`` or ``ties_mean``)."""
    _set_threads()
    xa = np.ascontiguousarray(x.reshape(x.shape[0], -1).numpy())        # a partial last block is a strided view
    _drop_block(xa, keys, pos0, np.uint64(threshold), w.contiguous().numpy(), MODES[mode], out, CHUNK)


def _set_threads() -> None:
    """numba's threads follow torch's (a pooled worker or a test may have set fewer)."""
    nb.set_num_threads(max(1, min(torch.get_num_threads(), nb.config.NUMBA_NUM_THREADS)))


class BlockTrim:
    """Reused buffers for ``trim`` on blocks of one shape (N, E)."""

    def __init__(self, n: int, entries: int, chunk: int = CHUNK):
        self.chunk = chunk
        n_chunks = -(-entries // chunk)
        self.shape = (n, entries)
        self.counts = np.zeros((n_chunks, n), np.int64)
        self.cand_n = np.zeros((n_chunks, n), np.int64)
        self.cand_pos = np.zeros((n_chunks, n, chunk), np.int32)
        self.cand_val = np.zeros((n_chunks, n, chunk), np.float32)

    def __call__(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, w: torch.Tensor, mode: str,
                 out: np.ndarray, offset: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Trim block x (N, E) against the brackets a, b (N,) and add the kept entries, weighted by w (N,), to
        ``out`` (rows, E) float32 (one row per sum of ``mode``, zero where the block was not yet added). Returns
        (kept counts (N,), and the candidates' contributor, ``offset`` + position in the block and value, ordered
        by contributor)."""
        _set_threads()
        xa = np.ascontiguousarray(x.reshape(x.shape[0], -1).numpy())    # a partial last block is a strided view
        _trim_block(xa, a.numpy(), b.numpy(), w.numpy(), MODES[mode], out, self.counts, self.cand_n,
                    self.cand_pos, self.cand_val, self.chunk)
        who, pos, val = _compact(self.cand_n, self.cand_pos, self.cand_val, offset)
        return self.counts.sum(0), who, pos, val


def warm_up() -> float:
    """Compile (or load from numba's cache) every kernel on tiny inputs; returns the seconds it took. A process's
    first merge pays this otherwise: ``benchmarks/merge_latency.py`` calls it before timing anything."""
    import time

    t0 = time.perf_counter()
    x = torch.linspace(-1, 1, 2 * 3 * 8).reshape(2, 3, 8)
    a, b, w = torch.full((2,), 0.5), torch.full((2,), 0.1), torch.ones(2)
    for mode, rows in (("sum", 1), ("ties_sum", 3), ("ties_mean", 5)):
        out = np.zeros((rows, 48), np.float32)[:, :24]          # a strided slice, as of ``Sums.buf``
        _, who, pos, val = BlockTrim(2, 24)(x, a, b, w, mode, out)
        kth_by_group(who, val, 2, np.ones(2, np.int64))
        add_kept(who, pos, val, np.zeros(2, np.float32), w, mode, np.zeros((rows, 24), np.float32))
        if mode != "ties_sum":
            drop_block(x, contributor_keys(0, 2), 0, keep_threshold(0.5), w, mode, out)
    network_block(torch.rand(5, 2, 3), np.array([[0, 1], [1, 2]], np.int64), 1)
    bracket(np.linspace(0, 1, 100, dtype=np.float32), 0.5, 0.2)
    sample_entries(torch.rand(2, 4, 3), torch.rand(2, 3, 5), torch.tensor([0, 3]), torch.tensor([1, 4]))
    row_order_stats(torch.rand(2, 9), [2, 5])
    counted = Counted((4, 6), entries=12)
    m, f_b, f_a = torch.linspace(-1, 1, 24).reshape(4, 6), torch.rand(4, 2), torch.rand(2, 6)
    counted.ties(m, f_b, f_a, 0.5, 0.2, 0.5, "sum", torch.empty(4, 6), 0.9, 0.1)
    counted.magnitudes(f_b, f_a, 0.9, 0.1)
    tau(f_b, f_a, torch.empty(4, 6))
    tau_at(f_b, f_a, np.array([0, 5]))
    ties_entries(np.ones(3, np.float32), np.ones(3, np.float32), 0.5, 0.5, 0.5, "sum")
    take_larger(torch.rand(8, 6)[2:6], torch.rand(4, 6))          # a block of rows of the selection, one of work
    return time.perf_counter() - t0
