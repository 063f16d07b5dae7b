"""Differentiable Siamese Augmentation (Zhao & Bilen, ICML 2021, "Dataset Condensation with
Differentiable Siamese Augmentation").

Every transform is a differentiable torch op on the *images* (colour arithmetic, padding and slicing,
masks, ``affine_grid`` + ``grid_sample``), so the gradient of a matching loss flows back to the synthetic
pixels through the augmentation. *Siamese*: one parameter draw is shared by every image of the real batch
and of the synthetic batch of a step, so the two are compared under the same transform.

As in the paper's default (``aug_mode='S'``), each step draws one family of the strategy, then its
parameters: ``color`` (brightness, saturation and contrast together), ``crop`` (translation with zero
padding), ``cutout``, ``flip``, ``scale``, ``rotate``. Images are in the embeddings' normalised space (mean
0.5, std 0.25 in pixel units), where the paper's magnitudes apply; 0 there is mid grey, the padding value.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from sim.config import DSA_FAMILIES

# Magnitudes of the DSA paper (its ParamDiffAug defaults).
BRIGHTNESS = 1.0    # x + (u - 0.5) * BRIGHTNESS
SATURATION = 2.0    # channel mean + (x - channel mean) * u * SATURATION
CONTRAST = 0.5      # image mean + (x - image mean) * (u + CONTRAST)
CROP_RATIO = 0.125  # translate by up to this share of the side
CUTOUT_RATIO = 0.5  # side of the erased square as a share of the image side
FLIP_PROB = 0.5
SCALE_RATIO = 1.2   # per-axis scale in [1 / SCALE_RATIO, SCALE_RATIO]
ROTATE_DEG = 15.0   # rotation angle in [-ROTATE_DEG, ROTATE_DEG]


@dataclass(frozen=True)
class DSAParams:
    """One draw: a family and its parameters, shared by every image it is applied to."""

    family: str
    values: tuple[float, ...]


def _uniform(gen: torch.Generator, n: int, lo: float = 0.0, hi: float = 1.0) -> tuple[float, ...]:
    return tuple(lo + (hi - lo) * u for u in torch.rand(n, generator=gen).tolist())


def _affine(x: torch.Tensor, theta: list[list[float]]) -> torch.Tensor:
    """Warp (B, C, H, W) by one 2x3 matrix (output → input coordinates), zero padding."""
    theta_t = torch.tensor([theta], dtype=x.dtype, device=x.device).expand(x.shape[0], 2, 3)
    grid = F.affine_grid(theta_t, list(x.shape), align_corners=True)       # (B, H, W, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


# --- one (sample, apply) pair per family --------------------------------------------------------
def _sample_color(gen: torch.Generator, size: int) -> tuple[float, ...]:
    return _uniform(gen, 3)                                                  # brightness, saturation, contrast


def _color(x: torch.Tensor, v: tuple[float, ...]) -> torch.Tensor:
    ub, us, uc = v
    x = x + (ub - 0.5) * BRIGHTNESS
    mean_c = x.mean(dim=1, keepdim=True)                                     # (B, 1, H, W)
    x = mean_c + (x - mean_c) * (us * SATURATION)
    mean_img = x.mean(dim=(1, 2, 3), keepdim=True)                           # (B, 1, 1, 1)
    return mean_img + (x - mean_img) * (uc + CONTRAST)


def _sample_crop(gen: torch.Generator, size: int) -> tuple[float, ...]:
    limit = int(size * CROP_RATIO + 0.5)
    return tuple(float(v) for v in torch.randint(-limit, limit + 1, (2,), generator=gen))   # dy, dx pixels


def _crop(x: torch.Tensor, v: tuple[float, ...]) -> torch.Tensor:
    dy, dx = int(v[0]), int(v[1])
    pad = max(abs(dy), abs(dx))
    if pad == 0:
        return x
    h, w = x.shape[-2:]
    padded = F.pad(x, (pad, pad, pad, pad))                                  # (B, C, H + 2p, W + 2p)
    return padded[..., pad + dy:pad + dy + h, pad + dx:pad + dx + w]


def _sample_cutout(gen: torch.Generator, size: int) -> tuple[float, ...]:
    return tuple(float(v) for v in torch.randint(0, size, (2,), generator=gen))     # centre y, x


def _cutout(x: torch.Tensor, v: tuple[float, ...]) -> torch.Tensor:
    h, w = x.shape[-2:]
    side_h, side_w = int(h * CUTOUT_RATIO + 0.5), int(w * CUTOUT_RATIO + 0.5)
    rows = torch.arange(h, device=x.device) - (int(v[0]) - side_h // 2)
    cols = torch.arange(w, device=x.device) - (int(v[1]) - side_w // 2)
    inside = ((rows >= 0) & (rows < side_h))[:, None] & ((cols >= 0) & (cols < side_w))[None, :]   # (H, W)
    return x * (~inside).to(x.dtype)


def _sample_flip(gen: torch.Generator, size: int) -> tuple[float, ...]:
    return (float(_uniform(gen, 1)[0] < FLIP_PROB),)


def _flip(x: torch.Tensor, v: tuple[float, ...]) -> torch.Tensor:
    return x.flip(-1) if v[0] else x


def _sample_scale(gen: torch.Generator, size: int) -> tuple[float, ...]:
    return _uniform(gen, 2, 1.0 / SCALE_RATIO, SCALE_RATIO)                 # sy, sx


def _scale(x: torch.Tensor, v: tuple[float, ...]) -> torch.Tensor:
    sy, sx = v
    return _affine(x, [[sx, 0.0, 0.0], [0.0, sy, 0.0]])


def _sample_rotate(gen: torch.Generator, size: int) -> tuple[float, ...]:
    return _uniform(gen, 1, -ROTATE_DEG, ROTATE_DEG)                         # degrees


def _rotate(x: torch.Tensor, v: tuple[float, ...]) -> torch.Tensor:
    c, s = math.cos(math.radians(v[0])), math.sin(math.radians(v[0]))
    return _affine(x, [[c, -s, 0.0], [s, c, 0.0]])


# family -> (sample(gen, size) -> values, apply(x, values) -> x)
AUGMENTATIONS: dict[str, tuple[Callable, Callable]] = {
    "color": (_sample_color, _color),
    "crop": (_sample_crop, _crop),
    "cutout": (_sample_cutout, _cutout),
    "flip": (_sample_flip, _flip),
    "scale": (_sample_scale, _scale),
    "rotate": (_sample_rotate, _rotate),
}
assert tuple(AUGMENTATIONS) == DSA_FAMILIES, "sim.config.DSA_FAMILIES must list the DSA registry's keys"


def parse_strategy(strategy: str) -> tuple[str, ...]:
    """``"color_crop_flip"`` → ``("color", "crop", "flip")``; an unknown family raises ``ValueError``."""
    parts = tuple(p for p in strategy.split("_") if p)
    if not parts or any(p not in AUGMENTATIONS for p in parts):
        raise ValueError(f"distill.dsa_strategy must join families from {', '.join(AUGMENTATIONS)} with '_', "
                         f"got {strategy!r}")
    return parts


def sample_dsa(strategy: tuple[str, ...], size: int, gen: torch.Generator) -> DSAParams:
    """Draw one family of ``strategy`` and its parameters for images of side ``size``."""
    family = strategy[int(torch.randint(len(strategy), (1,), generator=gen))]
    return DSAParams(family, AUGMENTATIONS[family][0](gen, size))


def apply_dsa(x: torch.Tensor, p: DSAParams) -> torch.Tensor:
    """Apply the draw ``p`` to every image of ``x`` (B, C, H, W); differentiable in ``x``."""
    return AUGMENTATIONS[p.family][1](x, p.values)


def siamese_augment(real: torch.Tensor, syn: torch.Tensor, strategy: tuple[str, ...],
                    gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, DSAParams]:
    """One parameter draw, applied alike to the real batch and to the synthetic batch."""
    p = sample_dsa(strategy, real.shape[-1], gen)
    return apply_dsa(real, p), apply_dsa(syn, p), p
