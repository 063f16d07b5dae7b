"""Formula-driven pretraining images: FractalDB-style IFS fractals and RCDB-style radial contours.

Formula-driven supervised learning pretrains a network to tell apart images drawn from mathematical formulas, one
class per formula, with no natural image and no human label: FractalDB (Kataoka et al., "Pre-training without
Natural Images", ACCV 2020; for ViTs Nakashima et al., "Can Vision Transformers Learn without Natural Images?", AAAI
2022) and RCDB (Kataoka et al., "Replacing Labeled Real-image Datasets with Auto-generated Contours", CVPR 2022)
transfer close to ImageNet pretraining. This module builds a seeded corpus of both, as uint8 (n, 3, S, S) with the
formula's category as the label, in numpy alone.

**Fractals** (FractalDB, following the authors' category search and renderer):

* a category is an iterated function system of N affine maps ``(x, y) ↦ (a x + b y + e, c x + d y + f)``, N drawn
  from {2, …, 7} and every parameter from U(-1, 1), each map chosen with probability ∝ |ad − bc|; it is kept when its
  *filling rate* passes 0.2: rendered with 100,000 chaos-game points onto 512 × 512 pixels (bounding box scaled to
  the image less a 6 px margin), at least a fifth of the pixels are hit (the search code's ``--rate 0.2``);
* its instances vary one of the six parameters of every map by a weight in {0.8, 0.9, 1.1, 1.2} (24 variants, plus
  the unweighted one: the paper's 25, ``weights_0.1.csv``), each in the four flips (none, vertical, horizontal,
  both): 100 instances per category;
* an instance is rendered by the chaos game, white points on black.

**Radial contours** (RCDB, following the authors' ``make_rcdb.py`` with lengths scaled from its 512 px canvas):

* a category fixes the number of vertices n (an exponential with mean 100, redrawn until 2 < n ≤ 200), the number of
  contours L ~ U{1, …, 200}, the Perlin-noise amplitude c ~ U(0, 4) px and the line offset w ~ U(0, 0.1) px;
* an instance draws its start radius U{0, …, 100} px, oval rates U(1, 2) for x and y and a centre within ±200 px
  of the image centre; it starts from the regular n-gon of that radius and draws L contours, each the polygon after
  every vertex has moved along its own ray by w − (2c·p − c) in x and in y (p a 1-D Perlin-noise value at a random
  position, drawn independently per vertex, contour and axis), so the contours grow outwards as a noisy concentric
  family; each contour in a random grey U{0, …, 255}, over the earlier ones, on white.

Deviations, for a CPU budget and a 32 px model:

* categories: as many as the pretraining budget asks for (``sim.model.pretraining_corpus``: 192 for the default,
  half of each family, at most 256) instead of 1,000 per family;
* instances: FractalDB's 100 per category without its ten random 3 × 3 patch masks per point; RCDB's 1,000 cut to
  the same 100;
* resolution: images are drawn at ``RENDER_SCALE`` (4) times the model's input size and averaged down (the authors
  draw at 512 px and resize), with ``POINTS_PER_PIXEL`` chaos-game points per drawn pixel and one-pixel-wide contour
  lines at that size (RCDB's 1 px lines at 512 px would vanish at 32 px);
* the filling-rate test runs at 128 × 128 with 6,250 points, the same 0.38 points per pixel as the authors'
  100,000 on 512 × 512 (a fractal's fine structure makes its rate somewhat higher at the coarser grid, so more
  candidates pass: about 1 in 20, where none of a first 64 passed at 512 px);
* the chaos game runs ``CHAINS`` parallel chains from the origin instead of one, the first ``BURN_IN`` points of
  each discarded (the same attractor, sampled in parallel);
* the Perlin noise is ``perlin_1d`` with seeded random lattice gradients (the authors call the ``noise`` package's
  ``pnoise1``); sampled at uniform random positions, as there, it is an i.i.d. draw from its value distribution.
"""
from __future__ import annotations

import numpy as np

from sim.data.base import Split, derive_rng

# FractalDB category search (the authors' param_search/ifs_search.py)
MAPS = (2, 7)                  # np.random.randint(2, 8)
FILL_RATE = 0.2                # --rate
# --numof_point 100000 on 512 x 512 with a 6 px margin, scaled to 128 x 128 at the same points per pixel
SEARCH_POINTS = 100_000 * 128 ** 2 // 512 ** 2
SEARCH_SIZE, SEARCH_PAD = 128, 6 * 128 / 512
WEIGHTS = (0.8, 0.9, 1.1, 1.2)  # weights_0.1.csv: one parameter of every map scaled by one of these (+ unweighted)
FLIPS = 4
FRACTAL_INSTANCES = (1 + 6 * len(WEIGHTS)) * FLIPS  # 100
CHAINS, BURN_IN = 256, 16      # parallel chaos-game chains; steps discarded before points are kept
POINTS_PER_PIXEL = 1.2         # chaos-game points per pixel of the rendering canvas
FRACTAL_GREY = 255             # point intensity on black (the authors draw 127; the input is normalised anyway)

