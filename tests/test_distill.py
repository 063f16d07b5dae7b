"""Distillers (dm, random, herding, noise), DSA and the fidelity/privacy audit, on tiny data."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from sim.config import DSA_FAMILIES, DistillConfig
from sim.data.base import DistilledSet, Split
from sim.distill import DISTILLERS, distill
from sim.distill.audit import audit_institution, audit_verdict, nearest_distances, nearest_indices, privacy_audit
from sim.distill.baselines import herding_order
from sim.distill.common import to_z
from sim.distill.convnet import sample_convnet
from sim.distill.dm import matching_loss
from sim.distill.dsa import AUGMENTATIONS, DSAParams, apply_dsa, sample_dsa, siamese_augment

# A small, fast DM: narrow random ConvNet, few steps (the defaults are for 32 px images on one core).
FAST_DM = DistillConfig(method="dm", ipc=3, iterations=8, real_batch=16, embed_width=16)


def method_cfg(method: str, **kw) -> DistillConfig:
    return dataclasses.replace(FAST_DM, method=method, **kw)


def hand_split(counts: list[int], size: int = 16, seed: int = 0) -> Split:
    """Random uint8 images with exactly ``counts[c]`` images of class c."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(len(counts)), counts)
    return Split(rng.integers(0, 256, (len(y), 3, size, size), dtype=np.uint8), y.astype(np.int64))


# ------------------------------------------------------------------------------------------------
# Registries
# ------------------------------------------------------------------------------------------------
def test_registry_keys_match_function_names():
    assert set(DISTILLERS) == {"dm", "random", "herding", "noise"}
    assert all(fn.__name__ == name for name, fn in DISTILLERS.items())
    assert tuple(AUGMENTATIONS) == DSA_FAMILIES


def test_unknown_dsa_family_is_a_config_error():
    with pytest.raises(ValueError, match="distill.dsa_strategy"):
        DistillConfig(dsa_strategy="color_blur")


# ------------------------------------------------------------------------------------------------
# Every distiller: shapes, range, labels, determinism, no global RNG use
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", sorted(DISTILLERS))
def test_distiller_shapes_and_determinism(method, tiny_cohort, tiny_foundation):
    # Prepare
    inst = tiny_cohort.institutions[0]
    cfg = method_cfg(method)
    torch_state, np_state = torch.random.get_rng_state(), np.random.get_state()
    # Execute
    a = distill(inst.train, inst.task, inst.classes, cfg, seed=1, foundation=tiny_foundation)
    b = distill(inst.train, inst.task, inst.classes, cfg, seed=1, foundation=tiny_foundation)
    c = distill(inst.train, inst.task, inst.classes, cfg, seed=2, foundation=tiny_foundation)
    # Assert
    k, size = len(inst.classes), tiny_cohort.institutions[0].train.x.shape[-1]
    assert isinstance(a, DistilledSet) and a.method == method and a.task == inst.task
    assert a.x.shape == (k * cfg.ipc, 3, size, size) and a.x.dtype == np.float32
    assert np.isfinite(a.x).all() and a.x.min() >= 0.0 and a.x.max() <= 1.0
    assert np.array_equal(np.bincount(a.y, minlength=k), np.full(k, cfg.ipc))
    assert np.array_equal(a.x, b.x) and np.array_equal(a.y, b.y)                 # same seed: identical
    if method == "herding":
        assert np.array_equal(a.x, c.x)                                          # deterministic selection
    else:
        assert not np.array_equal(a.x, c.x)                                      # another seed: other images
    assert torch.equal(torch.random.get_rng_state(), torch_state)                # no global RNG side effects
    assert np.random.get_state()[1].tolist() == np_state[1].tolist()
    assert a.meta["real_counts"] == {name: int(n) for name, n in
                                     zip(inst.classes, inst.train.class_counts(len(inst.classes)))}


def test_real_selections_are_real_images(tiny_cohort, tiny_foundation):
    inst = tiny_cohort.institutions[1]
    real = inst.train.x.astype(np.float32) / 255.0
    for method in ("random", "herding"):
        out = distill(inst.train, inst.task, inst.classes, method_cfg(method), 0, tiny_foundation)
        for img, label in zip(out.x, out.y):
            match = np.flatnonzero(np.all(np.isclose(real, img[None]), axis=(1, 2, 3)))
            assert len(match) == 1 and inst.train.y[match[0]] == label


