"""Distribution Matching (Zhao & Bilen, "Dataset Condensation with Distribution Matching", WACV 2023).

Synthetic images S_c of every class c are learned so that, under an embedding network ψ sampled afresh at
every iteration, their mean embedding matches the mean embedding of a real batch R_c of the class:

    L = Σ_c || mean_{x ∈ R_c} ψ(A(x)) − mean_{s ∈ S_c} ψ(A(s)) ||²

where A is a Differentiable Siamese Augmentation draw shared by R_c and S_c (DSA, ICML 2021). The images
are optimised by SGD (momentum 0.5, as in the paper) in the normalised pixel space and projected back to
valid pixels after every step. ψ is the paper's random ConvNet (``embed=convnet``) or the frozen
foundation's features (``embed=foundation``, as MedForge distils with its CLIP image encoder).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from sim.config import DistillConfig
from sim.distill.common import Z_MAX, Z_MIN, from_z, noise_images, real_init, to_z
from sim.distill.convnet import sample_convnet
from sim.distill.dsa import parse_strategy, siamese_augment

Embed = Callable[[torch.Tensor], torch.Tensor]   # normalised images (B, 3, S, S) → embeddings (B, D)
MOMENTUM = 0.5                                    # DM's SGD momentum on the synthetic images
# init name -> fn(real pixels of one class, n, gen) -> n initial images (pixels)
INITS = {
    "real": real_init,
    "noise": lambda real, n, gen: noise_images(n, real.shape[-1], gen),
}


def sample_embedder(cfg: DistillConfig, gen: torch.Generator, size: int, foundation=None) -> Embed:
    """ψ for one iteration: a fresh random ConvNet, or the frozen foundation (no draw needed)."""
    if cfg.embed == "convnet":
        device = foundation.device if foundation is not None else "cpu"
        return sample_convnet(gen, cfg.embed_width, cfg.embed_depth, size, device=device)
    if foundation is None:
        raise ValueError("distill.embed=foundation needs the foundation model")
    # z is in forgesim's normalised space (PIXEL_MEAN, PIXEL_STD), its own backbone's input scale; a named
    # pretrained model normalises with its own mean and std, so z is mapped to that scale first.
    return lambda z: foundation.embed(foundation.from_standard_scale(z))


def matching_loss(real: list[torch.Tensor], syn: list[torch.Tensor], embed: Embed) -> torch.Tensor:
    """Σ_c ||mean ψ(real_c) − mean ψ(syn_c)||² over classes present in both (images in normalised space)."""
    pairs = [(r, s) for r, s in zip(real, syn) if len(r) and len(s)]
    if not pairs:
        return torch.zeros(())
    with torch.no_grad():
        e_real = embed(torch.cat([r for r, _ in pairs]))             # (Σ n_real, D)
    e_syn = embed(torch.cat([s for _, s in pairs]))                  # (Σ n_syn, D)
    loss, i, j = torch.zeros((), device=e_syn.device), 0, 0
    for r, s in pairs:
        loss = loss + ((e_real[i:i + len(r)].mean(0) - e_syn[j:j + len(s)].mean(0)) ** 2).sum()
        i, j = i + len(r), j + len(s)
    return loss


def dm(real: list[torch.Tensor], cfg: DistillConfig, gen: torch.Generator,
       foundation=None) -> tuple[list[torch.Tensor], dict]:
    """Distribution matching with DSA.

    Args:
        real: per class, the real images as pixels (n_c, 3, S, S) in [0, 1]; a class may be empty.
        cfg: ``ipc``, ``iterations``, ``lr_img``, ``real_batch``, ``embed``, ``init``, ``dsa``...
        gen: the only source of randomness (init, real batches, networks, augmentations).
        foundation: needed for ``embed=foundation``; otherwise only its device is used.
    Returns:
        per class, ``ipc`` synthetic images (0 for a class without real images), and loss statistics.
    """
    size = real[0].shape[-1]                                          # every class tensor is (n_c, 3, S, S)
    strategy = parse_strategy(cfg.dsa_strategy)
    device = foundation.device if foundation is not None else torch.device("cpu")
    # Step 1: initial images, stacked (Σ ipc, 3, S, S) in normalised space, class c in rows[c].
    init = [INITS[cfg.init](r, cfg.ipc, gen) if len(r) else r[:0] for r in real]
    starts = np.cumsum([0] + [len(x) for x in init])
    rows = [slice(int(a), int(b)) for a, b in zip(starts[:-1], starts[1:])]
    z = to_z(torch.cat(init)).to(device).requires_grad_(True)
    z_real = [to_z(r).to(device) for r in real]
    active = [c for c, r in enumerate(real) if len(r)]
    opt = torch.optim.SGD([z], lr=cfg.lr_img, momentum=MOMENTUM)
    losses = []
    for _ in range(cfg.iterations):
        # Step 2: a fresh embedding network; per class a real batch and one siamese augmentation draw.
        embed = sample_embedder(cfg, gen, size, foundation)
        real_b, syn_b = [], []
        for c in active:
            idx = torch.randperm(len(z_real[c]), generator=gen)[:cfg.real_batch]
            r, s = z_real[c][idx.to(device)], z[rows[c]]
            if cfg.dsa:
                r, s, _ = siamese_augment(r, s, strategy, gen)
            real_b.append(r)
            syn_b.append(s)
        # Step 3: match the class means and take one step on the pixels, then project to valid pixels.
        loss = matching_loss(real_b, syn_b, embed)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            z.clamp_(Z_MIN, Z_MAX)
        losses.append(loss.item())
    out = from_z(z.detach().cpu())
    return [out[rows[c]] for c in range(len(real))], _loss_stats(losses)


def _loss_stats(losses: list[float]) -> dict:
    """First/last tenth means and a curve of at most 20 points (the loss is noisy: ψ changes every step)."""
    if not losses:
        return {}
    k = max(1, len(losses) // 10)
    points = np.linspace(0, len(losses) - 1, min(20, len(losses))).round().astype(int)
    return {"loss_first": float(np.mean(losses[:k])), "loss_last": float(np.mean(losses[-k:])),
            "loss_curve": [round(losses[i], 6) for i in points]}
