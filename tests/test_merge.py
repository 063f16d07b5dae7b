"""Merge strategies: registry-wide properties, hand-computed tiny cases, cross-checks against peft."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from peft.utils import merge_utils

from sim.config import MergeConfig
from sim.merge import (STRATEGIES, Mixture, get_spec, get_strategy, load_mixture, merge, merge_step, mixture_proba,
                       save_mixture, start_sequence)
from sim.merge.mixture import adapter_features, combine_probabilities
from sim.merge.svd import kept_rank, lowrank_svd, stacked_factors
from sim.metrics import predict_proba
from sim.model import PEFT_PREFIX, Adapter, load_adapter, save_adapter

MODULES = ("blocks.0.attn.qkv", "blocks.1.attn.qkv")


def make_adapter(seed: int, r: int = 3, out_f: int = 12, in_f: int = 8, alpha: float = 6.0,
                 modules: tuple[str, ...] = MODULES, base: str | None = "base0", scale: float = 1.0) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    w = {}
    for m in modules:
        w[f"{PEFT_PREFIX}{m}.lora_A.weight"] = torch.randn(r, in_f, generator=g)
        w[f"{PEFT_PREFIX}{m}.lora_B.weight"] = torch.randn(out_f, r, generator=g) * scale
    return Adapter(w, alpha, base)


def from_delta(*deltas: list[list[float]]) -> list[Adapter]:
    """Adapters whose ΔW of one module is exactly the given matrix (A = I, B = ΔW, alpha = r → scaling 1)."""
    out = []
    for d in deltas:
        b = torch.tensor(d, dtype=torch.float32)
        r = b.shape[1]
        out.append(Adapter({f"{PEFT_PREFIX}m.lora_A.weight": torch.eye(r),
                            f"{PEFT_PREFIX}m.lora_B.weight": b}, float(r), None))
    return out


def delta_of(merged, module: str) -> torch.Tensor:
    return merged.delta(module)


# Everything the strategies take from the config, with density 1 so that pruning methods keep every entry.
KEEP_ALL = MergeConfig(density=1.0, svd_threshold=1.0)
# merged(c·w) = c^degree · merged(w); others 1. RegMean, Fisher merging and the running average normalise their
# weights; continual TIES is not homogeneous (it TIES-merges the scaled merged update with the unscaled new one).
HOMOGENEITY = {"lora_avg": 2, "fusion": 2, "mixture": 0, "regmean": 0, "fisher": 0, "continual_weight_average": 0,
               "continual_ties": None}


def statistics(name: str, adapters: list[Adapter]) -> dict:
    """Hand-made per-contributor statistics of a data-aware strategy (``spec.statistic``), without data: random
    PSD input Grams (RegMean) or random positive Fisher diagonals (Fisher merging), each drawn from a seed taken from
    its own adapter's factors, so they travel with the adapters when those are permuted; nothing for the others."""
    spec = get_spec(name)
    if spec.statistic_impl is None:
        return {}
    stats = []
    for a in adapters:
        g = torch.Generator().manual_seed(int(1e6 * abs(float(next(iter(a.weights.values())).sum()))) % 2 ** 31)
        if spec.statistic_option == "grams":
            x = {m: torch.randn(40, a.factors(m)[0].shape[1], generator=g, dtype=torch.float64) for m in a.modules()}
            stats.append({m: v.T @ v / 40 for m, v in x.items()})
        else:
            stats.append({k: torch.rand(v.shape, generator=g) + 0.1 for k, v in a.weights.items()})
    return {spec.statistic_option: stats}


def merged_with(name: str, adapters: list[Adapter], weights=None, cfg: MergeConfig | None = None, seed: int = 0):
    """``merge(name, adapters, weights, cfg, seed).merged``; a data-aware strategy merges on ``statistics``."""
    if get_spec(name).statistic_impl is None:
        return merge(name, adapters, weights, cfg=cfg, seed=seed).merged
    return get_spec(name).fn(adapters, weights, **statistics(name, adapters))


