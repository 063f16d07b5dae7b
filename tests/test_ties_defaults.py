"""TIES' trim scope, the published defaults of the ΔW-space merges, and MagMax's tie rule, against numpy."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sim.config import MergeConfig
from sim.merge import STRATEGIES, get_spec
from sim.model import PEFT_PREFIX, Adapter

MODULES = ("blocks.0.attn.qkv", "blocks.1.attn.qkv")

pytestmark = pytest.mark.usefixtures("single_thread")


def make_adapter(seed: int, scales: tuple[float, ...] = (1.0, 1.0), r: int = 2, out_f: int = 6, in_f: int = 4,
                 alpha: float = 2.0) -> Adapter:
    """Random rank-r factors per module; module j's B is multiplied by ``scales[j]``."""
    g = torch.Generator().manual_seed(seed)
    w = {}
    for m, s in zip(MODULES, scales):
        w[f"{PEFT_PREFIX}{m}.lora_A.weight"] = torch.randn(r, in_f, generator=g)
        w[f"{PEFT_PREFIX}{m}.lora_B.weight"] = torch.randn(out_f, r, generator=g) * s
    return Adapter(w, alpha, "base0")


def np_delta(a: Adapter, m: str) -> np.ndarray:
    fa = a.weights[f"{PEFT_PREFIX}{m}.lora_A.weight"].double().numpy()
    fb = a.weights[f"{PEFT_PREFIX}{m}.lora_B.weight"].double().numpy()
    return a.alpha / fa.shape[0] * fb @ fa


def np_trim(tau: np.ndarray, density: float) -> np.ndarray:
    """The paper's trim of one task vector (any shape): keep the top int(density · size) entries by magnitude."""
    k = int(density * tau.size)
    t = np.sort(np.abs(tau).ravel())[::-1][k - 1]
    return np.where(np.abs(tau) >= t, tau, 0.0)


def np_ties_vectors(taus: np.ndarray, w: np.ndarray, density: float, disjoint: str = "sum") -> np.ndarray:
    """TIES on flat task vectors (N, d): trim each, elect the sign of the total mass, weighted disjoint sum
    (FusionBench's default) or mean (the paper's)."""
    trimmed = np.stack([np_trim(t, density) for t in taus])
    elected = np.where(trimmed.sum(0) >= 0, 1.0, -1.0)
    agree = np.sign(trimmed) == elected
    total = (w[:, None] * trimmed * agree).sum(0)
    return total / np.maximum(agree.sum(0), 1) if disjoint == "mean" else total


def np_ties(adapters: list[Adapter], w: np.ndarray, density: float, scope: str) -> list[np.ndarray]:
    """Merged ΔW per module; ``global`` flattens every module of a contributor into one task vector."""
    deltas = [[np_delta(a, m) for m in MODULES] for a in adapters]
    if scope == "module":
        return [np_ties_vectors(np.stack([d[j].ravel() for d in deltas]), w, density).reshape(deltas[0][j].shape)
                for j in range(len(MODULES))]
    flat = np_ties_vectors(np.stack([np.concatenate([x.ravel() for x in d]) for d in deltas]), w, density)
    sizes = np.cumsum([0] + [x.size for x in deltas[0]])
    return [flat[sizes[j]:sizes[j + 1]].reshape(deltas[0][j].shape) for j in range(len(MODULES))]


def merged_deltas(merged: Adapter) -> list[np.ndarray]:
    return [merged.delta(m).double().numpy() for m in MODULES]


# ------------------------------------------------------------------------------------------
# TIES: global (the paper's) vs per-module trimming
# ------------------------------------------------------------------------------------------
def test_global_scope_trims_the_whole_task_vector_and_module_scope_each_module():
    # Prepare: module 0's updates are 5x larger than module 1's, so the whole-vector top 40 % is mostly module 0
    adapters = [make_adapter(i, scales=(5.0, 1.0)) for i in range(3)]
    w = np.array([0.5, 1.0, 0.8])
    # Execute
    glob = STRATEGIES["ties"](adapters, w, density=0.4, scope="global")
    per_module = STRATEGIES["ties"](adapters, w, density=0.4, scope="module")
    # Assert: each scope is the paper's algorithm on its own vectors; the two differ on this case
    exp_glob, exp_mod = np_ties(adapters, w, 0.4, "global"), np_ties(adapters, w, 0.4, "module")
    for got, exp in zip(merged_deltas(glob), exp_glob):
        np.testing.assert_allclose(got, exp, rtol=1e-5, atol=1e-5)
    for got, exp in zip(merged_deltas(per_module), exp_mod):
        np.testing.assert_allclose(got, exp, rtol=1e-5, atol=1e-5)
    assert np.abs(exp_glob[1] - exp_mod[1]).max() > 0.1
    assert np.count_nonzero(exp_glob[1]) < np.count_nonzero(exp_mod[1])   # module 1 loses more entries globally


def test_ties_scope_is_validated_naming_the_config_field():
    adapters = [make_adapter(0), make_adapter(1)]
    with pytest.raises(ValueError, match=r"merge\.ties_scope.*global, module.*'layer'"):
        STRATEGIES["ties"](adapters, scope="layer")
    with pytest.raises(ValueError, match=r"merge\.ties_scope must be one of global, module, got 'layer'"):
        MergeConfig(ties_scope="layer")
    with pytest.raises(ValueError, match=r"merge\.density"):
        STRATEGIES["ties"](adapters, density=1.5)
    with pytest.raises(ValueError, match=r"merge\.density must be null .* or a number in \(0, 1\], got 0"):
        MergeConfig(density=0)