def test_herding_order_by_hand():
    # Prepare: 1-D features 0, 1, 2, 10 (mean 3.25)
    feats = torch.tensor([[0.0], [1.0], [2.0], [10.0]])
    # Execute
    order = herding_order(feats, 4)
    # Assert: 2 (closest to 3.25); then 1 ((2+1)/2=1.5 beats 1.0 and 6.0); then 10 ((3+10)/3=4.33); then 0
    assert order == [2, 1, 3, 0]
    assert herding_order(feats, 9) == [2, 1, 3, 0]                               # k > n: everything, once


def test_short_empty_and_rare_classes_are_reported_not_crashed_on(tiny_foundation):
    # Prepare: class a plentiful, b short (3 < ipc), c rare (1 image, ~2%), d absent; ipc 5
    split = hand_split([40, 3, 1, 0])
    classes = ("a", "b", "c", "d")
    expected_real = {"dm": [5, 5, 5, 0], "noise": [5, 5, 5, 0], "random": [5, 3, 1, 0], "herding": [5, 3, 1, 0]}
    for method, counts in expected_real.items():
        # Execute
        out = distill(split, "toy", classes, method_cfg(method, ipc=5), 0, tiny_foundation)
        # Assert
        assert np.bincount(out.y, minlength=4).tolist() == counts, method
        assert out.meta["short_classes"] == ["b", "c"] and out.meta["empty_classes"] == ["d"]
        assert out.meta["rare_classes"] == ["c", "d"]
        assert out.meta["real_counts"] == {"a": 40, "b": 3, "c": 1, "d": 0}
        assert out.meta["distilled_counts"] == dict(zip(classes, counts))
    # DM keeps the images of a short class distinct (copies are jittered, then optimised)
    dm_c = distill(split, "toy", classes, method_cfg("dm", ipc=5), 0).x[-5:]
    assert len({img.tobytes() for img in dm_c}) == 5


def test_ipc_above_every_class_count_on_a_cohort_with_a_rare_class(tiny_cfg, tiny_foundation):
    from sim.data import build_cohort

    data = dataclasses.replace(tiny_cfg.data, rare_prevalence=0.01)
    inst = build_cohort(data, 0).institutions[0]
    counts = inst.train.class_counts(len(inst.classes))
    ipc = int(counts.max()) + 2
    out = distill(inst.train, inst.task, inst.classes, method_cfg("dm", ipc=ipc, iterations=2), 0, tiny_foundation)
    rare = inst.classes[-1]
    assert counts[-1] <= 1 and rare in out.meta["rare_classes"]
    assert set(out.meta["short_classes"]) | set(out.meta["empty_classes"]) == set(inst.classes)
    assert np.bincount(out.y, minlength=len(counts)).tolist() == [ipc if n else 0 for n in counts]


# ------------------------------------------------------------------------------------------------
# DSA
# ------------------------------------------------------------------------------------------------
def test_dsa_transforms_by_hand():
    # Prepare: one bright pixel at (row 4, col 5) of an 8x8 image
    x = torch.zeros(1, 3, 8, 8)
    x[..., 4, 5] = 1.0
    # Execute / Assert
    assert torch.equal(apply_dsa(x, DSAParams("flip", (1.0,))), x.flip(-1))
    assert torch.equal(apply_dsa(x, DSAParams("flip", (0.0,))), x)
    shifted = apply_dsa(x, DSAParams("crop", (1.0, -2.0)))                       # content moves up 1, right 2
    assert shifted[0, 0, 3, 7] == 1.0 and shifted.sum() == 3.0
    erased = apply_dsa(torch.ones(1, 3, 8, 8), DSAParams("cutout", (4.0, 4.0)))  # 4x4 square at rows/cols 2..5
    assert erased[0, 0, 2:6, 2:6].sum() == 0 and erased.sum() == 3 * (64 - 16)
    y = torch.rand(2, 3, 8, 8)
    assert torch.allclose(apply_dsa(y, DSAParams("color", (0.5, 0.5, 0.5))), y, atol=1e-6)   # neutral draw
    assert torch.allclose(apply_dsa(y, DSAParams("scale", (1.0, 1.0))), y, atol=1e-5)
    assert torch.allclose(apply_dsa(y, DSAParams("rotate", (0.0,))), y, atol=1e-5)
    rot90 = apply_dsa(x, DSAParams("rotate", (90.0,)))
    assert torch.allclose(rot90, x.rot90(1, dims=(-2, -1)), atol=1e-5) or \
        torch.allclose(rot90, x.rot90(-1, dims=(-2, -1)), atol=1e-5)