pytestmark = pytest.mark.usefixtures("single_thread")


# ------------------------------------------------------------------------------------------
# Registry-wide properties
# ------------------------------------------------------------------------------------------
def test_get_strategy_lists_known_names_on_typo():
    with pytest.raises(ValueError, match="unknown merge strategy 'svdd'; known: lora_avg, fusion, mixture"):
        get_strategy("svdd")
    assert get_strategy("ties") is STRATEGIES["ties"]


@pytest.mark.parametrize("name", sorted(n for n in STRATEGIES if not get_spec(n).fitted))   # routers: test_router
def test_strategy_properties(name, tiny_foundation):
    # Prepare: three adapters on the tiny foundation's qkv shapes, different alphas
    shape = tuple(tiny_foundation.weight(MODULES[0]).shape)
    adapters = [make_adapter(i, out_f=shape[0], in_f=shape[1], alpha=4.0 + 2 * i, scale=0.05,
                             base=tiny_foundation.fingerprint) for i in range(3)]
    w = np.array([0.5, 0.3, 0.2])
    x = np.random.default_rng(0).random((6, 3, 16, 16), dtype=np.float32)

    def outputs(result):
        if isinstance(result, Mixture):
            return torch.from_numpy(predict_proba(tiny_foundation, result, x, "t", ("a", "b", "c")))
        return torch.stack([result.delta(m) for m in MODULES])

    # Execute
    merged = merged_with(name, adapters, w, cfg=MergeConfig(density=0.6), seed=3)
    single = merged_with(name, adapters[:1], [1.0], cfg=KEEP_ALL)      # weight 1: the defaults are scales
    scaled = merged_with(name, adapters, 2.0 * w, cfg=MergeConfig(density=0.6), seed=3)
    order = [2, 0, 1]
    permuted = merged_with(name, [adapters[i] for i in order], w[order], cfg=MergeConfig(density=0.6), seed=3)

    # Assert: finite; one contributor gives back its own ΔW (its own predictions for the mixture)
    assert torch.isfinite(outputs(merged)).all()
    if isinstance(single, Mixture):
        own = predict_proba(tiny_foundation, adapters[0], x, "t", ("a", "b", "c"))
        np.testing.assert_allclose(outputs(single).numpy(), own, atol=1e-5)
    else:
        if get_spec(name).one_is_identity:      # Iso-C/CTS flatten even one update's spectrum
            torch.testing.assert_close(outputs(single), torch.stack([adapters[0].delta(m) for m in MODULES]),
                                       atol=1e-4, rtol=1e-4)
        assert single.base_fingerprint == tiny_foundation.fingerprint
    # weights: scaling all of them by 2 scales the result by 2^degree (as each docstring states)
    degree = HOMOGENEITY.get(name, 1)
    if degree is not None:
        torch.testing.assert_close(outputs(scaled), 2.0 ** degree * outputs(merged), atol=1e-4, rtol=1e-4)
    # permuting contributors together with their weights changes nothing, except for the strategies whose spec says
    # so (DARE's random masks follow the adapter order; OPCM and continual TIES merge in arrival order)
    if get_spec(name).order_invariant:
        torch.testing.assert_close(outputs(permuted), outputs(merged), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(n for n in STRATEGIES if get_spec(n).space != "output"))
