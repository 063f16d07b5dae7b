"""Many candidate LoRA updates through the frozen foundation in one forward pass (the batched coefficient search).

A coefficient search scores candidates that differ only in the LoRA updates of the adapted modules: everything
else is the frozen foundation. Two things follow, and this module does both:

* **The frozen prefix is shared.** The blocks before the first adapted one (and the patch embedding, position
  embedding and pre-norm) compute the same tokens for every candidate. ``prefix_tokens`` computes them for a set
  of images; ``PrefixCache`` keeps them per distilled set (content-keyed, ``sim.coefficients.set_key``), so a set
  received once is pushed through the prefix once per foundation for the whole run — every stage, every commit and,
  in a replay, every order that sees it.
* **The candidates are folded into the batch.** The tokens of C candidates are stacked as (C·n, T, D): every frozen
  layer runs once on the stack, and each adapted linear layer multiplies candidate c's rows by its merged weight
  ``W + s B_c A_c`` (LoRA's merged form, Hu et al., arXiv 2106.09685, §4.1) in one batched matmul over the candidate
  dimension. The candidates' features equal C separate forwards of the foundation with those merged weights
  (``Foundation.merged_weights``) up to float round-off. (Merged weights rather than the frozen output plus
  ``s (x A_cᵀ) B_cᵀ``: the same matmul cost as the frozen layer, no extra pass over the activations.)
* **Only what the features read.** With token pooling the features are the class token's row of the last block's
  output, so the last block computes every token's keys and values but the query, attention output, projection and
  MLP of the class token only (``_class_token_block``): the same features, about three quarters of that block's
  arithmetic skipped.

``proxy_tokens`` gives the prefix tokens of a ``ProxyData`` (from the cache), ``stacked_features`` the pooled features
(C, n, D) of those tokens under C candidate updates. The adapted layers' forwards are replaced on the instance for
the duration of the call only (as ``torch.func.functional_call`` swaps parameters for its call).
"""
from __future__ import annotations

import re
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from sim.model import Foundation

# Images × candidates per stacked forward pass: the peak activation memory of one pass is that of a 512-image batch
# of the foundation (``sim.coefficients.proxy_features`` batches 512 images).
STACK_ROWS = 512
# The cached prefix tokens of one foundation are capped at this many bytes (least recently used sets dropped first).
PREFIX_CACHE_BYTES = 1 << 30

_BLOCK = re.compile(r"^blocks\.(\d+)\.")


@dataclass(frozen=True)
class CandidateUpdates:
    """Per-candidate LoRA factors of the adapted modules: ``factors[m] = (A (C, r, in), B (C, out, r), s)``, the
    update of candidate c on module m being ``ΔW = s · B[c] @ A[c]`` (out, in)."""

    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor, float]]

    def __post_init__(self) -> None:
        counts = {a.shape[0] for a, b, _ in self.factors.values()} | {b.shape[0] for _, b, _ in self.factors.values()}
        if len(counts) != 1:
            raise ValueError(f"candidate updates disagree on the number of candidates: {sorted(counts)}")

    @property
    def count(self) -> int:
        return next(iter(self.factors.values()))[0].shape[0]

    def modules(self) -> list[str]:
        return list(self.factors)


def first_adapted_block(modules: Sequence[str]) -> int:
    """Index of the first ViT block holding an adapted module (``blocks.3.attn.qkv`` → 3): the frozen prefix is the
    embedding and blocks ``0 .. k-1``."""
    blocks = []
    for m in modules:
        hit = _BLOCK.match(m)
        if hit is None:
            raise ValueError(f"module {m!r} is not inside a ViT block (blocks.<i>.…); the stacked forward adapts "
                             f"block modules only")
        blocks.append(int(hit.group(1)))
    if not blocks:
        raise ValueError("candidate updates adapt no module")
    return min(blocks)


