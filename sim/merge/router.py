"""Routed output-space predictors, space: output. ``router`` (FedKIM's gated mixture of experts) and ``task_route``
(LoRKD's task-selected experts): N frozen adapters whose per-image weights come from the input, not a constant w.

Both keep all N adapters (as ``sim.merge.mixture.Mixture`` does) and predict, for an image x of task t with classes C,

    q(x) = Σ_i r_i(x) p_i(x),    p_i = softmax of adapter i's logits on C, each adapter with its own head of t
                                (``member_heads``, as the Mixture), r(x) ∈ simplex over the N adapters,

where r reads h(x), the frozen foundation's own pooled feature of x (no adapter; ``Foundation.backbone`` on the
normalised image, the path ``mixture_proba`` feeds the adapters). Per batch only the adapters some image of it
routes to are run: the gate's forward pass plus at most N, as few as k (the point of a sparse gate).

``router`` — Wang et al., "FedKIM: Adaptive Federated Knowledge Injection into Medical Foundation Models", EMNLP
2024 (arXiv 2408.10276): a server-side M3OE module mixes LoRA experts with a learned gate. The gate here is that of
the sparsely-gated MoE (Shazeer et al., "Outrageously Large Neural Networks", ICLR 2017, G(x) = Softmax(KeepTopK(H(x),
k))) without its noise term and with a bias: ``r(x) = top_k_softmax(W h(x) + b)``, the softmax over the k largest
logits and 0 elsewhere. FedKIM's code is public (``XiaochenWang-PSU/FedKIM``, built on Octavius' LoRA-MoE): its
``Top2Gating`` (``FedKIM/src/model/Octavius/moe/layer.py``) takes the softmax over all experts and renormalises the
two largest, which equals the softmax over the two largest logits, and ``top2_gate`` is the only ``gate_mode`` its
``MoeLoraConfig`` accepts — hence k = 2. Its training config (``FedKIM/src/config/FedMEKI_train.yaml``) gives the
optimizer taken here: Adam(W) with betas (0.9, 0.95), eps 1e-6, weight decay 1e-4, gradient clipping 1, batch 16.
The gate is trained on the union of the distilled sets received: cross-entropy of q against the distilled labels,
each set scored on its own task's classes and weighing equally (the mean over sets of the per-set mean, as the
coefficient searches do), experts frozen, W and b only; the experts' probabilities do not change, so they are
computed once.

forgesim's own choices for ``router`` (not FedKIM's):

* experts are whole adapters mixed in *output* space (FedKIM mixes the experts' LoRA updates inside every layer);
* the gate reads the image feature h(x). FedKIM's deployed gate (``octavius.py``: ``CrossAttentionBasedGating``, with
  the ``Top2Gating`` line commented out) is a dense softmax over all 12 experts of a cross-attention between the
  modality and task-type prompts' token embeddings; forgesim's images carry no prompt;
* no noise and no load-balancing loss (deterministic); W, b start at zero (FedKIM: randn), so the untrained gate is
  uniform over adapters 0 … k-1: ties between logits go to the lowest index (a stable sort; ``torch.topk`` promises
  no order among equals). An expert outside the top k gets no gradient until a kept logit falls below its own;
* training standardises h with the union's per-dimension mean and sqrt(var + 1e-5) (BatchNorm's eps) and folds that
  back into W, b (``fold``), so the stored gate is still W h(x) + b. The tiny test foundation's features vary
  across images by about 1 % of their norm (not measured on the default one), which left a zero-initialised gate
  nearly untrained in 100 steps;
* learning rate ``GATE_LR`` = 1e-2 and ``GATE_STEPS`` = 100 (FedKIM: 5e-4, warmed up and decayed over 20 000 steps
  of an LLM-scale model);
* top_k = 1 is refused for training with N >= 2: a softmax over one logit is 1 whatever W is, so the gate gets no
  gradient (Shazeer et al. train with k >= 2 for this reason).

``task_route`` — Li et al., "Low-Rank Knowledge Decomposition for Medical Foundation Models", CVPR 2024
(arXiv 2404.17184): task-specific low-rank experts, the expert of a task selected by the task. LoRKD's code
(``MediaBrain-SJTU/LoRKD``, ``train_lora_shufflenet_medmnist.py``) is given the true task label at test time;
forgesim's merged predictor is not, so (forgesim's choice) a linear task classifier ``softmax(V h(x) + c)`` over the
tasks of the distilled sets, trained on those sets only (label = the set's task; each task weighing equally, each
of its sets equally; zero init; standardised features and the optimizer above), predicts each image's task
(argmax; ties to the first task in sorted order), and r(x) is uniform over the adapters of the predicted task (an
adapter's task: its ``meta["task"]``, else the task of the set it arrived with). No adapter of the predicted task
(impossible when every adapter's set has its task, guarded anyway): uniform over all N.

Mini-batches are drawn with replacement from a seeded ``torch.Generator`` with probability = each image's weight in
the objective (an unbiased estimate of it); a batch as large as the union is the union itself (the exact objective).
Training runs on CPU tensors of features and probabilities and is deterministic per seed.

Files: ``adapter_000/ …`` (peft adapter dirs), ``router.json`` (kind, top_k, tasks, adapter tasks, meta) and
``gate.safetensors`` (the gate or task classifier: ``weight``, ``bias``).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from sim.coefficients import ProxyData, prepare_proxy
from sim.data.base import DistilledSet
from sim.merge.base import Weights, check_compatible, common_base
from sim.merge.specs import ROUTER_BATCH, ROUTER_LR, ROUTER_STEPS, ROUTER_TOP_K
from sim.merge.mixture import (ProbabilityCache, adapter_features, adapter_probabilities, member_heads,
                               save_members)
from sim.model import Adapter, Foundation, load_adapter

KINDS = ("router", "task_route")
ROUTER_FILE = "router.json"
GATE_FILE = "gate.safetensors"

# The spec's published defaults (``sim.merge.specs``): FedKIM's (Octavius') Top2Gating k = 2; forgesim's bounded 100
# steps at learning rate 1e-2 (see the module doc); FedKIM FedMEKI_train.yaml's deepspeed train_batch_size 16
TOP_K, GATE_STEPS, GATE_LR, GATE_BATCH = ROUTER_TOP_K, ROUTER_STEPS, ROUTER_LR, ROUTER_BATCH
ADAM_BETAS = (0.9, 0.95)   # FedKIM FedMEKI_train.yaml: optimizer Adam, betas [0.9, 0.95]
ADAM_EPS = 1e-6            # FedKIM FedMEKI_train.yaml: eps 1e-6
WEIGHT_DECAY = 1e-4        # FedKIM FedMEKI_train.yaml: weight_decay 1e-4 (deepspeed's Adam decouples it: AdamW)
GRAD_CLIP = 1.0            # FedKIM FedMEKI_train.yaml: gradient_clipping 1
PROB_FLOOR = 1e-12         # -log q is taken of max(q, floor): a row every expert gives 0 would be +inf
FEATURE_EPS = 1e-5         # training standardises h with sqrt(var + eps): BatchNorm's default eps


# ------------------------------------------------------------------------------------------
# The predictor
# ------------------------------------------------------------------------------------------
@dataclass
class Router:
    """Output-level predictor: N adapters and a routing of each image over them (module doc).

    ``gate``: ``{"weight", "bias"}`` — for ``kind="router"`` the gate, (N, D) and (N,); for ``kind="task_route"``
    the task classifier, (T, D) and (T,) over ``tasks``. ``top_k``: the router's k (used as min(top_k, N));
    ``adapter_tasks``: the task of each adapter (task_route).
    """

    adapters: list[Adapter]
    gate: dict[str, torch.Tensor]
    kind: str = "router"
    top_k: int = TOP_K
    tasks: tuple[str, ...] = ()
    adapter_tasks: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.adapters = list(self.adapters)
        self.tasks, self.adapter_tasks = tuple(self.tasks), tuple(self.adapter_tasks)
        n = len(self.adapters)
        if n == 0:
            raise ValueError("a router needs at least one adapter")
        if self.kind not in KINDS:
            raise ValueError(f"router kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if set(self.gate) != {"weight", "bias"}:
            raise ValueError(f"router gate tensors must be 'weight' and 'bias', got {sorted(self.gate)}")
        w, b = (torch.as_tensor(self.gate[k]).detach().to("cpu", torch.float32).contiguous()
                for k in ("weight", "bias"))
        if w.ndim != 2 or b.shape != (w.shape[0],):
            raise ValueError(f"router gate weight {tuple(w.shape)} and bias {tuple(b.shape)} are not (R, D) and (R,)")
        if not (torch.isfinite(w).all() and torch.isfinite(b).all()):
            raise ValueError("router gate tensors must be finite")
        self.gate = {"weight": w, "bias": b}
        rows = n if self.kind == "router" else len(self.tasks)
        if w.shape[0] != rows:
            what = f"{n} adapters" if self.kind == "router" else f"{len(self.tasks)} tasks"
            raise ValueError(f"{self.kind} gate has {w.shape[0]} rows for {what}")
        if self.kind == "router" and (not isinstance(self.top_k, (int, np.integer)) or self.top_k < 1):
            raise ValueError(f"router top_k must be an integer >= 1, got {self.top_k!r}")
        if self.kind == "task_route":
            if len(set(self.tasks)) != len(self.tasks) or not self.tasks:
                raise ValueError(f"task_route needs distinct tasks, got {self.tasks}")
            if len(self.adapter_tasks) != n:
                raise ValueError(f"task_route needs one task per adapter, got {len(self.adapter_tasks)} for {n}")

    @property
    def base_fingerprint(self) -> str | None:
        return common_base(self.adapters)

    @property
    def dim(self) -> int:
        """Feature width D the gate reads."""
        return int(self.gate["weight"].shape[1])

    def check_base(self, foundation: Foundation) -> None:
        """Every adapter was trained on ``foundation`` and the gate reads features of its width."""
        for a in self.adapters:
            a.check_base(foundation)
        if self.dim != foundation.dim:
            raise ValueError(f"{self.kind} gate reads {self.dim}-wide features, the foundation gives {foundation.dim}")

    def num_bytes(self) -> int:
        """The adapters' bytes plus the gate's (or task classifier's)."""
        return sum(a.num_bytes() for a in self.adapters) + sum(t.numel() * t.element_size() for t in self.gate.values())

    def member_heads(self, task: str) -> list[dict[str, torch.Tensor] | None]:
        """The head each adapter scores ``task`` with (``sim.merge.mixture.member_heads``)."""
        return member_heads(self.adapters, task)


# ------------------------------------------------------------------------------------------
# Routing: features → (B, N) weights over the adapters
# ------------------------------------------------------------------------------------------
def top_k_gate(logits: torch.Tensor, k: int) -> torch.Tensor:
    """(B, N) gate logits → (B, N) weights: per row the softmax over its min(k, N) largest logits, 0 elsewhere.

    Ties go to the lowest index (a stable descending sort), so zero logits keep adapters 0 … k-1. Differentiable in
    the kept logits.
    """
    k = min(int(k), logits.shape[1])
    kept = torch.sort(logits, dim=1, descending=True, stable=True).indices[:, :k]                  # (B, k)
    mask = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, kept, True)
    return torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=1)


