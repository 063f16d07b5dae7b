"""The formula-driven pretraining corpus (sim.data.formula) against hand-derived IFS attractors and polygons."""
from __future__ import annotations

import numpy as np
import pytest

from sim.data import formula as fm


def _ifs(*maps: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """One IFS as the (1, N, 6) maps and (1, N) probabilities ∝ |det| that the chaos game takes."""
    m = np.array([maps], float)
    det = np.abs(m[..., 0] * m[..., 3] - m[..., 1] * m[..., 2])
    return m, det / det.sum(1, keepdims=True)


# Sierpinski's triangle on (0, 0), (1, 0), (0, 1): p ↦ p / 2 + v / 2
SIERPINSKI = _ifs((0.5, 0, 0, 0.5, 0, 0), (0.5, 0, 0, 0.5, 0.5, 0), (0.5, 0, 0, 0.5, 0, 0.5))
# the unit square as four half-size copies of itself: its attractor fills the image
SQUARE = _ifs(*[(0.5, 0, 0, 0.5, e, f) for e in (0, 0.5) for f in (0, 0.5)])
# a segment: x ↦ x / 2 or x / 2 + 1/2, y ↦ y / 2 (the attractor is [0, 1] × {0})
SEGMENT = _ifs((0.5, 0, 0, 0.5, 0, 0), (0.5, 0, 0, 0.5, 0.5, 0))


def test_chaos_game_points_lie_on_the_sierpinski_triangle():
    # Prepare / Execute
    maps, probs = SIERPINSKI
    points = fm._chaos_game(maps, probs, steps=20, rng=np.random.default_rng(0))[0]
    # Assert: a point of the right-angled Sierpinski triangle never has a binary digit 1 in both x and y (checked to
    # 8 digits; the burn-in leaves the chains within 2^-16 of the attractor), and every third of it is visited
    assert points.shape == (fm.CHAINS * 20, 2)
    digits = np.floor(points * 2 ** 8).astype(np.int64)
    near = [(digits[:, 0] + dx) & (digits[:, 1] + dy) for dx in (-1, 0) for dy in (-1, 0)]
    assert (np.min(np.abs(near), axis=0) == 0).all()
    thirds = [(points[:, 0] < 0.5) & (points[:, 1] < 0.5), points[:, 0] >= 0.5, points[:, 1] >= 0.5]
    assert all(0.25 < t.mean() < 0.42 for t in thirds)


def test_filling_rate_passes_a_filled_square_and_rejects_a_segment():
    rng = np.random.default_rng(1)
    square = fm.filling_rate(*SQUARE, rng)[0]
    segment = fm.filling_rate(*SEGMENT, rng)[0]
    # a uniformly filled square hit by P points on S² pixels: 1 − exp(−P / S²) of them (Poisson), less the margin
    density = fm.SEARCH_POINTS / fm.SEARCH_SIZE ** 2
    inner = ((fm.SEARCH_SIZE - 2 * fm.SEARCH_PAD) / fm.SEARCH_SIZE) ** 2
    assert square == pytest.approx((1 - np.exp(-density)) * inner, abs=0.03)
    assert square >= fm.FILL_RATE
    # a segment lies on one row of pixels at most (its bounding box has no height)
    assert segment <= 1 / fm.SEARCH_SIZE
    # a map that doubles every point diverges: no image, rate 0
    diverging = _ifs((2.0, 0, 0, 2.0, 1, 1), (2.0, 0, 0, -2.0, 0, 1))
    assert fm.filling_rate(*diverging, rng)[0] == 0.0


def test_categories_pass_the_fill_rate_and_have_two_to_seven_maps():
    cats = fm.fractal_categories(3, np.random.default_rng(2))
    assert len(cats) == 3
    for params in cats:
        assert fm.MAPS[0] <= len(params) <= fm.MAPS[1] and params.shape[1] == 7
        np.testing.assert_allclose(params[:, 6].sum(), 1.0)
        det = np.abs(params[:, 0] * params[:, 3] - params[:, 1] * params[:, 2])
        np.testing.assert_allclose(params[:, 6], det / det.sum())
        assert (np.abs(params[:, :6]) <= 1).all()
        rate = fm.filling_rate(params[None, :, :6], params[None, :, 6], np.random.default_rng(3))[0]
        assert rate >= fm.FILL_RATE - 0.02          # another draw of the same chaos game: nearly the same rate


def test_weight_variants_scale_one_parameter_of_every_map():
    params = np.array([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7], [-0.1, -0.2, -0.3, -0.4, -0.5, -0.6, 0.3]])
    variants = fm._weight_variants(params)
    assert variants.shape == (25, 2, 6)
    np.testing.assert_array_equal(variants[0], params[:, :6])
    # variant 1 + 4 j + k scales parameter j of both maps by WEIGHTS[k], nothing else
    for j in range(6):
        for k, w in enumerate(fm.WEIGHTS):
            want = params[:, :6].copy()
            want[:, j] *= w
            np.testing.assert_allclose(variants[1 + 4 * j + k], want)