def test_parameter_space_result_saves_as_peft_dir_with_right_scaling(name, tmp_path):
    from peft import get_peft_model

    # Prepare: uneven ranks come out of svd; everything else has one rank
    adapters = [make_adapter(i, r=2 + i, alpha=3.0) for i in range(3)] if get_spec(name).mixed_ranks \
        else [make_adapter(i, alpha=3.0 + i) for i in range(3)]
    merged = merged_with(name, adapters, cfg=MergeConfig(svd_threshold=0.8))

    # Execute: write, read back, and let peft build its LoRA layers from the written config
    save_adapter(merged, tmp_path / "m")
    back = load_adapter(tmp_path / "m")
    model = get_peft_model(torch.nn.ModuleDict({"blocks": torch.nn.ModuleList(
        [torch.nn.ModuleDict({"attn": torch.nn.ModuleDict({"qkv": torch.nn.Linear(8, 12)})}) for _ in range(2)])}),
        back.to_peft_config())

    # Assert: same ΔW after the round trip, and peft's own scaling per module equals ours
    for m in MODULES:
        torch.testing.assert_close(back.delta(m), merged.delta(m))
        layer = model.base_model.model.get_submodule(m)
        assert layer.scaling["default"] == pytest.approx(merged.scaling(m))
        assert layer.r["default"] == merged.rank(m)


# ------------------------------------------------------------------------------------------
# Hand-computed tiny cases
# ------------------------------------------------------------------------------------------
def test_task_arithmetic_hand_computed():
    # Prepare: ΔW_1 = [[1, 0], [0, 0]], ΔW_2 = [[0, 0], [0, 2]] from rank-1 factors, alpha = r = 1
    a1 = Adapter({f"{PEFT_PREFIX}m.lora_A.weight": torch.tensor([[1.0, 0.0]]),
                  f"{PEFT_PREFIX}m.lora_B.weight": torch.tensor([[1.0], [0.0]])}, 1.0)
    a2 = Adapter({f"{PEFT_PREFIX}m.lora_A.weight": torch.tensor([[0.0, 1.0]]),
                  f"{PEFT_PREFIX}m.lora_B.weight": torch.tensor([[0.0], [2.0]])}, 1.0)
    # Execute
    merged = STRATEGIES["task_arithmetic"]([a1, a2], [0.5, 2.0])
    avg = STRATEGIES["lora_avg"]([a1, a2])
    # Assert: 0.5 ΔW_1 + 2 ΔW_2; the factor average instead mixes cross terms B_i A_j (Med-LEGO eq. 2)
    torch.testing.assert_close(merged.delta("m"), torch.tensor([[0.5, 0.0], [0.0, 4.0]]))
    torch.testing.assert_close(avg.delta("m"), torch.tensor([[0.25, 0.25], [0.5, 0.5]]))


def test_magmax_hand_computed():
    # Prepare
    adapters = from_delta([[1.0, -3.0], [2.0, 0.0]], [[-2.0, 1.0], [1.5, 0.5]])
    # Execute
    merged = STRATEGIES["magmax"](adapters)
    weighted = STRATEGIES["magmax"](adapters, [1.0, 3.0])
    # Assert: per entry the value of largest magnitude, after weighting (default λ = 0.5 each); |-3| = |3 · 1| is a
    # tie, the later contributor wins (MagMax's reference code)
    torch.testing.assert_close(merged.delta("m"), 0.5 * torch.tensor([[-2.0, -3.0], [2.0, 0.5]]))
    torch.testing.assert_close(weighted.delta("m"), torch.tensor([[-6.0, 3.0], [4.5, 1.5]]))


def test_ties_hand_computed():
    # Prepare: density 0.5 keeps the 2 largest entries of each 2x2 ΔW
    adapters = from_delta([[1.0, -3.0], [2.0, 0.0]], [[-2.0, 1.0], [1.5, 0.5]])
    # Execute
    merged = STRATEGIES["ties"](adapters, density=0.5)
    mean = STRATEGIES["ties"](adapters, [1.0, 1.0], density=0.5, disjoint="mean")
    # Assert: trimmed [[0,-3],[2,0]] and [[-2,0],[1.5,0]]; elected signs [[-,-],[+,+]]; default: FusionBench's
    # disjoint sum at λ = 0.3; the paper's disjoint mean at λ = 1
    torch.testing.assert_close(merged.delta("m"), 0.3 * torch.tensor([[-2.0, -3.0], [3.5, 0.0]]))
    torch.testing.assert_close(mean.delta("m"), torch.tensor([[-2.0, -3.0], [1.75, 0.0]]))