# RCDB (the authors' rcdb_render/make_rcdb.py), lengths in pixels of its 512 px canvas
RCDB_SIZE = 512
MAX_VERTICES, MEAN_VERTICES = 200, 100
MAX_CONTOURS = 200
PERLIN_MAX, LINE_OFFSET_MAX = 4.0, 0.1
RADIUS_MAX, OVAL_MAX, CENTRE_SHIFT = 100, 2.0, 400
RENDER_SCALE = 4               # images are drawn at 4x the model's input size and averaged down (the authors draw
                               # at 512 px and resize): point clouds and lines become grey densities, not speckle
LINE_STEP = 0.75               # contour edges are sampled every 3/4 px of the rendering canvas (no gaps)


# ------------------------------------------------------------------------------------------
# Fractals
# ------------------------------------------------------------------------------------------
def _chaos_game(maps: np.ndarray, probs: np.ndarray, steps: int, rng: np.random.Generator) -> np.ndarray:
    """Points (B, CHAINS * steps, 2) of B IFSs by the chaos game; ``maps`` (B, N, 6) as (a, b, c, d, e, f),
    ``probs`` (B, N) (zero for padding maps). Chains start at the origin; ``BURN_IN`` steps are dropped.
    Points of an IFS that is not contractive come back non-finite."""
    b, n = probs.shape
    cum = np.cumsum(probs, axis=1)
    cum[:, -1] = 1.0 + 1e-9
    x = np.zeros((b, CHAINS))
    y = np.zeros((b, CHAINS))
    out = np.empty((b, steps, CHAINS, 2))
    flat = maps.reshape(b * n, 6)
    offset = (np.arange(b) * n)[:, None]
    with np.errstate(over="ignore", invalid="ignore"):
        for t in range(BURN_IN + steps):
            k = (rng.random((b, CHAINS))[..., None] >= cum[:, None, :]).sum(-1)    # (B, CHAINS) map index
            m = flat[k + offset]                                                    # (B, CHAINS, 6)
            x, y = m[..., 0] * x + m[..., 1] * y + m[..., 4], m[..., 2] * x + m[..., 3] * y + m[..., 5]
            if t >= BURN_IN:
                out[:, t - BURN_IN, :, 0], out[:, t - BURN_IN, :, 1] = x, y
    return out.reshape(b, -1, 2)


def _raster(points: np.ndarray, size: int, pad: float) -> np.ndarray:
    """Binary images (B, size, size) of the points (B, P, 2), each IFS's bounding box scaled to the image less ``pad``
    on every side (x and y independently, as the authors' renderer); an IFS with non-finite points is all zero."""
    b = points.shape[0]
    with np.errstate(over="ignore", invalid="ignore"):
        ok = np.isfinite(points).all(axis=(1, 2)) & (np.abs(points) < 1e12).all(axis=(1, 2))
        p = np.where(ok[:, None, None], points, 0.0)
        lo, hi = p.min(1, keepdims=True), p.max(1, keepdims=True)                   # (B, 1, 2)
        span = np.where(hi - lo > 1e-12, hi - lo, 1.0)
        q = ((p - lo) / span * (size - 1 - 2 * pad) + pad).astype(np.int64)        # (B, P, 2) pixel x, y
    img = np.zeros(b * size * size, bool)
    img[(np.arange(b)[:, None] * size + q[..., 1]) * size + q[..., 0]] = True
    img = img.reshape(b, size, size)
    img[~ok] = False
    return img