@pytest.mark.parametrize("family", DSA_FAMILIES)
def test_siamese_one_draw_for_both_batches(family):
    # Prepare: a real batch of 6 and a synthetic batch that is a copy of its first 2 images
    gen = torch.Generator().manual_seed(0)
    real = torch.rand(6, 3, 16, 16, generator=gen)
    syn = real[:2].clone().requires_grad_(True)
    changed = 0
    for _ in range(8):
        # Execute
        real_aug, syn_aug, params = siamese_augment(real, syn, (family,), gen)
        # Assert: the same transform on both batches and on every image of a batch
        assert params.family == family
        assert torch.allclose(syn_aug, real_aug[:2], atol=1e-6)
        same = siamese_augment(real[:1].expand(4, -1, -1, -1), real[:1], (family,),
                               torch.Generator().manual_seed(1))[0]
        assert torch.allclose(same, same[:1].expand_as(same), atol=1e-6)
        changed += not torch.allclose(real_aug, real, atol=1e-4)
    assert changed > 0                                                           # draws are not all identity
    syn_aug.sum().backward()                                                     # differentiable in the pixels
    assert syn.grad is not None and torch.isfinite(syn.grad).all() and syn.grad.abs().sum() > 0


def test_sample_dsa_is_seeded():
    draws = [sample_dsa(DSA_FAMILIES, 32, torch.Generator().manual_seed(s)) for s in (3, 3, 4)]
    assert draws[0] == draws[1]
    families = {sample_dsa(DSA_FAMILIES, 32, torch.Generator().manual_seed(s)).family for s in range(60)}
    assert families == set(DSA_FAMILIES)


# ------------------------------------------------------------------------------------------------
# DM
# ------------------------------------------------------------------------------------------------
def test_random_convnet_is_the_dm_architecture():
    gen = torch.Generator().manual_seed(0)
    net = sample_convnet(gen, width=128, depth=3, size=32)
    assert [tuple(w.shape) for w, _ in net.layers] == [(128, 3, 3, 3), (128, 128, 3, 3), (128, 128, 3, 3)]
    assert net(torch.rand(2, 3, 32, 32)).shape == (2, 128 * 4 * 4)
    assert len(sample_convnet(gen, width=8, depth=3, size=4).layers) == 2        # depth capped by image side
    again = sample_convnet(torch.Generator().manual_seed(0), width=128, depth=3, size=32)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(net.layers, again.layers))


def test_dm_loss_decreases(tiny_cohort):
    # Prepare: noise init, so there is a real gap to close; score on ConvNets DM never saw, without DSA
    inst = tiny_cohort.institutions[0]
    cfg = method_cfg("dm", init="noise", iterations=40, lr_img=1.0)
    before = distill(inst.train, inst.task, inst.classes, dataclasses.replace(cfg, iterations=0), 0)
    # Execute
    after = distill(inst.train, inst.task, inst.classes, cfg, 0)
    # Assert
    real = [to_z(torch.from_numpy(inst.train.x[inst.train.y == c]).float() / 255) for c in range(len(inst.classes))]

    def held_out_loss(ds: DistilledSet) -> float:
        syn = [to_z(torch.from_numpy(ds.x[ds.y == c])) for c in range(len(inst.classes))]
        nets = [sample_convnet(torch.Generator().manual_seed(100 + i), 16, 3, 16) for i in range(4)]
        return float(np.mean([matching_loss(real, syn, net).item() for net in nets]))

    assert after.meta["loss_last"] < after.meta["loss_first"]
    assert held_out_loss(after) < 0.7 * held_out_loss(before)