@torch.inference_mode()
def prefix_tokens(foundation: Foundation, z: torch.Tensor, k: int) -> torch.Tensor:
    """Tokens (n, T, D) after blocks ``0 .. k-1`` of images ``z`` at the backbone's input scale (``normalize``): the
    opening of timm's ``VisionTransformer.forward_features`` (patch embed, position embedding, patch drop, pre-norm),
    in this foundation's precision."""
    bb = foundation.backbone
    with foundation.autocast():
        x = bb.norm_pre(bb.patch_drop(bb._pos_embed(bb.patch_embed(z))))
        for blk in bb.blocks[:k]:
            x = blk(x)
    return x


def merged_stack(foundation: Foundation, updates: CandidateUpdates) -> dict[str, torch.Tensor]:
    """{module: W + s B_c A_c (C, out, in)}: every candidate's merged weight of each adapted module (as
    ``Foundation.merged_weights`` builds one candidate's), on the foundation's device."""
    out = {}
    for m, (a, b, s) in updates.factors.items():
        w = foundation.weight(m)
        out[m] = w + s * torch.bmm(b.float().to(w.device), a.float().to(w.device))
    return out


@torch.inference_mode()
def suffix_features(foundation: Foundation, tokens: torch.Tensor, k: int,
                    weights: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Pooled features (C, n, D), float32, of prefix tokens (n, T, D) (``prefix_tokens``) through blocks ``k ..``, the
    final norm and the head, once per candidate of the merged weights ``weights`` ({module: (C, out, in)},
    ``merged_stack``), in one pass over the stack (C·n, T, D)."""
    bb = foundation.backbone
    c, n = next(iter(weights.values())).shape[0], tokens.shape[0]
    linears = [(bb.get_submodule(m), w) for m, w in weights.items()]
    for module, _ in linears:
        if "forward" in vars(module):
            raise RuntimeError(f"module {type(module).__name__} already has its forward replaced")
    try:
        for module, w in linears:
            module.forward = _candidate_linear(c, w, module.bias)
        with foundation.autocast():
            x = tokens.unsqueeze(0).expand(c, *tokens.shape).reshape(c * n, *tokens.shape[1:])   # (C·n, T, D)
            blocks = list(bb.blocks[k:])
            last = blocks.pop() if _class_token_only(bb, blocks[-1]) else None
            for blk in blocks:
                x = blk(x)
            if last is not None:
                x = _class_token_block(last, x)                                                  # (C·n, 1, D)
            feats = bb.forward_head(bb.norm(x))                                                  # (C·n, D)
    finally:
        for module, _ in linears:
            vars(module).pop("forward", None)
    return feats.float().reshape(c, n, -1)


def _class_token_only(backbone: torch.nn.Module, blk: torch.nn.Module) -> bool:
    """Whether the features read only the class token of ``blk``'s output: token pooling (``global_pool="token"``, no
    attention pool) after timm's plain ``Block`` with its plain ``Attention`` (no gate), the last block."""
    from timm.layers.attention import Attention
    from timm.models.vision_transformer import Block

    return (getattr(backbone, "global_pool", None) == "token" and getattr(backbone, "attn_pool", None) is None
            and getattr(backbone, "num_prefix_tokens", 0) >= 1 and type(blk) is Block
            and type(blk.attn) is Attention and blk.attn.gate is None and not blk.training)


def _class_token_block(blk: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm ``Block.forward`` of tokens (B, T, D) computed for the class token's row only, (B, 1, D): every token's keys
    and values, the class token's query, attention output, residuals and MLP. Token pooling reads nothing else, so the
    features are those of the full block (the other rows' attention, projection and MLP are never used)."""
    attn = blk.attn
    b, t, _ = x.shape
    qkv = attn.qkv(blk.norm1(x)).reshape(b, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)                                                   # (B, H, T, hd)
    q, k = attn.q_norm(q[:, :, :1]), attn.k_norm(k)
    o = F.scaled_dot_product_attention(q, k, v)                               # (B, H, 1, hd)
    o = attn.proj_drop(attn.proj(attn.norm(o.transpose(1, 2).reshape(b, 1, attn.attn_dim))))
    x0 = x[:, :1] + blk.drop_path1(blk.ls1(o))
    return x0 + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x0))))


