"""Merged adapters are stored at their numerical rank (numpy's ``matrix_rank``), not at the layer's width."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sim.config import MergeConfig
from sim.merge import STRATEGIES, merge
from sim.model import PEFT_PREFIX, Adapter

MODULES = ("blocks.0.attn.qkv", "blocks.1.attn.qkv")

pytestmark = pytest.mark.usefixtures("single_thread")


def make_adapter(seed: int, r: int = 2, out_f: int = 12, in_f: int = 8, positive: bool = False,
                 shared_a: torch.Tensor | None = None) -> Adapter:
    """Random rank-r factors (|·| if ``positive``: every ΔW entry > 0); ``shared_a`` fixes A in every module."""
    g = torch.Generator().manual_seed(seed)
    w = {}
    for m in MODULES:
        a = torch.randn(r, in_f, generator=g) if shared_a is None else shared_a
        b = torch.randn(out_f, r, generator=g)
        w[f"{PEFT_PREFIX}{m}.lora_A.weight"] = a.abs() if positive else a
        w[f"{PEFT_PREFIX}{m}.lora_B.weight"] = b.abs() if positive else b
    return Adapter(w, float(r), "base0")


def np_delta(a: Adapter, m: str) -> np.ndarray:
    fa = a.weights[f"{PEFT_PREFIX}{m}.lora_A.weight"].double().numpy()
    fb = a.weights[f"{PEFT_PREFIX}{m}.lora_B.weight"].double().numpy()
    return a.alpha / fa.shape[0] * fb @ fa


def lora_bytes(rank: int, out_f: int = 12, in_f: int = 8) -> int:
    """float32 bytes of A (r, in) and B (out, r) in each of the two modules."""
    return len(MODULES) * rank * (in_f + out_f) * 4


# ------------------------------------------------------------------------------------------
# Dense ΔW-space merges: stored at their true rank
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, positive", [("ties", True), ("magnitude_prune", False), ("dare_linear", False)])
def test_density_1_merge_of_two_rank_2_adapters_is_stored_at_rank_4(name, positive):
    # Prepare: at density 1 nothing is trimmed or dropped; magnitude_prune and DARE are then the weighted sum, TIES
    # (all entries positive: every sign agrees) the weighted disjoint sum, its default — rank <= 4 either way
    adapters = [make_adapter(0, positive=positive), make_adapter(1, positive=positive)]
    w = np.array([0.7, 0.4])
    # Execute
    result = merge(name, adapters, w, cfg=MergeConfig(density=1.0), seed=0)
    # Assert: the exact result, at numpy's numerical rank of it, with the bytes of that rank
    for m in MODULES:
        expected = sum(wi * np_delta(a, m) for wi, a in zip(w, adapters))
        assert np.linalg.matrix_rank(expected) == 4
        assert result.merged.rank(m) == 4
        np.testing.assert_allclose(result.merged.delta(m).double().numpy(), expected, rtol=1e-5, atol=1e-5)
    assert result.record()["storage_bytes"] == result.merged.num_bytes() == lora_bytes(4)


def test_magmax_of_one_contributor_and_rank_deficient_task_arithmetic_keep_their_rank():
    # Prepare: a rank-2 adapter alone; six rank-2 adapters sharing A (Σ r = 12 >= 8 = min(out, in), but rank 2)
    alone = make_adapter(3)
    shared = torch.randn(2, 8, generator=torch.Generator().manual_seed(9))
    crowd = [make_adapter(i, shared_a=shared) for i in range(6)]
    # Execute
    mm = STRATEGIES["magmax"]([alone], [1.0])
    ta = STRATEGIES["task_arithmetic"](crowd, np.linspace(0.2, 1.2, 6))
    # Assert
    for m in MODULES:
        assert mm.rank(m) == 2 and ta.rank(m) == 2
        np.testing.assert_allclose(mm.delta(m).double().numpy(), np_delta(alone, m), rtol=1e-5, atol=1e-5)
        exact = sum(wi * np_delta(a, m) for wi, a in zip(np.linspace(0.2, 1.2, 6), crowd))
        np.testing.assert_allclose(ta.delta(m).double().numpy(), exact, rtol=1e-5, atol=1e-5)
    assert mm.num_bytes() == ta.num_bytes() == lora_bytes(2)


def test_a_full_rank_merge_keeps_the_width_and_is_exact():
    # Prepare: a generic trimmed merge is of full rank min(out, in) = 8
    adapters = [make_adapter(i, r=4) for i in range(3)]
    # Execute
    merged = STRATEGIES["ties"](adapters, [1.0, 1.0, 1.0], density=0.5, scope="module")
    # Assert
    for m in MODULES:
        assert np.linalg.matrix_rank(merged.delta(m).double().numpy()) == 8 == merged.rank(m)
    # its exact factors hold 8·(12 + 8) numbers per module, more than ΔW's 12·8: what one ships (and counts) is ΔW
    assert lora_bytes(8) > len(MODULES) * 12 * 8 * 4
    assert merged.num_bytes() == len(MODULES) * 12 * 8 * 4


def test_storage_of_a_low_rank_adapter_is_its_factors():
    adapter = make_adapter(0, r=2)
    assert adapter.num_bytes() == lora_bytes(2) < len(MODULES) * 12 * 8 * 4


# ------------------------------------------------------------------------------------------
# svd at threshold 1: the numerical rank, also on the Gram path (Σ r_i >= min(out, in))
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n, r, out_f, in_f", [(2, 3, 12, 8),       # R = 6 < 8: QR path
                                              (4, 4, 12, 8),       # R = 16 >= 8: Gram MᵀM
                                              (4, 4, 8, 12),       # R = 16 >= 8, out < in: Gram M Mᵀ
                                              (8, 8, 96, 64)])     # R = 64 >= 64
def test_svd_at_threshold_1_of_rank_r_inputs_reports_rank_r(n, r, out_f, in_f):
    # Prepare: contributors share A, so Σ w_i ΔW_i = (Σ w_i s B_i) A has rank r however many there are
    shared = torch.randn(r, in_f, generator=torch.Generator().manual_seed(5))
    adapters = [make_adapter(i, r=r, out_f=out_f, in_f=in_f, shared_a=shared) for i in range(n)]
    w = np.linspace(0.3, 1.0, n)
    # Execute
    merged = STRATEGIES["svd"](adapters, w, threshold=1.0)
    # Assert
    for m in MODULES:
        exact = sum(wi * np_delta(a, m) for wi, a in zip(w, adapters))
        assert np.linalg.matrix_rank(exact) == r == merged.rank(m)
        np.testing.assert_allclose(merged.delta(m).double().numpy(), exact, rtol=1e-4,
                                   atol=1e-5 * np.abs(exact).max())
    assert merged.num_bytes() == len(MODULES) * r * (in_f + out_f) * 4


# ------------------------------------------------------------------------------------------
# The full-rank certificate agrees with the eigensolve's rank
# ------------------------------------------------------------------------------------------
def spectrum_delta(sigma: np.ndarray, out_f: int, seed: int) -> torch.Tensor:
    """A float32 ΔW (out, q) = U diag(σ) Vᵀ with random orthonormal U, V (numpy, float64)."""
    rng = np.random.default_rng(seed)
    q = len(sigma)
    u = np.linalg.qr(rng.standard_normal((out_f, q)))[0]
    v = np.linalg.qr(rng.standard_normal((q, q)))[0]
    return torch.from_numpy((u * sigma) @ v.T).float()


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("wide", [False, True])
def test_full_rank_certificate_never_contradicts_the_eigenvalues(seed, wide):
    from sim.merge.base import certainly_full_rank, dense_factors, rank_tolerance

    # Prepare: spectra whose smallest σ is far above, near or below the rank tolerance, tall and wide
    out_f, q = 60, 24
    tol = rank_tolerance(1.0, (out_f, q))
    rng = np.random.default_rng(seed)
    for smallest in (1e-1, 1e2 * tol, 1.5 * tol, 0.5 * tol, 0.0):
        sigma = np.sort(np.concatenate([[1.0], rng.uniform(0.2, 1.0, q - 2), [smallest]]))[::-1]
        delta = spectrum_delta(sigma, out_f, seed)
        delta = delta.T.contiguous() if wide else delta
        d64 = delta.double()
        gram = d64 @ d64.T if wide else d64.T @ d64
        # Execute
        certified = certainly_full_rank(gram, tuple(delta.shape))
        eig = np.linalg.eigvalsh(gram.numpy())[::-1].clip(0) ** 0.5
        eig_rank = int((eig > rank_tolerance(float(eig[0]), tuple(delta.shape))).sum())
        a, b = dense_factors(delta)
        # Assert: a certificate only where the eigenvalues give full rank, and given wherever σ_min is clear of it;
        # the stored rank is the eigenvalues' either way
        assert not certified or eig_rank == q
        if smallest >= 1e2 * tol:
            assert certified
        if smallest <= 0.5 * tol:
            assert not certified
        assert a.shape[0] == max(eig_rank, 1)
