"""TSV-M, Iso-C, Iso-CTS and KnOTS (``sim.merge.subspace``) against numpy re-derivations on tiny adapters.

Two references per SVD merge, written here from FusionBench's code and the papers with dense ΔW and
``np.linalg.svd``: a line-by-line transcription of FusionBench (``TSVM_utils.compute_and_sum_svd_mem_reduction``,
``iso_utils.iso_c`` / ``iso_cts``), which is well defined on full-rank updates, and the numerical-rank reading of it
that ``sim.merge.subspace`` documents for low-rank (LoRA) updates. KnOTS follows its authors' ``SVDMerger``.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sim.merge import get_spec
from sim.merge.subspace import common_split, iso_c, iso_cts, knots, tsv
from sim.merge.specs import ISO_CTS_COMMON_FRACTION, KNOTS_SCALE
from sim.model import PEFT_PREFIX, Adapter
from test_merge import from_delta

MODULES = ("blocks.0.attn.qkv", "blocks.1.attn.qkv")
EPS32 = float(np.finfo(np.float32).eps)

pytestmark = pytest.mark.usefixtures("single_thread")


def make_adapter(seed: int, r: int = 3, out_f: int = 12, in_f: int = 10, alpha: float = 6.0,
                 modules: tuple[str, ...] = MODULES) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    w = {}
    for m in modules:
        w[f"{PEFT_PREFIX}{m}.lora_A.weight"] = torch.randn(r, in_f, generator=g)
        w[f"{PEFT_PREFIX}{m}.lora_B.weight"] = torch.randn(out_f, r, generator=g)
    return Adapter(w, alpha, "base0")


def np_delta(a: Adapter, m: str) -> np.ndarray:
    fa = a.weights[f"{PEFT_PREFIX}{m}.lora_A.weight"].double().numpy()
    fb = a.weights[f"{PEFT_PREFIX}{m}.lora_B.weight"].double().numpy()
    return a.alpha / fa.shape[0] * fb @ fa


def got(merged: Adapter, m: str) -> np.ndarray:
    return merged.delta(m).double().numpy()


def np_rank(s: np.ndarray, shape: tuple[int, ...], ref: float | None = None) -> int:
    """Singular values above float32 round-off of a matrix of ``shape`` (numpy's matrix_rank rule)."""
    ref = s[0] if ref is None else ref
    return int((s > ref * max(shape) * EPS32).sum())


def np_polar(x: np.ndarray) -> np.ndarray:
    u, _, vh = np.linalg.svd(x, full_matrices=False)
    return u @ vh


# ------------------------------------------------------------------------------------------
# Transcriptions of FusionBench (well defined on full-rank updates)
# ------------------------------------------------------------------------------------------
def fb_tsv(deltas: list[np.ndarray]) -> np.ndarray:
    """``compute_and_sum_svd_mem_reduction``: top q/N of each task into zero-filled (out, q), (q,), (q, in) slots."""
    n, q = len(deltas), min(deltas[0].shape)
    k = q // n
    sum_u, sum_s, sum_vh = np.zeros((deltas[0].shape[0], q)), np.zeros(q), np.zeros((q, deltas[0].shape[1]))
    for i, d in enumerate(deltas):
        u, s, vh = np.linalg.svd(d, full_matrices=False)
        sum_u[:, i * k:(i + 1) * k], sum_s[i * k:(i + 1) * k], sum_vh[i * k:(i + 1) * k] = u[:, :k], s[:k], vh[:k]
    return np_polar(sum_u) @ np.diag(sum_s) @ np_polar(sum_vh)


def fb_iso_c(deltas: list[np.ndarray], w: np.ndarray) -> np.ndarray:
    u, s, vh = np.linalg.svd(np.tensordot(w, np.stack(deltas), 1), full_matrices=False)
    return u @ np.diag(np.full_like(s, s.mean())) @ vh


def fb_iso_cts(deltas: list[np.ndarray], w: np.ndarray, fraction: float) -> np.ndarray:
    deltas = [wi * d for wi, d in zip(w, deltas)]
    n, q = len(deltas), min(deltas[0].shape)
    k_c = int(q * fraction)
    k_c = q - round((q - k_c) / n) * n
    u, s, vh = np.linalg.svd(sum(deltas), full_matrices=False)
    per = (q - k_c) // n
    cols_u, cols_s, rows_v = [], [], []
    for d in deltas:
        ut, st, vt = np.linalg.svd(d - u[:, :k_c] @ u[:, :k_c].T @ d, full_matrices=False)
        cols_u.append(ut[:, :per]), cols_s.append(st[:per]), rows_v.append(vt[:per])
    x = np.concatenate(cols_u + [u[:, :k_c]], 1)
    s_all = np.concatenate(cols_s + [s[:k_c]])
    y = np.concatenate(rows_v + [vh[:k_c]], 0)
    return np_polar(x) @ np.diag(np.full_like(s_all, s_all.mean())) @ np_polar(y)


# ------------------------------------------------------------------------------------------
# The numerical-rank reading (sim.merge.subspace's docstring), for low-rank updates
# ------------------------------------------------------------------------------------------
def np_tsv(deltas: list[np.ndarray], w: np.ndarray) -> np.ndarray:
    """Task i keeps min(q // N, rank) triplets of w_i ΔW_i; polar factors of the stacks; all kept σ."""
    k = min(deltas[0].shape) // len(deltas)
    us, ss, vhs = [], [], []
    for wi, d in zip(w, deltas):
        u, s, vh = np.linalg.svd(wi * d, full_matrices=False)
        keep = min(k, np_rank(s, d.shape))
        us.append(u[:, :keep]), ss.append(s[:keep]), vhs.append(vh[:keep])
    return np_polar(np.concatenate(us, 1)) @ np.diag(np.concatenate(ss)) @ np_polar(np.concatenate(vhs, 0))


def np_iso_c(deltas: list[np.ndarray], w: np.ndarray) -> np.ndarray:
    """mean(σ) U Vᵀ over the sum's nonzero singular values."""
    m = np.tensordot(w, np.stack(deltas), 1)
    u, s, vh = np.linalg.svd(m, full_matrices=False)
    rho = np_rank(s, m.shape)
    return s[:rho].mean() * u[:, :rho] @ vh[:rho]


def np_iso_cts(deltas: list[np.ndarray], w: np.ndarray, fraction: float = ISO_CTS_COMMON_FRACTION) -> np.ndarray:
    """Iso-CTS splitting the sum's rank ρ; each residual at its rank read against its own task's σ_max."""
    deltas = [wi * d for wi, d in zip(w, deltas)]
    n = len(deltas)
    m = sum(deltas)
    u, s, vh = np.linalg.svd(m, full_matrices=False)
    rho = np_rank(s, m.shape)
    k_c = int(rho * fraction)
    per = round((rho - k_c) / n)
    k_c = rho - per * n
    cols_u, cols_s, rows_v = [u[:, :k_c]], [s[:k_c]], [vh[:k_c]]
    for d in deltas if per else []:
        s_own = np.linalg.svd(d, compute_uv=False)
        ut, st, vt = np.linalg.svd(d - u[:, :k_c] @ u[:, :k_c].T @ d, full_matrices=False)
        keep = min(per, np_rank(st, d.shape, ref=s_own[0]))
        cols_u.append(ut[:, :keep]), cols_s.append(st[:keep]), rows_v.append(vt[:keep])
    s_all = np.concatenate(cols_s)
    return s_all.mean() * np_polar(np.concatenate(cols_u, 1)) @ np_polar(np.concatenate(rows_v, 0))


# ------------------------------------------------------------------------------------------
# KnOTS (the authors' SVDMerger): SVD of [ΔW_1 … ΔW_N], TIES on diag(σ) V_iᵀ, U back
# ------------------------------------------------------------------------------------------
def np_trim(z: np.ndarray, density: float) -> np.ndarray:
    if density >= 1:
        return z
    k = int(density * z.size)
    t = np.sort(np.abs(z).ravel())[::-1][k - 1]
    return np.where(np.abs(z) >= t, z, 0.0)


def np_knots(deltas: list[list[np.ndarray]], w: np.ndarray, density: float = 0.2, scope: str = "global",
             base: str = "ties") -> list[np.ndarray]:
    """``deltas[j][i]``: module j of contributor i; w (N, M). Returns the merged ΔW of every module."""
    n, in_f = len(deltas[0]), deltas[0][0].shape[1]
    bases, coords = [], []                                      # coords[j]: (N, ρ_j, in)
    for mods in deltas:
        cat = np.concatenate(mods, axis=1)                      # (out, N · in)
        u, s, vh = np.linalg.svd(cat, full_matrices=False)
        rho = np_rank(s, cat.shape)
        sv = s[:rho, None] * vh[:rho]                           # (ρ, N · in)
        bases.append(u[:, :rho])
        coords.append(np.stack([sv[:, i * in_f:(i + 1) * in_f] for i in range(n)]))
    if base == "ta":
        return [b @ np.tensordot(w[:, j], z, 1) for j, (b, z) in enumerate(zip(bases, coords))]
    if scope == "global":                                       # trim each task's coordinates of all modules at once
        flat = [np_trim(np.concatenate([z[i].ravel() for z in coords]), density) for i in range(n)]
        ends = np.cumsum([0] + [z[0].size for z in coords])
        trimmed = [np.stack([flat[i][ends[j]:ends[j + 1]].reshape(z[0].shape) for i in range(n)])
                   for j, z in enumerate(coords)]
    else:
        trimmed = [np.stack([np_trim(zi, density) for zi in z]) for z in coords]
    out = []
    for j, (b, z) in enumerate(zip(bases, trimmed)):
        elected = np.where(z.sum(0) >= 0, 1.0, -1.0)
        agree = np.sign(z) == elected
        out.append(b @ ((w[:, j, None, None] * z * agree).sum(0) / np.maximum(agree.sum(0), 1)))
    return out


def deltas_of(adapters: list[Adapter], m: str) -> list[np.ndarray]:
    return [np_delta(a, m) for a in adapters]


# ------------------------------------------------------------------------------------------
# TSV-M
# ------------------------------------------------------------------------------------------
def test_tsv_of_two_rank_one_updates_is_the_polar_factor_hand_computed():
    # Prepare: ΔW_1 = e1 e1ᵀ, ΔW_2 = u e2ᵀ with u at 60°: q = 2, N = 2, one triplet each; Y = I, X = [e1, u]
    c, s = np.cos(np.pi / 3), np.sin(np.pi / 3)
    adapters = from_delta([[1.0, 0.0], [0.0, 0.0]], [[0.0, c], [0.0, s]])
    # Execute
    merged = tsv(adapters, [1.0, 1.0])
    # Assert: polar([e1, u]) has orthonormal columns at 60°/2 ∓ 45° = -15°, 75°; σ = 1, 1
    a, b = np.deg2rad(-15.0), np.deg2rad(75.0)
    np.testing.assert_allclose(got(merged, "m"), [[np.cos(a), np.cos(b)], [np.sin(a), np.sin(b)]], atol=1e-6)


@pytest.mark.parametrize("n", [2, 3])
def test_tsv_matches_fusionbench_on_full_rank_updates(n):
    # Prepare: rank-10 updates of a 12 × 10 layer (full rank, as full fine-tuning gives)
    adapters = [make_adapter(i, r=10, alpha=10.0) for i in range(n)]
    # Execute
    merged = tsv(adapters, np.ones(n))
    # Assert
    for m in MODULES:
        np.testing.assert_allclose(got(merged, m), fb_tsv(deltas_of(adapters, m)), rtol=1e-4, atol=1e-4)


def test_tsv_of_low_rank_updates_keeps_each_tasks_rank():
    # Prepare: q = 10, N = 3: a share of 3 triplets; rank-2 updates keep their 2 (the 3rd singular value is 0)
    adapters = [make_adapter(i, r=2) for i in range(3)]
    w = np.array([0.5, 1.5, -1.0])
    # Execute
    merged = tsv(adapters, w)
    # Assert
    for m in MODULES:
        np.testing.assert_allclose(got(merged, m), np_tsv(deltas_of(adapters, m), w), rtol=1e-4, atol=1e-4)
        assert merged.rank(m) == 6


def test_tsv_truncates_to_a_share_of_min_out_in():
    # Prepare: rank-4 updates, q = 10, N = 3 → 3 triplets each, so the 4th is dropped
    adapters = [make_adapter(i, r=4, alpha=4.0) for i in range(3)]
    # Execute
    merged = tsv(adapters)
    # Assert: default weights 1.0 (FusionBench's α = 1)
    for m in MODULES:
        np.testing.assert_allclose(got(merged, m), np_tsv(deltas_of(adapters, m), np.ones(3)), rtol=1e-4, atol=1e-4)
        assert merged.rank(m) == 9


# ------------------------------------------------------------------------------------------
# Iso-C
# ------------------------------------------------------------------------------------------
def test_iso_c_flattens_the_spectrum_of_the_sum_hand_computed():
    # Prepare: Σ ΔW_i = diag(3, 1): mean singular value 2; with weights (1, 3): diag(3, 3)
    adapters = from_delta([[3.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 1.0]])
    # Execute / Assert
    np.testing.assert_allclose(got(iso_c(adapters), "m"), 2 * np.eye(2), atol=1e-6)
    np.testing.assert_allclose(got(iso_c(adapters, [1.0, 3.0]), "m"), 3 * np.eye(2), atol=1e-6)


def test_iso_c_matches_fusionbench_on_a_full_rank_sum():
    # Prepare: 3 rank-4 updates of a 12 × 10 layer: the sum has rank 10 = min(out, in)
    adapters = [make_adapter(i, r=4) for i in range(3)]
    w = np.array([0.5, 0.3, 0.2])
    # Execute
    merged = iso_c(adapters, w)
    # Assert
    for m in MODULES:
        np.testing.assert_allclose(got(merged, m), fb_iso_c(deltas_of(adapters, m), w), rtol=1e-4, atol=1e-4)


def test_iso_c_of_a_low_rank_sum_flattens_its_nonzero_spectrum():
    # Prepare: 2 rank-2 updates: the sum has rank 4 < 10
    adapters = [make_adapter(i, r=2) for i in range(2)]
    w = np.array([1.0, 0.5])
    # Execute
    merged = iso_c(adapters, w)
    # Assert: rank 4, every nonzero singular value the mean of the sum's four
    for m in MODULES:
        expected = np_iso_c(deltas_of(adapters, m), w)
        np.testing.assert_allclose(got(merged, m), expected, rtol=1e-4, atol=1e-4)
        s = np.linalg.svd(got(merged, m), compute_uv=False)
        np.testing.assert_allclose(s[:4], s[0], rtol=1e-5)
        assert merged.rank(m) == 4 and s[4] < 1e-5 * s[0]


def test_iso_c_of_one_contributor_is_not_its_identity():
    adapter = make_adapter(7)
    merged = iso_c([adapter], [1.0])
    for m in MODULES:
        np.testing.assert_allclose(got(merged, m), np_iso_c([np_delta(adapter, m)], np.ones(1)), rtol=1e-4, atol=1e-4)
        assert not np.allclose(got(merged, m), np_delta(adapter, m), atol=1e-2)


# ------------------------------------------------------------------------------------------
# Iso-CTS
# ------------------------------------------------------------------------------------------
def test_common_split_is_fusionbench_rounding():
    # FusionBench: k_c = int(q f), the rest rounded to a multiple of N; ViT-B qkv (q = 768), f = 0.8
    assert common_split(768, 50, 0.8) == (618, 3)       # 154 / 50 → 3 each
    assert common_split(768, 8, 0.8) == (616, 19)       # 154 / 8 = 19.25 → 19
    assert common_split(10, 2, 0.5) == (6, 2)           # 5 / 2 = 2.5 → 2 (half to even)
    assert common_split(10, 30, 0.8) == (10, 0)         # more tasks than directions left: all common
    assert common_split(10, 6, 0.1) == (4, 1)           # round(9 / 6) = 2 would leave k_c < 0: capped at 10 // 6


@pytest.mark.parametrize("n, fraction", [(2, 0.8), (3, 0.8), (3, 0.5)])
def test_iso_cts_matches_fusionbench_on_full_rank_updates(n, fraction):
    # Prepare: rank-10 updates of a 12 × 10 layer (sum and residuals full rank)
    adapters = [make_adapter(i, r=10, alpha=10.0) for i in range(n)]
    w = np.linspace(0.5, 1.5, n)
    # Execute
    merged = iso_cts(adapters, w, common_space_fraction=fraction)
    # Assert
    for m in MODULES:
        np.testing.assert_allclose(got(merged, m), fb_iso_cts(deltas_of(adapters, m), w, fraction),
                                   rtol=1e-4, atol=1e-4)


def test_iso_cts_of_low_rank_updates_splits_the_rank_of_the_sum():
    # Prepare: 3 rank-3 updates of a 12 × 10 layer: the sum has rank ρ = 9; f = 0.5: int(4.5) = 4, round(5 / 3) = 2
    # directions per task, k_c = 3; f = 0.8: int(7.2) = 7, round(2 / 3) = 1 per task, k_c = 6
    adapters = [make_adapter(i, r=3) for i in range(3)]
    w = np.array([1.0, 0.7, 1.3])
    # Execute
    merged = iso_cts(adapters, w, common_space_fraction=0.5)
    default = iso_cts(adapters, w)
    # Assert
    assert common_split(9, 3, 0.5) == (3, 2) and common_split(9, 3, 0.8) == (6, 1)
    for m in MODULES:
        d = deltas_of(adapters, m)
        np.testing.assert_allclose(got(merged, m), np_iso_cts(d, w, 0.5), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(got(default, m), np_iso_cts(d, w, 0.8), rtol=1e-4, atol=1e-4)
        assert not np.allclose(got(merged, m), np_iso_c(d, w), atol=1e-3)     # the task directions matter


def test_iso_cts_is_iso_c_when_no_direction_is_left_for_the_tasks():
    # Prepare: ρ = 6, f = 0.95: int(5.7) = 5, round(1 / 3) = 0 directions per task: all 6 common
    adapters = [make_adapter(i, r=2) for i in range(3)]
    # Execute
    merged, flat = iso_cts(adapters, common_space_fraction=0.95), iso_c(adapters)
    # Assert
    for m in MODULES:
        np.testing.assert_allclose(got(merged, m), got(flat, m), rtol=1e-5, atol=1e-5)


def test_iso_cts_refuses_a_fraction_outside_0_1():
    with pytest.raises(ValueError, match="common_space_fraction"):
        iso_cts([make_adapter(0)], common_space_fraction=1.5)


# ------------------------------------------------------------------------------------------
# KnOTS
# ------------------------------------------------------------------------------------------
def test_knots_ties_hand_computed_in_the_shared_basis():
    # Prepare: ΔW_1 = diag(2, 1), ΔW_2 = diag(-1, 3): [ΔW_1 ΔW_2] = I · [ΔW_1 ΔW_2] has U = ±(e2, e1) (σ = √10, √5),
    # so the coordinates are the ΔW_i's rows (up to sign and order). Density 1: TIES elects per entry the sign of the
    # sum and averages the agreeing entries: (0,0): 2 + -1 → +, mean of {2} = 2; (1,1): 1, 3 → mean 2.
    adapters = from_delta([[2.0, 0.0], [0.0, 1.0]], [[-1.0, 0.0], [0.0, 3.0]])
    # Execute
    merged = knots(adapters, [1.0, 1.0], density=1.0)
    halved = knots(adapters, [0.5, 0.5], density=1.0)
    # Assert
    np.testing.assert_allclose(got(merged, "m"), [[2.0, 0.0], [0.0, 2.0]], atol=1e-6)
    np.testing.assert_allclose(got(halved, "m"), [[1.0, 0.0], [0.0, 1.0]], atol=1e-6)


@pytest.mark.parametrize("scope", ["global", "module"])
@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_knots_ties_matches_the_authors_definition(scope, density):
    # Prepare: 3 rank-3 adapters; the two modules differ in scale so that the global trim differs from per module
    adapters = [make_adapter(i) for i in range(3)]
    for a in adapters:
        key = f"{PEFT_PREFIX}{MODULES[1]}.lora_B.weight"
        a.weights[key] = a.weights[key] * 3.0
    w = np.array([0.5, 0.3, 0.2])
    # Execute
    merged = knots(adapters, w, density=density, scope=scope)
    # Assert
    expected = np_knots([deltas_of(adapters, m) for m in MODULES], np.repeat(w[:, None], 2, 1), density, scope)
    for m, e in zip(MODULES, expected):
        np.testing.assert_allclose(got(merged, m), e, rtol=1e-4, atol=1e-4)


def test_knots_global_trim_is_not_per_module():
    adapters = [make_adapter(i) for i in range(3)]
    for a in adapters:
        key = f"{PEFT_PREFIX}{MODULES[1]}.lora_B.weight"
        a.weights[key] = a.weights[key] * 3.0
    glob, per = knots(adapters, density=0.3), knots(adapters, density=0.3, scope="module")
    assert not np.allclose(got(glob, MODULES[0]), got(per, MODULES[0]), atol=1e-3)


def test_knots_with_task_arithmetic_is_task_arithmetic():
    # Prepare: U Uᵀ ΔW_i = ΔW_i, so merging the coordinates linearly is the weighted sum
    adapters = [make_adapter(i, r=2 + i) for i in range(3)]
    w = np.array([0.5, -0.3, 1.2])
    # Execute
    merged = knots(adapters, w, base="ta")
    # Assert
    for m in MODULES:
        np.testing.assert_allclose(got(merged, m), np.tensordot(w, np.stack(deltas_of(adapters, m)), 1),
                                   rtol=1e-4, atol=1e-4)


def test_knots_defaults_are_the_authors_vit_b_config():
    adapters = [make_adapter(i) for i in range(3)]
    merged = knots(adapters)
    expected = np_knots([deltas_of(adapters, m) for m in MODULES], np.full((3, 2), KNOTS_SCALE), 0.2, "global")
    for m, e in zip(MODULES, expected):
        np.testing.assert_allclose(got(merged, m), e, rtol=1e-4, atol=1e-4)
    assert get_spec("knots").default_weight == 0.6


def test_knots_refuses_unknown_options():
    adapters = [make_adapter(0)]
    with pytest.raises(ValueError, match="knots base merge must be one of ties, ta"):
        knots(adapters, base="mean")
    with pytest.raises(ValueError, match="merge.ties_scope"):
        knots(adapters, scope="layer")
    with pytest.raises(ValueError, match="merge.density"):
        knots(adapters, density=0.0)


# ------------------------------------------------------------------------------------------
# Per-module weights and mixed ranks, every strategy
# ------------------------------------------------------------------------------------------
def expected_per_module(name: str, adapters: list[Adapter], w: np.ndarray) -> list[np.ndarray]:
    """Merged ΔW of each module under (N, M) weights ``w``, from the references above."""
    if name == "knots":
        return np_knots([deltas_of(adapters, m) for m in MODULES], w, 0.5, "global")
    ref = {"tsv": np_tsv, "iso_c": np_iso_c, "iso_cts": np_iso_cts}[name]
    return [ref(deltas_of(adapters, m), w[:, j]) for j, m in enumerate(MODULES)]


def options(name: str) -> dict:
    return {"density": 0.5} if name == "knots" else {}


@pytest.mark.parametrize("name", ["tsv", "iso_c", "iso_cts", "knots"])
def test_per_module_weights_weigh_each_module_apart(name):
    # Prepare: (N, M) weights, different in each module
    adapters = [make_adapter(i, r=3) for i in range(3)]
    w = np.array([[0.5, 1.5], [0.3, -0.4], [1.2, 0.8]])
    # Execute
    merged = get_spec(name).fn(adapters, w, **options(name))
    # Assert
    for m, e in zip(MODULES, expected_per_module(name, adapters, w)):
        np.testing.assert_allclose(got(merged, m), e, rtol=1e-4, atol=1e-4)
    first_only = get_spec(name).fn(adapters, w[:, 0], **options(name))
    assert not np.allclose(got(first_only, MODULES[1]), got(merged, MODULES[1]), atol=1e-3)


@pytest.mark.parametrize("name", ["tsv", "iso_c", "iso_cts", "knots"])
def test_mixed_ranks(name):
    # Prepare: ranks 2, 4 and 5 with their own alphas (scalings 2, 1.5, 0.4)
    adapters = [make_adapter(0, r=2, alpha=4.0), make_adapter(1, r=4, alpha=6.0), make_adapter(2, r=5, alpha=2.0)]
    w = np.array([1.0, 0.6, 1.4])
    # Execute
    merged = get_spec(name).fn(adapters, w, **options(name))
    # Assert
    for m, e in zip(MODULES, expected_per_module(name, adapters, np.repeat(w[:, None], 2, 1))):
        np.testing.assert_allclose(got(merged, m), e, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["tsv", "iso_c", "iso_cts", "knots"])
def test_zero_weights_give_a_zero_update(name):
    adapters = [make_adapter(i) for i in range(2)]
    merged = get_spec(name).fn(adapters, [0.0, 0.0], **options(name))
    for m in MODULES:     # nothing kept: one zero factor (KnOTS keeps its basis U, with zero coordinates)
        assert np.abs(got(merged, m)).max() == 0.0 and (name == "knots" or merged.rank(m) == 1)


def test_top_singular_values_of_factored_updates_match_numpy():
    from sim.merge.subspace import top_singular_values

    # Prepare: three (out, r) @ (r, in) products, one of rank 1 and one zero
    g = torch.Generator().manual_seed(3)
    sb, a = torch.randn(3, 40, 4, generator=g), torch.randn(3, 4, 30, generator=g)
    sb[1, :, 1:] = 0
    sb[2] = 0
    # Execute
    got = top_singular_values(sb, a).numpy()
    # Assert
    want = [np.linalg.svd(sb[i].double().numpy() @ a[i].double().numpy(), compute_uv=False)[0] for i in range(3)]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_residual_svds_match_the_svd_of_the_formed_residual():
    from sim.merge.subspace import residual_svds

    # Prepare: 3 contributors, rank 4, a common basis of 5 orthonormal columns; contributor 1 lies inside it
    g = torch.Generator().manual_seed(4)
    u_c = torch.linalg.qr(torch.randn(40, 5, generator=g, dtype=torch.float64))[0]
    sb = torch.randn(3, 40, 4, generator=g, dtype=torch.float64)
    sb[1] = u_c[:, :4] @ torch.randn(4, 4, generator=g, dtype=torch.float64)
    a = torch.randn(3, 4, 30, generator=g, dtype=torch.float64)
    floors = [1e-6, 1e-6, 1e-6]
    # Execute
    got = residual_svds(sb, a, u_c, floors, n=3)
    # Assert: numpy's SVD of ((I − U_c U_cᵀ) sb_i) a_i, the leading triplets above the floor (up to sign)
    p = np.eye(40) - u_c.numpy() @ u_c.numpy().T
    for i, (u, s, v) in enumerate(got):
        uu, ss, vt = np.linalg.svd(p @ sb[i].numpy() @ a[i].numpy())
        k = min(3, int((ss > floors[i]).sum()))
        assert s.numel() == k == (0 if i == 1 else 3)
        np.testing.assert_allclose(s.numpy(), ss[:k], rtol=1e-10)
        for j in range(k):
            sign = np.sign(uu[:, j] @ u[:, j].numpy())
            np.testing.assert_allclose(u[:, j].numpy() * sign, uu[:, j], atol=1e-9)
            np.testing.assert_allclose(v[:, j].numpy() * sign, vt[j], atol=1e-9)