def test_fractal_instances_are_the_four_flips_of_each_variant():
    rng = np.random.default_rng(4)
    out = fm.render_fractals([np.concatenate([SQUARE[0][0], SQUARE[1][0][:, None]], 1)], 16, rng)
    assert out.shape == (1, 100, 16, 16) and out.dtype == np.uint8
    first = out[0, :4]
    np.testing.assert_array_equal(first[1], first[0][::-1])
    np.testing.assert_array_equal(first[2], first[0][:, ::-1])
    np.testing.assert_array_equal(first[3], first[0][::-1, ::-1])
    assert out[0, 0].mean() > 100          # the square fills the image (bar a one-pixel margin)


def test_perlin_noise_by_hand():
    g = np.array([0.5, -1.0, 0.25])
    # zero at lattice points; at u = 1/2 the fade is 1/2: (g0 · 1/2 + g1 · (−1/2)) / 2
    np.testing.assert_allclose(fm.perlin_1d(np.array([0.0, 1.0, 2.0, 3.0]), g), 0.0, atol=1e-12)
    np.testing.assert_allclose(fm.perlin_1d(np.array([0.5, 1.5, 2.5]), g),
                               [0.25 * (0.5 + 1.0), 0.25 * (-1.0 - 0.25), 0.25 * (0.25 - 0.5)])
    t = np.random.default_rng(5).uniform(0, 3, 1000)
    assert np.abs(fm.perlin_1d(t, np.array([1.0, -1.0, 1.0]))).max() <= 0.5


def test_contours_without_noise_are_concentric_ovals_growing_by_the_offset():
    # Prepare: 4 vertices at 0°, 90°, 180°, 270°, radius 3 stretched (2, 1), 3 contours, offset 1, no noise
    xs, ys = fm.contour_vertices(4, 3.0, np.array([2.0, 1.0]), np.array([10.0, 20.0]), 1.0, np.zeros((2, 3, 4)))
    # Assert: contour l has its vertex on the x axis at 10 + 6 + (l + 1) and on the y axis at 20 + 3 + (l + 1)
    np.testing.assert_allclose(xs[:, 0], [17, 18, 19])
    np.testing.assert_allclose(ys[:, 1], [24, 25, 26])
    np.testing.assert_allclose(xs[:, 2], [3, 2, 1], atol=1e-5)
    np.testing.assert_allclose(ys[:, 3], [16, 15, 14], atol=1e-5)
    np.testing.assert_allclose(ys[:, 0], 20.0, atol=1e-5)


def test_polygons_are_drawn_in_order_on_white():
    # a square of side 6 at (2, 2)-(8, 8) in grey 0, then its left edge again in grey 100 (a later one covers it)
    xs = np.array([[2.0, 8.0, 8.0, 2.0], [2.0, 2.0, 2.0, 2.0]])
    ys = np.array([[2.0, 2.0, 8.0, 8.0], [2.0, 2.0, 8.0, 8.0]])
    img = fm.draw_polygons(xs, ys, np.array([0, 100]), canvas=12)
    edge = np.zeros((12, 12), bool)
    edge[2, 2:9] = edge[8, 2:9] = edge[2:9, 2] = edge[2:9, 8] = True
    assert set(np.unique(img)) == {0.0, 100.0, 255.0}
    np.testing.assert_array_equal(img != 255, edge)
    assert (img[2:9, 2] == 100).all() and (img[3:8, 8] == 0).all()


def test_corpus_is_seeded_balanced_and_labels_fractals_first():
    a, k = fm.make_formula_corpus(16, seed=0, fractals=2, contours=2, instances=10)
    b, _ = fm.make_formula_corpus(16, seed=0, fractals=2, contours=2, instances=10)
    assert k == 4 and a.x.shape == (40, 3, 16, 16) and a.x.dtype == np.uint8
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(np.bincount(a.y), [10, 10, 10, 10])
    np.testing.assert_array_equal(a.x[:, 0], a.x[:, 2])                  # greyscale in RGB
    frac, cont = a.x[a.y < 2], a.x[a.y >= 2]
    assert frac.mean() < 128 < cont.mean()          # fractals: grey points on black; contours: lines on white
    other, _ = fm.make_formula_corpus(16, seed=1, fractals=2, contours=2, instances=10)
    assert not np.array_equal(other.x, a.x)