def test_svd_threshold_and_rank_hand_computed():
    # Prepare: ΔW = diag(3, 1): singular-value shares 0.75, 1.0
    adapters = from_delta([[3.0, 0.0], [0.0, 1.0]])
    # Execute
    low = STRATEGIES["svd"](adapters, threshold=0.7)
    full = STRATEGIES["svd"](adapters, threshold=0.9)
    capped = STRATEGIES["svd"](adapters, threshold=1.0, rank=1)
    # Assert
    torch.testing.assert_close(low.delta("m"), torch.tensor([[3.0, 0.0], [0.0, 0.0]]))
    torch.testing.assert_close(full.delta("m"), torch.tensor([[3.0, 0.0], [0.0, 1.0]]))
    torch.testing.assert_close(capped.delta("m"), torch.tensor([[3.0, 0.0], [0.0, 0.0]]))
    assert (low.rank("m"), full.rank("m"), capped.rank("m")) == (1, 2, 1)
    assert low.scaling("m") == 1.0


def test_kept_rank_edges():
    s = torch.tensor([4.0, 3.0, 2.0, 1.0])                       # shares 0.4, 0.7, 0.9, 1.0
    assert [kept_rank(s, v) for v in (0.3, 0.4, 0.41, 0.9, 0.95, 1.0)] == [1, 1, 2, 3, 4, 4]
    assert kept_rank(s, 1.0, rank=2) == 2
    assert kept_rank(torch.tensor([5.0, 1e-9]), 1.0) == 1        # round-off is not rank
    assert kept_rank(torch.zeros(3), 0.9) == 1                   # an all-zero update still has a factor


def test_mixture_combination_hand_computed():
    probs = torch.tensor([[[0.9, 0.1]], [[0.2, 0.8]]])           # (N=2, n=1, K=2)
    torch.testing.assert_close(combine_probabilities(probs, [0.5, 0.5]), torch.tensor([[0.55, 0.45]]))
    torch.testing.assert_close(combine_probabilities(probs, [1.0, -1.0]), torch.tensor([[1.0, 0.0]]))
    torch.testing.assert_close(combine_probabilities(probs, [0.0, 0.0]), torch.tensor([[0.5, 0.5]]))


def test_incompatible_adapters_are_rejected():
    a = make_adapter(0)
    with pytest.raises(ValueError, match="different bases"):
        merge("svd", [a, make_adapter(1, base="other")])
    with pytest.raises(ValueError, match="shapes"):
        merge("ties", [a, make_adapter(1, out_f=10)])
    with pytest.raises(ValueError, match="different modules"):
        merge("task_arithmetic", [a, make_adapter(1, modules=MODULES[:1])])
    with pytest.raises(ValueError, match="equal ranks"):
        merge("lora_avg", [a, make_adapter(1, r=4)])
    with pytest.raises(ValueError, match="3 entries"):
        merge("svd", [a, make_adapter(1), make_adapter(2)], [0.5, 0.5])
    merge("svd", [a, make_adapter(1, r=5)])                      # ranks may differ in ΔW space


# ------------------------------------------------------------------------------------------
# SVD: the QR path equals a dense SVD
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n, r, out_f, in_f", [(3, 4, 40, 30),      # R = 12 < 30: QR of the stacked factors
                                              (5, 8, 40, 30),      # R = 40 >= 30: Gram MᵀM
                                              (5, 8, 30, 40)])     # R = 40 >= 30, out < in: Gram M Mᵀ
