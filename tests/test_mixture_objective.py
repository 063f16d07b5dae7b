"""The mixture's search objective is MedForge's cross-entropy of the unnormalised Σ w·softmax: scale matters."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sim.coefficients import ProxyData, ProxySet, search_coefficients
from sim.merge.mixture import combine_probabilities, mixture_loss

L1 = 0.05


def hand_built() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Two adapters, two proxy sets: adapter 0 is right on set A (2 classes), adapter 1 on set B (3 classes)."""
    probs_a = np.array([[[0.9, 0.1], [0.2, 0.8], [0.7, 0.3]],          # adapter 0 on set A
                        [[0.4, 0.6], [0.6, 0.4], [0.5, 0.5]]])         # adapter 1 on set A
    probs_b = np.array([[[0.3, 0.3, 0.4], [0.5, 0.2, 0.3]],            # adapter 0 on set B
                        [[0.8, 0.1, 0.1], [0.1, 0.1, 0.8]]])           # adapter 1 on set B
    return [probs_a, probs_b], [np.array([0, 1, 0]), np.array([0, 2])]


def as_proxy(probs: list[np.ndarray], labels: list[np.ndarray]) -> tuple[list[torch.Tensor], ProxyData]:
    sets, start = [], 0
    for k, (p, y) in enumerate(zip(probs, labels)):
        sets.append(ProxySet(f"t{k}", tuple(f"c{j}" for j in range(p.shape[2])), start, start + len(y),
                             torch.as_tensor(y), key=f"set{k}"))
        start += len(y)
    return [torch.as_tensor(p, dtype=torch.float32) for p in probs], ProxyData(torch.zeros(start, 3, 1, 1), sets)


def numpy_ce(probs: list[np.ndarray], labels: list[np.ndarray], w: np.ndarray) -> float:
    """Mean over sets of mean_rows(logsumexp(z) - z_y), z = Σ_i w_i p_i: torch's CrossEntropyLoss on the sum."""
    per_set = []
    for p, y in zip(probs, labels):
        z = np.einsum("i,ink->nk", w, p)
        lse = np.log(np.exp(z).sum(axis=1))
        per_set.append(np.mean(lse - z[np.arange(len(y)), y]))
    return float(np.mean(per_set))


def test_loss_is_the_cross_entropy_of_the_unnormalised_sum_and_depends_on_scale():
    probs, labels = hand_built()
    tprobs, data = as_proxy(probs, labels)
    loss = mixture_loss(tprobs, data)
    for w in (np.array([0.5, 0.5]), np.array([1.2, -0.4]), np.array([-0.3, 0.0])):
        assert loss(w) == pytest.approx(numpy_ce(probs, labels, w), rel=1e-5)
    w = np.array([0.6, 0.4])
    for c in (0.25, 2.0):
        assert loss(c * w) == pytest.approx(numpy_ce(probs, labels, c * w), rel=1e-5)
        assert abs(loss(c * w) - loss(w)) > 1e-3                     # a renormalised mixture gives equal values


def test_l1_minimiser_does_not_shrink_the_weights_to_zero():
    probs, labels = hand_built()
    tprobs, data = as_proxy(probs, labels)
    loss = mixture_loss(tprobs, data)
    grid = [np.array([a, b]) for a in np.arange(-1.5, 1.501, 0.1) for b in np.arange(-1.5, 1.501, 0.1)]
    objective = [loss(w) + L1 * np.mean(np.abs(w)) for w in grid]
    reference = [numpy_ce(probs, labels, w) + L1 * np.mean(np.abs(w)) for w in grid]
    best = grid[int(np.argmin(objective))]
    np.testing.assert_allclose(best, grid[int(np.argmin(reference))])
    assert np.abs(best).sum() > 1.0                                  # scale-free CE + L1: the grid point next to 0
    # the search itself (MedForge: NGOpt, init 0.5, bounds ±1.5) ends far from 0 as well
    res = search_coefficients(loss, np.full(2, 0.5), budget=60, l1=L1, seed=0)
    assert np.abs(res.coefficients).sum() > 1.0
    assert res.objective == pytest.approx(numpy_ce(probs, labels, res.coefficients)
                                          + L1 * np.mean(np.abs(res.coefficients)), rel=1e-5)


def test_prediction_is_scale_free_and_makes_the_decisions_of_the_scored_distribution():
    probs, labels = hand_built()
    tprobs, _ = as_proxy(probs, labels)
    w = np.array([0.9, 0.2])
    for p, tp in zip(probs, tprobs):
        q = combine_probabilities(tp, w).numpy()
        z = np.einsum("i,ink->nk", w, p)
        scored = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)      # what the search's cross-entropy scores
        np.testing.assert_allclose(q, z / z.sum(axis=1, keepdims=True), rtol=1e-5)   # weighted average
        np.testing.assert_allclose(combine_probabilities(tp, 3.0 * w).numpy(), q, rtol=1e-5)
        assert (q.argmax(axis=1) == scored.argmax(axis=1)).all()
        if p.shape[2] == 2:                                             # same ranking, hence the same AUC
            assert (np.argsort(q[:, 1]) == np.argsort(scored[:, 1])).all()
    np.testing.assert_allclose(combine_probabilities(tprobs[1], np.zeros(2)).numpy(), np.full((2, 3), 1 / 3))