def task_weights(task_logits: torch.Tensor, tasks: Sequence[str], adapter_tasks: Sequence[str]) -> torch.Tensor:
    """(B, T) task logits → (B, N): uniform over the adapters of each row's argmax task (first on ties); uniform over
    all N where no adapter holds that task."""
    holders = torch.tensor([[float(a == t) for a in adapter_tasks] for t in tasks])                # (T, N)
    holders[holders.sum(dim=1) == 0] = 1.0
    holders = holders / holders.sum(dim=1, keepdim=True)
    return holders.to(task_logits.device)[task_logits.argmax(dim=1)]


def _gate_route(router: Router, logits: torch.Tensor) -> torch.Tensor:
    return top_k_gate(logits, router.top_k)


def _task_route(router: Router, logits: torch.Tensor) -> torch.Tensor:
    return task_weights(logits, router.tasks, router.adapter_tasks)


# kind → (router, (B, R) logits of its gate tensors) → (B, N) weights
_ROUTES: dict[str, Callable[[Router, torch.Tensor], torch.Tensor]] = {"router": _gate_route, "task_route": _task_route}


def route_features(router: Router, feats: torch.Tensor) -> torch.Tensor:
    """(B, D) foundation features h(x) → (B, N) weights over the router's adapters; rows sum to 1."""
    if feats.ndim != 2 or feats.shape[1] != router.dim:
        raise ValueError(f"{router.kind} gate reads (B, {router.dim}) features, got {tuple(feats.shape)}")
    w, b = (router.gate[k].to(feats.device) for k in ("weight", "bias"))
    return _ROUTES[router.kind](router, F.linear(feats.float(), w, b))                     # logits (B, N) or (B, T)