def test_svd_lowrank_path_equals_dense_svd(n, r, out_f, in_f):
    # Prepare
    adapters = [make_adapter(i, r=r, out_f=out_f, in_f=in_f, alpha=float(r + i)) for i in range(n)]
    w = torch.linspace(0.2, 1.0, n)
    b_cat, a_cat = stacked_factors(adapters, MODULES[0], w)
    dense = sum(wi * a.delta(MODULES[0]) for wi, a in zip(w.tolist(), adapters))
    # Execute
    left, s, right = lowrank_svd(b_cat, a_cat)
    merged = STRATEGIES["svd"](adapters, w, threshold=0.9)
    exact = STRATEGIES["svd"](adapters, w, threshold=1.0)
    # Assert: same singular values, same kept rank, same truncated matrix as a dense SVD; v = 1 keeps M
    ud, sd, vhd = torch.linalg.svd(dense, full_matrices=False)
    tol = {"atol": 1e-4 * float(sd[0]), "rtol": 1e-4}
    q = min(s.shape[0], sd.shape[0])
    torch.testing.assert_close(s[:q], sd[:q], **tol)
    assert float(torch.cat([s[q:], sd[q:], torch.zeros(1)]).max()) < 1e-4 * float(sd[0])
    k = kept_rank(sd, 0.9)
    assert merged.rank(MODULES[0]) == k
    torch.testing.assert_close(merged.delta(MODULES[0]), ud[:, :k] @ torch.diag(sd[:k]) @ vhd[:k], **tol)
    torch.testing.assert_close(exact.delta(MODULES[0]), dense, **tol)
    torch.testing.assert_close(left @ right, dense, **tol)


# ------------------------------------------------------------------------------------------
# Cross-checks against peft where the definitions agree
# ------------------------------------------------------------------------------------------
def _peft_merge(adapters: list[Adapter], weights: list[float], combination: str, **kw) -> dict[str, torch.Tensor]:
    """ΔW per module of peft's ``add_weighted_adapter`` on a model of Linear(8, 12) layers."""
    from peft import get_peft_model, set_peft_model_state_dict

    base = torch.nn.ModuleDict({"blocks": torch.nn.ModuleList(
        [torch.nn.ModuleDict({"attn": torch.nn.ModuleDict({"qkv": torch.nn.Linear(8, 12)})}) for _ in range(2)])})
    model = get_peft_model(base, adapters[0].to_peft_config(), adapter_name="a0")
    for i, a in enumerate(adapters):
        if i:
            model.add_adapter(f"a{i}", a.to_peft_config())
        set_peft_model_state_dict(model, a.weights, adapter_name=f"a{i}")
    model.add_weighted_adapter([f"a{i}" for i in range(len(adapters))], weights, "merged",
                               combination_type=combination, **kw)
    return {m: model.base_model.model.get_submodule(m).get_delta_weight("merged").detach() for m in MODULES}


def test_svd_matches_peft_svd():
    adapters = [make_adapter(i, r=3, alpha=2.0 + i) for i in range(3)]
    w = [0.5, 1.0, -0.7]
    ours = STRATEGIES["svd"](adapters, w, threshold=1.0, rank=4)
    theirs = _peft_merge(adapters, w, "svd", svd_rank=4)
    for m in MODULES:
        torch.testing.assert_close(ours.delta(m), theirs[m], atol=1e-4, rtol=1e-4)


def test_task_arithmetic_matches_peft_cat():
    adapters = [make_adapter(i, r=2, alpha=1.0 + i) for i in range(3)]   # Σ r = 6 < 8: stacked factors
    w = [0.3, -1.2, 0.8]
    ours = STRATEGIES["task_arithmetic"](adapters, w)
    theirs = _peft_merge(adapters, w, "cat")
    for m in MODULES:
        torch.testing.assert_close(ours.delta(m), theirs[m], atol=1e-5, rtol=1e-5)
    assert ours.rank(MODULES[0]) == 6


