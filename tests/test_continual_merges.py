"""Continual merges (``sim.merge.continual``): each strategy against a numpy re-derivation of FusionBench's code,
hand-computed TIES / MagMax cases, order dependence and purity of ``step``."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sim.merge import continual as C
from sim.model import PEFT_PREFIX, Adapter

MODULES = ("blocks.0.attn.qkv", "blocks.1.attn.qkv")
EPS32 = np.finfo(np.float32).eps

pytestmark = pytest.mark.usefixtures("single_thread")


def make_adapter(seed: int, r: int = 2, out_f: int = 7, in_f: int = 5, alpha: float = 4.0,
                 base: str | None = "base0") -> Adapter:
    g = torch.Generator().manual_seed(seed)
    w = {}
    for m in MODULES:
        w[f"{PEFT_PREFIX}{m}.lora_A.weight"] = torch.randn(r, in_f, generator=g)
        w[f"{PEFT_PREFIX}{m}.lora_B.weight"] = torch.randn(out_f, r, generator=g)
    return Adapter(w, alpha, base)


def from_delta(d: list[list[float]]) -> Adapter:
    """An adapter whose one module ``m`` has exactly ΔW = d (A = I, B = d, alpha = r → scaling 1)."""
    b = torch.tensor(d, dtype=torch.float32)
    r = b.shape[1]
    return Adapter({f"{PEFT_PREFIX}m.lora_A.weight": torch.eye(r), f"{PEFT_PREFIX}m.lora_B.weight": b}, float(r))


def np_delta(a: Adapter, m: str) -> np.ndarray:
    fa = a.weights[f"{PEFT_PREFIX}{m}.lora_A.weight"].double().numpy()
    fb = a.weights[f"{PEFT_PREFIX}{m}.lora_B.weight"].double().numpy()
    return a.alpha / fa.shape[0] * fb @ fa


def task_vectors(adapters: list[Adapter]) -> list[dict[str, np.ndarray]]:
    return [{m: np_delta(a, m) for m in a.modules()} for a in adapters]


def assert_merge(merged: Adapter, expected: dict[str, np.ndarray], rtol: float = 1e-4) -> None:
    for m, e in expected.items():
        np.testing.assert_allclose(merged.delta(m).double().numpy(), e, rtol=rtol,
                                   atol=rtol * np.abs(e).max(), err_msg=m)


# ------------------------------------------------------------------------------------------
# numpy re-derivations of FusionBench's continual methods (float64, dense ΔW)
# ------------------------------------------------------------------------------------------
def np_opcm(taus: list[dict[str, np.ndarray]], alpha: float = 0.5,
            diagonal_to_rank: bool = False) -> dict[str, np.ndarray]:
    """fusion_bench/method/opcm/opcm.py, ``OPCMForCLIP.run`` and ``merge_linear_weights``, line by line.

    ``diagonal_to_rank``: zero P's diagonal only over the merged update's numerical rank (ours; the same as
    FusionBench's whenever the merged update has full rank)."""
    merged = dict(taus[0])
    norms = [np.sqrt(sum((t ** 2).sum() for t in taus[0].values()))]
    prev_lambda = 1.0
    for tau in taus[1:]:
        norms.append(np.sqrt(sum((t ** 2).sum() for t in tau.values())))
        avg = np.mean(norms)
        new = {}
        for m, prev in merged.items():
            u, s, vt = np.linalg.svd(prev, full_matrices=True)
            v = vt.T
            split = int(np.argmax(np.cumsum(s) / s.sum() > alpha))
            p = u.T @ tau[m] @ v
            nd = int((s > s[0] * max(prev.shape) * EPS32).sum()) if diagonal_to_rank else len(s)
            p[np.arange(nd), np.arange(nd)] = 0
            p[:split, :split] = 0
            new[m] = prev_lambda * prev + u @ p @ v.T
        tv_norm = np.sqrt(sum((t ** 2).sum() for t in new.values()))
        lam = tv_norm / avg
        merged = {m: t * (avg / tv_norm) for m, t in new.items()}
        prev_lambda = lam
    return merged


def np_ties_pair(rows: np.ndarray, density: float, how: str) -> np.ndarray:
    """fusion_bench/method/ties_merging/ties_merging_utils.py ``ties_merging`` on (2, D) flat task vectors, except the
    trim keeps exactly int(density · D) entries per row (FusionBench's kthvalue keeps one more)."""
    k = int(density * rows.shape[1])
    t = np.sort(np.abs(rows), axis=1)[:, ::-1][:, k - 1:k]
    v = rows * (np.abs(rows) >= t)
    sign = np.sign(v.sum(0))
    sign[sign == 0] = np.sign(sign.sum())                       # resolve_zero_signs(..., "majority")
    sel = v * np.where(sign > 0, v > 0, v < 0)
    if how == "sum":
        return sel.sum(0)
    if how == "mean":
        return sel.sum(0) / np.maximum((sel != 0).sum(0), 1)
    return np.abs(sel).max(0) * sign


def np_continual_ties(taus: list[dict[str, np.ndarray]], lam: float = 0.5, density: float = 0.2,
                      how: str = "sum") -> dict[str, np.ndarray]:
    """fusion_bench/method/opcm/ties_merging.py: merged += λ · ties_merging([merged, τ]) over the whole vector."""
    mods = list(taus[0])
    merged = {m: lam * taus[0][m] for m in mods}
    for tau in taus[1:]:
        flat = np.stack([np.concatenate([merged[m].ravel() for m in mods]),
                         np.concatenate([tau[m].ravel() for m in mods])])
        upd, pos = np_ties_pair(flat, density, how), 0
        for m in mods:
            size = merged[m].size
            merged[m] = merged[m] + lam * upd[pos:pos + size].reshape(merged[m].shape)
            pos += size
    return merged


def np_magmax(taus: list[dict[str, np.ndarray]], lam: float = 0.5) -> dict[str, np.ndarray]:
    """fusion_bench/method/magmax/magmax.py ``MagMaxAlgorithm.run``: running where(|new| >= |best|), then λ ·."""
    best = dict(taus[0])
    for tau in taus[1:]:
        best = {m: np.where(np.abs(tau[m]) >= np.abs(b), tau[m], b) for m, b in best.items()}
    return {m: lam * b for m, b in best.items()}


# ------------------------------------------------------------------------------------------
# Each strategy against its re-derivation
# ------------------------------------------------------------------------------------------
def test_opcm_matches_fusionbench_with_full_rank_updates():
    # Prepare: rank-3 adapters of a (5, 3) layer: every merged update has full rank, as FusionBench's do
    adapters = [make_adapter(i, r=3, out_f=5, in_f=3) for i in range(3)]
    # Execute
    merged = C.fold("opcm", adapters)
    # Assert
    assert_merge(merged, np_opcm(task_vectors(adapters)))


@pytest.mark.parametrize("alpha", [0.3, 0.5, 0.8])
def test_opcm_low_rank_updates_zero_the_diagonal_over_the_numerical_rank(alpha):
    # Prepare: rank-2 adapters of a (7, 5) layer: merged ranks 2, 4, then full
    adapters = [make_adapter(10 + i) for i in range(4)]
    # Execute
    merged = C.fold("opcm", adapters, alpha=alpha)
    # Assert
    assert_merge(merged, np_opcm(task_vectors(adapters), alpha, diagonal_to_rank=True))


def test_opcm_keeps_the_mean_task_vector_norm_and_depends_on_order():
    # Prepare
    adapters = [make_adapter(20 + i) for i in range(3)]
    norms = [np.sqrt(sum((t ** 2).sum() for t in tv.values())) for tv in task_vectors(adapters)]
    # Execute
    forward = C.fold("opcm", adapters)
    backward = C.fold("opcm", adapters[::-1])
    # Assert: ‖M_t‖ = mean ‖τ_i‖ (λ_t's definition), and the merge depends on the order
    for merged in (forward, backward):
        total = np.sqrt(sum(float(merged.delta(m).double().square().sum()) for m in MODULES))
        assert total == pytest.approx(np.mean(norms), rel=1e-5)
    gap = max(float((forward.delta(m) - backward.delta(m)).abs().max()) for m in MODULES)
    assert gap > 1e-2 * max(float(forward.delta(m).abs().max()) for m in MODULES)


@pytest.mark.parametrize("how", ["sum", "mean", "max"])
def test_continual_ties_matches_fusionbench(how):
    # Prepare
    adapters = [make_adapter(30 + i) for i in range(3)]
    # Execute
    merged = C.fold("continual_ties", adapters, disjoint=how)
    # Assert
    assert_merge(merged, np_continual_ties(task_vectors(adapters), how=how))


def test_continual_ties_by_hand_with_an_exact_cancellation():
    # Prepare: M_0 = 0.5 τ_0 = [1, -2, 4]; density 0.7 keeps int(2.1) = 2 entries of each row
    adapters = [from_delta([[2.0, -4.0, 8.0]]), from_delta([[0.5, 2.0, 1.0]])]
    # Execute
    merged = C.fold("continual_ties", adapters, density=0.7)
    # Assert: trimmed rows [0, -2, 4] and [0, 2, 1]; entry 1 cancels exactly, so it takes the majority sign (+,
    # from entry 2): TIES = [0, 2, 5], M_1 = [1, -2, 4] + 0.5 · [0, 2, 5]
    np.testing.assert_allclose(merged.delta("m").numpy(), [[1.0, -1.0, 6.5]])


def test_continual_ties_by_hand_with_no_majority_keeps_the_negative_entry():
    # Prepare: M_0 = [[1, -2], [3, 0.5]]; density 0.5 keeps 2 of the 4 entries of each row
    adapters = [from_delta([[2.0, -4.0], [6.0, 1.0]]), from_delta([[1.0, 2.0], [-3.0, 0.1]])]
    # Execute
    merged = C.fold("continual_ties", adapters, density=0.5)
    # Assert: trimmed [[0, -2], [3, 0]] and [[0, 2], [-3, 0]] cancel everywhere: the majority sign is 0, and
    # FusionBench then keeps the negative entries: TIES = [[0, -2], [-3, 0]]
    np.testing.assert_allclose(merged.delta("m").numpy(), [[1.0, -3.0], [1.5, 0.5]])


@pytest.mark.parametrize("name", ["continual_ties", "continual_magmax"])
def test_blocked_passes_cover_every_row(name):
    # Prepare: more rows than one block of the elementwise passes (C.ROWS), a module of each shape
    adapters = [make_adapter(90 + i, out_f=2 * C.ROWS + 5, in_f=3) for i in range(3)]
    taus = task_vectors(adapters)
    # Execute
    merged = C.fold(name, adapters)
    # Assert
    assert_merge(merged, np_continual_ties(taus) if name == "continual_ties" else np_magmax(taus))


def test_continual_magmax_matches_fusionbench_and_new_wins_ties():
    # Prepare
    adapters = [make_adapter(40 + i) for i in range(3)]
    tie = [from_delta([[1.0, -2.0]]), from_delta([[-1.0, 1.0]])]
    # Execute
    merged = C.fold("continual_magmax", adapters)
    tied = C.fold("continual_magmax", tie)
    # Assert: |-1| = |1| in entry 0: the later one wins (MagMax's >=); then · 0.5
    assert_merge(merged, np_magmax(task_vectors(adapters)))
    np.testing.assert_allclose(tied.delta("m").numpy(), [[-0.5, -1.0]])


def test_continual_task_arithmetic_and_weight_average_match_their_definitions():
    # Prepare
    adapters = [make_adapter(50 + i) for i in range(3)]
    taus = task_vectors(adapters)
    # Execute
    ta = C.fold("continual_task_arithmetic", adapters)
    avg = C.fold("continual_weight_average", adapters)
    weighted = C.fold("continual_weight_average", adapters, weights=[1.0, 2.0, 1.0])
    # Assert: 0.3 Σ τ_i (FusionBench's scaling_factor); the running mean (t M + τ) / (t + 1); the weighted mean
    assert_merge(ta, {m: 0.3 * sum(t[m] for t in taus) for m in MODULES})
    assert_merge(avg, {m: sum(t[m] for t in taus) / 3 for m in MODULES})
    assert_merge(weighted, {m: (taus[0][m] + 2 * taus[1][m] + taus[2][m]) / 4 for m in MODULES})
    assert ta.rank(MODULES[0]) == 5 and C.fold("continual_weight_average", adapters[:2]).rank(MODULES[0]) == 4


# ------------------------------------------------------------------------------------------
# General properties
# ------------------------------------------------------------------------------------------
ONE = {"opcm": 1.0, "continual_task_arithmetic": 0.3, "continual_ties": 0.5, "continual_weight_average": 1.0,
       "continual_magmax": 0.5}


@pytest.mark.parametrize("name", sorted(C.STEPS))
def test_one_contributor_is_its_scaled_task_vector(name):
    # Prepare
    adapter = make_adapter(60)
    # Execute
    merged = C.fold(name, [adapter])
    # Assert: the first commit is taken as it is, scaled by the strategy's λ (OPCM: λ_0 = 1; TIES: no trim)
    assert_merge(merged, {m: ONE[name] * np_delta(adapter, m) for m in MODULES}, rtol=1e-5)
    assert merged.meta["n_contributors"] == 1 and merged.meta["merge_strategy"] == name


@pytest.mark.parametrize("name", sorted(C.STEPS))
def test_step_does_not_change_its_input(name):
    # Prepare
    adapters = [make_adapter(70 + i) for i in range(3)]
    state = C.step(C.step(C.start(name), adapters[0]), adapters[1])
    tensors = {k: t.clone() for k, t in state.tensors.items()}
    scalars = dict(state.scalars)
    # Execute
    after = C.step(state, adapters[2])
    # Assert
    assert state.n == 2 and after.n == 3
    assert state.tensors.keys() == tensors.keys() and state.scalars == scalars
    for k, t in tensors.items():
        assert torch.equal(state.tensors[k], t), k
    assert_merge(C.merged_adapter(after, adapters), {m: t.double().numpy()
                                                     for m, t in C.merged_deltas(after).items()}, rtol=1e-6)


def test_order_matters_for_ties_and_opcm_but_not_for_the_sums():
    # Prepare
    adapters = [make_adapter(80 + i) for i in range(3)]

    def gap(name: str) -> float:
        a, b = C.fold(name, adapters), C.fold(name, adapters[::-1])
        return max(float((a.delta(m) - b.delta(m)).abs().max() / a.delta(m).abs().max()) for m in MODULES)

    # Execute / Assert
    assert gap("opcm") > 1e-2 and gap("continual_ties") > 1e-2
    assert gap("continual_task_arithmetic") < 1e-5 and gap("continual_weight_average") < 1e-5
    assert gap("continual_magmax") < 1e-6


def test_branch_checks_its_commits():
    # Prepare
    state = C.step(C.start("opcm"), make_adapter(0))
    # Execute / Assert
    with pytest.raises(ValueError, match="unknown continual merge strategy 'opcmm'; known: opcm"):
        C.start("opcmm")
    with pytest.raises(ValueError, match="shape"):
        C.step(state, make_adapter(1, out_f=6))
    with pytest.raises(ValueError, match="different modules"):
        C.step(state, from_delta([[1.0]]))
    with pytest.raises(ValueError, match="base"):
        C.step(state, make_adapter(1, base="other"))
    with pytest.raises(ValueError, match="alpha"):
        C.step(state, make_adapter(1), alpha=1.0)
    with pytest.raises(ValueError, match="no commit"):
        C.merged_adapter(C.start("continual_ties"), [])


@pytest.mark.parametrize("n, k", [(10, 3), (300_000, 60_000), (300_000, 1), (300_000, 300_000), (300_000, 0)])
def test_kth_largest_is_the_sorted_value_with_ties_and_missed_brackets(n, k):
    from sim.merge.continual import kth_largest

    rng = np.random.default_rng(1)
    for x in (np.abs(rng.standard_normal(n)).astype(np.float32),                      # distinct
              np.round(np.abs(rng.standard_normal(n)), 1).astype(np.float32),         # heavy ties
              np.concatenate([np.zeros(n - n // 50), np.ones(n // 50)]).astype(np.float32)):   # bracket may miss
        want = float(np.sort(x)[::-1][k - 1]) if k else float("inf")
        assert kth_largest(x.copy(), k) == want


# ------------------------------------------------------------------------------------------
# The compiled passes: folds, carried thresholds, sampled brackets
# ------------------------------------------------------------------------------------------
BIG = dict(r=3, out_f=400, in_f=410)        # two modules of 164 000 entries: the global trim samples its bracket


def step_through(name: str, adapters: list[Adapter], **options) -> C.ContinualState:
    state = C.start(name)
    for a in adapters:
        state = C.step(state, a, **options)
    return state


@pytest.mark.parametrize("name, options", [("continual_ties", {}), ("continual_ties", {"scope": "module"}),
                                           ("continual_ties", {"disjoint": "mean", "density": 0.35}),
                                           ("continual_magmax", {})])
def test_fold_is_bit_identical_to_stepping_through_the_commits(name, options):
    # Prepare
    adapters = [make_adapter(100 + i, **BIG) for i in range(4)]
    # Execute
    folded = C.fold(name, adapters, **options)
    stepped = C.merged_adapter(step_through(name, adapters, **options), adapters)
    # Assert
    for m in MODULES:
        assert torch.equal(folded.delta(m), stepped.delta(m)), m


@pytest.mark.parametrize("scope", ["global", "module"])
def test_continual_ties_on_sampled_brackets_matches_fusionbench(scope):
    # Prepare: more entries than kth_largest partitions whole, so τ_t's and M_t's thresholds come from brackets
    adapters = [make_adapter(110 + i, **BIG) for i in range(3)]
    taus = task_vectors(adapters)
    if scope == "module":       # the re-derivation trims each module on its own
        want = {m: np_continual_ties([{m: t[m]} for t in taus])[m] for m in MODULES}
    else:
        want = np_continual_ties(taus)
    # Execute
    merged = C.fold("continual_ties", adapters, scope=scope)
    # Assert
    assert_merge(merged, want)


def test_carried_thresholds_are_the_exact_kth_magnitudes_of_the_merged_update():
    # Prepare
    adapters = [make_adapter(120 + i, **BIG) for i in range(3)]
    # Execute
    state = step_through("continual_ties", adapters)
    # Assert: the threshold the next step will trim M_t at is M_t's int(0.2 · size)-th largest magnitude
    mags = np.concatenate([state.tensors[m].abs().reshape(-1).numpy() for m in MODULES])
    want = float(np.sort(mags)[::-1][int(0.2 * mags.size) - 1])
    assert [state.scalars[f"{C.THRESHOLD}/{m}"] for m in MODULES] == [want, want]
    assert state.scalars[f"{C.THRESHOLD}/density"] == 0.2 and state.scalars[f"{C.THRESHOLD}/global"] == 1.0


def test_missed_brackets_fall_back_to_the_same_merge(monkeypatch):
    # Prepare
    adapters = [make_adapter(130 + i, **BIG) for i in range(3)]
    want = C.fold("continual_ties", adapters)
    # Execute: a bracket of zero width misses every time
    monkeypatch.setattr(C, "BRACKET_Z", 0.0)
    state = step_through("continual_ties", adapters)
    # Assert: every threshold came from the fallback, and the merge is the same
    assert not state.scalars
    for m in MODULES:
        assert torch.equal(C.merged_adapter(state, adapters).delta(m), want.delta(m)), m


def test_a_changed_density_or_scope_does_not_use_the_carried_thresholds():
    # Prepare
    adapters = [make_adapter(140 + i) for i in range(3)]
    state = step_through("continual_ties", adapters[:2])
    taus = task_vectors(adapters)
    # Execute
    merged = C.merged_adapter(C.step(state, adapters[2], density=0.5), adapters)
    # Assert: the last step trims M_1 at density 0.5, not at the 0.2 threshold its step counted
    m1 = np_continual_ties(taus[:2])
    flat = np.stack([np.concatenate([m1[m].ravel() for m in MODULES]),
                     np.concatenate([taus[2][m].ravel() for m in MODULES])])
    upd, pos, want = np_ties_pair(flat, 0.5, "sum"), 0, {}
    for m in MODULES:
        want[m] = m1[m] + 0.5 * upd[pos:pos + m1[m].size].reshape(m1[m].shape)
        pos += m1[m].size
    assert_merge(merged, want)


def test_tau_rows_are_summed_in_order():
    from sim.merge import kernels

    # Prepare: k = 13 (one sweep of eight terms, five single ones)
    g = torch.Generator().manual_seed(5)
    sb, a = torch.randn(37, 13, generator=g), torch.randn(13, 29, generator=g)
    want = np.zeros((37, 29), np.float32)
    for q in range(13):                                          # 0 + Σ_q in order, float32
        want += np.outer(sb[:, q].numpy(), a[q].numpy()).astype(np.float32)
    # Execute
    full = kernels.tau(sb, a, torch.empty(37, 29))
    some = kernels.tau_at(sb, a, np.array([0, 28, 29, 37 * 29 - 1]))
    # Assert
    np.testing.assert_array_equal(full.numpy(), want)
    np.testing.assert_array_equal(some, want.reshape(-1)[[0, 28, 29, 37 * 29 - 1]])