def _candidate_linear(c: int, w: torch.Tensor, bias: torch.Tensor | None):
    """The forward of an adapted linear layer over the stack: rows of candidate i through ``w[i]`` (out, in), as one
    batched matmul (C, n·T, in) @ (C, in, out) (+ the frozen bias)."""
    wt = w.transpose(1, 2)                                   # (C, in, out)

    def forward(x: torch.Tensor) -> torch.Tensor:
        xs = x.reshape(c, -1, x.shape[-1])                   # (C, n·T, in)
        wx = wt.to(xs.dtype)
        y = torch.bmm(xs, wx) if bias is None else torch.baddbmm(bias.to(xs.dtype).view(1, 1, -1), xs, wx)
        return y.reshape(*x.shape[:-1], w.shape[1])          # (C·n, T, out)
    return forward


class PrefixCache:
    """Prefix tokens per (distilled set, first adapted block), for one foundation; least recently used sets are
    dropped past ``max_bytes``. A set's tokens depend only on its images and the frozen prefix, so a set received once
    is computed once."""

    def __init__(self, max_bytes: int = PREFIX_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self._tokens: OrderedDict[tuple[str, int], torch.Tensor] = OrderedDict()
        self.hits = self.misses = 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tokens.values())

    def tokens(self, foundation: Foundation, key: str, z: torch.Tensor, k: int) -> torch.Tensor:
        """The prefix tokens of images ``z`` (normalised) of the set ``key``, computed on the first call only."""
        entry = (key, k)
        if entry in self._tokens:
            self.hits += 1
            self._tokens.move_to_end(entry)
            return self._tokens[entry]
        self.misses += 1
        t = prefix_tokens(foundation, z, k)
        self._tokens[entry] = t
        while len(self._tokens) > 1 and self.nbytes > self.max_bytes:
            self._tokens.popitem(last=False)
        return t


# One cache per foundation backbone and precision (a bf16 foundation shares the fp32 one's backbone but not its
# tokens); dropped with the backbone.
_CACHES: "weakref.WeakKeyDictionary[torch.nn.Module, dict[str, PrefixCache]]" = weakref.WeakKeyDictionary()


def prefix_cache(foundation: Foundation) -> PrefixCache:
    """The process-wide ``PrefixCache`` of ``foundation``."""
    per_precision = _CACHES.setdefault(foundation.backbone, {})
    return per_precision.setdefault(f"{foundation.precision}:{foundation.device}", PrefixCache())


def proxy_tokens(foundation: Foundation, data, k: int, cache: PrefixCache | None = None) -> torch.Tensor:
    """Prefix tokens (n, T, D) of every image of ``data`` (a ``sim.coefficients.ProxyData``), set by set from ``cache``
    (default: the foundation's ``prefix_cache``), in the rows' order."""
    cache = cache if cache is not None else prefix_cache(foundation)
    parts = [cache.tokens(foundation, s.key, data.x[s.start:s.stop], k) for s in data.sets]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def stacked_features(foundation: Foundation, tokens: torch.Tensor, k: int, updates: CandidateUpdates) -> torch.Tensor:
    """Pooled features (C, n, D) of prefix tokens (n, T, D) (``proxy_tokens``) under each of the C candidate updates,
    in stacked passes of at most ``STACK_ROWS`` images × candidates."""
    if first_adapted_block(updates.modules()) < k:
        raise ValueError(f"the prefix tokens end after block {k - 1}, but the updates adapt an earlier block")
    weights = merged_stack(foundation, updates)
    rows = max(1, STACK_ROWS // updates.count)
    return torch.cat([suffix_features(foundation, tokens[i:i + rows], k, weights)
                      for i in range(0, tokens.shape[0], rows)], dim=1)
