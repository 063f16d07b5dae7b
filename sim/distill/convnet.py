"""The randomly initialised ConvNet embedding of Distribution Matching (Zhao & Bilen, WACV 2023).

``depth`` blocks of conv 3x3 (``width`` channels, padding 1) → instance norm → ReLU → 2x2 average
pooling; the embedding is the flattened output of the last block. DM samples a fresh network at every
iteration, so the network is written functionally: its weights are drawn from a ``torch.Generator`` with
PyTorch's default conv initialisation (kaiming-uniform with a = sqrt(5): U(±1/sqrt(fan_in)) for weights and
biases), and instance norm starts as the identity affine map, so it is a parameter-free ``F.instance_norm``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class RandomConvNet:
    """Frozen conv weights [(w (out, in, 3, 3), b (out,)), ...]; call on (B, 3, S, S) → (B, width·s·s)."""

    layers: tuple[tuple[torch.Tensor, torch.Tensor], ...]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for w, b in self.layers:
            x = F.conv2d(x, w, b, padding=1)     # (B, width, s, s)
            x = F.instance_norm(x)
            x = F.relu(x)
            x = F.avg_pool2d(x, 2)               # (B, width, s/2, s/2)
        return x.flatten(1)


def usable_depth(depth: int, size: int) -> int:
    """Blocks that fit an image of side ``size`` (each halves it; at least 1x1 must remain)."""
    return max(1, min(depth, int(math.log2(size))))


def sample_convnet(gen: torch.Generator, width: int = 128, depth: int = 3, size: int = 32,
                   in_channels: int = 3, device: torch.device | str = "cpu") -> RandomConvNet:
    """A freshly initialised ConvNet (weights drawn from ``gen`` only); depth is capped by ``size``."""
    layers, c_in = [], in_channels
    for _ in range(usable_depth(depth, size)):
        bound = 1.0 / math.sqrt(c_in * 9)
        w = (torch.rand(width, c_in, 3, 3, generator=gen) * 2 - 1) * bound
        b = (torch.rand(width, generator=gen) * 2 - 1) * bound
        layers.append((w.to(device), b.to(device)))
        c_in = width
    return RandomConvNet(tuple(layers))
