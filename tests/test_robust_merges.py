"""Robust aggregation (``sim.merge.robust``): hand-computed tiny cases and numpy re-derivations across row blocks."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sim.config import MergeConfig, apply_overrides, SimConfig
from sim.merge import STRATEGIES, merge
from sim.merge.streamed import ROWS
from sim.model import PEFT_PREFIX, Adapter
from test_merge import from_delta

pytestmark = pytest.mark.usefixtures("single_thread")


def random_adapters(n: int, out_f: int = 2 * ROWS + 6, in_f: int = 9, r: int = 2) -> list[Adapter]:
    """N rank-r adapters of two modules whose ΔW spans several row blocks (the last one partial)."""
    g = torch.Generator().manual_seed(n)
    out = []
    for _ in range(n):
        w = {}
        for m in ("blocks.0.attn.qkv", "blocks.1.attn.qkv"):
            w[f"{PEFT_PREFIX}{m}.lora_A.weight"] = torch.randn(r, in_f, generator=g)
            w[f"{PEFT_PREFIX}{m}.lora_B.weight"] = torch.randn(out_f, r, generator=g)
        out.append(Adapter(w, 2.0 * r, "base0"))
    return out


def np_deltas(adapters: list[Adapter], m: str) -> np.ndarray:
    """(N, out, in) ΔW_i = (alpha / r) B_i A_i from the raw factors."""
    return np.stack([a.alpha / a.rank(m) * a.weights[f"{PEFT_PREFIX}{m}.lora_B.weight"].double().numpy()
                     @ a.weights[f"{PEFT_PREFIX}{m}.lora_A.weight"].double().numpy() for a in adapters])


# ------------------------------------------------------------------------------------------
# Hand-computed
# ------------------------------------------------------------------------------------------
def test_median_of_an_even_number_is_the_mean_of_the_two_middle_values():
    # Prepare: per entry the values (1, 5, 2, 100) and (2, 10, 4, 200); torch.median alone would give 2 and 4
    adapters = from_delta([[1.0, 2.0]], [[5.0, 10.0]], [[2.0, 4.0]], [[100.0, 200.0]])
    # Execute
    merged = STRATEGIES["median"](adapters)
    odd = STRATEGIES["median"](adapters[:3])
    weighted = STRATEGIES["median"](adapters[:3], [1.0, 0.1, 1.0])
    # Assert: sorted (1, 2, 5, 100) → (2 + 5) / 2 = 3.5; odd N: the middle value; weights scale before ranking
    torch.testing.assert_close(merged.delta("m"), torch.tensor([[3.5, 7.0]]))
    torch.testing.assert_close(odd.delta("m"), torch.tensor([[2.0, 4.0]]))
    torch.testing.assert_close(weighted.delta("m"), torch.tensor([[1.0, 2.0]]))      # (1, 0.5, 2) → 1


def test_trimmed_mean_drops_floor_beta_n_at_each_end_ties_included():
    # Prepare: values (3, -50, 1, 1, 100); β = 0.2 of N = 5 drops ⌊1.0⌋ = 1 at each end
    adapters = from_delta([[3.0, 0.0]], [[-50.0, 0.0]], [[1.0, 7.0]], [[1.0, 7.0]], [[100.0, 7.0]])
    # Execute
    merged = STRATEGIES["trimmed_mean"](adapters, trim=0.2)
    default = STRATEGIES["trimmed_mean"](adapters)
    # Assert: sorted (-50, 1, 1, 3, 100) keeps (1, 1, 3): 5/3; the second entry (0, 0, 7, 7, 7) keeps (0, 7, 7): 14/3;
    # the default β = 0.1 drops ⌊0.5⌋ = 0: the plain mean, 55/5 = 11 and 21/5
    torch.testing.assert_close(merged.delta("m"), torch.tensor([[5.0 / 3.0, 14.0 / 3.0]]))
    torch.testing.assert_close(default.delta("m"), torch.tensor([[11.0, 4.2]]))


def test_clipped_mean_clips_each_whole_update_to_the_median_norm():
    # Prepare: ΔW_i = v_i (1, 2) with v = (1, 2, 10): norms √5 (1, 2, 10), median 2√5
    adapters = from_delta([[1.0, 2.0]], [[2.0, 4.0]], [[10.0, 20.0]])
    # Execute
    merged = STRATEGIES["clipped_mean"](adapters)
    fixed = STRATEGIES["clipped_mean"](adapters, clip_norm=5 ** 0.5)
    # Assert: the third is scaled by 2/10 to v = 2: mean (1 + 2 + 2) / 3 = 5/3; with τ = √5 every v becomes 1
    torch.testing.assert_close(merged.delta("m"), torch.tensor([[5.0 / 3.0, 10.0 / 3.0]]))
    torch.testing.assert_close(fixed.delta("m"), torch.tensor([[1.0, 2.0]]))
    assert merged.meta["merge_strategy"] == "clipped_mean"


# ------------------------------------------------------------------------------------------
# Against numpy, across row blocks, and their robustness to one boosted update
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [4, 7, 50])
def test_median_and_trimmed_mean_match_numpy_across_row_blocks(n):
    # Prepare: ΔW of 70 rows (blocks of 32, 32, 6)
    adapters = random_adapters(n)
    k = int(np.floor(0.3 * n))
    # Execute
    med = STRATEGIES["median"](adapters)
    trimmed = STRATEGIES["trimmed_mean"](adapters, trim=0.3)
    # Assert
    for m in adapters[0].modules():
        d = np_deltas(adapters, m)
        np.testing.assert_allclose(med.delta(m).double().numpy(), np.median(d, axis=0), rtol=1e-5, atol=1e-5)
        kept = np.sort(d, axis=0)[k:n - k].mean(0)
        np.testing.assert_allclose(trimmed.delta(m).double().numpy(), kept, rtol=1e-5, atol=1e-5)


def test_a_boosted_update_moves_the_robust_merges_little_and_the_mean_much():
    # Prepare: 9 honest adapters and one of them boosted × 1000 (the scale attack)
    honest = random_adapters(10)
    boosted = honest[:9] + [Adapter({k: (v * 1000 if ".lora_B." in k else v) for k, v in honest[9].weights.items()},
                                    honest[9].alpha, "base0")]
    m = honest[0].modules()[0]

    def moved(name: str, **opts) -> float:
        a, b = STRATEGIES[name](honest, **opts), STRATEGIES[name](boosted, **opts)
        return float((a.delta(m) - b.delta(m)).norm() / a.delta(m).norm())

    # Execute / Assert: the honest spread bounds the robust merges' change; the mean follows the attacker
    assert moved("median") < 1.0 and moved("trimmed_mean", trim=0.1) < 1.0 and moved("clipped_mean") < 1.0
    assert moved("task_arithmetic") > 50


# ------------------------------------------------------------------------------------------
# Options: from the config, and checked naming their field
# ------------------------------------------------------------------------------------------
def test_config_options_reach_the_merges():
    adapters = from_delta([[3.0, 0.0]], [[-50.0, 0.0]], [[1.0, 7.0]], [[1.0, 7.0]], [[100.0, 7.0]])
    trimmed = merge("trimmed_mean", adapters, cfg=MergeConfig(trim=0.2)).merged
    clipped = merge("clipped_mean", adapters[2:4], cfg=MergeConfig(clip_norm=1.0)).merged
    torch.testing.assert_close(trimmed.delta("m"), torch.tensor([[5.0 / 3.0, 14.0 / 3.0]]))
    torch.testing.assert_close(clipped.delta("m"), torch.tensor([[1.0, 7.0]]) / 50 ** 0.5)   # ‖(1, 7)‖ = √50


def test_bad_options_are_refused_naming_the_field():
    adapters = from_delta([[1.0]], [[2.0]])
    with pytest.raises(ValueError, match=r"merge\.trim"):
        STRATEGIES["trimmed_mean"](adapters, trim=0.5)
    with pytest.raises(ValueError, match=r"merge\.clip_norm"):
        STRATEGIES["clipped_mean"](adapters, clip_norm=-1.0)
    with pytest.raises(ValueError, match=r"merge\.trim must be null \(0\.1\) or a fraction in \[0, 0\.5\), got 0\.5"):
        MergeConfig(trim=0.5)
    with pytest.raises(ValueError, match=r"merge\.clip_norm must be a number >= 0"):
        apply_overrides(SimConfig(), ["merge.clip_norm=-2"])