def test_lora_avg_matches_peft_linear_with_squared_weights():
    # peft's "linear" scales A and B by sqrt(w_i · s_i); ours scales both by w_i: same for w_peft = w² (w > 0)
    adapters = [make_adapter(i, alpha=6.0) for i in range(3)]
    w = [0.2, 0.5, 0.9]
    ours = STRATEGIES["lora_avg"](adapters, w)
    theirs = _peft_merge(adapters, [x * x for x in w], "linear")
    for m in MODULES:
        torch.testing.assert_close(ours.delta(m), theirs[m], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["ties", "magnitude_prune"])
def test_delta_space_methods_match_peft_svd_variants_at_full_rank(name):
    # peft's "<name>_svd" applies merge_utils.<name> to each module's ΔW_i, then an SVD; at rank min(out, in) it
    # is exact. It trims per module and takes the disjoint mean: ties' scope "module", disjoint "mean".
    adapters = [make_adapter(i, alpha=2.0 + i) for i in range(3)]
    w = [1.0, 0.6, 0.8]
    options = {"scope": "module", "disjoint": "mean"} if name == "ties" else {}
    ours = STRATEGIES[name](adapters, w, density=0.4, **options)
    theirs = _peft_merge(adapters, w, f"{name}_svd", svd_rank=8, density=0.4)
    for m in MODULES:
        torch.testing.assert_close(ours.delta(m), theirs[m], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
def test_dare_is_merge_utils_definition_on_the_drawn_masks_with_a_per_module_seed(name):
    # Prepare: the drop mask of contributor i is what a one-hot weight on i reveals (kept entries come back as
    # x / p, dropped ones as 0); the masks depend on the seed and the contributors, never on the weights
    adapters = [make_adapter(i) for i in range(3)]
    w = torch.tensor([0.5, 0.25, 1.0])
    p = 0.3
    ours = STRATEGIES[name](adapters, w, density=p, seed=11)
    again = STRATEGIES[name](adapters, w, density=p, seed=11)
    other = STRATEGIES[name](adapters, w, density=p, seed=12)
    one_hot = [STRATEGIES["dare_linear"](adapters, torch.eye(3)[i], density=p, seed=11) for i in range(3)]
    for m in MODULES:
        deltas = [a.delta(m).double() for a in adapters]
        # kept: ≈ x / p; dropped: ≈ 0 (to the refactoring's round-off)
        masks = [(oh.delta(m).double().abs() > 0.5 * d.abs() / p) for oh, d in zip(one_hot, deltas)]
        for d, oh, mask in zip(deltas, one_hot, masks):           # kept entries are rescaled, the rest are 0
            torch.testing.assert_close(oh.delta(m).double()[mask], d[mask] / p, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(oh.delta(m).double()[~mask], torch.zeros_like(d[~mask]), rtol=0, atol=1e-4)
            assert 0.1 < mask.double().mean() < 0.6
        pruned = torch.stack([d * mask / p for d, mask in zip(deltas, masks)])
        weighted = pruned * w.double()[:, None, None]
        if name == "dare_linear":
            expected = weighted.sum(0)
        else:       # peft merge_utils.dare_ties after the drop: sign of the total mass, disjoint mean
            agree = merge_utils.calculate_majority_sign_mask(pruned, method="total")
            expected = merge_utils.disjoint_merge(weighted, agree)
        torch.testing.assert_close(ours.delta(m).double(), expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(again.delta(m), ours.delta(m))
        assert not torch.allclose(other.delta(m), ours.delta(m))


def test_dare_keeps_each_entry_with_probability_density_for_any_density():
    # Prepare: one large update; densities 0.3, 0.5, 0.9 (0.3 is not a multiple of a power of two)
    g = torch.Generator().manual_seed(0)
    a = Adapter({f"{PEFT_PREFIX}m.lora_A.weight": torch.randn(4, 300, generator=g),
                 f"{PEFT_PREFIX}m.lora_B.weight": torch.randn(400, 4, generator=g)}, 4.0)
    for p in (0.3, 0.5, 0.9):
        # Execute
        kept = (STRATEGIES["dare_linear"]([a], [1.0], density=p, seed=5).delta("m").abs() > 1e-9).double()
        # Assert: the share kept is p within 5 binomial standard errors, and the same in each half of the rows
        n = kept.numel()
        se = (p * (1 - p) / n) ** 0.5
        assert abs(float(kept.mean()) - p) < 5 * se
        assert abs(float(kept[:200].mean()) - float(kept[200:].mean())) < 5 * (2 * p * (1 - p) / (n / 2)) ** 0.5


# ------------------------------------------------------------------------------------------
# Mixture: batched evaluation, predictions, files
# ------------------------------------------------------------------------------------------
def test_mixture_equals_the_weighted_average(tiny_foundation, tmp_path):
    # Prepare
    shape = tuple(tiny_foundation.weight(MODULES[0]).shape)
    adapters = [make_adapter(i, out_f=shape[0], in_f=shape[1], scale=0.05, base=tiny_foundation.fingerprint)
                for i in range(3)]
    x = np.random.default_rng(1).random((5, 3, 16, 16), dtype=np.float32)
    classes = ("a", "b", "c")
    # Execute
    feats = adapter_features(tiny_foundation, adapters, tiny_foundation.normalize(torch.from_numpy(x)),
                             batch_size=2)                            # batches of 2 images exercise the batching
    mix = STRATEGIES["mixture"](adapters, [0.2, 0.3, 0.5])
    proba = mixture_proba(tiny_foundation, mix, x, "t", classes)
    save_mixture(mix, tmp_path / "mix")
    back = load_mixture(tmp_path / "mix")
    # Assert: the batched pass equals one forward per adapter; Σ w_i p_i; the files round-trip
    for i, a in enumerate(adapters):
        torch.testing.assert_close(feats[i], tiny_foundation.features(torch.from_numpy(x),
                                                                      tiny_foundation.merged_weights(a)),
                                   atol=1e-4, rtol=1e-4)
    expected = sum(w * predict_proba(tiny_foundation, a, x, "t", classes) for w, a in zip(mix.weights, adapters))
    np.testing.assert_allclose(proba, expected, atol=1e-5)
    np.testing.assert_allclose(back.weights, mix.weights)
    np.testing.assert_allclose(mixture_proba(tiny_foundation, back, x, "t", classes), proba, atol=1e-6)
    assert (tmp_path / "mix" / "adapter_002" / "adapter_config.json").is_file()


# ------------------------------------------------------------------------------------------
# Sequential merging without search: the running mean
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("granularity", ["adapter", "layer"])
def test_sequential_fusion_without_proxy_is_the_running_mean(granularity):
    adapters = [make_adapter(i) for i in range(4)]
    cfg = MergeConfig(granularity=granularity)
    state = start_sequence("fusion")
    for a in adapters:
        state = merge_step(state, a, cfg=cfg)
    expected = STRATEGIES["lora_avg"](adapters)
    np.testing.assert_allclose(np.asarray(state.coefficients).reshape(4, -1), 0.25)
    for m in MODULES:
        torch.testing.assert_close(state.merged.delta(m), expected.delta(m), atol=1e-5, rtol=1e-5)
    assert len(state.stages) == 4 and state.result.merged is state.merged


def test_sequential_mixture_without_proxy_keeps_every_adapter():
    adapters = [make_adapter(i) for i in range(3)]
    state = start_sequence("mixture")
    for a in adapters:
        state = merge_step(state, a)
    assert isinstance(state.merged, Mixture) and state.merged.adapters == adapters
    np.testing.assert_allclose(state.merged.weights, [1 / 3] * 3)
    with pytest.raises(ValueError, match="sequential merging is defined for fusion, mixture"):
        start_sequence("svd")
