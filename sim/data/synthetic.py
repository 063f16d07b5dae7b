"""The default ``synthetic`` cohort: procedurally generated, medical-like imaging tasks.

Each task stands for a modality and tells its classes apart by a different kind of structure:
texture and nucleus density (histology), localised opacities (chest X-ray), border irregularity
and colour variegation (dermoscopy), counts of small lesions (fundus), echo patterns (ultrasound),
mass vs. multiple spots (brain MRI). Nuisance variation (position, size, background, hair, vessels)
is shared by all classes of a task, so the label is only in the structure. Also here: the public
``shapes`` corpus forgesim pretrains its default foundation on, whose classes are disjoint from all tasks.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

from sim.data.base import Split, TaskPool, derive_rng, resize_uint8

# Generation happens at this resolution, then images are resized to ``data.img_size``.
GEN_SIZE = 32


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    return (y + 0.5) / size, (x + 0.5) / size


_Y, _X = _grid(GEN_SIZE)
_SOFT = 1.2 / GEN_SIZE  # edge width of shapes: about one pixel, so edges are antialiased


def _ellipse(cy: float, cx: float, ry: float, rx: float, theta: float = 0.0) -> np.ndarray:
    """Soft mask (S, S) in [0, 1] of a rotated ellipse."""
    c, s = math.cos(theta), math.sin(theta)
    dy, dx = _Y - cy, _X - cx
    u, v = dx * c + dy * s, -dx * s + dy * c
    d = np.sqrt((u / rx) ** 2 + (v / ry) ** 2)
    return np.clip((1.0 - d) * min(rx, ry) / _SOFT + 0.5, 0.0, 1.0)


def _polar_blob(cy: float, cx: float, radius: np.ndarray) -> np.ndarray:
    """Soft mask of a star-shaped region whose radius is a function of angle (``radius``: callable)."""
    dy, dx = _Y - cy, _X - cx
    r = np.sqrt(dy ** 2 + dx ** 2)
    edge = radius(np.arctan2(dy, dx))
    return np.clip((edge - r) / _SOFT + 0.5, 0.0, 1.0)


def _gauss(cy: float, cx: float, sigma: float) -> np.ndarray:
    return np.exp(-((_Y - cy) ** 2 + (_X - cx) ** 2) / (2 * sigma ** 2))


def _line(y0: float, x0: float, y1: float, x1: float, width: float) -> np.ndarray:
    """Soft mask of a line segment."""
    py, px = _Y - y0, _X - x0
    dy, dx = y1 - y0, x1 - x0
    t = np.clip((py * dy + px * dx) / (dy * dy + dx * dx + 1e-12), 0.0, 1.0)
    d = np.sqrt((py - t * dy) ** 2 + (px - t * dx) ** 2)
    return np.clip((width - d) / _SOFT + 0.5, 0.0, 1.0)


def _smooth_noise(rng: np.random.Generator, cells: int = 4) -> np.ndarray:
    """Low-frequency noise (S, S), roughly N(0, 1): bilinear upsampling of a coarse random grid."""
    coarse = rng.standard_normal((cells + 1, cells + 1)).astype(np.float32)
    g = np.linspace(0, cells, GEN_SIZE, dtype=np.float32)
    i = np.minimum(g.astype(int), cells - 1)
    f = g - i
    rows = coarse[i] * (1 - f)[:, None] + coarse[i + 1] * f[:, None]
    return rows[:, i] * (1 - f)[None, :] + rows[:, i + 1] * f[None, :]


def _canvas(colour: tuple[float, float, float], rng: np.random.Generator, texture: float) -> np.ndarray:
    img = np.empty((3, GEN_SIZE, GEN_SIZE), np.float32)
    img[:] = np.asarray(colour, np.float32)[:, None, None]
    return img + texture * _smooth_noise(rng, 6)[None]


def _paint(img: np.ndarray, mask: np.ndarray, colour) -> np.ndarray:
    colour = np.asarray(colour, np.float32)[:, None, None]
    return img * (1 - mask[None]) + mask[None] * colour


def _jitter(rng: np.random.Generator, colour, amount: float = 0.05) -> np.ndarray:
    return np.clip(np.asarray(colour) + amount * rng.standard_normal(3), 0, 1)


# ------------------------------------------------------------------------------------------
# Tasks: one generator per modality, gen(rng, label) -> float (3, S, S) in about [0, 1]
# ------------------------------------------------------------------------------------------
def _histology(rng: np.random.Generator, label: int) -> np.ndarray:
    """normal: few small round nuclei; stroma: aligned fibres + thin nuclei; tumor: crowded large nuclei."""
    img = _canvas(_jitter(rng, (0.92, 0.72, 0.82)), rng, 0.04)
    purple = _jitter(rng, (0.45, 0.25, 0.6))
    if label == 1:  # stroma
        angle = rng.uniform(0, math.pi)
        for _ in range(rng.integers(4, 7)):
            cy, cx = rng.uniform(0.1, 0.9, 2)
            dy, dx = 0.45 * math.sin(angle), 0.45 * math.cos(angle)
            img = _paint(img, 0.8 * _line(cy - dy, cx - dx, cy + dy, cx + dx, 0.025), _jitter(rng, (0.8, 0.4, 0.55)))
        for _ in range(rng.integers(2, 5)):
            cy, cx = rng.uniform(0.15, 0.85, 2)
            img = _paint(img, _ellipse(cy, cx, 0.03, 0.09, angle), purple)
        return img
    n, (rlo, rhi), colour = ((rng.integers(4, 8), (0.04, 0.06), purple) if label == 0 else
                             (rng.integers(13, 20), (0.05, 0.09), purple * 0.65))
    for _ in range(n):
        cy, cx = rng.uniform(0.08, 0.92, 2)
        r = rng.uniform(rlo, rhi)
        squash = 1.0 if label == 0 else rng.uniform(0.6, 1.0)
        img = _paint(img, _ellipse(cy, cx, r * squash, r, rng.uniform(0, math.pi)), colour)
    return img


def _xray(rng: np.random.Generator, label: int) -> np.ndarray:
    """normal: clear lungs; pneumonia: a fuzzy opacity in one lung; effusion: a fluid level at a lung base."""
    grey = np.full((GEN_SIZE, GEN_SIZE), 0.08, np.float32) + 0.03 * _smooth_noise(rng)
    oy, ox, sc = rng.uniform(-0.04, 0.04), rng.uniform(-0.04, 0.04), rng.uniform(0.9, 1.1)
    body = _ellipse(0.55 + oy, 0.5 + ox, 0.46 * sc, 0.42 * sc)
    grey = grey * (1 - body) + body * rng.uniform(0.5, 0.62)
    lungs = []
    for side in (-1, 1):
        lung = _ellipse(0.5 + oy, 0.5 + ox + side * 0.2 * sc, 0.3 * sc, 0.13 * sc)
        lungs.append(lung)
        grey = grey * (1 - lung) + lung * rng.uniform(0.15, 0.25)
    spine = np.clip(0.03 - np.abs(_X - 0.5 - ox), 0, 1) / 0.03 * body
    grey = np.maximum(grey, spine * 0.75)
    lung = lungs[rng.integers(2)]
    if label == 1:
        side = 1 if lung is lungs[1] else -1
        cy, cx = 0.5 + oy + rng.uniform(-0.12, 0.12), 0.5 + ox + side * 0.2 * sc + rng.uniform(-0.03, 0.03)
        grey = grey + rng.uniform(0.5, 0.6) * _gauss(cy, cx, rng.uniform(0.07, 0.1)) * lung
    elif label == 2:
        level = 0.5 + oy + rng.uniform(-0.02, 0.1)
        fluid = np.clip((_Y - level - 0.03 * np.cos(8 * (_X - ox))) / _SOFT + 0.5, 0, 1) * lung
        grey = grey + rng.uniform(0.4, 0.5) * fluid
    return np.repeat(grey[None], 3, axis=0)


def _dermoscopy(rng: np.random.Generator, label: int) -> np.ndarray:
    """nevus: regular border, uniform brown; melanoma: irregular border, dark core and blue-grey veil."""
    img = _canvas(_jitter(rng, (0.86, 0.66, 0.56)), rng, 0.03)
    cy, cx = rng.uniform(0.38, 0.62, 2)
    r0 = rng.uniform(0.16, 0.28)
    brown = _jitter(rng, (0.48, 0.3, 0.2))
    if label == 0:
        ecc, theta = rng.uniform(0.8, 1.0), rng.uniform(0, math.pi)
        img = _paint(img, _ellipse(cy, cx, r0 * ecc, r0, theta), brown)
    else:
        k = rng.integers(3, 7, size=3)
        amp, phase = rng.uniform(0.1, 0.2, size=3), rng.uniform(0, 2 * math.pi, size=3)
        radius = lambda a: r0 * (1 + sum(amp[j] * np.sin(k[j] * a + phase[j]) for j in range(3)))  # noqa: E731
        img = _paint(img, _polar_blob(cy, cx, radius), brown)
        img = _paint(img, 0.9 * _gauss(cy + rng.uniform(-.06, .06), cx + rng.uniform(-.06, .06), r0 * 0.35),
                     brown * 0.45)
        img = _paint(img, 0.7 * _gauss(cy + rng.uniform(-.1, .1), cx + rng.uniform(-.1, .1), r0 * 0.3),
                     (0.4, 0.45, 0.55))
    for _ in range(rng.integers(0, 3)):  # hair, in both classes
        y0, x0, y1, x1 = rng.uniform(0, 1, 4)
        img = _paint(img, 0.8 * _line(y0, x0, y1, x1, 0.012), (0.2, 0.15, 0.1))
    return img


def _fundus(rng: np.random.Generator, label: int) -> np.ndarray:
    """healthy: at most one lesion; moderate: 4-6 bright exudates; severe: 10-15."""
    img = np.zeros((3, GEN_SIZE, GEN_SIZE), np.float32)
    eye = _ellipse(0.5, 0.5, 0.47, 0.47)
    img = _paint(img, eye, _jitter(rng, (0.78, 0.35, 0.15), 0.04))
    img = img + 0.04 * _smooth_noise(rng)[None] * eye[None]
    side = rng.choice([-1, 1])
    dy, dx = rng.uniform(-0.05, 0.05), side * rng.uniform(0.22, 0.28)
    for _ in range(rng.integers(3, 5)):  # vessels leave the optic disc
        a = rng.uniform(0, 2 * math.pi)
        img = _paint(img, 0.7 * _line(0.5 + dy, 0.5 + dx, 0.5 + dy + 0.45 * math.sin(a), 0.5 + dx + 0.45 * math.cos(a),
                                      0.012) * eye, (0.5, 0.1, 0.05))
    img = _paint(img, _ellipse(0.5 + dy, 0.5 + dx, 0.08, 0.07), (0.97, 0.88, 0.55))
    n = (rng.integers(0, 2), rng.integers(4, 7), rng.integers(10, 16))[label]
    for _ in range(n):
        rr, a = 0.36 * math.sqrt(rng.uniform()), rng.uniform(0, 2 * math.pi)
        img = _paint(img, _ellipse(0.5 + rr * math.sin(a), 0.5 + rr * math.cos(a), 0.034, 0.034), (1.0, 0.95, 0.3))
    return img


def _ultrasound(rng: np.random.Generator, label: int) -> np.ndarray:
    """cyst: round anechoic region with posterior enhancement; solid: irregular hypoechoic mass with shadowing."""
    fan = np.clip((0.75 - np.abs(_X - 0.5) / (_Y + 0.15)) / 0.05, 0, 1) * (_Y > 0.05)
    speckle = rng.rayleigh(0.3, (GEN_SIZE, GEN_SIZE)).astype(np.float32)
    grey = np.clip(0.25 + 0.5 * speckle, 0, 1) * rng.uniform(0.6, 0.9)
    cy, cx, r = rng.uniform(0.4, 0.6), rng.uniform(0.38, 0.62), rng.uniform(0.1, 0.16)
    below = np.clip((_Y - cy) / 0.05, 0, 1) * (np.abs(_X - cx) < r * 0.9)
    if label == 0:
        grey = grey * (1 + 0.5 * below)
        mask = _ellipse(cy, cx, r, r * rng.uniform(0.9, 1.1))
        grey = grey * (1 - mask) + mask * 0.05 * speckle
    else:
        k, amp, ph = rng.integers(4, 8), rng.uniform(0.15, 0.3), rng.uniform(0, 6.3)
        mask = _polar_blob(cy, cx, lambda a: r * (1 + amp * np.sin(k * a + ph)))
        grey = grey * (1 - 0.6 * below)
        grey = grey * (1 - mask) + mask * 0.35 * grey
    return np.repeat((grey * fan)[None], 3, axis=0)


def _brain_mri(rng: np.random.Generator, label: int) -> np.ndarray:
    """healthy: normal anatomy; glioma: one bright mass with a dark core; lesions: several small bright spots."""
    img = np.zeros((GEN_SIZE, GEN_SIZE), np.float32)
    oy, ox = rng.uniform(-0.03, 0.03, 2)
    head, brain = _ellipse(0.5 + oy, 0.5 + ox, 0.45, 0.38), _ellipse(0.5 + oy, 0.5 + ox, 0.4, 0.33)
    img = img * (1 - head) + head * 0.8
    img = img * (1 - brain) + brain * (0.45 + 0.05 * _smooth_noise(rng))
    for side in (-1, 1):
        v = _ellipse(0.47 + oy, 0.5 + ox + side * 0.06, 0.1, 0.035, side * 0.3)
        img = img * (1 - v) + v * 0.12
    if label == 1:
        cy, cx, r = 0.5 + oy + rng.uniform(-0.18, 0.18), 0.5 + ox + rng.uniform(-0.15, 0.15), rng.uniform(0.1, 0.14)
        img = np.maximum(img, _ellipse(cy, cx, r, r * rng.uniform(0.7, 1.0), rng.uniform(0, 3)) * 0.95)
        core = _ellipse(cy, cx, r * 0.45, r * 0.45)
        img = img * (1 - core) + core * 0.25
    elif label == 2:
        for _ in range(rng.integers(6, 10)):
            rr, a = 0.3 * math.sqrt(rng.uniform()), rng.uniform(0, 2 * math.pi)
            img = np.maximum(img, _ellipse(0.5 + oy + rr * math.sin(a), 0.5 + ox + 0.8 * rr * math.cos(a),
                                           0.038, 0.038) * brain)
    return np.repeat(img[None], 3, axis=0)


# name -> (class names, generator); the first ``data.n_tasks`` are used by default.
TASKS: dict[str, tuple[tuple[str, ...], Callable[[np.random.Generator, int], np.ndarray]]] = {
    "histology": (("normal", "stroma", "tumor"), _histology),
    "xray": (("normal", "pneumonia", "effusion"), _xray),
    "dermoscopy": (("nevus", "melanoma"), _dermoscopy),
    "fundus": (("healthy", "moderate", "severe"), _fundus),
    "ultrasound": (("cyst", "solid"), _ultrasound),
    "brain_mri": (("healthy", "glioma", "lesions"), _brain_mri),
}


def _render(gen: Callable, counts: np.ndarray, rng: np.random.Generator, size: int, mode: str = "bilinear") -> Split:
    """Render ``counts[c]`` images of every class c, in a seeded shuffled order, resized to ``size`` (``mode``)."""
    labels = rng.permutation(np.repeat(np.arange(len(counts)), counts))
    x = np.stack([gen(rng, int(c)) for c in labels]) if len(labels) else np.zeros((0, 3, GEN_SIZE, GEN_SIZE))
    x = np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)
    return Split(resize_uint8(x, size, mode), labels.astype(np.int64))


def load_synthetic_tasks(cfg, seed: int) -> list[TaskPool]:
    """Generate every task's pools; sizes are per class per site, times the task's number of sites."""
    names = list(task_classes(cfg))
    pools = []
    for t, name in enumerate(names):
        classes, gen = TASKS[name]
        sites = len(range(t, cfg.institutions, len(names)))
        splits = []
        for split, per_class in (("train", cfg.train_per_class), ("val", cfg.val_per_class),
                                 ("test", cfg.test_per_class)):
            rng = derive_rng(seed, "synthetic", name, split)
            splits.append(_render(gen, np.full(len(classes), per_class * sites), rng, cfg.img_size,
                                  cfg.interpolation))
        pools.append(TaskPool(name, classes, *splits))
    return pools


def render_site(cfg, seed: int, task: str, site: int, counts: dict[str, np.ndarray]) -> dict[str, Split]:
    """One site's own images of ``task`` (``data.partition=per_institution``): ``counts[split][c]`` images of class
    c per split, from a stream of ``(seed, task, split, site)`` alone, so a site's images never depend on how many
    other sites there are."""
    _, gen = TASKS[task]
    return {split: _render(gen, n, derive_rng(seed, "synthetic-site", task, split, site), cfg.img_size,
                          cfg.interpolation)
            for split, n in counts.items()}


def task_classes(cfg) -> dict[str, tuple[str, ...]]:
    """The tasks ``cfg`` names (``data.tasks`` or the first ``data.n_tasks``) and their classes, nothing rendered."""
    names = list(cfg.tasks) if cfg.tasks else list(TASKS)[: cfg.n_tasks]
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise ValueError(f"data.tasks: unknown synthetic task {unknown[0]!r}; known: {', '.join(TASKS)}")
    if len(names) < cfg.n_tasks and not cfg.tasks:
        raise ValueError(f"data.n_tasks must be at most {len(TASKS)} for synthetic data, got {cfg.n_tasks}")
    return {name: TASKS[name][0] for name in names}


# ------------------------------------------------------------------------------------------
# The public pretraining corpus: generic shapes and textures, no medical class among them
# ------------------------------------------------------------------------------------------
def _shape(rng: np.random.Generator, label: int) -> np.ndarray:
    img = _canvas(rng.uniform(0, 1, 3), rng, rng.uniform(0, 0.08))
    fg = rng.uniform(0, 1, 3)
    cy, cx = rng.uniform(0.3, 0.7, 2)
    r, theta = rng.uniform(0.12, 0.3), rng.uniform(0, math.pi)
    if label == 0:      # disc
        mask = _ellipse(cy, cx, r, r)
    elif label == 1:    # square
        c, s = math.cos(theta), math.sin(theta)
        u, v = (_X - cx) * c + (_Y - cy) * s, -(_X - cx) * s + (_Y - cy) * c
        mask = np.clip((r * 0.8 - np.maximum(np.abs(u), np.abs(v))) / _SOFT + 0.5, 0, 1)
    elif label == 2:    # triangle
        mask = _polar_blob(cy, cx, lambda a: r * 0.5 / np.maximum(np.cos(((a - theta) % (2 * math.pi / 3))
                                                                          - math.pi / 3), 0.5))
    elif label == 3:    # ring
        mask = _ellipse(cy, cx, r, r) * (1 - _ellipse(cy, cx, r * 0.6, r * 0.6))
    elif label == 4:    # cross
        c, s = r * math.cos(theta), r * math.sin(theta)
        mask = np.maximum(_line(cy - s, cx - c, cy + s, cx + c, 0.05), _line(cy - c, cx + s, cy + c, cx - s, 0.05))
    elif label == 5:    # stripes
        f = rng.uniform(4, 9)
        mask = (np.sin(2 * math.pi * f * (_X * math.cos(theta) + _Y * math.sin(theta))) > 0).astype(np.float32)
    elif label == 6:    # checkerboard
        f = rng.integers(2, 6)
        mask = ((np.floor(_X * f * 2) + np.floor(_Y * f * 2)) % 2).astype(np.float32)
    elif label == 7:    # dots
        mask = np.zeros_like(_X)
        for _ in range(rng.integers(6, 14)):
            mask = np.maximum(mask, _ellipse(*rng.uniform(0.05, 0.95, 2), 0.035, 0.035))
    elif label == 8:    # gradient
        mask = np.clip(_X * math.cos(theta) + _Y * math.sin(theta), 0, 1)
    else:               # star
        k = rng.integers(5, 8)
        mask = _polar_blob(cy, cx, lambda a: r * (0.55 + 0.45 * np.cos(k * (a - theta))))
    return _paint(img, mask, fg)


SHAPE_CLASSES = ("disc", "square", "triangle", "ring", "cross", "stripes", "checker", "dots", "gradient", "star")


def make_pretraining_corpus(n: int, size: int, seed: int) -> Split:
    """``n`` images of the public shapes corpus (balanced classes), uint8 (n, 3, size, size)."""
    rng = derive_rng(seed, "shapes-corpus")
    counts = np.full(len(SHAPE_CLASSES), n // len(SHAPE_CLASSES))
    counts[: n % len(SHAPE_CLASSES)] += 1
    return _render(_shape, counts, rng, size)
