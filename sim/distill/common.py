"""Helpers shared by the distillers: pixel ↔ normalised space and the initial synthetic images."""
from __future__ import annotations

import torch

from sim.model import PIXEL_MEAN, PIXEL_STD

# Normalised values of pixel 0 and 1: synthetic images are projected back into this box after each step.
Z_MIN, Z_MAX = (0.0 - PIXEL_MEAN) / PIXEL_STD, (1.0 - PIXEL_MEAN) / PIXEL_STD
# Jitter (normalised units) added to repeated copies when a class has fewer real images than IPC:
# identical copies would receive identical gradients forever and stay duplicates.
REPEAT_JITTER = 0.1


def to_z(x: torch.Tensor) -> torch.Tensor:
    """Pixels in [0, 1] → the normalised space of the embeddings (mean 0.5, std 0.25)."""
    return (x - PIXEL_MEAN) / PIXEL_STD


def from_z(z: torch.Tensor) -> torch.Tensor:
    """Normalised values → pixels, clipped to [0, 1]."""
    return (z * PIXEL_STD + PIXEL_MEAN).clamp(0.0, 1.0)


def noise_images(n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` images of N(0, 1) noise in normalised space (DM's noise init), as pixels (n, 3, S, S)."""
    return from_z(torch.randn(n, 3, size, size, generator=gen))


def real_init(real: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` distinct real images of one class (n, 3, S, S); a short class is cycled with a little jitter."""
    order = torch.randperm(len(real), generator=gen)
    if n <= len(real):
        return real[order[:n]].clone()
    idx = order.repeat(-(-n // len(real)))[:n]                      # (n,) cycles through every real image
    x = real[idx].clone()
    repeated = torch.arange(n) >= len(real)
    jitter = torch.randn(x.shape, generator=gen) * REPEAT_JITTER * PIXEL_STD
    return torch.where(repeated[:, None, None, None], (x + jitter).clamp(0.0, 1.0), x)

