"""Foundations by name: a timm ViT with timm's own pretrained weights (``model.pretrained: hub | FILE``).

``hub`` is ``timm.create_model(name, pretrained=True)``: timm resolves the model's pretrained config and fetches its
weights (Hugging Face hub or URL) the way it does for anyone with network. ``FILE`` goes through exactly the same
call with ``pretrained_cfg_overlay=dict(file=FILE)``, timm's own override of where the weights come from, so the
code a user runs online is the code the tests run offline. The model is built at its own architecture (forgesim's
shape fields do not apply) with its pretrained classifier, so timm's load is strict (every weight of the file
must fit, none may be missing); the classifier is then dropped unless ``model.keep_head`` keeps it as the features'
last layer (CLIP image towers: the projection into the text-embedding space).

The model's pretrained config also fixes its input: ``input_config`` reads side, mean, std and interpolation
through ``timm.data.resolve_data_config``; ``SimConfig`` sets ``data.img_size`` and ``data.interpolation`` from it
and ``Foundation.normalize`` uses its mean and std.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sim.config import INTERPOLATIONS


@dataclass(frozen=True)
class InputConfig:
    """What a pretrained model expects of its images: side in pixels, per-channel mean and std, resize filter."""

    img_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str


def pretrained_cfg(name: str) -> dict[str, Any]:
    """timm's pretrained config of ``name`` (``arch`` or ``arch.tag``) as a dict; ValueError naming ``model.name``."""
    import timm
    from timm.models import get_pretrained_cfg

    arch = name.split(".", 1)[0]
    if not timm.is_model(arch):
        raise ValueError(f"model.name {name!r} is not a timm model")
    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError:                                    # a tag the architecture does not have
        cfg = None
    if cfg is None:
        raise ValueError(f"model.name {name!r} has no pretrained config in timm {timm.__version__}, which "
                         f"model.pretrained needs (its tags: {', '.join(timm.list_pretrained(arch + '.*')) or 'none'})")
    return cfg.to_dict()


def input_config(name: str) -> InputConfig:
    """Input side, mean, std and interpolation of ``name``'s pretrained config (``timm.data.resolve_data_config``)."""
    from timm.data import resolve_data_config

    data = resolve_data_config(pretrained_cfg=pretrained_cfg(name))
    _, h, w = data["input_size"]
    if h != w:
        raise ValueError(f"model.name {name!r} takes {h}x{w} images; forgesim feeds square ones")
    interpolation = data.get("interpolation", "bicubic")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"model.name {name!r} resizes with {interpolation!r}; forgesim resizes with "
                         f"{' or '.join(INTERPOLATIONS)}")
    return InputConfig(int(h), tuple(float(v) for v in data["mean"]), tuple(float(v) for v in data["std"]),
                       interpolation)


def pretrained_source(pretrained: str) -> dict[str, Any] | None:
    """The ``pretrained_cfg_overlay`` of ``model.pretrained``: ``None`` for ``hub``, ``{"file": path}`` for a file."""
    if pretrained == "hub":
        return None
    path = Path(pretrained).expanduser()
    if not path.is_file():
        raise ValueError(f"model.pretrained {pretrained} is neither none, hub nor an existing file")
    return {"file": str(path)}


def create_pretrained(name: str, pretrained: str, keep_head: bool = False):
    """``timm.create_model(name, pretrained=True, ...)`` with the weights of ``model.pretrained`` (hub or a file).

    Built with the pretrained classifier so that timm loads strictly, then without it (pooled features) unless
    ``keep_head``. Any failure of timm's load is a ValueError naming ``model.pretrained``."""
    import timm

    pretrained_cfg(name)                                    # a clear error for a name timm has no weights for
    overlay = pretrained_source(pretrained)
    try:
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay)
    except Exception as exc:  # noqa: BLE001 - network, file and key/shape errors alike are one clear message
        what = "timm's hub weights" if overlay is None else f"the file {overlay['file']}"
        detail = " ".join(str(exc).split()) or exc.__class__.__name__       # one line: the CLI prints one
        detail = detail if len(detail) <= 400 else detail[:400] + " ..."
        raise ValueError(f"model.pretrained {pretrained}: timm could not load {what} into {name}: {detail}") from None
    if not keep_head:
        model.reset_classifier(0)
    _check_vit(model, name)
    return model


def _check_vit(model, name: str) -> None:
    """LoRA adapts ``blocks.<i>.attn.qkv`` and friends (sim.model.MODULE_PATHS): the model must have them."""
    import torch

    blocks = getattr(model, "blocks", None)
    qkv = getattr(getattr(blocks[0], "attn", None), "qkv", None) if blocks is not None and len(blocks) else None
    if not isinstance(qkv, torch.nn.Linear):
        raise ValueError(f"model.name {name!r} is not a ViT with blocks.<i>.attn.qkv linear layers, which "
                         f"forgesim's LoRA adapts")
