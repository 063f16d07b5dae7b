"""The frozen foundation model (a timm ViT + a frozen head) and LoRA adapters in peft's format.

* ``Foundation``: a timm ViT with ``num_classes=0`` (pooled features), frozen, plus a fingerprint
  (hash of its weights) that travels with every adapter trained on it.
* Heads: by default a frozen *class-prototype* head, the stand-in for CLIP's text embeddings in
  MedForge: class ``task/name`` has a fixed unit vector seeded from its name, and
  ``logits = cos(features, prototypes) / tau``. Optionally per-task linear heads (Med-LEGO protocol),
  trained with the adapter and carried in ``Adapter.head``: one head of the adapter's own task, or one per task
  (merges, the joint reference; see ``Adapter``).
* ``Adapter``: LoRA factors keyed exactly as peft saves them
  (``base_model.model.blocks.0.attn.qkv.lora_A.weight``: (r, in); ``...lora_B.weight``: (out, r)),
  with the update ``ΔW = B A · alpha / r``. Saved as a standard peft adapter dir that
  ``peft.PeftModel.from_pretrained`` loads onto the same timm model.
* Where the weights come from (``load_foundation``): with ``model.pretrained=none`` (the default) forgesim's own
  backbone of the configured shape, from ``model.checkpoint`` or pretrained once by forgesim on the corpus
  ``model.pretrain_data`` names (the public synthetic ``shapes``, or the formula-driven images of
  ``sim.data.formula``; classes disjoint from every task) and cached on disk keyed by its config; with ``hub`` or a
  FILE, the timm model ``model.name`` at its own architecture with timm's pretrained weights (``sim.pretrained``),
  normalised with its pretrained mean and std. ``model.prototypes`` replaces the seeded prototypes by class
  embeddings from a file (``sim.class_embeddings``); the fingerprint then covers them too.

One file (over 400 lines) for the foundation and the adapter because each is defined by the other: an adapter's
module names, shapes and base fingerprint come from the foundation it was trained on, and loading one checks it
against the other.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from sim.class_embeddings import ClassEmbeddings, read_class_embeddings
from sim.config import LoraConfig, ModelConfig, config_hash

PEFT_PREFIX = "base_model.model."
# forgesim's short names for the adaptable linear layers of a timm ViT block
MODULE_PATHS = {"qkv": "attn.qkv", "proj": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
PIXEL_MEAN, PIXEL_STD = 0.5, 0.25   # forgesim's own backbone; a named pretrained model uses its pretrained config's
HEAD_SEP = "/"                       # per-task linear head keys: "<task>/weight", "<task>/bias"


# ------------------------------------------------------------------------------------------
# Foundation
# ------------------------------------------------------------------------------------------
def create_backbone(cfg: ModelConfig, img_size: int) -> torch.nn.Module:
    """The timm ViT of ``cfg`` with pooled-feature output (no classifier), randomly initialised."""
    import timm

    try:
        return timm.create_model(cfg.name, pretrained=False, num_classes=0, img_size=img_size,
                                 patch_size=cfg.patch_size, embed_dim=cfg.embed_dim, depth=cfg.depth,
                                 num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio)
    except (RuntimeError, TypeError, ValueError, AssertionError) as exc:
        raise ValueError(f"model.name {cfg.name!r} with these overrides is not a usable timm ViT: {exc}") from None


def fingerprint_state(state: Mapping[str, torch.Tensor]) -> str:
    """Hash of the frozen weights (names, shapes, bytes): the base every adapter must match."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu", torch.float32).contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class Foundation:
    """Frozen backbone + head settings. ``features`` takes images in [0, 1], (B, 3, S, S).

    ``mean``/``std``: per-channel input normalisation (the pretrained config's for a named pretrained model);
    ``class_embeddings``: the prototype head's rows from ``model.prototypes`` (``None``: seeded prototypes);
    ``precision``: ``runtime.precision`` of every forward pass through the backbone (``autocast``; features come
    out float32 either way)."""

    backbone: torch.nn.Module
    cfg: ModelConfig
    img_size: int
    fingerprint: str
    device: torch.device = torch.device("cpu")
    mean: tuple[float, ...] = (PIXEL_MEAN,) * 3
    std: tuple[float, ...] = (PIXEL_STD,) * 3
    class_embeddings: ClassEmbeddings | None = None
    precision: str = "fp32"

    @property
    def dim(self) -> int:
        """Feature width: the pooled features, or a kept pretrained head's outputs (``model.keep_head``)."""
        return getattr(self.backbone, "num_classes", 0) or self.backbone.num_features

    def block_count(self) -> int:
        return len(self.backbone.blocks)

    def weight(self, module: str) -> torch.Tensor:
        """Frozen weight (out, in) of a module path like ``blocks.0.attn.qkv``."""
        return self.backbone.get_submodule(module).weight

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 [0, 255] or float [0, 1] images → the backbone's input scale, on its device."""
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        mean = torch.tensor(self.mean, device=self.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=self.device).view(1, -1, 1, 1)
        return (x.float().to(self.device) - mean) / std

    def from_standard_scale(self, z: torch.Tensor) -> torch.Tensor:
        """Images normalised with forgesim's PIXEL_MEAN / PIXEL_STD (the distillers' space) → this backbone's input
        scale: the same tensor for forgesim's own backbone, a per-channel affine map for a pretrained config's."""
        if self.mean == (PIXEL_MEAN,) * 3 and self.std == (PIXEL_STD,) * 3:
            return z.to(self.device)
        mean = torch.tensor(self.mean, device=self.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=self.device).view(1, -1, 1, 1)
        return (z.to(self.device) * PIXEL_STD + PIXEL_MEAN - mean) / std

    def autocast(self):
        """The context every forward pass through the backbone (or a training copy of it) runs in:
        ``sim.accelerator.autocast`` of this foundation's device and precision (a no-op for fp32)."""
        from sim.accelerator import autocast

        return autocast(self.device, self.precision)

    def features(self, x: torch.Tensor, weights: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Pooled features (B, D); ``weights`` ({module.weight: W'}, see ``merged_weights``) replace frozen ones."""
        return self.embed(self.normalize(x), weights)

    def embed(self, z: torch.Tensor, weights: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Pooled features (B, D), float32, of images ``z`` already at the backbone's input scale (``normalize``),
        in this foundation's precision; ``weights`` replace frozen ones as in ``features``."""
        with self.autocast():
            if not weights:
                feats = self.backbone(z)
            else:
                feats = torch.func.functional_call(self.backbone, weights, (z,), strict=False)
        return feats.float()       # the same tensor for fp32

    def merged_weights(self, adapter: "Adapter") -> dict[str, torch.Tensor]:
        """{module.weight: W + ΔW} for every module the adapter touches."""
        adapter.check_base(self)
        return {f"{m}.weight": self.weight(m) + adapter.delta(m).to(self.device) for m in adapter.modules()}

    def prototypes(self, task: str, classes: Sequence[str]) -> torch.Tensor:
        """The prototype head's unit rows (K, D) for ``task``: from ``model.prototypes``, else seeded from names."""
        if self.class_embeddings is not None:
            return self.class_embeddings.rows(task, classes)
        return prototypes(task, classes, self.dim)

    def check_tasks(self, task_classes: Mapping[str, Sequence[str]]) -> None:
        """A prototype file has rows for every task of a run (called before any work starts)."""
        if self.class_embeddings is not None:
            self.class_embeddings.check(task_classes)

    def logits(self, feats: torch.Tensor, task: str, classes: Sequence[str],
               head: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """(B, K) logits of ``task`` from features (B, D): a linear head when given, else this foundation's
        prototype head (cosine / ``model.tau``)."""
        protos = None if head is not None else self.prototypes(task, classes)
        return logits_from_features(feats, task, classes, self.cfg.tau, head, protos)


@functools.lru_cache(maxsize=256)
def _prototypes(task: str, classes: tuple[str, ...], dim: int) -> torch.Tensor:
    rows = []
    for name in classes:
        seed = int.from_bytes(hashlib.sha256(f"{task}/{name}".encode()).digest()[:8], "little") >> 1
        g = torch.Generator().manual_seed(seed)
        rows.append(torch.randn(dim, generator=g))
    return F.normalize(torch.stack(rows), dim=1)


def prototypes(task: str, classes: Sequence[str], dim: int) -> torch.Tensor:
    """Fixed unit vectors (K, D), one per class, seeded from ``task/class`` (CLIP text-embedding stand-in)."""
    return _prototypes(task, tuple(classes), dim).clone()


def logits_from_features(feats: torch.Tensor, task: str, classes: Sequence[str], tau: float,
                         head: dict[str, torch.Tensor] | None = None,
                         protos: torch.Tensor | None = None) -> torch.Tensor:
    """(B, K) logits: cosine to class prototypes (K, D) / tau, or a per-task linear head when given.

    ``protos``: the prototype rows (``Foundation.prototypes``, which knows ``model.prototypes``); ``None`` = the
    seeded ones. Callers holding a foundation use ``Foundation.logits``."""
    if head is not None:
        return F.linear(feats, head["weight"].to(feats.device), head["bias"].to(feats.device))
    if protos is None:
        protos = prototypes(task, classes, feats.shape[1])
    return F.normalize(feats, dim=1) @ protos.to(feats.device).T / tau


# ------------------------------------------------------------------------------------------
# Foundation loading: timm's pretrained weights by name, a local checkpoint, or forgesim's cached pretraining
# ------------------------------------------------------------------------------------------
_LOADED: dict[tuple, Foundation] = {}
# Pretrained foundations shipped with forgesim (``scripts/pretrain_foundation.py`` writes them), by cache file name: a
# fresh machine loads these instead of pretraining; a cached file of the same key, if any, is used first.
SHIPPED_FOUNDATIONS = Path(__file__).resolve().parent / "foundations"


def cache_dir(cfg: ModelConfig) -> Path:
    root = cfg.cache_dir or os.environ.get("FORGESIM_CACHE") or Path.home() / ".cache" / "forgesim"
    return Path(root)


def foundation_key(cfg: ModelConfig, img_size: int) -> str:
    """Cache key: everything that changes the pretrained weights (not the head or the cache dir)."""
    arch = {k: getattr(cfg, k) for k in ("name", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio",
                                         "pretrain_steps", "pretrain_batch", "pretrain_lr")}
    # the shapes corpus keeps the key it had before model.pretrain_data existed, so its caches and file still match
    return config_hash(arch, img_size, f"{cfg.pretrain_data}-v1")


def foundation_path(cfg: ModelConfig, img_size: int) -> Path:
    return cache_dir(cfg) / f"foundation-{foundation_key(cfg, img_size)}.safetensors"


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Backbone weights from a .safetensors or torch file (raw, ``state_dict`` or ``model`` nesting)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"model.checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is one clear error
        raise ValueError(f"model.checkpoint {path} is not a readable checkpoint: {exc}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"model.checkpoint {path} does not hold a state dict")
    return {k.removeprefix("module."): v for k, v in state.items() if not k.removeprefix("module.").startswith("head.")}


def _load_into(backbone: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    own = backbone.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        detail = (f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}" if unexpected
                  else f"shape of {wrong[0]} is {tuple(state[wrong[0]].shape)}, model has {tuple(own[wrong[0]].shape)}")
        raise ValueError(f"{source} does not fit model {backbone.__class__.__name__} of this config: {detail}")
    backbone.load_state_dict(state)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive lock on ``path`` across processes (concurrent workers pretrain the foundation once, make a cached
    commit once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def prepare_foundation(cfg: ModelConfig, img_size: int, task_classes: Mapping[str, Sequence[str]]) -> None:
    """What a run's driver does before any work starts: pretrain the foundation into the shared cache once and
    check it fits the run (``load_foundation``'s errors for a bad checkpoint or pretrained name, a prototype file
    with a row for every task).

    When the foundation is forgesim's own pretraining, without prototypes, and its cache (or shipped) file is
    there with its header naming this key, there is nothing to build or check: the driver returns without
    building the backbone, so it does not import timm (≈ 2.7 s of CPU in every driver, a sweep's trial processes
    included). The workers load the file as always."""
    if cfg.pretrained == "none" and not cfg.checkpoint and cfg.prototypes is None:
        path = foundation_path(cfg, img_size)
        for file in (path, SHIPPED_FOUNDATIONS / path.name):
            if file.is_file():
                if _header_key(file) == path.stem:
                    return
                break                                      # the file load_foundation reads: let it say what is wrong
    load_foundation(cfg, img_size).check_tasks(task_classes)


def _header_key(path: Path) -> str | None:
    """The ``key`` in a foundation file's safetensors header (its metadata), ``None`` when it cannot be read."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as fh:
            return (fh.metadata() or {}).get("key")
    except Exception:  # noqa: BLE001 - an unreadable file is load_foundation's to report
        return None


def load_foundation(cfg: ModelConfig, img_size: int, device: str = "cpu", precision: str = "fp32") -> Foundation:
    """The frozen foundation of ``cfg`` on ``device``, computing in ``precision`` (``runtime.precision``); cached
    per process and, for forgesim's pretraining, on disk.

    The fingerprint hashes the weights as loaded (the backbone's state dict after timm's or forgesim's load) and,
    with ``model.prototypes``, the class embeddings: an adapter trained on other weights or another head is
    another base. The precision is not part of it (the weights are the same): adapters trained in bf16 and in fp32
    are on one base, and a bf16 foundation shares the fp32 one's backbone in this process."""
    key = (cfg, img_size, device, precision)
    if key in _LOADED:
        return _LOADED[key]
    if precision != "fp32":
        from sim.accelerator import autocast

        autocast(device, precision)          # an unknown precision is a ValueError naming runtime.precision
        foundation = replace(load_foundation(cfg, img_size, device), precision=precision)
        _LOADED[key] = foundation
        return foundation
    mean, std = (PIXEL_MEAN,) * 3, (PIXEL_STD,) * 3
    if cfg.pretrained != "none":
        backbone, (mean, std) = _named_pretrained(cfg, img_size)
    else:
        backbone = _own_backbone(cfg, img_size)
    backbone.requires_grad_(False).eval().to(device)
    state = dict(backbone.state_dict())
    embeddings = None
    if cfg.prototypes is not None:
        dim = getattr(backbone, "num_classes", 0) or backbone.num_features
        embeddings = read_class_embeddings(cfg.prototypes, dim)
        state |= {f"prototypes:{task}": t for task, t in embeddings.tables.items()}
    foundation = Foundation(backbone, cfg, img_size, fingerprint_state(state), torch.device(device), mean, std,
                            embeddings)
    _LOADED[key] = foundation
    return foundation


def _named_pretrained(cfg: ModelConfig, img_size: int) -> tuple[torch.nn.Module, tuple[tuple, tuple]]:
    """timm's ``model.name`` with the weights of ``model.pretrained`` (hub or FILE), and its input mean and std."""
    from sim.pretrained import create_pretrained, input_config

    want = input_config(cfg.name)
    if img_size != want.img_size:
        raise ValueError(f"data.img_size is {img_size} but model.name {cfg.name} takes {want.img_size} px images "
                         f"(its pretrained config; a SimConfig sets data.img_size from it)")
    return create_pretrained(cfg.name, cfg.pretrained, cfg.keep_head), (want.mean, want.std)


def _own_backbone(cfg: ModelConfig, img_size: int) -> torch.nn.Module:
    """forgesim's backbone of the configured shape, from ``model.checkpoint``, its cached pretraining, the
    pretraining shipped with forgesim for this key (``SHIPPED_FOUNDATIONS``), or a pretraining run now and cached."""
    backbone = create_backbone(cfg, img_size)
    if cfg.checkpoint:
        _load_into(backbone, read_checkpoint(cfg.checkpoint), f"model.checkpoint {cfg.checkpoint}")
        return backbone
    path = foundation_path(cfg, img_size)
    shipped = SHIPPED_FOUNDATIONS / path.name
    if not path.exists() and shipped.is_file():           # the default shape: forgesim's released pretraining
        _load_into(backbone, load_file(str(shipped)), f"shipped foundation {shipped}")
        return backbone
    with file_lock(path.with_suffix(".lock")):
        if not path.exists():
            state = pretrain_foundation(cfg, img_size)
            tmp = path.with_suffix(".tmp")
            save_file(state, str(tmp), metadata={"forgesim": "foundation", "key": path.stem})
            os.replace(tmp, path)
    _load_into(backbone, load_file(str(path)), f"cached foundation {path}")
    return backbone


def pretraining_corpus(cfg: ModelConfig, img_size: int) -> tuple[Any, int]:
    """The labelled corpus of ``model.pretrain_data`` (a ``Split``, seed 0) and its number of classes, sized by the
    pretraining budget: a quarter as many images as the pretraining draws, at least 1,000; the shapes corpus at most
    12,000 (as it always was), the formula corpus at most 25,600 (256 categories of 100 instances)."""
    want = max(1000, cfg.pretrain_steps * cfg.pretrain_batch // 4)
    if cfg.pretrain_data == "shapes":
        from sim.data.synthetic import SHAPE_CLASSES, make_pretraining_corpus

        return make_pretraining_corpus(min(12000, want), img_size, seed=0), len(SHAPE_CLASSES)
    from sim.data.formula import FRACTAL_INSTANCES, make_formula_corpus

    categories = min(256, want // FRACTAL_INSTANCES)
    return make_formula_corpus(img_size, seed=0, fractals=categories // 2, contours=categories - categories // 2)


def pretrain_foundation(cfg: ModelConfig, img_size: int, log: Any = None) -> dict[str, torch.Tensor]:
    """Supervised pretraining of the backbone on the ``model.pretrain_data`` corpus (label = the image's formula
    category, or its shape); returns its state dict."""
    t0 = time.perf_counter()
    torch.manual_seed(0)  # timm initialises weights from the global RNG; pin it for a reproducible cache
    backbone = create_backbone(cfg, img_size)
    corpus, n_classes = pretraining_corpus(cfg, img_size)
    if log is not None:
        log(f"pretraining corpus {cfg.pretrain_data}: {len(corpus)} images of {n_classes} classes "
            f"({time.perf_counter() - t0:.0f}s)")
    x, y = torch.from_numpy(corpus.x), torch.from_numpy(corpus.y)
    head = torch.nn.Linear(backbone.num_features, n_classes)
    params = list(backbone.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.pretrain_lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.pretrain_lr, total_steps=max(cfg.pretrain_steps, 1),
                                                pct_start=0.1)
    g = torch.Generator().manual_seed(0)
    backbone.train()
    for step in range(cfg.pretrain_steps):
        idx = torch.randint(len(y), (cfg.pretrain_batch,), generator=g)
        xb = augment(x[idx].float() / 255.0, g)
        loss = F.cross_entropy(head(backbone((xb - PIXEL_MEAN) / PIXEL_STD)), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log is not None and (step % 100 == 0 or step == cfg.pretrain_steps - 1):
            log(f"pretrain step {step + 1}/{cfg.pretrain_steps} loss {loss.item():.3f} "
                f"({time.perf_counter() - t0:.0f}s)")
    return {k: v.detach().contiguous() for k, v in backbone.state_dict().items()}


def augment(x: torch.Tensor, g: torch.Generator, shift: int = 2) -> torch.Tensor:
    """Random horizontal flips and shifts (reflect-padded crops) of float (B, C, S, S), seeded by ``g``."""
    b, _, s, _ = x.shape
    flip = torch.rand(b, generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    padded = F.pad(x, (shift, shift, shift, shift), mode="reflect")
    oy, ox = torch.randint(0, 2 * shift + 1, (2, b), generator=g)
    rows = (oy[:, None] + torch.arange(s))[:, :, None]          # (B, S, 1)
    cols = (ox[:, None] + torch.arange(s))[:, None, :]          # (B, 1, S)
    return padded[torch.arange(b)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)


# ------------------------------------------------------------------------------------------
# Adapters
# ------------------------------------------------------------------------------------------
def target_module_names(lora: LoraConfig, n_blocks: int) -> list[str]:
    """Module paths (``blocks.i.attn.qkv``) that ``lora`` adapts in a ViT of ``n_blocks`` blocks."""
    layers = lora.layers or tuple(range(n_blocks))
    bad = [i for i in layers if i >= n_blocks]
    if bad:
        raise ValueError(f"lora.layers holds block {bad[0]} but the model has {n_blocks} blocks")
    return [f"blocks.{i}.{MODULE_PATHS[m]}" for i in layers for m in lora.target_modules]


@dataclass
class Adapter:
    """LoRA factors in peft key format, their scaling, and the base they were trained on.

    ``weights[f"base_model.model.{module}.lora_A.weight"]``: (r, in);
    ``weights[f"base_model.model.{module}.lora_B.weight"]``: (out, r).
    ``ΔW(module) = B @ A * alpha(module) / r(module)``; r and alpha may differ per module
    (``rank_pattern`` / ``alpha_pattern``, as in peft) for merges that produce uneven ranks.

    ``head`` (``model.head=linear`` only; ``None`` with prototype heads) is a flat tensor dict, in one of two
    layouts, saved as it is in ``head.safetensors``: a trained adapter's single head ``{"weight": (K, D),
    "bias": (K,)}`` of its task ``meta["task"]`` (the layout training has always written), or per-task heads
    ``{"<task>/weight", "<task>/bias"}`` (merges and the joint reference) with ``meta["head_counts"]`` = {task:
    how many contributors' heads were averaged}, so that a merge folded in later weighs each exactly.
    ``task_heads`` reads either layout; ``head_for(task)`` is the head that scores ``task``.
    """

    weights: dict[str, torch.Tensor]
    alpha: float
    base_fingerprint: str | None = None
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    head: dict[str, torch.Tensor] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key in self.weights:
            if not (key.startswith(PEFT_PREFIX) and (key.endswith(".lora_A.weight") or key.endswith(".lora_B.weight"))):
                raise ValueError(f"adapter key {key!r} is not a peft LoRA key "
                                 f"({PEFT_PREFIX}<module>.lora_A.weight / .lora_B.weight)")
        for m in self.modules():
            a, b = self.factors(m)
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
                raise ValueError(f"adapter module {m}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} "
                                 f"do not form a low-rank pair")
        if self.head is not None and set(self.head) != {"weight", "bias"}:
            bad = [k for k in self.head if k.rpartition(HEAD_SEP)[2] not in ("weight", "bias") or HEAD_SEP not in k]
            if bad:
                raise ValueError(f"adapter head key {bad[0]!r} is neither 'weight'/'bias' (one head) nor "
                                 f"'<task>{HEAD_SEP}weight'/'<task>{HEAD_SEP}bias' (per-task heads)")

    def task_heads(self) -> dict[str, dict[str, torch.Tensor]]:
        """task → ``{"weight": (K, D), "bias": (K,)}`` for every linear head the adapter carries ({} if none)."""
        if self.head is None:
            return {}
        if set(self.head) == {"weight", "bias"}:
            task = self.meta.get("task")
            if not task:
                raise ValueError("adapter carries one linear head but no meta['task'] saying which task it scores")
            return {task: dict(self.head)}
        out: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in self.head.items():
            task, _, part = key.rpartition(HEAD_SEP)
            out.setdefault(task, {})[part] = t
        return out

    def head_counts(self) -> dict[str, int]:
        """task → number of contributors whose heads were averaged into this one (1 for a trained head)."""
        counts = self.meta.get("head_counts") or {}
        return {task: int(counts.get(task, 1)) for task in self.task_heads()}

    def head_for(self, task: str) -> dict[str, torch.Tensor] | None:
        """The linear head that scores ``task``; ``None`` without linear heads (the prototype head scores it).

        An adapter with linear heads but none for ``task`` is an error: silently scoring it with the random
        prototype head instead is what made merged models look worse than they are.
        """
        heads = self.task_heads()
        if not heads:
            return None
        if task not in heads:
            raise ValueError(f"adapter has linear heads for tasks {sorted(heads)} but none for task {task!r} "
                             f"(model.head=linear scores a task only with a head trained on it)")
        return heads[task]

    def modules(self) -> list[str]:
        mods = {k[len(PEFT_PREFIX):].rsplit(".lora_", 1)[0] for k in self.weights}
        return sorted(mods, key=_module_order)

    def factors(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            return (self.weights[f"{PEFT_PREFIX}{module}.lora_A.weight"],
                    self.weights[f"{PEFT_PREFIX}{module}.lora_B.weight"])
        except KeyError:
            raise ValueError(f"adapter has no complete lora_A/lora_B pair for module {module}") from None

    def rank(self, module: str) -> int:
        return self.factors(module)[0].shape[0]

    @property
    def max_rank(self) -> int:
        return max(self.rank(m) for m in self.modules())

    def scaling(self, module: str) -> float:
        return self.alpha_pattern.get(module, self.alpha) / self.rank(module)

    def delta(self, module: str) -> torch.Tensor:
        """ΔW (out, in) = B A · alpha / r."""
        a, b = self.factors(module)
        return (b.float() @ a.float()) * self.scaling(module)

    def update_hash(self, h) -> None:
        """Feed ``h`` (a hashlib object) the tensors that define this adapter: the LoRA factors, then the head, each
        as ``name:key:shape`` and its float32 bytes, keys sorted (the tensor part of ``Commit.content_hash``)."""
        for name, tensors in (("lora", self.weights), ("head", self.head or {})):
            for k in sorted(tensors):
                h.update(f"{name}:{k}:{tuple(tensors[k].shape)}".encode())
                h.update(tensors[k].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())

    def content_hash(self) -> str:
        """SHA-256 of everything its predictions read: scalings, base, the task its single head scores, and the
        tensors (``update_hash``). Equal hashes, equal predictions."""
        h = hashlib.sha256(json.dumps([float(self.alpha), sorted(self.alpha_pattern.items()), self.base_fingerprint,
                                       self.meta.get("task")]).encode())
        self.update_hash(h)
        return h.hexdigest()

    def check_base(self, foundation: Foundation) -> None:
        if self.base_fingerprint is not None and self.base_fingerprint != foundation.fingerprint:
            raise ValueError(f"adapter was trained on base {self.base_fingerprint}, "
                             f"this foundation is {foundation.fingerprint}")

    def num_bytes(self) -> int:
        """Bytes one would ship: per module the smaller of its factors and its dense ΔW (out × in), plus heads.

        A full-rank merge (TIES, DARE, MagMax) is written as exact factors of rank min(out, in), which hold more
        numbers than ΔW itself (r·(out + in) > out·in); whoever ships it ships ΔW, so that is what it costs."""
        total = sum(t.numel() * t.element_size() for t in (self.head or {}).values())
        for m in self.modules():
            a, b = self.factors(m)
            total += min(a.numel() + b.numel(), b.shape[0] * a.shape[1]) * a.element_size()
        return total

    def peft_config_dict(self, dropout: float = 0.0) -> dict[str, Any]:
        """The ``adapter_config.json`` fields of the ``peft.LoraConfig`` that reproduces this adapter's modules,
        ranks and scalings; every field not named takes peft's default when peft reads the file
        (``PeftConfig.from_pretrained``). Built without importing peft, so a process that only writes adapter dirs
        (the merge actor) does not pay peft's import (~1.7 s)."""
        mods = self.modules()
        ranks = {m: self.rank(m) for m in mods}
        base_r = max(set(ranks.values()), key=list(ranks.values()).count)
        return {
            "peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "inference_mode": False,
            "r": base_r, "lora_alpha": self.alpha, "lora_dropout": dropout, "bias": "none",
            "target_modules": "^(" + "|".join(m.replace(".", r"\.") for m in mods) + ")$",
            "rank_pattern": {m: r for m, r in ranks.items() if r != base_r},
            "alpha_pattern": dict(self.alpha_pattern),
            "fan_in_fan_out": False, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
            "modules_to_save": None,
        }

    def to_peft_config(self, dropout: float = 0.0):
        """The ``peft.LoraConfig`` of ``peft_config_dict``."""
        from peft import LoraConfig as PeftLoraConfig

        fields = self.peft_config_dict(dropout)
        del fields["peft_type"]
        return PeftLoraConfig(**fields)


def pack_heads(heads: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """task → {weight, bias} as the flat per-task layout of ``Adapter.head`` (``"<task>/weight"``, ...)."""
    return {f"{task}{HEAD_SEP}{part}": t for task, head in heads.items() for part, t in head.items()}


def _module_order(module: str) -> tuple:
    parts = module.split(".")
    return tuple(int(p) if p.isdigit() else p for p in parts)


def new_adapter(foundation: Foundation, lora: LoraConfig, seed: int) -> Adapter:
    """Fresh LoRA: A ~ Kaiming-uniform (peft's default init), B = 0, from a private ``torch.Generator``."""
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for m in target_module_names(lora, foundation.block_count()):
        out_f, in_f = foundation.weight(m).shape
        bound = 1.0 / math.sqrt(in_f)  # kaiming_uniform_(a=sqrt(5)) on (r, in)
        weights[f"{PEFT_PREFIX}{m}.lora_A.weight"] = (torch.rand(lora.rank, in_f, generator=g) * 2 - 1) * bound
        weights[f"{PEFT_PREFIX}{m}.lora_B.weight"] = torch.zeros(out_f, lora.rank)
    return Adapter(weights, float(lora.alpha), foundation.fingerprint)


# ------------------------------------------------------------------------------------------
# peft adapter dirs
# ------------------------------------------------------------------------------------------
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
HEAD_WEIGHTS = "head.safetensors"
META_FILE = "forgesim_adapter.json"


def save_adapter(adapter: Adapter, out_dir: str | Path) -> Path:
    """Write a standard peft adapter dir (+ forgesim's base fingerprint and metadata beside it).

    Linear heads go to ``head.safetensors`` in the adapter's layout (one head, or per-task heads whose
    ``head_counts`` travel in the metadata file), so ``load_adapter`` gives them back unchanged."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / ADAPTER_CONFIG).write_text(json.dumps(adapter.peft_config_dict(), indent=2, sort_keys=True))
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in adapter.weights.items()}
    metadata = {"format": "pt"}
    if adapter.base_fingerprint:
        metadata["forgesim_base_fingerprint"] = adapter.base_fingerprint
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata=metadata)
    if adapter.head is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in adapter.head.items()}, str(out / HEAD_WEIGHTS))
    meta = {"base_fingerprint": adapter.base_fingerprint, "alpha": adapter.alpha,
            "alpha_pattern": adapter.alpha_pattern, **adapter.meta}
    (out / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
    return out


def load_adapter(path: str | Path) -> Adapter:
    """Read a peft adapter dir (written by forgesim or by peft itself) into an ``Adapter``."""
    path = Path(path)
    cfg_file, weights_file = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    if not cfg_file.is_file() or not weights_file.is_file():
        raise ValueError(f"{path} is not a peft adapter dir (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    try:
        cfg = json.loads(cfg_file.read_text())
        from safetensors import safe_open

        with safe_open(str(weights_file), "pt") as fh:
            file_meta = fh.metadata() or {}
            weights = {k: fh.get_tensor(k).float() for k in fh.keys()}
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"{path}: unreadable adapter files: {exc}") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type {cfg.get('peft_type')!r} is not LORA")
    weights = {_normalise_key(k): v for k, v in weights.items()}
    if cfg.get("use_rslora") or cfg.get("use_dora"):
        raise ValueError(f"{path}: rsLoRA/DoRA adapters are not supported")
    base_r, alpha = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
    adapter = Adapter(weights, alpha, file_meta.get("forgesim_base_fingerprint"))
    # peft's scaling is alpha_pattern.get(module, alpha) / rank_pattern.get(module, r); express both per module.
    for m in adapter.modules():
        a_m = _pattern_value(cfg.get("alpha_pattern") or {}, m, alpha)
        if a_m != alpha:
            adapter.alpha_pattern[m] = a_m
        declared_r = _pattern_value(cfg.get("rank_pattern") or {}, m, base_r)
        if declared_r != adapter.rank(m):
            raise ValueError(f"{path}: module {m} has rank {adapter.rank(m)} but the config declares {declared_r}")
    if (path / HEAD_WEIGHTS).is_file():
        adapter.head = load_file(str(path / HEAD_WEIGHTS))
    if (path / META_FILE).is_file():
        meta = json.loads((path / META_FILE).read_text())
        adapter.meta = {k: v for k, v in meta.items() if k not in ("base_fingerprint", "alpha", "alpha_pattern")}
        adapter.base_fingerprint = adapter.base_fingerprint or meta.get("base_fingerprint")
    return adapter


def _normalise_key(key: str) -> str:
    """peft saves without the adapter name; accept ``.lora_A.default.weight`` too."""
    return key.replace(".lora_A.default.weight", ".lora_A.weight").replace(".lora_B.default.weight", ".lora_B.weight")


def _pattern_value(pattern: dict[str, Any], module: str, default: Any) -> Any:
    import re

    for key, value in pattern.items():
        if re.fullmatch(key, module) or re.search(rf"(^|\.){key}$", module):
            return type(default)(value)
    return default

