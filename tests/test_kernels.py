"""The compiled per-entry passes (sim.merge.kernels): independent of the thread count, DARE's draw keyed by
(seed, module, contributor, entry), the keep threshold exact, the selection network against numpy."""
from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch

from sim.merge import kernels
from sim.merge.robust import selection_network
from sim.merge.streamed import dropped_merge, stack_module, trimmed_merge
from sim.model import PEFT_PREFIX, Adapter


def lora(seed: int, out_f: int = 70, in_f: int = 50, r: int = 3) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    return Adapter({f"{PEFT_PREFIX}m.lora_A.weight": torch.randn(r, in_f, generator=g),
                    f"{PEFT_PREFIX}m.lora_B.weight": torch.randn(out_f, r, generator=g)}, float(r))


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize("combine", ["sum", "ties_sum", "ties_mean"])
def test_the_trim_is_bit_identical_with_one_and_two_threads(threads, combine):
    # Prepare: 6 contributors, 70 rows (several row blocks), chunks split across the threads
    ads = [lora(i) for i in range(6)]
    stacks = [stack_module(ads, "m")]
    w = torch.rand(6, 1, generator=torch.Generator().manual_seed(1))
    results = []
    for t in (1, 2):
        threads(t)
        results.append(trimmed_merge(stacks, w, 0.3, "global", combine)[0])
    assert torch.equal(results[0], results[1])


def test_the_trim_sums_each_entry_in_float64_rounded_once():
    # Prepare: values whose float32 running sum loses the small ones (1e8 + 1 + 1 − 1e8)
    x = torch.tensor([[[1e8]], [[1.0]], [[1.0]], [[-1e8]]])
    trim = kernels.BlockTrim(4, 1)
    out = np.zeros((1, 1), np.float32)
    # Execute: nothing trimmed (a = -1), weights 1
    counts, who, _, _ = trim(x, torch.full((4,), -1.0), torch.full((4,), -2.0), torch.ones(4), "sum", out)
    # Assert
    assert out[0, 0] == 2.0
    assert counts.tolist() == [1, 1, 1, 1] and who.size == 0


def test_dare_masks_depend_on_seed_module_contributor_and_entry_only(threads):
    # Prepare: contributor 1's mask, read through a one-hot weight, alone and among five
    ads = [lora(i) for i in range(5)]
    one_hot = torch.zeros(5, 1)
    one_hot[1] = 1.0
    among = dropped_merge([stack_module(ads, "m")], one_hot, 0.4, [7], "sum")[0]
    first_two = dropped_merge([stack_module(ads[:2], "m")], one_hot[:2], 0.4, [7], "sum")[0]
    threads(1)
    one_thread = dropped_merge([stack_module(ads[:2], "m")], one_hot[:2], 0.4, [7], "sum")[0]
    other_seed = dropped_merge([stack_module(ads[:2], "m")], one_hot[:2], 0.4, [8], "sum")[0]
    # Assert: the same mask whatever the other contributors and threads; another seed, another mask
    assert torch.equal(among, first_two) and torch.equal(first_two, one_thread)
    assert not torch.equal((first_two != 0), (other_seed != 0))
    full = ads[1].delta("m")
    kept = first_two != 0
    torch.testing.assert_close(first_two[kept], full[kept] / 0.4)


@pytest.mark.parametrize("p", [0.0, 1e-300, 0.1, 0.3, 0.5, 1 - 2 ** -53])
def test_the_keep_threshold_is_floor_of_p_times_2_to_the_64(p):
    t = kernels.keep_threshold(p)
    assert Fraction(t, 1 << 64) <= Fraction(p) < Fraction(t + 1, 1 << 64)
    assert 0 <= t < 1 << 64


def test_the_keys_are_splitmix64_of_the_seed_stream():
    # An independent re-derivation of SplitMix64 (Steele et al. 2014) with Python integers
    mask = (1 << 64) - 1

    def splitmix(state: int) -> int:
        z = (state + 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    seed, state, expected = 12345, 12345, []
    for _ in range(3):
        expected.append(splitmix(state))
        state = (state + 0x9E3779B97F4A7C15) & mask
    assert kernels.contributor_keys(seed, 3).tolist() == expected


@pytest.mark.parametrize("n, k", [(7, 1), (50, 5), (50, 24), (9, 4)])
def test_the_selection_network_block_is_numpys_trimmed_mean(n, k):
    # Prepare: ties and a large outlier among the values
    rng = np.random.default_rng(n + k)
    x = rng.integers(-3, 4, size=(n, 5, 13)).astype(np.float32)
    x[0, 0, 0] = 1e6
    pairs = np.array(selection_network(n, k, n - 1 - k), dtype=np.int64).reshape(-1, 2)
    # Execute
    got = kernels.network_block(torch.from_numpy(x.copy()), pairs, k).numpy()
    # Assert
    s = np.sort(x, axis=0)[k:n - k]
    np.testing.assert_allclose(got, s.mean(0), rtol=1e-6)
