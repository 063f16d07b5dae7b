"""Baseline distillers: real-image selection (``random``, ``herding``) and the untrained floor (``noise``).

``random`` and ``herding`` send real patient images and are *not* private: they are the references the
privacy audit must flag. Herding is the greedy selection of Welling (ICML 2009) as used for exemplars in
iCaRL (Rebuffi et al., CVPR 2017): repeatedly add the image that brings the mean of the selected features
closest to the class mean, in the frozen foundation's (L2-normalised) feature space.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sim.config import DistillConfig
from sim.distill.common import noise_images


def random(real: list[torch.Tensor], cfg: DistillConfig, gen: torch.Generator,
           foundation=None) -> tuple[list[torch.Tensor], dict]:
    """``min(ipc, n_c)`` real images per class, drawn uniformly without replacement."""
    out = [r[torch.randperm(len(r), generator=gen)[:cfg.ipc]].clone() for r in real]
    return out, {}


@torch.no_grad()
def _features(foundation, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """L2-normalised foundation features (n, D) of pixels (n, 3, S, S)."""
    parts = [foundation.features(x[i:i + batch]).cpu() for i in range(0, len(x), batch)]
    return F.normalize(torch.cat(parts), dim=1) if parts else torch.zeros(0, foundation.dim)


def herding_order(feats: torch.Tensor, k: int) -> list[int]:
    """Indices of ``k`` rows of ``feats`` (n, D) chosen greedily so the running mean tracks the full mean."""
    mu = feats.mean(0)                                              # (D,)
    chosen: list[int] = []
    total = torch.zeros_like(mu)
    available = torch.ones(len(feats), dtype=torch.bool)
    for step in range(1, min(k, len(feats)) + 1):
        dist = ((mu - (total + feats) / step) ** 2).sum(1)          # (n,) distance if each candidate were added
        dist[~available] = float("inf")
        i = int(dist.argmin())
        chosen.append(i)
        total += feats[i]
        available[i] = False
    return chosen


def herding(real: list[torch.Tensor], cfg: DistillConfig, gen: torch.Generator,
            foundation=None) -> tuple[list[torch.Tensor], dict]:
    """``min(ipc, n_c)`` real images per class chosen by herding on foundation features (deterministic)."""
    if foundation is None:
        raise ValueError("distill.method=herding needs the foundation model (its features)")
    out = [r[herding_order(_features(foundation, r), cfg.ipc)].clone() if len(r) else r.clone() for r in real]
    return out, {"feature_space": "foundation"}


def noise(real: list[torch.Tensor], cfg: DistillConfig, gen: torch.Generator,
          foundation=None) -> tuple[list[torch.Tensor], dict]:
    """``ipc`` images of N(0, 1) noise (in normalised space) per class with real data: DM's untrained init."""
    size = real[0].shape[-1]
    return [noise_images(cfg.ipc, size, gen) if len(r) else r[:0].clone() for r in real], {}