def filling_rate(maps: np.ndarray, probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(B,) share of the ``SEARCH_SIZE``² pixels hit by ``SEARCH_POINTS`` chaos-game points of each IFS (``maps``
    (B, N, 6), ``probs`` (B, N)): FractalDB's filling rate; 0 for an IFS whose points diverge."""
    steps = -(-SEARCH_POINTS // CHAINS)
    points = _chaos_game(maps, probs, steps, rng)[:, :SEARCH_POINTS]
    return _raster(points, SEARCH_SIZE, SEARCH_PAD).mean(axis=(1, 2))


def fractal_categories(n: int, rng: np.random.Generator, batch: int = 64) -> list[np.ndarray]:
    """``n`` IFS categories (each (N, 7): a, b, c, d, e, f, probability) whose filling rate is at least
    ``FILL_RATE``, searched in batches of ``batch`` random IFSs."""
    found: list[np.ndarray] = []
    while len(found) < n:
        counts = rng.integers(MAPS[0], MAPS[1] + 1, batch)
        maps = rng.uniform(-1.0, 1.0, (batch, MAPS[1], 6))
        det = np.abs(maps[..., 0] * maps[..., 3] - maps[..., 1] * maps[..., 2])
        det[np.arange(MAPS[1])[None, :] >= counts[:, None]] = 0.0                  # padding maps: never chosen
        probs = det / det.sum(1, keepdims=True)
        for i in np.flatnonzero(filling_rate(maps, probs, rng) >= FILL_RATE):
            if len(found) < n:
                found.append(np.concatenate([maps[i, :counts[i]], probs[i, :counts[i], None]], axis=1))
    return found


def _weight_variants(params: np.ndarray) -> np.ndarray:
    """(25, N, 6) maps of one category: unweighted, then each parameter of every map scaled by each weight."""
    maps = params[:, :6]
    out = [maps]
    for j in range(6):
        for w in WEIGHTS:
            v = maps.copy()
            v[:, j] *= w
            out.append(v)
    return np.stack(out)


def render_fractals(categories: list[np.ndarray], size: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 (len(categories), 100, size, size) greyscale instances: 25 weight variants × 4 flips per category,
    rendered at ``RENDER_SCALE`` times ``size`` and averaged down."""
    canvas = RENDER_SCALE * size
    steps = max(1, int(round(POINTS_PER_PIXEL * canvas * canvas / CHAINS)))
    out = np.empty((len(categories), FRACTAL_INSTANCES, size, size), np.uint8)
    for c, params in enumerate(categories):
        maps = _weight_variants(params)                                             # (25, N, 6)
        probs = np.broadcast_to(params[:, 6], maps.shape[:2])
        img = _raster(_chaos_game(maps, probs, steps, rng), canvas, pad=1).astype(np.float32)
        img = img.reshape(len(maps), size, RENDER_SCALE, size, RENDER_SCALE).mean(axis=(2, 4)) * FRACTAL_GREY
        img = np.stack([img, img[:, ::-1], img[:, :, ::-1], img[:, ::-1, ::-1]], axis=1)   # the four flips
        out[c] = np.round(img.reshape(FRACTAL_INSTANCES, size, size)).astype(np.uint8)
    return out


# ------------------------------------------------------------------------------------------
# Radial contours
# ------------------------------------------------------------------------------------------
def perlin_1d(t: np.ndarray, gradients: np.ndarray) -> np.ndarray:
    """1-D Perlin gradient noise at ``t`` (Perlin 2002: fade 6u⁵ − 15u⁴ + 10u³), lattice gradients ``gradients``
    (length G, used periodically); values in [-0.5, 0.5], zero at the lattice points."""
    i = np.floor(t).astype(np.int64)
    u = t - i
    g0, g1 = gradients[i % len(gradients)], gradients[(i + 1) % len(gradients)]
    fade = u * u * u * (u * (u * 6 - 15) + 10)
    return (1 - fade) * g0 * u + fade * g1 * (u - 1)


def contour_categories(n: int, rng: np.random.Generator) -> list[dict]:
    """``n`` RCDB categories: vertices, contours, Perlin amplitude and line offset (lengths at 512 px)."""
    cats = []
    for _ in range(n):
        while True:
            vertices = int(rng.exponential(MEAN_VERTICES))
            if 2 < vertices <= MAX_VERTICES:
                break
        cats.append({"vertices": vertices, "contours": int(rng.integers(1, MAX_CONTOURS + 1)),
                     "perlin": float(rng.uniform(0, PERLIN_MAX)), "offset": float(rng.uniform(0, LINE_OFFSET_MAX))})
    return cats


def contour_vertices(n: int, radius: float, oval: np.ndarray, centre: np.ndarray, offset: float,
                     noise: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vertices (L, n) x and y of the L contours of one RCDB instance: the regular n-gon of ``radius`` stretched by
    ``oval`` (x, y), every vertex moved along its ray by ``offset − noise`` per contour (``noise`` (2, L, n): x and y),
    cumulatively, around ``centre`` (x, y)."""
    angle = 2 * np.pi * np.arange(n, dtype=np.float32) / n
    cos, sin = np.cos(angle), np.sin(angle)
    xs = centre[0] + cos * radius * oval[0] + np.cumsum(cos * (offset - noise[0]), axis=0)
    ys = centre[1] + sin * radius * oval[1] + np.cumsum(sin * (offset - noise[1]), axis=0)
    return xs, ys


def draw_polygons(xs: np.ndarray, ys: np.ndarray, grey: np.ndarray, canvas: int) -> np.ndarray:
    """float (canvas, canvas) image, white, with the closed polygons (L, n) drawn one pixel wide in order, polygon l
    in ``grey[l]`` (a later polygon covers an earlier one); each edge sampled every ``LINE_STEP`` px."""
    contours = xs.shape[0]
    xs, ys = np.concatenate([xs, xs[:, :1]], 1), np.concatenate([ys, ys[:, :1]], 1)
    dx, dy = np.diff(xs, axis=1), np.diff(ys, axis=1)                                # (L, n)
    per_seg = int(np.clip(np.ceil(np.hypot(dx, dy).max() / LINE_STEP), 1, 64)) if dx.size else 1
    f = (np.arange(per_seg, dtype=np.float32) / per_seg)[None, None, :]
    px = np.floor((xs[:, :-1, None] + f * dx[..., None]).reshape(contours, -1))      # (L, n * per_seg)
    py = np.floor((ys[:, :-1, None] + f * dy[..., None]).reshape(contours, -1))
    value = np.repeat(np.asarray(grey, np.float32), px.shape[1])
    px, py = px.ravel().astype(np.int32), py.ravel().astype(np.int32)
    keep = (px >= 0) & (px < canvas) & (py >= 0) & (py < canvas)
    img = np.full(canvas * canvas, 255.0, np.float32)
    img[(py * canvas + px)[keep]] = value[keep]         # numpy assigns repeated indices in order: the last wins
    return img.reshape(canvas, canvas)


def _contour_image(cat: dict, canvas: int, rng: np.random.Generator, gradients: np.ndarray) -> np.ndarray:
    """One RCDB instance, float (canvas, canvas) in [0, 255]: L noisy concentric polygons on white."""
    scale = canvas / RCDB_SIZE
    n, contours = cat["vertices"], cat["contours"]
    radius = rng.integers(0, RADIUS_MAX + 1) * scale
    oval = rng.uniform(1, OVAL_MAX, 2)
    centre = (canvas + rng.integers(-CENTRE_SHIFT, CENTRE_SHIFT + 1, 2) * scale) / 2          # (x, y)
    c = cat["perlin"] * scale
    noise = perlin_1d(rng.uniform(0, len(gradients), (2, contours, n)).astype(np.float32), gradients) * 2 * c - c
    xs, ys = contour_vertices(n, radius, oval, centre, cat["offset"] * scale, noise)
    return draw_polygons(xs, ys, rng.integers(0, 256, contours), canvas)


def render_contours(categories: list[dict], instances: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 (len(categories), instances, size, size) greyscale RCDB instances, rendered at ``RENDER_SCALE``
    times ``size`` and averaged down."""
    gradients = rng.uniform(-1, 1, 256).astype(np.float32)
    out = np.empty((len(categories), instances, size, size), np.uint8)
    for c, cat in enumerate(categories):
        for i in range(instances):
            img = _contour_image(cat, RENDER_SCALE * size, rng, gradients)
            out[c, i] = np.round(img.reshape(size, RENDER_SCALE, size, RENDER_SCALE).mean(axis=(1, 3))).astype(np.uint8)
    return out


# ------------------------------------------------------------------------------------------
# The corpus
# ------------------------------------------------------------------------------------------
def make_formula_corpus(size: int, seed: int, fractals: int = 64, contours: int = 64,
                        instances: int = FRACTAL_INSTANCES) -> tuple[Split, int]:
    """The formula-driven corpus, uint8 (n, 3, size, size) greyscale in RGB, labels 0 … fractals + contours − 1
    (fractal categories first), in a seeded shuffled order; returns it and the number of categories.

    ``instances`` per category (at most FractalDB's 100 for the fractals; the first ``instances`` of each category's
    weight-variant × flip list are kept, in a seeded order)."""
    rng = derive_rng(seed, "formula-corpus")
    frac = render_fractals(fractal_categories(fractals, rng), size, rng)                   # (F, 100, S, S)
    pick = np.stack([rng.permutation(FRACTAL_INSTANCES)[:instances] for _ in range(fractals)])
    frac = np.take_along_axis(frac, pick[:, :, None, None], axis=1)
    cont = render_contours(contour_categories(contours, rng), instances, size, rng)         # (R, I, S, S)
    x = np.concatenate([frac, cont]).reshape(-1, size, size)
    y = np.repeat(np.arange(fractals + contours), instances)
    order = rng.permutation(len(y))
    x = np.repeat(x[order][:, None], 3, axis=1)
    return Split(np.ascontiguousarray(x), y[order].astype(np.int64)), fractals + contours