def test_dm_with_foundation_embedding(tiny_cohort, tiny_foundation):
    inst = tiny_cohort.institutions[0]
    out = distill(inst.train, inst.task, inst.classes, method_cfg("dm", embed="foundation", iterations=3), 0,
                  tiny_foundation)
    assert out.x.shape[0] == 3 * len(inst.classes) and out.meta["embed"] == "foundation"
    with pytest.raises(ValueError, match="foundation"):
        distill(inst.train, inst.task, inst.classes, method_cfg("dm", embed="foundation"), 0)


# ------------------------------------------------------------------------------------------------
# Audit: privacy and fidelity
# ------------------------------------------------------------------------------------------------
def const_images(values: list[float], size: int = 4) -> np.ndarray:
    return np.stack([np.full((3, size, size), v, np.float32) for v in values])


def test_nearest_distances_by_hand():
    q = torch.from_numpy(const_images([0.2, 0.9]))
    refs = torch.from_numpy(const_images([0.0, 0.5]))
    assert torch.allclose(nearest_distances(q, refs), torch.tensor([0.2, 0.4]))  # RMS pixel distance
    img = torch.rand(1, 3, 8, 8)
    assert nearest_distances(img, img.flip(-1)).item() == pytest.approx(0.0, abs=1e-6)   # mirrored copy
    assert nearest_distances(img, img.flip(-1), flip=False).item() > 0


def test_privacy_audit_by_hand():
    # Prepare: members 0, .2, .4, .6; non-members .1, .3, .5, .7 (natural NN distance 0.1)
    train = Split(const_images([0.0, 0.2, 0.4, 0.6]), np.zeros(4, np.int64))
    holdout = Split(const_images([0.1, 0.3, 0.5, 0.7]), np.zeros(4, np.int64))
    # one copy of a member, one image far from everything
    distilled = DistilledSet("toy", ("a",), const_images([0.2, 0.95]), np.zeros(2, np.int64))
    # Execute
    report = privacy_audit(distilled, train, holdout, DistillConfig())
    # Assert
    assert report["reference_nn_distance"] == pytest.approx(0.1)
    assert report["per_image"]["memorised"] == [True, False]
    assert report["memorised_fraction"] == 0.5
    # the exposed members: the nearest member of each distilled image (.2 -> member 1, .95 -> member 3 at .6)
    assert report["per_image"]["nearest_member"] == [1, 3] and report["exposed_members"] == [1, 3]


def test_nearest_indices_by_hand():
    q = torch.from_numpy(const_images([0.2, 0.9, 0.45]))
    refs = torch.from_numpy(const_images([0.0, 0.5, 1.0]))
    assert nearest_indices(q, refs).tolist() == [0, 2, 1]
    assert nearest_indices(q, refs[:0]).tolist() == [-1, -1, -1]


def _report(memorised: int, tpr_all: float | None, tpr_exposed: float | None) -> dict:
    point = lambda tpr: {"tpr": tpr, "n_members": 30, "fpr_achieved": 0.0069}   # noqa: E731
    return {"memorised": memorised, "n_distilled": 30, "memorised_fraction": memorised / 30,
            "mia": {"attack": "lira_offline",
                    "combined": {"all": {"1pct": point(tpr_all)}, "exposed": {"1pct": point(tpr_exposed)}}}}


def test_audit_verdict_flags_the_attack_at_one_percent_fpr():
    cfg = DistillConfig(audit_max_tpr=0.1)
    assert audit_verdict(_report(0, 0.02, 0.05), cfg) == []
    reasons = audit_verdict(_report(0, 0.02, 0.6), cfg)                 # the exposed members are found
    assert len(reasons) == 1 and "exposed" in reasons[0] and "distill.audit_max_tpr 0.1" in reasons[0]
    assert len(audit_verdict(_report(2, 0.3, 0.6), cfg)) == 3            # near-copies, all and exposed members
    assert audit_verdict(_report(0, None, None), cfg) == []              # an unresolvable FPR never flags