@torch.inference_mode()
def base_features(foundation: Foundation, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Pooled features (n, D) of the frozen foundation, no adapter, for *normalised* images ``x`` (n, 3, S, S)."""
    if len(x) == 0:
        return torch.zeros((0, foundation.dim), device=foundation.device)
    return torch.cat([foundation.embed(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)])


def _normalized(foundation: Foundation, x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 or float-in-[0, 1] images (numpy or torch) → the backbone's input scale (``Foundation.normalize``)."""
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    return foundation.normalize(t)


@torch.inference_mode()
def route_weights(foundation: Foundation, router: Router, x: np.ndarray | torch.Tensor,
                  batch_size: int = 256) -> torch.Tensor:
    """Per-image weights (n, N) over the router's adapters for images ``x`` (n, 3, S, S), uint8 or float in [0, 1]."""
    out = [route_features(router, base_features(foundation, _normalized(foundation, x[s:s + batch_size])))
           for s in range(0, len(x), batch_size)]
    return torch.cat(out) if out else torch.zeros((0, len(router.adapters)))


@torch.inference_mode()
def router_proba(foundation: Foundation, router: Router, x: np.ndarray, task: str, classes: Sequence[str],
                 batch_size: int = 256) -> np.ndarray:
    """Class probabilities (n, K) ``Σ_i r_i(x) p_i(x)`` for images ``x`` (n, 3, S, S), uint8 or float in [0, 1];
    each adapter scores ``task`` with its own head (``member_heads``), as ``mixture_proba`` does. Per batch only the
    adapters some image routes to are run."""
    router.check_base(foundation)
    heads = router.member_heads(task)
    out = []
    for start in range(0, len(x), batch_size):
        xb = _normalized(foundation, x[start:start + batch_size])
        r = route_features(router, base_features(foundation, xb))                               # (b, N)
        active = torch.nonzero(r.amax(dim=0) > 0).flatten().tolist()
        feats = adapter_features(foundation, [router.adapters[i] for i in active], xb)          # (n_active, b, D)
        probs = adapter_probabilities(foundation, feats, task, classes, [heads[i] for i in active])
        out.append(torch.einsum("bi,ibk->bk", r[:, active], probs))
    return torch.cat(out).cpu().numpy() if out else np.zeros((0, len(classes)), np.float32)


# ------------------------------------------------------------------------------------------
# Training on the distilled sets
# ------------------------------------------------------------------------------------------
def _check_training(steps: int, lr: float, batch_size: int) -> None:
    if not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ValueError(f"router steps must be an integer >= 0, got {steps!r}")
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"router lr must be a finite number > 0, got {lr!r}")
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"router batch_size must be an integer >= 1, got {batch_size!r}")


