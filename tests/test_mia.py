"""The per-record membership-inference attack (sim/distill/mia.py) against hand-derived numbers."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from sim.distill import mia


def test_logit_confidence_is_the_log_odds_of_the_true_label():
    # Prepare: p_y = .9, .5, .2 (and one saturated row whose 1 - p_y rounds to 0 in float32)
    proba = np.array([[0.9, 0.05, 0.05], [0.25, 0.5, 0.25], [0.2, 0.7, 0.1], [1.0, 1e-30, 0.0]], np.float32)
    y = np.array([0, 1, 0, 0])
    # Execute
    phi = mia.logit_confidence(proba, y)
    # Assert: log(p / (1 - p)) by hand, and a finite value where 1 - p_y underflows
    assert phi[:3] == pytest.approx([np.log(9.0), 0.0, np.log(0.25)], rel=1e-5)
    assert np.isfinite(phi[3]) and phi[3] == pytest.approx(-np.log(1e-30), rel=1e-4)


def test_shadow_halves_are_complementary_stratified_pairs():
    y = np.array([0] * 7 + [1] * 10 + [2] * 3)
    holds = mia.shadow_halves(y, 4, seed=0)
    assert holds.shape == (4, 20)
    assert (holds[0] ^ holds[1]).all() and (holds[2] ^ holds[3]).all()       # every record out of one per pair
    assert not (holds[0] == holds[2]).all()                                  # a fresh split per pair
    for c, n in ((0, 7), (1, 10), (2, 3)):                                   # each class split in half (±1)
        assert abs(int(holds[0][y == c].sum()) - n / 2) <= 0.5


def test_lira_offline_by_hand():
    # Prepare: 2 records, 1 query, 4 shadows; record 0 is out of shadows 0 and 2 (φ 1 and 3: μ_out 2), record 1
    # out of shadows 1 and 3 (φ 0 and 2: μ_out 1). Residuals ±1 everywhere: global σ = 1.
    shadows = np.array([[1.0, 5.0], [9.0, 0.0], [3.0, 7.0], [9.0, 2.0]])[..., None]     # (S, n, Q)
    holds = np.array([[False, True], [True, False], [False, True], [True, False]])
    target = np.array([[5.0], [1.0]])
    # Execute
    scores = mia.lira_offline(target, shadows, holds)
    # Assert: (φ − μ_out) / σ = (5 − 2) / 1 and (1 − 1) / 1; the IN shadows (9, 5, 7) play no part
    assert scores == pytest.approx([3.0, 0.0])


def test_lira_online_by_hand():
    # Prepare: record 0: IN φ 4, 6 (μ 5), OUT 0, 2 (μ 1); record 1: IN and OUT 1, 3 (μ 2); σ_in = σ_out = 1
    shadows = np.array([[4.0, 1.0], [0.0, 1.0], [6.0, 3.0], [2.0, 3.0]])[..., None]
    holds = np.array([[True, True], [False, False], [True, True], [False, False]])
    target = np.array([[5.0], [2.0]])
    scores = mia.lira_online(target, shadows, holds)
    # log N(5; 5, 1) − log N(5; 1, 1) = 0 − (−8) = 8; equal IN and OUT Gaussians give 0
    assert scores == pytest.approx([8.0, 0.0])


def test_clopper_pearson_closed_forms():
    # k = 0: upper = 1 − (α/2)^(1/n); k = n: lower = (α/2)^(1/n)
    lo, hi = mia.clopper_pearson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(1 - 0.025 ** (1 / 10))
    lo, hi = mia.clopper_pearson(30, 30)
    assert hi == 1.0 and lo == pytest.approx(0.025 ** (1 / 30))
    lo, hi = mia.clopper_pearson(5, 20)
    assert lo < 0.25 < hi


def test_tpr_at_fpr_counts_members_above_the_top_nonmember():
    # Prepare: 200 non-members with distinct scores; 1 % FPR allows 2 false positives
    rng = np.random.default_rng(0)
    non = rng.permutation(200).astype(float)
    members = np.r_[np.full(12, 500.0), rng.uniform(0, 197.5, 28)]          # 12 far above, 28 below the 3rd top
    # Execute
    point = mia.tpr_at_fpr(members, non, 0.01)
    # Assert: with 2 false positives allowed, every member scored above the 3rd-highest non-member (197) is found
    expected = np.mean(members > np.sort(non)[-3])
    assert point["tpr"] == pytest.approx(expected) and point["fpr_achieved"] == pytest.approx(0.01)
    assert point["n_members"] == 40 and point["n_nonmembers"] == 200
    k = round(expected * 40)
    assert point["ci"] == pytest.approx(list(mia.clopper_pearson(k, 40)))


def test_tpr_at_an_unresolvable_fpr_is_none_not_a_number():
    # 145 non-members (a default institution's held-out split): 0.1 % FPR is below 1 / 145
    point = mia.tpr_at_fpr(np.ones(30), np.zeros(145), 0.001)
    assert point["tpr"] is None and not point["resolvable"]
    assert point["min_resolvable_fpr"] == pytest.approx(1 / 145)
    assert mia.tpr_at_fpr(np.ones(30), np.zeros(145), 0.01)["resolvable"]


def test_audit_config_fields_are_checked():
    from sim.config import DistillConfig

    with pytest.raises(ValueError, match="distill.audit_shadows"):
        DistillConfig(audit_shadows=1)
    with pytest.raises(ValueError, match="distill.audit_attack"):
        DistillConfig(audit_attack="lira")
    with pytest.raises(ValueError, match="distill.audit_max_tpr"):
        DistillConfig(audit_max_tpr=1.5)


# ---------------------------------------------------------------------------------------------------------------
# The whole attack on a small institution with enough held-out images to resolve 1 % FPR
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mia_setup(tiny_cfg, tiny_foundation, single_thread):
    """Institution 0 of a tiny cohort with 120 held-out images (1 % FPR resolvable), trained long enough to fit."""
    from sim.data import build_cohort

    cfg = tiny_cfg.replace(data=dataclasses.replace(tiny_cfg.data, institutions=1, n_tasks=1, train_per_class=60,
                                                    val_per_class=10, test_per_class=30, dirichlet_alpha=0.0),
                           train=dataclasses.replace(tiny_cfg.train, steps=60))
    return cfg, build_cohort(cfg.data, cfg.seed).institutions[0]


def _audit(setup, foundation, method: str, shadows: int) -> dict:
    from sim.distill import distill
    from sim.distill.audit import audit_institution

    cfg, inst = setup
    d = dataclasses.replace(cfg.distill, method=method, ipc=5, audit_shadows=shadows)
    ds = distill(inst.train, inst.task, inst.classes, d, 0, foundation)
    return audit_institution(foundation, inst, ds, cfg.replace(distill=d), 0, with_fidelity=False)


def test_audit_finds_the_sources_of_copied_images_and_not_noise(mia_setup, tiny_foundation):
    leak, clean = (_audit(mia_setup, tiny_foundation, m, 2) for m in ("random", "noise"))
    # the copied images' sources are the exposed members, and the attack finds most of them at FPR <= 1 %
    assert leak["mia_n_nonmembers"] == 120 and leak["mia_exposed_n_members"] == len(leak["exposed_members"]) == 15
    assert leak["mia_exposed_tpr_at_1pct_fpr"] >= 0.5 and leak["flagged"]
    assert leak["mia"]["attack"] == "lira_offline" and leak["mia_shadows"] == 2
    # noise leaks nothing: near the FPR for all members and none of its exposed members found
    assert clean["mia_exposed_tpr_at_1pct_fpr"] <= 0.2 and clean["mia_tpr_at_1pct_fpr"] <= 0.1
    assert not clean["flagged"]
    # 0.1 % FPR is not resolvable with 120 non-members: reported as None
    assert leak["mia_tpr_at_0p1pct_fpr"] is None


def test_audit_without_shadows_is_the_loss_attack_and_says_so(mia_setup, tiny_foundation):
    report = _audit(mia_setup, tiny_foundation, "noise", 0)
    assert report["mia"]["attack"] == "loss" and report["mia_shadows"] == 0 and "no shadows" in (
        report["mia"]["attack_description"])
    assert set(report["mia"]) >= {"model", "combined"} and "data" not in report["mia"]
    assert report["mia_data_exposed_tpr_at_1pct_fpr"] is None and not report["flagged"]