# ------------------------------------------------------------------------------------------
# Published defaults
# ------------------------------------------------------------------------------------------
PUBLISHED = {   # strategy: (scale λ per contributor, density); FusionBench config/method/*.yaml, TIES k = 20 %
    "task_arithmetic": (0.3, None), "ties": (0.3, 0.2), "dare_linear": (0.3, 0.5), "dare_ties": (0.5, 0.5),
    "magmax": (0.5, None),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_specs_carry_the_published_defaults(name):
    scale, density = PUBLISHED[name]
    spec = get_spec(name)
    assert spec.default_weight == scale
    assert dict(spec.default_options).get("density") == density
    assert MergeConfig().density is None and MergeConfig().ties_scope == "global"


def test_default_ties_is_the_papers_global_top_20_percent_at_scale_0_3():
    # Prepare: 2 modules of 6x4 entries per contributor; the top 20 % of 48 entries are its 9 largest
    adapters = [make_adapter(i, scales=(3.0, 1.0)) for i in range(3)]
    # Execute
    merged = STRATEGIES["ties"](adapters)
    # Assert
    for got, exp in zip(merged_deltas(merged), np_ties(adapters, np.full(3, 0.3), 0.2, "global")):
        np.testing.assert_allclose(got, exp, rtol=1e-5, atol=1e-5)


def test_default_task_arithmetic_and_magmax_scales():
    adapters = [make_adapter(i) for i in range(3)]
    ta, mm = STRATEGIES["task_arithmetic"](adapters), STRATEGIES["magmax"](adapters)
    for j, m in enumerate(MODULES):
        stacked = np.stack([np_delta(a, m) for a in adapters])
        np.testing.assert_allclose(merged_deltas(ta)[j], 0.3 * stacked.sum(0), rtol=1e-5, atol=1e-5)
        pick = np.abs(stacked).argmax(0)
        np.testing.assert_allclose(merged_deltas(mm)[j], 0.5 * np.take_along_axis(stacked, pick[None], 0)[0],
                                   rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------
# MagMax: exact-magnitude ties go to the later contributor
# ------------------------------------------------------------------------------------------
def one_module(*deltas: list[list[float]]) -> list[Adapter]:
    """Adapters whose ΔW of module "m" is exactly the given matrix (A = I, B = ΔW, alpha = r)."""
    out = []
    for d in deltas:
        b = torch.tensor(d, dtype=torch.float32)
        out.append(Adapter({f"{PEFT_PREFIX}m.lora_A.weight": torch.eye(b.shape[1]),
                            f"{PEFT_PREFIX}m.lora_B.weight": b}, float(b.shape[1])))
    return out


def test_magmax_exact_ties_go_to_the_later_contributor():
    # Prepare: entry (0, 0) ties across all three (|2|), entry (0, 1) ties between the first two (|-1| = |1|)
    first, second, third = [[2.0, -1.0]], [[-2.0, 1.0]], [[2.0, 0.5]]
    # Execute
    merged = STRATEGIES["magmax"](one_module(first, second, third), [1.0, 1.0, 1.0])
    reversed_ = STRATEGIES["magmax"](one_module(third, second, first), [1.0, 1.0, 1.0])
    # Assert: the reference code folds contributors in order with >=, so the last of the tied ones wins
    torch.testing.assert_close(merged.delta("m"), torch.tensor([[2.0, 1.0]]))
    torch.testing.assert_close(reversed_.delta("m"), torch.tensor([[2.0, -1.0]]))
    flipped = STRATEGIES["magmax"](one_module(first, second), [1.0, 1.0])
    torch.testing.assert_close(flipped.delta("m"), torch.tensor([[-2.0, 1.0]]))


@pytest.mark.parametrize("disjoint", ["sum", "mean"])
def test_ties_disjoint_sum_or_mean_matches_numpy(disjoint):
    """FusionBench's default disjoint *sum* (θ_0 + λ Σ agreeing τ_i) vs the paper's disjoint mean, re-derived."""
    adapters = [make_adapter(s, scales=(1.0, 3.0)) for s in (11, 12, 13)]
    w = np.array([0.3, 0.3, 0.3])
    merged = STRATEGIES["ties"](adapters, w, density=0.5, scope="global", disjoint=disjoint)
    deltas = [[np_delta(a, m) for m in MODULES] for a in adapters]
    flat = np.stack([np.concatenate([x.ravel() for x in d]) for d in deltas])
    trimmed = np.stack([np_trim(t, 0.5) for t in flat])
    elected = np.where(trimmed.sum(0) >= 0, 1.0, -1.0)
    agree = np.sign(trimmed) == elected
    total = (w[:, None] * trimmed * agree).sum(0)
    want = total / np.maximum(agree.sum(0), 1) if disjoint == "mean" else total
    got = np.concatenate([d.ravel() for d in merged_deltas(merged)])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_ties_disjoint_default_is_fusionbench_sum_and_config_checks_it():
    assert MergeConfig().ties_disjoint == "sum"
    with pytest.raises(ValueError, match="merge.ties_disjoint"):
        MergeConfig(ties_disjoint="median")