def test_audit_flags_copied_real_images_and_not_noise(tiny_cohort, tiny_foundation, tiny_cfg):
    inst = tiny_cohort.institutions[0]
    cfg = tiny_cfg.replace(distill=method_cfg("random", ipc=24))
    copied = distill(inst.train, inst.task, inst.classes, cfg.distill, 0, tiny_foundation)
    noise = distill(inst.train, inst.task, inst.classes, dataclasses.replace(cfg.distill, method="noise"), 0)
    leak = audit_institution(tiny_foundation, inst, copied, cfg, 0, with_fidelity=False)
    clean = audit_institution(tiny_foundation, inst, noise, cfg, 0, with_fidelity=False)
    assert leak["flagged"] and leak["memorised_fraction"] == 1.0
    assert not clean["flagged"] and clean["memorised_fraction"] == 0.0
    assert leak["fidelity"] is None
    # the tiny institution holds fewer than 100 held-out images: TPR at 1 % FPR is not resolvable and says so
    n_non = len(inst.val) + len(inst.test)
    assert n_non < 100 and leak["mia_tpr_at_1pct_fpr"] is None and leak["mia_n_nonmembers"] == n_non
    assert leak["mia"]["combined"]["all"]["1pct"]["min_resolvable_fpr"] == pytest.approx(1 / n_non)


def test_dm_beats_noise_on_fidelity(tiny_foundation, tiny_cfg):
    # Prepare: a balanced cohort (no label skew) with enough test images for accuracy to mean something, and
    # adapters trained long enough to learn; the real-data adapter is shared by both methods
    from sim.data import build_cohort
    from sim.train import train_adapter

    cfg = tiny_cfg.replace(data=dataclasses.replace(tiny_cfg.data, institutions=2, train_per_class=48,
                                                    test_per_class=24, dirichlet_alpha=0.0),
                           train=dataclasses.replace(tiny_cfg.train, steps=60))
    fids = {}
    for inst in build_cohort(cfg.data, 0).institutions:
        ref = train_adapter(tiny_foundation, inst.train, inst.task, inst.classes, cfg.lora, cfg.train, 0).adapter
        for method in ("dm", "noise"):
            run_cfg = cfg.replace(distill=method_cfg(method, ipc=5))
            ds = distill(inst.train, inst.task, inst.classes, run_cfg.distill, 0, tiny_foundation)
            # Execute
            report = audit_institution(tiny_foundation, inst, ds, run_cfg, 0, real_adapter=ref)
            fids.setdefault(method, []).append(report["fidelity"])
    # Assert
    assert np.all(np.isfinite(fids["dm"] + fids["noise"]))
    assert np.mean(fids["dm"]) > np.mean(fids["noise"]) + 0.1


def test_merged_fidelity(tiny_cohort, tiny_foundation, tiny_cfg):
    # Prepare: one adapter and one distilled set per institution; a tiny coefficient search
    from sim.config import MergeConfig
    from sim.distill.audit import merged_fidelity, real_proxy
    from sim.train import train_adapter

    insts = tiny_cohort.institutions
    adapters = [train_adapter(tiny_foundation, i.train, i.task, i.classes, tiny_cfg.lora, tiny_cfg.train, i.id).adapter
                for i in insts]
    mcfg = MergeConfig(budget=3)
    # Execute: proxies identical to the real validation data, then random real images
    same = merged_fidelity(tiny_foundation, insts, adapters, [real_proxy(i) for i in insts], mcfg, seed=0)
    dist = [distill(i.train, i.task, i.classes, method_cfg("random", ipc=2), 0) for i in insts]
    other = merged_fidelity(tiny_foundation, insts, adapters, dist, mcfg, strategy="mixture", seed=0)
    # Assert: the same proxy data give the same search, hence a ratio of exactly 1
    assert same["merged_fidelity"] == 1.0 and same["coefficients_distilled"] == same["coefficients_real_val"]
    assert set(other["per_institution"]) == {i.id for i in insts} and other["strategy"] == "mixture"
    assert all(0 <= v["acc_distilled_search"] <= 1 and np.isfinite(v["merged_fidelity"])
               for v in other["per_institution"].values())
