"""Data-aware merges: contributors weighted by statistics of their own **distilled sets**.

* ``regmean`` — RegMean, Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models", ICLR 2023
  (arXiv 2212.09849), space ΔW: per linear layer, the weights that best reproduce every contributor's outputs on its
  own inputs, a least-squares problem with the closed form ``W* = (Σ G_i)⁻¹ Σ G_i W_i`` (x W convention), ``G_i``
  the Gram matrix of the layer's inputs in model i. Statistics: ``layer_grams``.
* ``fisher`` — Fisher merging, Matena & Raffel, "Merging Models with Fisher-Weighted Averaging", NeurIPS 2022
  (arXiv 2111.09832), space factors: per parameter, ``θ* = Σ w_i F_i θ_i / Σ w_i F_i`` with ``F_i`` the diagonal
  Fisher of model i. Here the parameters are the LoRA factors A and B themselves. Statistics: ``lora_fisher``.

The definitions and defaults are FusionBench's (``tanganke/fusion_bench``): ``fusion_bench/method/regmean/
regmean.py`` (``reduce_non_diagonal_elements``, ``merging_with_regmean_weights``), ``fusion_bench/method/regmean/
clip_regmean.py`` (the Gram hooks) and ``config/method/regmean/clip_regmean.yaml`` (``reduce_non_diagonal_ratio:
0.95``, the CLIP-ViT config; the architecture-less ``regmean.yaml`` says 0.1, GPT-2's 0.6); ``fusion_bench/method/
fisher_merging/fisher_merging.py`` (``merging_with_fisher_weights``), ``clip_fisher_merging.py`` and
``config/method/fisher_merging/clip_fisher_merging.yaml`` (``normalize_fisher_weight: true``,
``minimal_fisher_weight: 1e-6``). Where forgesim differs, the function's docstring says so; in short:

* The merge actor never sees raw data: every statistic comes from the contributor's distilled set, all of it
  (FusionBench draws ``num_regmean_examples`` / ``num_fisher_examples`` = 256 shuffled training examples; a distilled
  set is already the small sample, and a prefix of one sorted by class would drop classes).
* Only LoRA-adapted linear layers are merged by the data: every other weight is the frozen foundation's in every
  contributor, where RegMean and Fisher merging both give it back unchanged. Linear heads are averaged per task
  (``base.merge_heads``, as every parameter-space strategy here does; FusionBench's RegMean also takes the plain mean
  of every parameter it does not regress, its Fisher merging would weigh a head by its Fisher).
* Everything is deterministic (no sampling, no shuffling).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Mapping, Sequence, Union

import torch
import torch.nn.functional as F

from sim.data.base import DistilledSet
from sim.merge.base import Weights, build_adapter, check_compatible, dense_factors, resolve_weights
from sim.merge.specs import FISHER_FLOOR, REGMEAN_ALPHA
from sim.model import PEFT_PREFIX, Adapter, Foundation, logits_from_features

FISHER_TARGETS = ("predicted", "label")
JACOBIAN_FLOATS = 1 << 24  # per-example Jacobian entries held at once by ``lora_fisher`` (64 MiB of float32)


# ------------------------------------------------------------------------------------------
# Statistics of a contributor's distilled set
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerGrams:
    """Input Gram matrices of one contributor's adapted layers, as FusionBench's RegMean hooks keep them.

    ``grams[module]``: (in, in) float64, ``Xᵀ X / n`` over the ``n = tokens[module]`` token rows X (n, in) that reached
    the layer's input (the mean of x xᵀ); ``images``: how many distilled images were run.
    """

    grams: dict[str, torch.Tensor]
    tokens: dict[str, int]
    images: int


def _images(foundation: Foundation, distilled: DistilledSet) -> torch.Tensor:
    """The distilled images (n, 3, S, S) in [0, 1], checked against the foundation's input size."""
    if len(distilled) == 0:
        raise ValueError(f"distilled set of task {distilled.task!r} is empty; data-aware merges need its images")
    if distilled.x.shape[-1] != foundation.img_size or distilled.x.shape[-2] != foundation.img_size:
        raise ValueError(f"distilled set of task {distilled.task!r} has {distilled.x.shape[-1]} px images; "
                         f"the foundation takes {foundation.img_size} px")
    return torch.from_numpy(distilled.x)