def _proxy(foundation: Foundation, sets: Sequence[DistilledSet] | ProxyData) -> ProxyData:
    data = sets if isinstance(sets, ProxyData) else prepare_proxy(foundation, list(sets))
    if data.x.shape[-1] != foundation.img_size:
        raise ValueError(f"proxy images are {data.x.shape[-1]} px; the foundation takes {foundation.img_size} px")
    return data


def set_weights(data: ProxyData) -> torch.Tensor:
    """(n,) weight of each proxy image in the objective: each set weighs 1 / (number of sets), shared by its images."""
    w = torch.zeros(len(data))
    for s in data.sets:
        w[s.start:s.stop] = 1.0 / (len(data.sets) * (s.stop - s.start))
    return w


def label_probabilities(foundation: Foundation, adapters: Sequence[Adapter], data: ProxyData,
                        cache: ProbabilityCache | None = None) -> torch.Tensor:
    """(n, N) probability expert i gives image j's distilled label, on the set's task classes with the expert's own
    head of it (``ProbabilityCache``: one batched pass per adapter; ``cache`` keeps them across calls, as a branch
    that fits its router again on every commit does)."""
    per_set = (cache or ProbabilityCache()).probabilities(foundation, adapters, data)            # [(N, n_s, K_s)]
    cols = [p[:, torch.arange(len(s.y)), s.y.to(p.device)] for p, s in zip(per_set, data.sets)]  # [(N, n_s)]
    return torch.cat(cols, dim=1).T.clone().cpu()                                                # (n, N)


