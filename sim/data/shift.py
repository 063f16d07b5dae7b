"""Per-site appearance shift: what differs between two hospitals' scanners and stain protocols.

A site draws one ``SiteShift`` (colour mixing like a stain change, gamma for contrast, Gaussian blur,
sensor noise level) and applies it to every image it holds.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sim.data.base import Split


@dataclass(frozen=True)
class SiteShift:
    colour: np.ndarray   # (3, 3) mixing matrix, identity = no stain change
    bias: np.ndarray     # (3,) per-channel offset
    gamma: float         # contrast: x ** gamma
    blur: float          # Gaussian sigma in pixels
    noise: float         # std of additive Gaussian noise, in [0, 1] intensity units


def sample_site_shift(rng: np.random.Generator, strength: float) -> SiteShift:
    """Draw one site's shift; ``strength`` 0 gives the identity."""
    s = float(strength)
    return SiteShift(
        colour=np.eye(3) + s * 0.12 * rng.standard_normal((3, 3)),
        bias=s * 0.06 * rng.standard_normal(3),
        gamma=float(np.exp(s * 0.25 * rng.standard_normal())),
        blur=float(s * rng.uniform(0.0, 0.7)),
        noise=float(s * rng.uniform(0.0, 0.05)),
    )


def _gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of float (n, C, H, W) with reflect padding."""
    if sigma < 0.05:
        return x
    radius = max(1, int(np.ceil(2.5 * sigma)))
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k /= k.sum()
    pad = np.pad(x, ((0, 0), (0, 0), (radius, radius), (radius, radius)), mode="reflect")
    h = sum(w * pad[:, :, :, i:i + x.shape[3]] for i, w in enumerate(k))
    return sum(w * h[:, :, i:i + x.shape[2], :] for i, w in enumerate(k))


def apply_site_shift(split: Split, shift: SiteShift, rng: np.random.Generator) -> Split:
    """Apply ``shift`` to every image of ``split``; ``rng`` draws the per-image noise."""
    if len(split) == 0:
        return split
    x = split.x.astype(np.float32) / 255.0                       # (n, 3, H, W)
    x = np.einsum("ij,njhw->nihw", shift.colour.astype(np.float32), x) + shift.bias[None, :, None, None]
    x = np.clip(x, 0.0, 1.0) ** shift.gamma
    x = _gaussian_blur(x, shift.blur)
    if shift.noise > 0:
        x = x + shift.noise * rng.standard_normal(x.shape, dtype=np.float32)
    x = np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)
    return Split(x, split.y)
