"""Typed, frozen configuration for one forgesim run.

Every section is a frozen dataclass with defaults, a one-line help per field (``metadata["help"]``)
and checks in ``__post_init__`` that raise one ``ValueError`` naming the field and what is allowed,
in the manner of peft's ``LoraConfig`` and nanoGPT's ``GPTConfig``. ``SimConfig`` composes the
sections; it loads from YAML/JSON and takes ``section.field=value`` overrides. Fields that name a registry entry
are checked against that registry. One file for every section (over 400 lines) so that each field's default, help
and check sit together and the whole configuration surface reads in one place.
"""
from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sim.registry import check_names

__all__ = [
    "DataConfig", "ModelConfig", "LoraConfig", "TrainConfig", "DistillConfig", "MergeConfig",
    "ScheduleConfig", "RuntimeConfig", "FaultsConfig", "SimConfig", "load_config", "apply_overrides",
    "config_from_dict", "config_to_dict", "config_hash", "DSA_FAMILIES", "CORRUPT_KINDS",
]


def _f(default: Any, help: str) -> Any:
    """A dataclass field with a one-line help text (shown by ``forgesim config --help``)."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("use tuples for sequence defaults so configs stay hashable")
    return field(default=default, metadata={"help": help})


def _check(ok: bool, name: str, allowed: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _choice(name: str, value: Any, choices: typing.Iterable[str]) -> None:
    choices = tuple(choices)
    _check(value in choices, name, f"one of {', '.join(choices)}", value)


# Fields that name a registry entry (data.name, distill.method, merge.strategies, schedule.arrival, the pulled
# branch) are checked against the registry itself, never a retyped list of names, so adding an entry is one edit.
# The registries live with what they register and import this module (sim.merge, sim.distill and sim.schedule take
# their config dataclasses from here), so each check imports its registry inside the function: by the time a
# config is constructed this module is fully loaded and the cycle is harmless, whereas a separate names-only list
# would be a second copy to keep in step (and the pull check needs each strategy's space, not only its name).


PARTITIONS = ("pool", "per_institution")   # data.partition; see sim.data.build_cohort
PRETRAIN_DATA = ("formula", "shapes")     # model.pretrain_data: the corpora sim.model.pretrain_foundation knows
INTERPOLATIONS = ("bilinear", "bicubic")   # data.interpolation: the filters sim.data.resize_uint8 applies

# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DataConfig:
    name: str = _f("synthetic", "dataset registry key: synthetic, digits, medmnist or imagefolder")
    data_dir: tuple[str, ...] = _f((), "medmnist: the one directory of .npz files; imagefolder: one folder per task "
                                       "(one subfolder of images per class); the other datasets read no files")
    classes: str | None = _f(None, "JSON or YAML file mapping a task to its class names in label order (replaces "
                                   "the dataset's names for the tasks it lists)")
    tasks: tuple[str, ...] = _f((), "task names to use, in order; empty = the dataset's default tasks")
    n_tasks: int = _f(4, "number of tasks when `tasks` is empty (synthetic: generated modalities; digits: 5 max; "
                         "imagefolder: ignored, one task per data_dir folder)")
    institutions: int = _f(12, "number of institutions; institution i holds task i % n_tasks at site i // n_tasks")
    img_size: int = _f(32, "image side in pixels fed to the model (images are resized to it); with model.pretrained "
                           "hub or FILE the model's pretrained input size")
    interpolation: str = _f("bilinear", "filter resizing images to data.img_size: bilinear or bicubic (antialiased); "
                                        "with model.pretrained hub or FILE the model's pretrained config's")
    train_per_class: int = _f(160, "synthetic: training images per class per site (other datasets: a cap, 0 = all); "
                                        "per_institution: images per class per institution, every dataset")
    val_per_class: int = _f(16, "synthetic or per_institution: validation images per class per site")
    test_per_class: int = _f(40, "synthetic or per_institution: test images per class per site")
    dirichlet_alpha: float = _f(1.0, "label skew across sites: Dirichlet concentration per class (0 = no skew)")
    site_shift: float = _f(1.0, "strength of per-site appearance shift (stain/colour, contrast, blur, noise); 0 = none")
    rare_prevalence: float = _f(0.0, "if > 0, the last class of every task is subsampled to this prevalence")
    partition: str = _f("pool", "pool (a fixed pool of each task split over its sites: more institutions, less data "
                                "each) or per_institution (institution i's own images, label skew and site shift "
                                "drawn from (seed, i) alone: the first N of a larger community are the N-community)")

    def __post_init__(self) -> None:
        from sim.data import DATASETS  # the registry lives with the loaders; see the note above _choice

        _choice("data.name", self.name, DATASETS)
        # One path as a plain string (a Python caller, or a config written when data_dir held one directory) is a
        # one-entry list, never a list of its characters.
        dirs = (self.data_dir,) if isinstance(self.data_dir, str) else tuple(self.data_dir or ())
        object.__setattr__(self, "data_dir", dirs)
        _check(all(isinstance(d, str) and d for d in dirs), "data.data_dir", "a list of paths", dirs)
        _check(self.n_tasks >= 1, "data.n_tasks", "an integer >= 1", self.n_tasks)
        _check(self.institutions >= 1, "data.institutions", "an integer >= 1", self.institutions)
        _check(8 <= self.img_size <= 512, "data.img_size", "an integer in [8, 512]", self.img_size)
        _choice("data.interpolation", self.interpolation, INTERPOLATIONS)
        for name in ("train_per_class", "val_per_class", "test_per_class"):
            value = getattr(self, name)
            _check(value >= 0, f"data.{name}", "an integer >= 0", value)
        _check(self.dirichlet_alpha >= 0 and math.isfinite(self.dirichlet_alpha), "data.dirichlet_alpha",
               "a finite number >= 0", self.dirichlet_alpha)
        _check(0 <= self.site_shift <= 3, "data.site_shift", "a number in [0, 3]", self.site_shift)
        _check(0 <= self.rare_prevalence < 0.5, "data.rare_prevalence", "a number in [0, 0.5)", self.rare_prevalence)
        _check(len(set(self.tasks)) == len(self.tasks), "data.tasks", "a list of distinct names", self.tasks)
        _choice("data.partition", self.partition, PARTITIONS)
        if self.partition == "per_institution":
            for name in ("train_per_class", "val_per_class", "test_per_class"):
                _check(getattr(self, name) >= 1, f"data.{name}", "an integer >= 1 with data.partition=per_institution "
                       "(images per class per institution)", getattr(self, name))
        if self.name == "medmnist":
            _check(len(dirs) == 1, "data.data_dir", "a directory of MedMNIST .npz files for data.name=medmnist "
                   "(exactly one)", dirs)
        if self.name == "imagefolder":
            _check(len(dirs) >= 1, "data.data_dir", "one or more task folders (one subfolder of images per class) "
                   "for data.name=imagefolder", dirs)
        _check(self.classes is None or bool(self.classes), "data.classes", "a file path or null", self.classes)

    @property
    def task_count(self) -> int:
        if self.tasks:
            return len(self.tasks)
        return len(self.data_dir) if self.name == "imagefolder" else self.n_tasks


@dataclass(frozen=True)
class ModelConfig:
    name: str = _f("vit_tiny_patch16_224", "timm ViT name, optionally with a pretrained tag (vit_base_patch16_clip_224"
                                           ".openai); with model.pretrained=none the shape fields below override its "
                                           "shape")
    pretrained: str = _f("none", "none (forgesim's own backbone: the shape fields below, with model.checkpoint or "
                                 "forgesim's cached pretraining), hub (timm's pretrained weights of model.name, as "
                                 "timm.create_model(pretrained=True) fetches them) or FILE (a local file of them, e.g. "
                                 "the hub's model.safetensors, loaded through the same timm call); with hub or FILE the "
                                 "model has model.name's own shape and data.img_size / data.interpolation follow its "
                                 "pretrained config")
    keep_head: bool = _f(False, "hub or FILE: keep the pretrained head as the features' last layer (CLIP image towers "
                                "such as vit_base_patch16_clip_224.openai: the projection into CLIP's text-embedding "
                                "space that model.prototypes from CLIP text live in); False = pooled features")
    prototypes: str | None = _f(None, "class embeddings for the prototype head instead of seeded random vectors: "
                                      ".safetensors or .npz with one (n_classes, dim) table per task named by the task, "
                                      "or .npy of a one-task run's table (scripts/clip_prototypes.py writes one)")
    patch_size: int = _f(4, "ViT patch size in pixels")
    embed_dim: int = _f(96, "ViT width")
    depth: int = _f(4, "number of transformer blocks")
    num_heads: int = _f(3, "attention heads per block")
    mlp_ratio: float = _f(2.0, "MLP hidden width / embed_dim")
    checkpoint: str | None = _f(None, "model.pretrained=none: local weights of the backbone of the shape above "
                                      "(.pt/.pth/.safetensors); None = forgesim's own cached pretraining")
    pretrain_steps: int = _f(600, "optimizer steps of forgesim's one-time foundation pretraining")
    pretrain_batch: int = _f(128, "batch size of the foundation pretraining")
    pretrain_lr: float = _f(2e-3, "learning rate of the foundation pretraining")
    pretrain_data: str = _f("shapes", "corpus of forgesim's foundation pretraining: shapes (ten simple synthetic "
                                      "shapes) or formula (formula-driven images: FractalDB-style IFS fractals and "
                                      "RCDB-style radial contours, one class per formula; sim.data.formula); "
                                      "benchmarks/transfer.py compares the two")
    cache_dir: str | None = _f(None, "foundation cache directory; None = $FORGESIM_CACHE or ~/.cache/forgesim")
    head: str = _f("prototype", "prototype (frozen class prototypes, cosine / tau) or linear (per-task heads)")
    tau: float = _f(0.07, "temperature of the cosine prototype head")

    def __post_init__(self) -> None:
        _check(bool(self.name), "model.name", "a timm model name", self.name)
        for name in ("patch_size", "embed_dim", "depth", "num_heads", "pretrain_batch"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value >= 1, f"model.{name}", "an integer >= 1", value)
        _check(self.embed_dim % self.num_heads == 0, "model.num_heads", f"a divisor of model.embed_dim "
               f"({self.embed_dim})", self.num_heads)
        _check(self.mlp_ratio > 0, "model.mlp_ratio", "a number > 0", self.mlp_ratio)
        _check(self.pretrain_steps >= 0, "model.pretrain_steps", "an integer >= 0", self.pretrain_steps)
        _check(self.pretrain_lr > 0, "model.pretrain_lr", "a number > 0", self.pretrain_lr)
        _choice("model.pretrain_data", self.pretrain_data, PRETRAIN_DATA)
        _choice("model.head", self.head, ("prototype", "linear"))
        _check(0 < self.tau <= 10, "model.tau", "a number in (0, 10]", self.tau)
        _check(bool(self.pretrained), "model.pretrained", "none, hub or a weights file", self.pretrained)
        if self.pretrained != "none":
            _check(self.checkpoint is None, "model.checkpoint", f"None with model.pretrained={self.pretrained} (both "
                   "name the backbone's weights; model.pretrained=FILE takes a file of model.name's weights)",
                   self.checkpoint)
        _check(not self.keep_head or self.pretrained != "none", "model.keep_head",
               "false with model.pretrained=none (forgesim's own backbone has no head)", self.keep_head)
        if self.prototypes is not None:
            _check(self.prototypes.endswith((".safetensors", ".npz", ".npy")), "model.prototypes",
                   "a .safetensors, .npz or .npy file", self.prototypes)
            _check(self.head == "prototype", "model.head", "prototype with model.prototypes (only the prototype head "
                   "reads class embeddings)", self.head)


@dataclass(frozen=True)
class LoraConfig:
    rank: int = _f(8, "LoRA rank r")
    alpha: float = _f(16.0, "LoRA alpha; the update is B A * alpha / r")
    dropout: float = _f(0.0, "dropout on the LoRA input during training")
    target_modules: tuple[str, ...] = _f(("qkv",), "module names in each ViT block to adapt (qkv, proj, fc1, fc2)")
    layers: tuple[int, ...] = _f((), "indices of the blocks to adapt; empty = all blocks")

    def __post_init__(self) -> None:
        _check(self.rank >= 1, "lora.rank", "an integer >= 1", self.rank)
        _check(self.alpha > 0, "lora.alpha", "a number > 0", self.alpha)
        _check(0 <= self.dropout < 1, "lora.dropout", "a number in [0, 1)", self.dropout)
        allowed = ("qkv", "proj", "fc1", "fc2")
        _check(len(self.target_modules) > 0 and all(m in allowed for m in self.target_modules),
               "lora.target_modules", f"a non-empty list from {', '.join(allowed)}", self.target_modules)
        _check(all(i >= 0 for i in self.layers), "lora.layers", "a list of block indices >= 0", self.layers)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True)
class TrainConfig:
    optimizer: str = _f("adamw", "local optimizer: adamw or sgd")
    lr: float = _f(3e-3, "local learning rate")
    steps: int = _f(150, "local optimizer steps per contribution")
    batch_size: int = _f(64, "local batch size")
    weight_decay: float = _f(0.0, "weight decay of the local optimizer")
    augment: bool = _f(True, "random flips and shifts during local training")
    joint: bool = _f(False, "also train the `joint` reference: one multi-task LoRA on the union of every "
                            "institution's training data, with Ray Train (the upper bound merging is compared to)")
    joint_steps: int = _f(0, "optimizer steps of the joint reference; 0 = steps x number of tasks")

    def __post_init__(self) -> None:
        _choice("train.optimizer", self.optimizer, ("adamw", "sgd"))
        _check(self.joint_steps >= 0, "train.joint_steps", "an integer >= 0", self.joint_steps)
        _check(self.lr > 0 and math.isfinite(self.lr), "train.lr", "a finite number > 0", self.lr)
        _check(self.steps >= 1, "train.steps", "an integer >= 1", self.steps)
        _check(self.batch_size >= 1, "train.batch_size", "an integer >= 1", self.batch_size)
        _check(self.weight_decay >= 0, "train.weight_decay", "a number >= 0", self.weight_decay)


# Families of Differentiable Siamese Augmentation; sim.distill.dsa's registry holds exactly these keys
# (listed here so that validating a config does not import torch).
DSA_FAMILIES = ("color", "crop", "cutout", "flip", "scale", "rotate")


@dataclass(frozen=True)
class DistillConfig:
    method: str = _f("dm", "distiller: dm (distribution matching), random, herding or noise")
    ipc: int = _f(10, "distilled images per class")
    iterations: int = _f(200, "dm: optimisation steps of the synthetic images")
    lr_img: float = _f(1.0, "dm: learning rate of the synthetic images")
    real_batch: int = _f(32, "dm: real images sampled per class per step (DM paper: 256; 32 keeps one IPC-10 "
                                 "distillation of the default institution at ≈23 s on one core)")
    embed: str = _f("convnet", "dm: embedding network, convnet (random ConvNet each step) or foundation")
    init: str = _f("real", "dm: initialise synthetic images from real samples or noise")
    dsa: bool = _f(True, "dm: differentiable siamese augmentation")
    dsa_strategy: str = _f("_".join(DSA_FAMILIES), "dm: DSA families joined by '_' (color, crop, cutout, flip, "
                                                   "scale, rotate); one family is drawn per class per step")
    embed_width: int = _f(64, "dm: channels of the random ConvNet embedding (DM paper: 128; 64 here keeps one IPC-10 "
                                "distillation of a 32 px institution under 30 s on one CPU core, about 4x cheaper)")
    embed_depth: int = _f(3, "dm: conv blocks of the random ConvNet (DM paper: 3; capped by the image side)")
    audit: bool = _f(False, "audit every distilled set as it is made (fidelity: accuracy of an adapter trained on it "
                            "÷ the real adapter's; privacy: memorised share, membership-inference TPR at 1 % and "
                            "0.1 % FPR); results in each commit's record")
    audit_near: float = _f(0.5, "audit: an image is a near-copy if its distance to the nearest training image is "
                                "below this share of the median real-to-real nearest-neighbour distance")
    audit_ratio: float = _f(0.5, "audit: ...and below this share of its distance to the nearest held-out image")
    audit_max_memorised: float = _f(0.0, "audit: flag the set if more than this share of its images are near-copies")
    audit_max_tpr: float = _f(0.1, "audit: flag the set if the membership-inference TPR at 1 % FPR (all members or "
                                   "the exposed ones) exceeds this (0.1 = ten times the FPR)")
    audit_shadows: int = _f(2, "audit: shadow adapters of the membership-inference attack (LiRA, in complementary "
                               "pairs of halves; each costs one distillation and one adapter training); 0 = the "
                               "global-threshold loss attack")
    audit_attack: str = _f("lira_offline", "audit: lira_offline (per-record OUT Gaussians) or lira_online (IN and "
                                           "OUT Gaussians); ignored with audit_shadows=0")

    def __post_init__(self) -> None:
        from sim.distill import DISTILLERS  # the registry; imported here, see the note above _choice

        _choice("distill.method", self.method, DISTILLERS)
        _check(self.ipc >= 1, "distill.ipc", "an integer >= 1", self.ipc)
        _check(self.iterations >= 0, "distill.iterations", "an integer >= 0", self.iterations)
        _check(self.lr_img > 0, "distill.lr_img", "a number > 0", self.lr_img)
        _check(self.real_batch >= 1, "distill.real_batch", "an integer >= 1", self.real_batch)
        _choice("distill.embed", self.embed, ("convnet", "foundation"))
        _choice("distill.init", self.init, ("real", "noise"))
        parts = self.dsa_strategy.split("_")
        _check(all(p in DSA_FAMILIES for p in parts), "distill.dsa_strategy",
               f"families from {', '.join(DSA_FAMILIES)} joined by '_'", self.dsa_strategy)
        _check(self.embed_width >= 1, "distill.embed_width", "an integer >= 1", self.embed_width)
        _check(self.embed_depth >= 1, "distill.embed_depth", "an integer >= 1", self.embed_depth)
        _check(0 < self.audit_near <= 10, "distill.audit_near", "a number in (0, 10]", self.audit_near)
        _check(0 < self.audit_ratio <= 1, "distill.audit_ratio", "a number in (0, 1]", self.audit_ratio)
        _check(0 <= self.audit_max_memorised < 1, "distill.audit_max_memorised", "a number in [0, 1)",
               self.audit_max_memorised)
        _check(0 <= self.audit_max_tpr <= 1, "distill.audit_max_tpr", "a number in [0, 1]", self.audit_max_tpr)
        _check(self.audit_shadows == 0 or self.audit_shadows >= 2, "distill.audit_shadows",
               "0 or an integer >= 2 (complementary halves: every record needs a shadow without it)",
               self.audit_shadows)
        _choice("distill.audit_attack", self.audit_attack, ("lira_offline", "lira_online"))


@dataclass(frozen=True)
class MergeConfig:
    strategies: tuple[str, ...] = _f(("fusion", "mixture", "svd", "ties"), "merge strategies kept as branches")
    optimizer: str = _f("NGOpt", "nevergrad optimizer for coefficient search (NGOpt, Shiwa, Cobyla, CMA, OnePlusOne)")
    budget: int = _f(40, "evaluations of the coefficient search")
    bound: float = _f(1.5, "coefficients are searched in [-bound, bound]")
    l1: float = _f(0.05, "L1 penalty on the coefficients in the search objective")
    granularity: str = _f("adapter", "one coefficient per adapter, or per layer (per adapted module; fusion and "
                                     "parameter-space searches; mixture weights are always per adapter)")
    search_mode: str = _f("sequential", "fusion/mixture: search two coefficients per arriving commit (MedForge), "
                                        "or all N at once (global)")
    search_batch: int = _f(1, "candidates the coefficient search asks and scores together: 1 = one ask/tell at a "
                              "time; B > 1 = nevergrad with num_workers=B, B candidates per round in one stacked "
                              "forward over the cached frozen prefix (fusion; other objectives keep one at a time); "
                              "the optimizer's trajectory differs from one-at-a-time asks")
    proxy_images: int = _f(0, "coefficient search: score at most this many distilled images; beyond it every "
                              "received set gives an equal, class-stratified share (a seeded prefix of its images), so "
                              "a stage's cost stays flat as contributors arrive; 0 = every image of every set "
                              "(MedForge)")
    density: float | None = _f(None, "ties/dare/magnitude_prune/knots: fraction of entries each contributor keeps; "
                                     "null = each strategy's published default (ties 0.2, dare 0.5, "
                                     "magnitude_prune 0.5)")
    ties_scope: str = _f("global", "ties: trim each contributor's top density over its whole task vector "
                                   "(global, the paper's) or within each module (module)")
    ties_disjoint: str = _f("sum", "ties: sum the agreeing entries (sum, FusionBench's default, with its λ 0.3) or "
                                   "average them (mean, the paper's τ_m, whose untuned λ is 1)")
    trim: float | None = _f(None, "trimmed_mean: fraction of the contributors removed at each end of every entry "
                                  "(⌊trim × N⌋ each); null = 0.1 (guards a 10 % malicious share; Yin et al. 2018 need "
                                  "it >= that share)")
    clip_norm: float = _f(0.0, "clipped_mean: the norm every contributor's whole update is clipped to; 0 = the "
                               "median of the contributors' norms")
    svd_threshold: float = _f(0.9, "svd: keep singular values up to this cumulative share")
    svd_rank: int = _f(0, "svd: cap on the merged rank; 0 = no cap")

    def __post_init__(self) -> None:
        _check(len(self.strategies) > 0, "merge.strategies", "a non-empty list", self.strategies)
        _check(len(set(self.strategies)) == len(self.strategies), "merge.strategies", "distinct names",
               self.strategies)
        from sim.merge.specs import SPECS, TIES_DISJOINT, TIES_SCOPES  # the registry; imported here, see the note above _choice

        check_names(SPECS, self.strategies, "merge strategy", "merge.strategies")
        _check(self.budget >= 1, "merge.budget", "an integer >= 1", self.budget)
        _check(self.bound > 0, "merge.bound", "a number > 0", self.bound)
        _check(self.l1 >= 0, "merge.l1", "a number >= 0", self.l1)
        _choice("merge.granularity", self.granularity, ("adapter", "layer"))
        _choice("merge.search_mode", self.search_mode, ("sequential", "global"))
        _check(isinstance(self.search_batch, int) and not isinstance(self.search_batch, bool)
               and self.search_batch >= 1, "merge.search_batch", "an integer >= 1", self.search_batch)
        _check(isinstance(self.proxy_images, int) and not isinstance(self.proxy_images, bool)
               and self.proxy_images >= 0, "merge.proxy_images", "an integer >= 0", self.proxy_images)
        if self.search_batch > 1:
            from sim.optimizers import parallel_problem  # nevergrad is imported only for a batched search

            problem = parallel_problem(self.optimizer, self.search_batch, budget=self.budget)
            _check(problem is None, "merge.search_batch",
                   f"1 with merge.optimizer {self.optimizer} ({problem})", self.search_batch)
        _check(self.density is None or 0 < self.density <= 1, "merge.density",
               "null (each strategy's default) or a number in (0, 1]", self.density)
        _check(self.trim is None or 0 <= self.trim < 0.5, "merge.trim", "null (0.1) or a fraction in [0, 0.5)",
               self.trim)
        _check(isinstance(self.clip_norm, (int, float)) and math.isfinite(self.clip_norm) and self.clip_norm >= 0,
               "merge.clip_norm", "a number >= 0 (0: the median of the contributors' norms)", self.clip_norm)
        _choice("merge.ties_scope", self.ties_scope, TIES_SCOPES)
        _choice("merge.ties_disjoint", self.ties_disjoint, TIES_DISJOINT)
        _check(0 < self.svd_threshold <= 1, "merge.svd_threshold", "a number in (0, 1]", self.svd_threshold)
        _check(self.svd_rank >= 0, "merge.svd_rank", "an integer >= 0", self.svd_rank)


@dataclass(frozen=True)
class ScheduleConfig:
    arrival: str = _f("poisson", "arrival process of contribution start times: poisson, uniform, periodic, eager (all "
                                 "at 0: each starts as soon as it may) or trace")
    contributions: int = _f(2, "contributions per institution (trace: ignored, each institution has its CSV rows)")
    rate: float = _f(1.0, "mean contribution starts per institution per unit of virtual time (trace: ignored)")
    speed_sigma: float = _f(0.5, "lognormal sigma of institution speeds (heterogeneous hospitals); 0 = all speed 1")
    init_from: str = _f("base", "base (every adapter starts from the foundation) or main (pulled main branch)")
    trace: str | None = _f(None, "trace: CSV file with columns institution,time (one row per contribution start)")
    train_time: float = _f(1.0, "mean virtual duration of one local training (divided by the institution's speed)")
    straggler_prob: float = _f(0.0, "probability that a contribution straggles (its training takes longer)")
    straggler_factor: float = _f(3.0, "training duration multiplier of a straggling contribution")
    dropout: float = _f(0.0, "probability, before each contribution after an institution's first, that it leaves "
                             "for good")
    commit_delay: float = _f(0.0, "mean of the exponential delay between end of training and the commit's arrival")
    max_staleness: int = _f(-1, "the merge actor rejects commits staler than this (commits merged since the pull); "
                                "-1 = unlimited")
    staleness_weighting: bool = _f(False, "weight a commit by 1 / (1 + staleness) in merges")
    pull_strategy: str = _f("", "init_from=main: merge strategy whose branch is pulled; empty = the first "
                                "parameter-space entry of merge.strategies")
    wall_scale: float = _f(0.05, "runtime.clock=wall: seconds of real time per unit of virtual time")
    protocol: str = _f("async", "when commits are merged: async (each on arrival) or sync_rounds (contribution k of "
                                "every institution is round k: all pull when the round starts, and the round's "
                                "commits are merged together when its slowest member's has arrived, which starts "
                                "the next round)")

    def __post_init__(self) -> None:
        from sim.schedule import ARRIVALS, PROTOCOLS  # the registries; imported here, see the note above _choice

        _choice("schedule.arrival", self.arrival, ARRIVALS)
        _choice("schedule.protocol", self.protocol, PROTOCOLS)
        _check(self.contributions >= 1, "schedule.contributions", "an integer >= 1", self.contributions)
        _check(0 < self.rate < math.inf, "schedule.rate", "a finite number > 0", self.rate)
        _check(0 <= self.speed_sigma < math.inf, "schedule.speed_sigma", "a finite number >= 0", self.speed_sigma)
        _choice("schedule.init_from", self.init_from, ("base", "main"))
        if self.arrival == "trace":
            _check(bool(self.trace), "schedule.trace", "a CSV path when schedule.arrival=trace", self.trace)
        _check(0 < self.train_time < math.inf, "schedule.train_time", "a finite number > 0", self.train_time)
        _check(0 <= self.straggler_prob <= 1, "schedule.straggler_prob", "a number in [0, 1]", self.straggler_prob)
        _check(1 <= self.straggler_factor < math.inf, "schedule.straggler_factor", "a finite number >= 1",
               self.straggler_factor)
        # 1 is allowed: every institution then makes exactly one contribution (the first is never dropped).
        _check(0 <= self.dropout <= 1, "schedule.dropout", "a number in [0, 1]", self.dropout)
        _check(0 <= self.commit_delay < math.inf, "schedule.commit_delay", "a finite number >= 0", self.commit_delay)
        _check(self.max_staleness >= -1, "schedule.max_staleness", "-1 (unlimited) or an integer >= 0",
               self.max_staleness)
        _check(0 < self.wall_scale < math.inf, "schedule.wall_scale", "a finite number > 0", self.wall_scale)


# ``runtime.precision`` values (sim.accelerator maps each to an autocast dtype; listed here so that validating a
# config does not import torch).
PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class RuntimeConfig:
    device: str = _f("cpu", "torch device of the pooled workers' training/evaluation tasks: cpu, cuda or cuda:N "
                            "(cuda needs runtime.num_gpus > 0; the merge actor stays on the CPU)")
    workers: int = _f(2, "pooled torch worker processes")
    num_cpus: float = _f(1.0, "CPUs reserved per torch task")
    num_gpus: float = _f(0.0, "GPUs (fractional allowed) reserved per torch task")
    threads: int = _f(1, "torch intra-op threads per worker")
    precision: str = _f("fp32", "the frozen foundation's forward passes (training, evaluation, coefficient search, "
                                "distillation): fp32, or bf16 = bfloat16 autocast (mixed precision; LoRA parameters, "
                                "optimizer state and losses stay fp32)")
    clock: str = _f("virtual", "virtual (deterministic order) or wall (arrival order)")
    address: str | None = _f(None, "Ray address of an existing cluster; None = RAY_ADDRESS or a local Ray")
    eval_every: int = _f(0, "evaluate every k accepted commits (0 = only at the end)")
    eval_tasks: str = _f("seen", "the tasks each evaluation scores: seen (those of the commits accepted so far) or all "
                                 "(every task of the cohort, a task without a commit yet scored as it stands, so "
                                 "accuracy over time is on one fixed test set)")
    commit_cache: str | None = _f(None, "directory of a content-addressed commit cache shared by runs: a "
                                        "contribution trained before with the same training-relevant config is "
                                        "loaded from it instead of retrained (sweeps set it); None = off")
    feature_cache: str | None = _f(None, "directory where evaluations keep each adapter's features of each test "
                                         "split (content-addressed), so a run built from this one's log (a "
                                         "smaller nested community) reads them instead of recomputing them (the "
                                         "scaling study sets it); None = in memory only")
    institutions_per_actor: int = _f(0, "institutions hosted by one actor process, each with its own private data, "
                                        "key and state (Flower's virtual clients); 0 = chosen from the community "
                                        "size: ceil(institutions / 2), i.e. at most 2 actors")

    def __post_init__(self) -> None:
        _check(self.device == "cpu" or self.device.startswith("cuda"), "runtime.device", "cpu, cuda or cuda:N",
               self.device)
        _check(self.workers >= 1, "runtime.workers", "an integer >= 1", self.workers)
        _check(self.num_cpus >= 0, "runtime.num_cpus", "a number >= 0", self.num_cpus)
        _check(self.num_gpus >= 0, "runtime.num_gpus", "a number >= 0", self.num_gpus)
        _check(self.threads >= 1, "runtime.threads", "an integer >= 1", self.threads)
        # A pooled task that reserves no GPU gets CUDA_VISIBLE_DEVICES="" from Ray: torch would find no CUDA device.
        _check(self.device == "cpu" or self.num_gpus > 0, "runtime.num_gpus",
               "> 0 with runtime.device=cuda (e.g. 1, or 0.5 for two workers per GPU: Ray assigns a task a GPU only "
               "when it reserves one)", self.num_gpus)
        _choice("runtime.precision", self.precision, PRECISIONS)
        _choice("runtime.clock", self.clock, ("virtual", "wall"))
        _check(self.eval_every >= 0, "runtime.eval_every", "an integer >= 0", self.eval_every)
        _choice("runtime.eval_tasks", self.eval_tasks, ("seen", "all"))
        _check(self.institutions_per_actor >= 0, "runtime.institutions_per_actor", "an integer >= 0 (0 = automatic)",
               self.institutions_per_actor)


# Kinds of commit corruption ``faults.corrupt`` draws from; sim.faults.corrupt_commit makes each (listed here so
# that validating a config does not import torch).
CORRUPT_KINDS = ("nan", "inf", "shape", "fingerprint", "replay", "unknown_institution", "unsigned")


@dataclass(frozen=True)
class FaultsConfig:
    kill_institutions: float = _f(0.0, "probability that an institution actor is killed during a contribution "
                                       "(Ray restarts it; the merge actor has the contribution made again)")
    kill_delay: float = _f(0.5, "seconds after a contribution is handed to its institution at which the kill lands")
    kill_merge_actor_after: tuple[int, ...] = _f((), "accepted-commit counts after which the merge actor is killed "
                                                     "(right after logging that commit, before acknowledging it)")
    corrupt: float = _f(0.0, "probability that a contribution also sends a corrupted copy of its commit, of a kind "
                             "drawn from faults.corrupt_kinds (the merge actor must reject it and change nothing)")
    corrupt_kinds: tuple[str, ...] = _f(CORRUPT_KINDS, "kinds of corruption: " + ", ".join(CORRUPT_KINDS))
    slow: float = _f(0.0, "probability that a contribution's training task is slowed by faults.slow_s")
    slow_s: float = _f(1.0, "seconds a slowed task sleeps before it works")
    retries: int = _f(3, "times the merge actor has a contribution made again when it was lost (institution or "
                         "worker died) before rejecting it")

    def __post_init__(self) -> None:
        for name in ("kill_institutions", "corrupt", "slow"):
            value = getattr(self, name)
            _check(0 <= value <= 1, f"faults.{name}", "a probability in [0, 1]", value)
        _check(0 <= self.kill_delay < math.inf, "faults.kill_delay", "a finite number >= 0", self.kill_delay)
        _check(all(isinstance(n, int) and n >= 1 for n in self.kill_merge_actor_after)
               and len(set(self.kill_merge_actor_after)) == len(self.kill_merge_actor_after),
               "faults.kill_merge_actor_after", "a list of distinct integers >= 1", self.kill_merge_actor_after)
        _check(len(self.corrupt_kinds) > 0 and all(k in CORRUPT_KINDS for k in self.corrupt_kinds),
               "faults.corrupt_kinds", f"a non-empty list from {', '.join(CORRUPT_KINDS)}", self.corrupt_kinds)
        _check(0 <= self.slow_s < math.inf, "faults.slow_s", "a finite number >= 0", self.slow_s)
        _check(self.retries >= 0, "faults.retries", "an integer >= 0", self.retries)

    @property
    def any(self) -> bool:
        """Whether any fault is injected."""
        return bool(self.kill_institutions or self.kill_merge_actor_after or self.corrupt or self.slow)


# Kinds of attack ``attacks.kind`` chooses (sim.attacks makes each; listed here so that validating a config does not
# import torch). "none": every institution is honest.
ATTACK_KINDS = ("none", "scale", "sign_flip", "label_flip", "backdoor", "distill_mismatch", "free_rider")


@dataclass(frozen=True)
class AttacksConfig:
    kind: str = _f("none", "what the malicious institutions do: none, scale (ΔW × attacks.scale), sign_flip (−ΔW), "
                           "label_flip (train on permuted labels), backdoor (a trigger patch mapped to "
                           "attacks.target_class on attacks.poison_rate of the training images), distill_mismatch "
                           "(commit a distilled set of other data), free_rider (train nothing: resubmit another "
                           "institution's accepted adapter of the same task with attacks.noise)")
    share: float = _f(0.0, "share of the institutions that are malicious (round(share × N), drawn from the seed)")
    scale: float = _f(10.0, "scale: the factor a malicious update is multiplied by")
    start: int = _f(0, "merge position (accepted commits before it in the schedule) from which malicious "
                       "institutions attack; their earlier contributions are honest")
    poison_rate: float = _f(0.1, "backdoor: share of the training images stamped with the trigger and relabelled")
    target_class: int = _f(0, "backdoor: index of the class within each task that triggered images are sent to")
    trigger_size: int = _f(3, "backdoor: side in pixels of the white square stamped in the bottom-right corner")
    noise: float = _f(0.01, "free_rider: std of the Gaussian noise added to each LoRA factor of the copied adapter, "
                            "relative to that factor's RMS entry (0 = an exact copy)")

    def __post_init__(self) -> None:
        _choice("attacks.kind", self.kind, ATTACK_KINDS)
        _check(0 <= self.share <= 1, "attacks.share", "a share in [0, 1]", self.share)
        _check(math.isfinite(self.scale) and self.scale != 0, "attacks.scale", "a finite number != 0", self.scale)
        _check(isinstance(self.start, int) and self.start >= 0, "attacks.start", "an integer >= 0", self.start)
        _check(0 < self.poison_rate <= 1, "attacks.poison_rate", "a share in (0, 1]", self.poison_rate)
        _check(isinstance(self.target_class, int) and self.target_class >= 0, "attacks.target_class",
               "an integer >= 0", self.target_class)
        _check(isinstance(self.trigger_size, int) and self.trigger_size >= 1, "attacks.trigger_size",
               "an integer >= 1", self.trigger_size)
        _check(isinstance(self.noise, (int, float)) and math.isfinite(self.noise) and self.noise >= 0, "attacks.noise",
               "a finite number >= 0 (relative noise std)", self.noise)

    @property
    def any(self) -> bool:
        """Whether any institution attacks."""
        return self.kind != "none" and self.share > 0


# Checks ``gate.checks`` may list (sim.gate runs them); listed here so that validating a config does not import torch.
GATE_CHECKS = ("norm", "cosine", "duplicate", "fit", "regression")


@dataclass(frozen=True)
class GateConfig:
    checks: tuple[str, ...] = _f((), "checks a commit must pass before it merges (empty: no gate): norm (update norm "
                                     "vs the accepted ones), cosine (similarity to accepted commits of its task), "
                                     "duplicate (not a near copy of any accepted commit), fit "
                                     "(its adapter fits its own distilled set), regression (merged into main it does "
                                     "not lower the other tasks' distilled sets)")
    norm_z: float = _f(3.5, "norm: largest robust z-score of log ‖ΔW‖ (median, 1.4826 × MAD of the accepted "
                            "commits' log norms) let through")
    norm_spread: float = _f(0.25, "norm: smallest spread of the accepted log norms the z-score divides by (0.25: "
                                  "a norm 2.4× the median is z 3.5)")
    min_history: int = _f(3, "norm, cosine: accepted commits (of the task, for cosine) needed before the check "
                             "judges; with fewer, cosine passes and norm follows gate.cold_start")
    cold_start: str = _f("hold", "norm, while fewer than gate.min_history commits are accepted: hold (arriving "
                                 "commits wait, merged into nothing, until each can be judged against gate.min_history "
                                 "others, held or accepted; then they are taken on in arrival order) or pass (they "
                                 "pass the norm check unjudged)")
    min_cosine: float = _f(0.0, "cosine: smallest cosine similarity to the mean update of the task's accepted commits")
    max_cosine: float = _f(0.99, "duplicate: largest cosine similarity of the update to any accepted commit's (a "
                                 "copy with 1 % noise on its factors scores about 0.9999)")
    min_fit: float = _f(0.5, "fit: smallest accuracy of the commit's adapter on its own distilled set")
    max_drop: float = _f(0.1, "regression: largest accuracy drop on the other tasks' distilled sets (a distilled "
                              "set of 5 images per class and 3 classes moves in steps of 0.067)")
    min_gain: float = _f(-0.1, "regression: smallest accuracy change on the commit's own task's distilled sets (-0.1: "
                               "it may not lower them by more than 10 points)")
    strategy: str | None = _f(None, "regression: the branch the commit is merged into for the check (None: the first "
                                    "parameter-space entry of merge.strategies, else its first)")

    def __post_init__(self) -> None:
        _check(all(c in GATE_CHECKS for c in self.checks) and len(set(self.checks)) == len(self.checks),
               "gate.checks", f"a list of distinct names from {', '.join(GATE_CHECKS)}", self.checks)
        _check(self.norm_z > 0, "gate.norm_z", "a number > 0", self.norm_z)
        _check(self.norm_spread >= 0, "gate.norm_spread", "a number >= 0", self.norm_spread)
        _check(isinstance(self.min_history, int) and self.min_history >= 1, "gate.min_history", "an integer >= 1",
               self.min_history)
        _choice("gate.cold_start", self.cold_start, ("hold", "pass"))
        _check(-1 <= self.min_cosine <= 1, "gate.min_cosine", "a number in [-1, 1]", self.min_cosine)
        _check(-1 < self.max_cosine <= 1, "gate.max_cosine", "a number in (-1, 1]", self.max_cosine)
        _check(0 <= self.min_fit <= 1, "gate.min_fit", "an accuracy in [0, 1]", self.min_fit)
        _check(0 <= self.max_drop <= 1, "gate.max_drop", "an accuracy in [0, 1]", self.max_drop)
        _check(-1 <= self.min_gain <= 1, "gate.min_gain", "a number in [-1, 1]", self.min_gain)


@dataclass(frozen=True)
class SimConfig:
    seed: int = _f(0, "master seed: data, schedule, training and search derive their seeds from it")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    attacks: AttacksConfig = field(default_factory=AttacksConfig)
    gate: GateConfig = field(default_factory=GateConfig)

    def __post_init__(self) -> None:
        _check(isinstance(self.seed, int) and self.seed >= 0, "seed", "an integer >= 0", self.seed)
        self._follow_pretrained_input()
        _check(self.data.institutions >= self.data.task_count, "data.institutions",
               f"at least the number of tasks ({self.data.task_count})", self.data.institutions)
        self._check_protocol()
        _check(self.runtime.eval_tasks == "seen" or self.model.head == "prototype", "runtime.eval_tasks",
               "seen with model.head=linear (a task without a commit has no head to score it with)",
               self.runtime.eval_tasks)
        self.pull_branch  # noqa: B018 - raises here, at construction, if init_from=main has no branch to pull
        self.gate_branch  # noqa: B018 - the same for the gate's regression check

    def _check_protocol(self) -> None:
        """Synchronous rounds need the virtual clock (its driver holds a round's commits until the barrier) and no
        per-commit staleness: a round's commits all start from the same main, and the merge actor's staleness of
        each (the round's commits merged before it at the barrier, 0 … n - 1) only reflects its place in the
        barrier's institution order, so it may neither weight nor reject them."""
        if self.schedule.protocol != "sync_rounds":
            return
        _check(self.runtime.clock == "virtual", "runtime.clock", "virtual with schedule.protocol=sync_rounds (the "
               "barrier is the virtual clock's)", self.runtime.clock)
        _check(not self.schedule.staleness_weighting, "schedule.staleness_weighting", "false with "
               "schedule.protocol=sync_rounds (a round's commits all pulled the same main)",
               self.schedule.staleness_weighting)
        _check(self.schedule.max_staleness < 0, "schedule.max_staleness", "-1 with schedule.protocol=sync_rounds "
               "(a round's commits all pulled the same main; none is stale)", self.schedule.max_staleness)

    def _follow_pretrained_input(self) -> None:
        """With ``model.pretrained`` hub or FILE, images are what the model was pretrained on: ``data.img_size`` and
        ``data.interpolation`` are set from its pretrained config (timm's, read without loading any weights), with a
        warning when that changes a value. A researcher naming ``vit_base_patch16_224`` expects 224 px images, not an
        error about the 32 px default; the config that is saved with the run holds the values used."""
        if self.model.pretrained == "none":
            return
        from sim.pretrained import input_config  # imports timm; only for named pretrained models

        want = input_config(self.model.name)
        given = (self.data.img_size, self.data.interpolation)
        if given != (want.img_size, want.interpolation):
            warnings.warn(f"data.img_size {given[0]}, data.interpolation {given[1]} → {want.img_size}, "
                          f"{want.interpolation}: the pretrained input of model.name {self.model.name}", stacklevel=3)
            data = dataclasses.replace(self.data, img_size=want.img_size, interpolation=want.interpolation)
            object.__setattr__(self, "data", data)  # frozen: set once, during construction

    @property
    def gate_branch(self) -> str | None:
        """The branch the gate's regression check merges a commit into (``None`` without that check):
        ``gate.strategy``, or the first parameter-space entry of ``merge.strategies`` (the cheapest to score), else
        its first entry."""
        if "regression" not in self.gate.checks:
            return None
        from sim.merge.specs import SPECS  # the registry; imported here, see the note above _choice

        name = self.gate.strategy or next((s for s in self.merge.strategies if SPECS[s].space != "output"),
                                          self.merge.strategies[0])
        if name not in self.merge.strategies:
            raise ValueError(f"gate.strategy {name!r} is not one of merge.strategies ({', '.join(self.merge.strategies)})")
        return name

    @property
    def pull_branch(self) -> str | None:
        """The branch contributions pull with ``schedule.init_from: main`` (``None`` with ``init_from: base``).

        ``schedule.pull_strategy``, or the first entry of ``merge.strategies`` whose spec merges in parameter space
        (an output-space predictor such as the mixture has no weights to start training from).
        """
        if self.schedule.init_from != "main":
            return None
        from sim.merge.specs import SPECS  # the registry; imported here, see the note above _choice

        name = self.schedule.pull_strategy or next(
            (s for s in self.merge.strategies if SPECS[s].space != "output"), "")
        if not name or (name in SPECS and SPECS[name].space == "output"):
            raise ValueError("schedule.init_from=main needs a parameter-space strategy to pull (schedule.pull_strategy "
                             "or a non-mixture entry in merge.strategies)")
        if name not in self.merge.strategies:
            raise ValueError(f"schedule.pull_strategy {name!r} is not one of merge.strategies "
                             f"({', '.join(self.merge.strategies)})")
        return name

    def replace(self, **sections: Any) -> "SimConfig":
        return dataclasses.replace(self, **sections)


SECTIONS: dict[str, type] = {name: hint for name, hint in typing.get_type_hints(SimConfig).items() if name != "seed"}


# --------------------------------------------------------------------------------------------
# Coercion: YAML/JSON/CLI values → the declared field types, with errors naming the field
# --------------------------------------------------------------------------------------------
def _coerce(name: str, hint: Any, value: Any) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(name, inner[0], value)
    if origin is tuple:
        if value is None:              # a null list is an empty one (data_dir was `null` when it held one path)
            return ()
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name} must be a list, got {value!r}")
        return tuple(_coerce(f"{name}[{i}]", args[0], v) for i, v in enumerate(value))
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ValueError(f"{name} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            if isinstance(value, (int, str)):
                return int(value)
        except ValueError:
            pass
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, bool):
            raise ValueError(f"{name} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a number, got {value!r}") from None
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ValueError(f"{name} must be a string, got {value!r}")
    return value


# Fields a run dir written by an earlier version may hold, and why they are gone: reading such a run (replay,
# report, resume) drops them with a warning instead of refusing the run.
RETIRED_FIELDS = {"distill.audit_max_auc": "the audit flags on the membership attack's TPR at 1 % FPR "
                                           "(distill.audit_max_tpr) instead of the distance AUC"}


def _section_from_dict(cls: type, prefix: str, values: Any) -> Any:
    if not isinstance(values, dict):
        raise ValueError(f"{prefix} must be a mapping of fields, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for name in sorted(set(values) - known):
        if f"{prefix}.{name}" in RETIRED_FIELDS:
            warnings.warn(f"{prefix}.{name} is no longer a field and is ignored: {RETIRED_FIELDS[f'{prefix}.{name}']}")
            values = {k: v for k, v in values.items() if k != name}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{prefix}.{unknown[0]} is not a field; known fields: {', '.join(sorted(known))}")
    kwargs = {k: _coerce(f"{prefix}.{k}", hints[k], v) for k, v in values.items()}
    return cls(**kwargs)


def config_from_dict(d: dict[str, Any] | None) -> SimConfig:
    """Build a validated ``SimConfig`` from nested plain values (as loaded from YAML/JSON)."""
    d = dict(d or {})
    unknown = sorted(set(d) - set(SECTIONS) - {"seed"})
    if unknown:
        raise ValueError(f"{unknown[0]} is not a config section; known: seed, {', '.join(SECTIONS)}")
    kwargs: dict[str, Any] = {}
    if "seed" in d:
        kwargs["seed"] = _coerce("seed", int, d["seed"])
    for name, cls in SECTIONS.items():
        if name in d and d[name] is not None:
            kwargs[name] = _section_from_dict(cls, name, d[name])
    return SimConfig(**kwargs)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples become lists) suitable for YAML/JSON."""
    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        return v
    return plain(cfg)


def load_config(path: str | Path) -> SimConfig:
    """Load a YAML or JSON config file; errors name the file and the field."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    try:
        text = path.read_text()
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ValueError(f"config file {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: "
                         f"{str(exc).splitlines()[0]}") from None
    if raw is not None and not isinstance(raw, dict):
        raise ValueError(f"config file {path} must hold a mapping of sections")
    return config_from_dict(raw)


def apply_overrides(cfg: SimConfig, overrides: typing.Iterable[str]) -> SimConfig:
    """Apply ``section.field=value`` overrides (values parsed as YAML scalars/lists)."""
    d = config_to_dict(cfg)
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like section.field=value")
        value = yaml.safe_load(raw) if raw.strip() else None
        if key == "seed":
            d["seed"] = value
            continue
        section, dot, name = key.partition(".")
        if not dot or section not in SECTIONS:
            raise ValueError(f"override {item!r}: {key} is not section.field; sections: {', '.join(SECTIONS)}")
        d[section][name] = value
    return config_from_dict(d)


def config_hash(*parts: Any, length: int = 16) -> str:
    """Stable short hash of config sections (dataclasses or plain values), for cache keys."""
    import hashlib

    blob = json.dumps([config_to_dict(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]