def standardize(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(n, D) training features → (standardised features, mean (D,), scale (D,)): z = (h - mean) / scale with
    scale = sqrt(var + FEATURE_EPS) over the training images."""
    mean = feats.mean(dim=0)
    scale = (feats.var(dim=0, unbiased=False) + FEATURE_EPS).sqrt()
    return (feats - mean) / scale, mean, scale


def fold(weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor
         ) -> dict[str, torch.Tensor]:
    """A linear map of standardised features, V z + c, as one of raw features:
    (V / scale) h + (c - V (mean / scale))."""
    weight, bias = weight.detach(), bias.detach()
    return {"weight": (weight / scale).contiguous(), "bias": (bias - weight @ (mean / scale)).contiguous()}


def _fit(params: list[torch.Tensor], loss_at: Callable[[torch.Tensor | None], torch.Tensor], weights: torch.Tensor,
         *, steps: int, lr: float, batch_size: int, seed: int) -> tuple[float, float]:
    """AdamW on ``params`` for ``steps`` steps; ``loss_at(None)`` is the exact objective, ``loss_at(idx)`` the plain
    mean over a batch drawn ∝ ``weights``. Returns the exact objective before and after."""
    opt = torch.optim.AdamW(params, lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=WEIGHT_DECAY)
    g = torch.Generator().manual_seed(int(seed))
    full = batch_size >= len(weights)
    with torch.no_grad():
        before = float(loss_at(None))
    for _ in range(steps):
        idx = None if full else torch.multinomial(weights, batch_size, replacement=True, generator=g)
        loss = loss_at(idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        opt.step()
    with torch.no_grad():
        after = float(loss_at(None))
    return before, after


def _weighted(per_image: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    return (per_image * weights).sum() if idx is None else per_image.mean()


def train_gate(foundation: Foundation, adapters: Sequence[Adapter], sets: Sequence[DistilledSet] | ProxyData, *,
               top_k: int = TOP_K, steps: int = GATE_STEPS, lr: float = GATE_LR, batch_size: int = GATE_BATCH,
               seed: int = 0, cache: ProbabilityCache | None = None) -> Router:
    """FedKIM-style gate over frozen experts, trained on the union of the distilled sets (module doc).

    Args:
        foundation: the frozen foundation; h(x) is its own feature of x.
        adapters: the N frozen experts.
        sets: the distilled sets received (any number, any tasks), or their prepared ``ProxyData``.
        top_k: experts kept per image (min(top_k, N)); 1 is refused with N >= 2 (no gradient).
        steps, lr, batch_size, seed: AdamW steps on W, b; batches drawn by a ``torch.Generator`` seeded ``seed``.
        cache: the experts' probabilities on the sets, kept across calls (``ProbabilityCache``; the same numbers).
    Returns:
        ``Router`` of kind "router" with the gate {"weight": (N, D), "bias": (N,)}; ``meta`` holds the objective
        before and after training (``loss_before``, ``loss_after``) and the settings.
    """
    t0 = time.perf_counter()
    check_compatible(adapters, same_modules=False)
    _check_training(steps, lr, batch_size)
    n = len(adapters)
    if not isinstance(top_k, (int, np.integer)) or top_k < 1 or (top_k == 1 and n > 1):
        raise ValueError(f"router top_k must be an integer >= 2 (a softmax over one logit gives the gate no "
                         f"gradient), got {top_k!r}")
    data = _proxy(foundation, sets)
    feats, mean, scale = standardize(base_features(foundation, data.x).clone().cpu())                # (n_img, D)
    probs = label_probabilities(foundation, adapters, data, cache)                                 # (n_img, N)
    weights = set_weights(data)                                                                    # (n_img,)
    gate_w = torch.zeros(n, feats.shape[1], requires_grad=True)
    gate_b = torch.zeros(n, requires_grad=True)

    def loss_at(idx: torch.Tensor | None) -> torch.Tensor:
        f, p = (feats, probs) if idx is None else (feats[idx], probs[idx])
        q = (top_k_gate(F.linear(f, gate_w, gate_b), top_k) * p).sum(dim=1)                         # (b,)
        return _weighted(-torch.log(q.clamp_min(PROB_FLOOR)), weights, idx)

    before, after = _fit([gate_w, gate_b], loss_at, weights, steps=steps, lr=lr, batch_size=batch_size, seed=seed)
    meta = _meta("router", adapters, data, before, after, steps, lr, batch_size, seed, t0) | {"top_k": int(top_k)}
    return Router(list(adapters), fold(gate_w, gate_b, mean, scale), "router", int(top_k), meta=meta)


def adapter_task_list(adapters: Sequence[Adapter], sets: Sequence[DistilledSet]) -> tuple[str, ...]:
    """Each adapter's task: its ``meta["task"]``, else the task of the distilled set it arrived with."""
    if len(sets) != len(adapters):
        raise ValueError(f"task_route needs one distilled set per adapter (the set each arrived with), in the "
                         f"adapters' order; got {len(sets)} sets for {len(adapters)} adapters")
    return tuple(str(a.meta.get("task") or ds.task) for a, ds in zip(adapters, sets))


def train_task_router(foundation: Foundation, adapters: Sequence[Adapter], sets: Sequence[DistilledSet], *,
                      steps: int = GATE_STEPS, lr: float = GATE_LR, batch_size: int = GATE_BATCH,
                      seed: int = 0) -> Router:
    """LoRKD-style task routing: a linear task classifier on h(x), trained on the distilled sets (module doc).

    Args:
        foundation: the frozen foundation; h(x) is its own feature of x.
        adapters: the N frozen experts.
        sets: one distilled set per adapter, in the same order (the set each arrived with); the classifier's
            tasks are the sets' tasks (sorted), an adapter without ``meta["task"]`` takes its set's task.
        steps, lr, batch_size, seed: AdamW steps on the classifier; batches drawn by a seeded ``torch.Generator``.
    Returns:
        ``Router`` of kind "task_route": the classifier {"weight": (T, D), "bias": (T,)}, ``tasks``,
        ``adapter_tasks``; ``meta`` holds the classifier's cross-entropy before and after training.
    """
    t0 = time.perf_counter()
    check_compatible(adapters, same_modules=False)
    _check_training(steps, lr, batch_size)
    if isinstance(sets, ProxyData):
        raise ValueError("task_route needs the distilled sets themselves, one per adapter; a prepared ProxyData "
                         "cannot say which set arrived with which adapter")
    adapter_tasks = adapter_task_list(adapters, sets)
    data = _proxy(foundation, sets)
    tasks = tuple(sorted({s.task for s in data.sets}))
    labels = torch.cat([torch.full((s.stop - s.start,), tasks.index(s.task)) for s in data.sets])  # (n_img,)
    weights = torch.zeros(len(data))                    # each task 1/T, shared equally by its sets, then its images
    for s in data.sets:
        n_sets = sum(o.task == s.task for o in data.sets)
        weights[s.start:s.stop] = 1.0 / (len(tasks) * n_sets * (s.stop - s.start))
    feats, mean, scale = standardize(base_features(foundation, data.x).clone().cpu())                # (n_img, D)
    cls_w = torch.zeros(len(tasks), feats.shape[1], requires_grad=True)
    cls_b = torch.zeros(len(tasks), requires_grad=True)

    def loss_at(idx: torch.Tensor | None) -> torch.Tensor:
        f, y = (feats, labels) if idx is None else (feats[idx], labels[idx])
        return _weighted(F.cross_entropy(F.linear(f, cls_w, cls_b), y, reduction="none"), weights, idx)

    before, after = _fit([cls_w, cls_b], loss_at, weights, steps=steps, lr=lr, batch_size=batch_size, seed=seed)
    meta = _meta("task_route", adapters, data, before, after, steps, lr, batch_size, seed, t0)
    return Router(list(adapters), fold(cls_w, cls_b, mean, scale), "task_route",
                  tasks=tasks, adapter_tasks=adapter_tasks, meta=meta)


def _meta(kind: str, adapters: Sequence[Adapter], data: ProxyData, before: float, after: float, steps: int,
          lr: float, batch_size: int, seed: int, t0: float) -> dict[str, Any]:
    return {"merge_strategy": kind, "n_contributors": len(adapters), "n_sets": len(data.sets), "n_images": len(data),
            "loss_before": before, "loss_after": after, "steps": int(steps), "lr": float(lr),
            "batch_size": int(batch_size), "seed": int(seed), "train_s": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------------
# Strategy-style entry points
# ------------------------------------------------------------------------------------------
def _no_weights(weights: Weights, name: str) -> None:
    if weights is not None:
        raise ValueError(f"{name} takes no weights: its weights over the adapters are per image, from its trained "
                         f"{'gate' if name == 'router' else 'task classifier'} (got {np.asarray(weights).tolist()})")


def _sets(proxy: Any) -> Sequence[DistilledSet] | ProxyData:
    """A list of distilled sets, an ``ArrivedProxy`` (its ``sets``, one per adapter) or prepared ``ProxyData``."""
    if proxy is None:
        raise ValueError("a router is trained on the distilled sets: pass proxy=[one set per adapter]")
    return proxy if isinstance(proxy, ProxyData) else list(getattr(proxy, "sets", proxy))


def fit_router(adapters: Sequence[Adapter], weights: Weights = None, *, foundation: Foundation, proxy: Any,
               top_k: int | None = None, steps: int | None = None, lr: float | None = None,
               batch_size: int | None = None, seed: int = 0, cache: ProbabilityCache | None = None) -> Router:
    """``router`` as a strategy: ``train_gate`` on the distilled sets ``proxy`` (``None`` options: the defaults above).
    ``weights`` must be ``None``: the router's weights are per image (an error otherwise)."""
    _no_weights(weights, "router")
    return train_gate(foundation, adapters, _sets(proxy), top_k=TOP_K if top_k is None else top_k,
                      steps=GATE_STEPS if steps is None else steps, lr=GATE_LR if lr is None else lr,
                      batch_size=GATE_BATCH if batch_size is None else batch_size, seed=seed, cache=cache)


def fit_task_route(adapters: Sequence[Adapter], weights: Weights = None, *, foundation: Foundation, proxy: Any,
                   steps: int | None = None, lr: float | None = None, batch_size: int | None = None,
                   seed: int = 0, cache: ProbabilityCache | None = None) -> Router:
    """``task_route`` as a strategy: ``train_task_router`` on one distilled set per adapter, in order (``proxy``).
    ``weights`` must be ``None`` (an error otherwise); ``cache`` is accepted for a uniform call and not needed (the
    task classifier reads only the foundation's features)."""
    _no_weights(weights, "task_route")
    return train_task_router(foundation, adapters, _sets(proxy), steps=GATE_STEPS if steps is None else steps,
                             lr=GATE_LR if lr is None else lr,
                             batch_size=GATE_BATCH if batch_size is None else batch_size, seed=seed)


# ------------------------------------------------------------------------------------------
# Files: a dir of adapters plus router.json and gate.safetensors
# ------------------------------------------------------------------------------------------
def save_router(router: Router, out_dir: str | Path) -> Path:
    """Write ``adapter_000/ … adapter_{N-1}/`` (peft adapter dirs), ``gate.safetensors`` and ``router.json``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = save_members(router.adapters, out)
    save_file({k: v.contiguous() for k, v in router.gate.items()}, str(out / GATE_FILE), metadata={"format": "pt"})
    doc = {"format": "forgesim-router", "kind": router.kind, "adapters": names, "top_k": int(router.top_k),
           "tasks": list(router.tasks), "adapter_tasks": list(router.adapter_tasks),
           "base_fingerprint": router.base_fingerprint, "meta": router.meta}
    (out / ROUTER_FILE).write_text(json.dumps(doc, indent=2, default=str))
    return out


def load_router(path: str | Path) -> Router:
    """Read a dir written by ``save_router``; a missing or corrupt file is a ``ValueError`` naming it."""
    from safetensors.torch import load_file

    path = Path(path)
    doc_file, gate_file = path / ROUTER_FILE, path / GATE_FILE
    try:
        doc = json.loads(doc_file.read_text())
        if doc.get("format") != "forgesim-router":
            raise ValueError(f"format is {doc.get('format')!r}, not 'forgesim-router'")
        kind, names, top_k = doc["kind"], list(doc["adapters"]), int(doc["top_k"])
        tasks, adapter_tasks = tuple(doc.get("tasks") or ()), tuple(doc.get("adapter_tasks") or ())
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{doc_file}: not a readable router file ({exc})") from None
    try:
        gate = load_file(str(gate_file))
    except Exception as exc:  # noqa: BLE001 - any unreadable file is one clear error
        raise ValueError(f"{gate_file}: not a readable router gate ({exc})") from None
    adapters = [load_adapter(path / n) for n in names]
    try:
        return Router(adapters, gate, kind, top_k, tasks, adapter_tasks, doc.get("meta") or {})
    except ValueError as exc:
        raise ValueError(f"{doc_file} and {gate_file} do not form a router: {exc}") from None
