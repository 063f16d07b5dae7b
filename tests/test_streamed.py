"""The streamed trims (sim.merge.streamed) against a sort: exact k-th magnitudes, ties, zeros, bracket misses."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sim.merge import streamed
from sim.merge.streamed import plan_topk, stack_module, trimmed_merge, widen
from sim.model import PEFT_PREFIX, Adapter

pytestmark = pytest.mark.usefixtures("single_thread")


def adapters_from(deltas: list[list[np.ndarray]]) -> list[Adapter]:
    """Adapters whose ΔW per module is exactly the given matrix (A = I, B = ΔW, alpha = r)."""
    out = []
    for per_module in deltas:
        w, alphas = {}, {}
        for j, d in enumerate(per_module):
            w[f"{PEFT_PREFIX}blocks.{j}.attn.qkv.lora_A.weight"] = torch.eye(d.shape[1])
            w[f"{PEFT_PREFIX}blocks.{j}.attn.qkv.lora_B.weight"] = torch.tensor(d, dtype=torch.float32)
            alphas[f"blocks.{j}.attn.qkv"] = float(d.shape[1])          # scaling alpha / r = 1 in every module
        out.append(Adapter(w, 1.0, alpha_pattern=alphas))
    return out


def np_trim(vec: np.ndarray, density: float) -> np.ndarray:
    """Keep every entry with |x| >= the k-th largest |x| (k = int(density · size)), by a sort."""
    k = int(density * vec.size)
    if k == 0:
        return np.zeros_like(vec)
    t = np.sort(np.abs(vec).ravel())[::-1][k - 1]
    return np.where(np.abs(vec) >= t, vec, 0.0)


def np_merge(deltas, w, density, scope, combine):
    n, m = len(deltas), len(deltas[0])
    if scope == "global":
        sizes = np.cumsum([0] + [d.size for d in deltas[0]])
        flat = [np_trim(np.concatenate([d.ravel() for d in per]), density) for per in deltas]
        trimmed = [[f[sizes[j]:sizes[j + 1]].reshape(deltas[0][j].shape) for j in range(m)] for f in flat]
    else:
        trimmed = [[np_trim(d, density) for d in per] for per in deltas]
    out = []
    for j in range(m):
        x = np.stack([trimmed[i][j] for i in range(n)]).astype(np.float64)
        wx = w[:, j, None, None] * x
        if combine == "sum":
            out.append(wx.sum(0))
            continue
        elected = np.where(x.sum(0) >= 0, 1.0, -1.0)
        agree = np.sign(x) == elected
        total = (wx * agree).sum(0)
        out.append(total / np.maximum(agree.sum(0), 1) if combine == "ties_mean" else total)
    return out


def random_deltas(seed: int, n: int = 4, shapes=((70, 9), (33, 12))) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [[rng.standard_normal(s).astype(np.float32) * (i + 1) for s in shapes] for i in range(n)]


def run(deltas, w, density, scope, combine):
    ads = adapters_from(deltas)
    stacks = [stack_module(ads, m) for m in ads[0].modules()]
    return [t.double().numpy() for t in trimmed_merge(stacks, torch.tensor(w, dtype=torch.float32), density,
                                                     scope, combine)]


@pytest.mark.parametrize("scope", ["global", "module"])
@pytest.mark.parametrize("combine", ["sum", "ties_sum", "ties_mean"])
@pytest.mark.parametrize("density", [0.0, 0.013, 0.2, 0.5, 0.97, 1.0])
def test_trim_equals_the_sort_definition(scope, combine, density):
    deltas = random_deltas(1)
    w = np.random.default_rng(2).uniform(0.1, 1.0, (4, 2))
    for got, exp in zip(run(deltas, w, density, scope, combine), np_merge(deltas, w, density, scope, combine)):
        np.testing.assert_allclose(got, exp, rtol=1e-5, atol=1e-5)


def test_tied_magnitudes_at_the_threshold_are_all_kept():
    # Prepare: a quarter of the entries share the magnitude 1, which is the k-th largest
    rng = np.random.default_rng(3)
    d = rng.uniform(0.0, 0.5, (40, 10)).astype(np.float32)
    d.ravel()[:100] = np.where(np.arange(100) % 2, 1.0, -1.0)
    d.ravel()[100:120] = 2.0
    deltas = [[d]]
    w = np.ones((1, 1))
    got = run(deltas, w, 0.2, "module", "sum")[0]
    # Assert: k = 80 reaches into the tie, so all 100 entries of magnitude 1 and the 20 of 2 are kept
    assert np.count_nonzero(got) == 120
    np.testing.assert_allclose(got, np_merge(deltas, w, 0.2, "module", "sum")[0])


def test_zeros_below_the_threshold_and_a_density_that_reaches_them():
    d = np.zeros((30, 8), np.float32)
    d[:3] = np.random.default_rng(4).standard_normal((3, 8))
    deltas = [[d], [2 * d]]
    w = np.ones((2, 1))
    for density in (0.05, 0.5):                       # k below and beyond the 24 nonzero entries
        np.testing.assert_allclose(run(deltas, w, density, "module", "ties_sum")[0],
                                   np_merge(deltas, w, density, "module", "ties_sum")[0], rtol=1e-6)


def test_a_bracket_that_misses_is_widened_and_the_result_stays_exact(monkeypatch):
    # Prepare: brackets of zero width (Z = 0) almost never hold the k-th magnitude
    monkeypatch.setattr(streamed, "Z", 0.0)
    deltas = random_deltas(5)
    w = np.full((4, 2), 0.3)
    ads = adapters_from(deltas)
    stacks = [stack_module(ads, m) for m in ads[0].modules()]
    plan = plan_topk(stacks, 0.3, "global")
    assert streamed._pass(stacks, torch.tensor(w, dtype=torch.float32), plan, "ties_sum") is None
    assert plan.missed
    opened = widen(plan, plan.missed)
    assert all(np.isinf(opened.a[g].numpy()).all() for g in plan.missed)
    # Execute / Assert: the public entry point redoes the pass and matches the sort
    for got, exp in zip(run(deltas, w, 0.3, "global", "ties_sum"), np_merge(deltas, w, 0.3, "global", "ties_sum")):
        np.testing.assert_allclose(got, exp, rtol=1e-5, atol=1e-5)


def test_blocks_span_rows_beyond_one_block_and_mixed_ranks():
    # Prepare: 100 output rows (several blocks of ROWS) and contributors of rank 2 and 5
    g = torch.Generator().manual_seed(6)
    ads = []
    for r in (2, 5, 3):
        ads.append(Adapter({f"{PEFT_PREFIX}m.lora_A.weight": torch.randn(r, 7, generator=g),
                            f"{PEFT_PREFIX}m.lora_B.weight": torch.randn(100, r, generator=g)}, 2.0 * r))
    deltas = [[a.delta("m").numpy()] for a in ads]
    stacks = [stack_module(ads, "m")]
    w = np.array([[0.2], [0.5], [1.0]])
    got = trimmed_merge(stacks, torch.tensor(w, dtype=torch.float32), 0.25, "module", "ties_mean")[0]
    np.testing.assert_allclose(got.double().numpy(), np_merge(deltas, w, 0.25, "module", "ties_mean")[0],
                               rtol=1e-4, atol=1e-5)