def layer_grams(foundation: Foundation, adapter: Adapter, distilled: DistilledSet, *,
                batch_size: int = 256) -> LayerGrams:
    """RegMean's statistics: the input Gram matrix of every module ``adapter`` adapts, on ``distilled``.

    As FusionBench's ``RegMeanAlgorithmForCLIP.get_regmean_weights`` (``fusion_bench/method/regmean/
    clip_regmean.py``): a forward hook on each linear layer of the *fine-tuned* model — here the foundation with this
    contributor's ΔW merged in (``Foundation.merged_weights``), so a later block sees the inputs its contributor's
    earlier blocks produce — flattens the layer input (B, T, in) to (B·T, in) token rows and keeps the running mean
    of x xᵀ over all tokens. Images are normalised as ``Foundation.features`` does. Sums are taken in float64.

    Args:
        foundation: the frozen foundation the adapter was trained on.
        adapter: the contributor's adapter (its modules are the layers hooked).
        distilled: the contributor's distilled set (all its images are used).
        batch_size: images per forward pass (does not change the result beyond round-off).
    Returns:
        ``LayerGrams``: per module the (in, in) mean Gram on the CPU and its token count; the image count.
    """
    x = _images(foundation, distilled)
    weights = foundation.merged_weights(adapter)                  # checks the base fingerprint
    modules = adapter.modules()
    sums = {m: torch.zeros(foundation.weight(m).shape[1], foundation.weight(m).shape[1], dtype=torch.float64,
                           device=foundation.device) for m in modules}
    tokens = dict.fromkeys(modules, 0)

    def hook_for(module: str):
        def hook(layer: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            rows = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()    # (B·T, in)
            sums[module].add_(rows.T @ rows)
            tokens[module] += rows.shape[0]
        return hook

    # Hooks on the shared backbone are removed before returning, whatever happens in between.
    handles = [foundation.backbone.get_submodule(m).register_forward_hook(hook_for(m)) for m in modules]
    try:
        with torch.inference_mode():
            for start in range(0, len(x), batch_size):
                foundation.features(x[start:start + batch_size], weights)
    finally:
        for handle in handles:
            handle.remove()
    return LayerGrams({m: (sums[m] / tokens[m]).cpu() for m in modules}, tokens, len(x))


def lora_fisher(foundation: Foundation, adapter: Adapter, distilled: DistilledSet, *, target: str = "predicted",
                batch_size: int = 32) -> dict[str, torch.Tensor]:
    """Fisher merging's statistics: the diagonal Fisher of every LoRA factor entry of ``adapter`` on ``distilled``.

    ``F = (1/n) Σ_x Σ_c p(c | x) (∂ log p(c | x) / ∂θ)²`` over the n distilled images x and the classes c of the
    set's task, θ every entry of every ``lora_A`` / ``lora_B`` (peft's parameters; ΔW = s B A): the exact expectation
    over the model's own predictive distribution, per example, as Matena & Raffel define it and compute it
    (``mmatena/model_merging``, ``model_merging/fisher.py``, ``_compute_exact_fisher_for_batch``). FusionBench
    (``fusion_bench/method/fisher_merging/clip_fisher_merging.py``) also weighs the classes by the model's own
    probabilities (not the labels), but squares the gradient of the *batch sum* of ``√p_c log p_c``, which adds cross
    terms between examples and classes and depends on the batch size; forgesim takes per-example squared gradients.
    ``target="label"`` gives the empirical Fisher instead, ``(1/n) Σ_x (∂ log p(y | x) / ∂θ)²`` with the distilled
    label y.

    The logits are the project's: ``Foundation.features`` with the adapter's ΔW merged in (``merged_weights`` of the
    factors being differentiated) and ``Foundation.logits``' head: the adapter's linear head of the set's task
    (``Adapter.head_for``; the prototype head without linear heads). Per-example gradients are taken at once with
    ``torch.func`` (``vmap`` over examples of ``jacrev``), ``batch_size`` examples at a time, fewer if their
    Jacobians (examples × classes × LoRA entries) would exceed ``JACOBIAN_FLOATS``.

    Returns:
        ``{peft key: F}`` for every key of ``adapter.weights``, float32 on the CPU, shaped like the factor.
    """
    if target not in FISHER_TARGETS:
        raise ValueError(f"fisher target must be one of {', '.join(FISHER_TARGETS)}, got {target!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    x = _images(foundation, distilled)
    adapter.check_base(foundation)
    y = torch.from_numpy(distilled.y.astype("int64")).to(foundation.device)
    head = adapter.head_for(distilled.task)
    params = {k: v.detach().float().to(foundation.device) for k, v in adapter.weights.items()}
    # the prototype rows are taken once, outside vmap: seeded ones come from a generator, which vmap refuses
    protos = foundation.prototypes(distilled.task, distilled.classes) if head is None else None

    def log_probs(p: dict[str, torch.Tensor], image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        candidate = Adapter(p, adapter.alpha, adapter.base_fingerprint, adapter.alpha_pattern)
        feats = foundation.features(image[None], foundation.merged_weights(candidate))              # (1, D)
        logp = torch.log_softmax(logits_from_features(feats, distilled.task, distilled.classes,
                                                      foundation.cfg.tau, head, protos), dim=1)[0]   # (K,)
        return logp, logp.detach()

    per_example = torch.func.vmap(torch.func.jacrev(log_probs, has_aux=True), in_dims=(None, 0))
    n_classes, n_entries = len(distilled.classes), sum(t.numel() for t in params.values())
    step = max(1, min(batch_size, JACOBIAN_FLOATS // (n_classes * n_entries)))
    sums = {k: torch.zeros(v.shape, dtype=torch.float64, device=foundation.device) for k, v in params.items()}
    with warnings.catch_warnings():
        # torch.func has no batching rule for the CPU flash-attention backward and loops over it (same numbers)
        warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented")
        for start in range(0, len(x), step):
            jac, logp = per_example(params, x[start:start + step])           # {key: (b, K, *shape)}, (b, K)
            if target == "predicted":
                weight = logp.double().exp()                                   # (b, K): p(c | x)
            else:
                weight = F.one_hot(y[start:start + step], n_classes).double()  # (b, K): the label only
            for key, j in jac.items():
                sums[key] += torch.einsum("bk,bk...->...", weight, j.double().square())
    return {k: (s / len(x)).float().cpu() for k, s in sums.items()}


# ------------------------------------------------------------------------------------------
# RegMean
# ------------------------------------------------------------------------------------------
Grams = Union[LayerGrams, Mapping[str, torch.Tensor]]


def reduce_off_diagonal(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha · G + (1 - alpha) · diag(G)``: off-diagonal entries scaled by ``alpha``, the diagonal kept.

    FusionBench's ``reduce_non_diagonal_elements`` (``fusion_bench/method/regmean/regmean.py``); Jin et al.'s α, which
    pulls the merge towards a per-feature weighted average: alpha = 1 is the plain least-squares solution, alpha = 0
    keeps only each input feature's second moment."""
    return alpha * gram + (1.0 - alpha) * torch.diag_embed(torch.diagonal(gram))


def _gram_table(grams: Sequence[Grams], adapters: Sequence[Adapter]) -> list[Mapping[str, torch.Tensor]]:
    """The contributors' Gram mappings, checked: one per adapter, one (in, in) finite matrix per module."""
    if len(grams) != len(adapters):
        raise ValueError(f"regmean needs one set of Gram matrices per adapter: got {len(grams)} for "
                         f"{len(adapters)} adapters")
    table = [g.grams if isinstance(g, LayerGrams) else g for g in grams]
    for i, (g, a) in enumerate(zip(table, adapters)):
        for m in a.modules():
            if m not in g:
                raise ValueError(f"grams[{i}] has no Gram matrix for module {m} (layer_grams of adapter {i} on its "
                                 f"distilled set gives one per adapted module)")
            in_f = a.factors(m)[0].shape[1]
            if tuple(g[m].shape) != (in_f, in_f):
                raise ValueError(f"grams[{i}][{m!r}] has shape {tuple(g[m].shape)}; the module's input Gram is "
                                 f"({in_f}, {in_f})")
            if not torch.isfinite(g[m]).all():
                raise ValueError(f"grams[{i}][{m!r}] holds NaN or Inf")
    return table


def _nonnegative(w: torch.Tensor, strategy: str) -> torch.Tensor:
    """``w`` (N, M) if every weight is >= 0 and each module has a positive one (they weigh statistics)."""
    if (w < 0).any():
        raise ValueError(f"{strategy} weights scale each contributor's statistics and must be >= 0, "
                         f"got {w.min().item():g}")
    if (w.sum(0) <= 0).any():
        raise ValueError(f"{strategy} weights are all zero for a module; at least one contributor must count")
    return w


def _precision(tensors) -> float:
    """Machine epsilon of the least precise of ``tensors`` (float64 for integer ones)."""
    return max(torch.finfo(t.dtype if t.is_floating_point() else torch.float64).eps for t in tensors)


def pinv_psd(matrix: torch.Tensor, eps: float) -> torch.Tensor:
    """Pseudo-inverse of a symmetric positive semi-definite float64 matrix (n, n) from its eigendecomposition.

    Eigenvalues at or below ``λ_max · n · eps`` (numpy ``matrix_rank``'s tolerance, ``eps`` of the statistics' own
    precision) count as zero. On a well-conditioned matrix this is the inverse to round-off."""
    lam, vec = torch.linalg.eigh(matrix)                                   # ascending
    tol = float(lam[-1].clamp_min(0)) * matrix.shape[0] * eps
    keep = lam > tol
    return (vec[:, keep] / lam[keep]) @ vec[:, keep].T


def regmean(adapters: Sequence[Adapter], weights: Weights = None, *, grams: Sequence[Grams],
            alpha: float | None = None) -> Adapter:
    """RegMean (Jin et al., ICLR 2023), space ΔW: per module the least-squares merge of the contributors' layers.

    For a linear layer ``y = x Wᵀ`` (W (out, in)) and contributor i's token inputs X_i (n_i, in), RegMean minimises
    ``Σ_i ‖X_i Wᵀ - X_i W_iᵀ‖²``; with ``G̃_i = w_i · reduce_off_diagonal(G_i, alpha)`` the solution is
    ``Wᵀ = (Σ G̃_i)⁻¹ Σ G̃_i W_iᵀ`` (FusionBench's ``merging_with_regmean_weights``, ``weight_transpose=True``). Every
    contributor shares the frozen W_0 (W_i = W_0 + ΔW_i) and ``(Σ G̃)⁻¹ Σ G̃_i W_0ᵀ = W_0ᵀ``, so the merge is
    computed on the updates alone: ``ΔW* = (Σ_i ΔW_i G̃_i) (Σ_i G̃_i)⁻¹`` (out, in), with ``ΔW_i = s_i B_i A_i``.

    Args:
        adapters: N adapters with the same modules and shapes (ranks may differ).
        weights: (N,) or (N, M), >= 0; contributor i's Gram of module j is multiplied by ``w[i, j]`` (FusionBench has
            no weights, i.e. all equal; the merge does not change when every weight is scaled alike). Default 1/N.
            FusionBench's G_i are means over tokens (``layer_grams``), so every contributor counts alike whatever its
            set's size; ``weights = [g.tokens[m] …]`` restores the paper's unnormalised sums ``X_iᵀ X_i``.
        grams: one per adapter, in the same order: ``LayerGrams`` (``layer_grams`` of that adapter on its own
            distilled set) or a mapping module → (in, in) Gram.
        alpha: scale of the Grams' off-diagonal entries (Jin et al.'s α, FusionBench's ``reduce_non_diagonal_ratio``),
            in [0, 1]; default 0.95, FusionBench's ``clip_regmean.yaml`` (``None`` also means it).
    Returns:
        One adapter, scaling 1, each module at the numerical rank of its merged ΔW (at most Σ r_i), factored exactly
        by ``base.dense_factors``.

    Where forgesim differs from FusionBench: ``(Σ G̃_i)`` is inverted as a pseudo-inverse (``pinv_psd``; FusionBench
    calls ``torch.inverse``), identical when the sum is invertible. It is singular when alpha = 1 and the distilled
    sets' tokens do not span a layer's input space (fewer tokens than inputs, or a dead feature); the result is then
    the least-squares solution of smallest ‖ΔW‖: the merge keeps W_0 in input directions no contributor's data
    reached. So with one contributor the merge gives back its ΔW exactly whenever its G̃ is invertible, for every
    alpha (alpha cancels: G̃⁻¹ G̃ ΔWᵀ = ΔWᵀ); alpha < 1 makes G̃ invertible as soon as every input feature is non-zero
    somewhere (its diagonal is then positive), while with alpha = 1 and a singular G it gives ΔW restricted to the
    span of the set's inputs.
    """
    alpha = REGMEAN_ALPHA if alpha is None else float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"regmean alpha (the off-diagonal scale of the Gram matrices) must be in [0, 1], "
                         f"got {alpha!r}")
    check_compatible(adapters)
    table = _gram_table(grams, adapters)
    modules = adapters[0].modules()
    w = _nonnegative(resolve_weights(weights, len(adapters), len(modules), None), "regmean").double()
    factors = {}
    for j, m in enumerate(modules):
        in_f = adapters[0].factors(m)[0].shape[1]
        gram_sum = torch.zeros(in_f, in_f, dtype=torch.float64)
        b_cat, ag = [], []                          # ΔW* = [s_i B_i]_i · [A_i G̃_i]_i (Σ G̃)⁺, never dense before it must be
        for i, (a, g) in enumerate(zip(adapters, table)):
            g_i = g[m].detach().to("cpu", torch.float64)                          # (in, in)
            a_i, b_i = a.factors(m)
            gram_sum.add_(g_i, alpha=float(w[i, j]))          # the off-diagonal scaling is linear: applied to the sum
            b_cat.append(b_i.double() * a.scaling(m))                            # (out, r)
            # A_i G̃_i = w (α A_i G_i + (1 − α) A_i diag(G_i)), without forming G̃_i
            a64 = a_i.double()
            ag.append(float(w[i, j]) * (alpha * (a64 @ g_i) + (1.0 - alpha) * a64 * torch.diagonal(g_i)))
        gram_sum = reduce_off_diagonal(gram_sum, alpha)
        right = torch.cat(ag) @ pinv_psd(gram_sum, _precision(t[m] for t in table))   # (R, in); G̃ symmetric
        factors[m] = _low_rank_factors(torch.cat(b_cat, dim=1), right)
    return build_adapter(factors, adapters, "regmean")


def _low_rank_factors(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(A, B, 1.0)`` of ΔW = b @ a (b (out, R), a (R, in), float64) at ΔW's numerical rank: with R < min(out, in)
    from the thin SVD of the factors (``subspace.factored_svd``: A = Vᵀ, B = U S, what ``base.dense_factors`` gives
    from the dense ΔW), else ``dense_factors`` of the product (float32, as every ΔW-space merge stores it)."""
    from sim.merge.subspace import factored_svd

    if b.shape[1] < min(b.shape[0], a.shape[1]):
        u, s, v = factored_svd(b, a)
        if s.numel() == 0:
            return torch.zeros(1, a.shape[1]), torch.zeros(b.shape[0], 1), 1.0
        return v.T.float().contiguous(), (u * s).float().contiguous(), 1.0
    a_new, b_new = dense_factors(b.float() @ a.float())
    return a_new, b_new, 1.0


# ------------------------------------------------------------------------------------------
# Fisher merging
# ------------------------------------------------------------------------------------------
def _fisher_table(fishers: Sequence[Mapping[str, torch.Tensor]], adapters: Sequence[Adapter]
                  ) -> list[Mapping[str, torch.Tensor]]:
    """The contributors' Fishers, checked: one per adapter, one finite, non-negative tensor per factor key."""
    if len(fishers) != len(adapters):
        raise ValueError(f"fisher needs one Fisher per adapter: got {len(fishers)} for {len(adapters)} adapters")
    for i, (f, a) in enumerate(zip(fishers, adapters)):
        for key, value in a.weights.items():
            if key not in f:
                raise ValueError(f"fishers[{i}] has no entry for {key} (lora_fisher of adapter {i} on its distilled "
                                 f"set gives one per LoRA factor)")
            if tuple(f[key].shape) != tuple(value.shape):
                raise ValueError(f"fishers[{i}][{key!r}] has shape {tuple(f[key].shape)}; the factor is "
                                 f"{tuple(value.shape)}")
            if not torch.isfinite(f[key]).all() or (f[key] < 0).any():
                raise ValueError(f"fishers[{i}][{key!r}] must be finite and >= 0 (a diagonal Fisher)")
    return list(fishers)


def fisher_norms(fishers: Sequence[Mapping[str, torch.Tensor]], adapters: Sequence[Adapter]) -> torch.Tensor:
    """(N,) float64: the L2 norm of each contributor's Fisher over all its LoRA factor entries
    (FusionBench's ``get_models_fisher_norm``, over the parameters merged)."""
    return torch.stack([torch.sqrt(sum(f[k].double().square().sum() for k in a.weights))
                        for f, a in zip(fishers, adapters)])


def fisher(adapters: Sequence[Adapter], weights: Weights = None, *, fishers: Sequence[Mapping[str, torch.Tensor]],
           normalize: bool = True, floor: float = FISHER_FLOOR) -> Adapter:
    """Fisher merging (Matena & Raffel, NeurIPS 2022), space factors: per entry of every A and B,
    ``θ* = Σ_i c_i (F_i + floor) θ_i / Σ_i c_i (F_i + floor)``.

    FusionBench's ``merging_with_fisher_weights`` (``fusion_bench/method/fisher_merging/fisher_merging.py``): the floor
    (``minimal_fisher_weight``, default 1e-6) is added to every Fisher entry, and with ``normalize``
    (``normalize_fisher_weight``, default true, as in ``clip_fisher_merging.yaml`` and Matena & Raffel's
    ``normalize_fishers``) each contributor's coefficient is divided by the L2 norm of its whole Fisher, so a
    contributor whose Fisher is large overall does not dominate: ``c_i = w_i · u_i / Σ_k u_k`` with
    ``u_i = 1 / (‖F_i‖ + floor)`` (``fisher_norms``). The merge is the same when every weight is scaled alike.

    Averaging entries of A and B (as ``lora_avg`` does, not ΔW) needs the same rank per module in every
    contributor. Scalings s_i = alpha_i / r that differ are folded into B (``factors.combine_factors``' convention):
    the entry averaged is ``(s_i / s) B_i`` and its Fisher ``F_B,i (s / s_i)²`` (the Fisher of a rescaled parameter),
    identical to FusionBench whenever the contributors share their scaling. Linear heads: ``base.merge_heads``
    (FusionBench merges every other parameter with the same Fisher weights; its CLIP heads are zero-shot and not
    merged at all).

    Args:
        adapters: N adapters with the same modules, shapes and ranks.
        weights: (N,) or (N, M), >= 0: FusionBench's ``fisher_scaling_coefficients``; default 1/N (its default).
        fishers: one per adapter, in the same order: ``{peft key: diagonal Fisher shaped like that factor}``, as
            ``lora_fisher`` of that adapter on its own distilled set gives.
        normalize: divide each contributor's coefficient by its Fisher's L2 norm (FusionBench default true).
        floor: added to every Fisher entry (FusionBench's ``minimal_fisher_weight``); must be > 0 so that entries
            no contributor's data moves are plain weighted averages.
    Returns:
        One adapter of the contributors' rank; with one contributor, its own factors.
    """
    if not floor > 0:
        raise ValueError(f"fisher floor (minimal Fisher weight) must be > 0, got {floor!r}")
    check_compatible(adapters, same_ranks=True)
    table = _fisher_table(fishers, adapters)
    modules = adapters[0].modules()
    w = _nonnegative(resolve_weights(weights, len(adapters), len(modules), None), "fisher").double()
    if normalize:
        u = 1.0 / (fisher_norms(table, adapters) + floor)                    # (N,)
        w = w * (u / u.sum())[:, None]
    factors = {}
    for j, m in enumerate(modules):
        scalings = [a.scaling(m) for a in adapters]
        s_out = scalings[0] if len(set(scalings)) == 1 else 1.0
        a_key, b_key = f"{PEFT_PREFIX}{m}.lora_A.weight", f"{PEFT_PREFIX}{m}.lora_B.weight"
        num_a = den_a = num_b = den_b = 0.0
        for i, (a, f, s) in enumerate(zip(adapters, table, scalings)):
            a_i, b_i = a.factors(m)
            c = s / s_out                                                      # B_i enters as c B_i
            f_a = w[i, j] * (f[a_key].double() + floor)                        # (r, in)
            f_b = w[i, j] * (f[b_key].double() / c**2 + floor)                 # (out, r)
            num_a, den_a = num_a + f_a * a_i.double(), den_a + f_a
            num_b, den_b = num_b + f_b * (c * b_i.double()), den_b + f_b
        factors[m] = ((num_a / den_a).float(), (num_b / den_b).float(), s_out)
    return build_adapter(factors, adapters, "fisher")
