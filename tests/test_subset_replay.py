"""Nested cohorts: a smaller community built from a larger one's log (``sim.replay.replay_subset``) is the fresh run
of that community, number for number."""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

ray = pytest.importorskip("ray")

from sim.replay import replay_subset, subset_mismatch  # noqa: E402

STRATEGIES = ("fusion", "mixture", "svd", "ties", "opcm")


def nested(cfg, n: int):
    """``cfg`` as a community of ``n`` institutions with their own data (``data.partition: per_institution``)."""
    return cfg.replace(data=dataclasses.replace(cfg.data, institutions=n, partition="per_institution"))


@pytest.fixture(scope="module")
def runs(ray_session, tiny_run_cfg, tmp_path_factory):
    """A fresh 6-institution run, a fresh 4-institution run and the 4 built from the 6's log (one contribution
    each, evaluated every 2 commits)."""
    from actors.runner import run_simulation

    r = dataclasses.replace
    base = tiny_run_cfg.replace(merge=r(tiny_run_cfg.merge, strategies=STRATEGIES),
                                schedule=r(tiny_run_cfg.schedule, contributions=1),
                                runtime=r(tiny_run_cfg.runtime, eval_every=2))
    out = tmp_path_factory.mktemp("subset")
    big, small = nested(base, 6), nested(base, 4)
    keep = r(base.runtime, feature_cache=str(out / "features"))    # the big run keeps its test features
    big_summary = run_simulation(big.replace(runtime=keep), out / "big", run_id="big")
    fresh = run_simulation(small, out / "fresh", run_id="fresh")
    # built from the big run's log and its test features (a fresh store: nothing of this process's memory)
    replayed = replay_subset(out / "big", small.replace(runtime=r(keep, feature_cache=str(out / "features"))),
                             out / "replayed", run_id="replayed")
    return out, big_summary, fresh, replayed, small


def numbers(summary: dict) -> dict:
    strategies = {name: {k: s[k] for k in ("acc", "auc", "per_task", "forgetting", "bwt", "storage_bytes")}
                  for name, s in summary["strategies"].items()}
    return {"strategies": strategies, "references": summary["references"],
            "commits_accepted": summary["commits_accepted"], "n_contributions": summary["n_contributions"]}


def test_a_replayed_subset_is_the_fresh_run_bit_for_bit(runs):
    from sim.merge import load_mixture
    from sim.model import load_adapter

    out, big, fresh, replayed, small = runs
    # the summary's numbers, every evaluation row, every branch's tensors and the merge order are the fresh run's
    assert big["commits_accepted"] == 6 and fresh["commits_accepted"] == 4
    assert numbers(replayed) == numbers(fresh)
    cols = ["version", "strategy", "task", "acc", "auc", "n"]
    rows = {name: pd.read_parquet(out / name / "metrics.parquet")[cols].sort_values(cols[:3]).reset_index(drop=True)
            for name in ("fresh", "replayed")}
    pd.testing.assert_frame_equal(rows["replayed"], rows["fresh"])
    assert sorted(rows["fresh"].version.unique()) == [-1, 2, 4]
    for s in STRATEGIES:
        path = {name: out / name / "main" / s for name in ("fresh", "replayed")}
        if s == "mixture":
            got, want = load_mixture(path["replayed"]), load_mixture(path["fresh"])
            np.testing.assert_array_equal(got.weights, want.weights)
            pairs = [(a.weights, b.weights) for a, b in zip(got.adapters, want.adapters)]
        else:
            pairs = [(load_adapter(path["replayed"]).weights, load_adapter(path["fresh"]).weights)]
        for got_w, want_w in pairs:
            assert got_w.keys() == want_w.keys() and all(torch.equal(got_w[k], want_w[k]) for k in want_w), s
    order = {name: [r["id"] for r in pd.read_parquet(out / name / "events.parquet").to_dict("records")
                    if r.get("event") == "accepted"] for name in ("fresh", "replayed")}
    assert order["replayed"] == order["fresh"]
    # the replay says where it came from and trained nothing
    assert replayed["replayed_from"]["n_institutions"] == 6 and replayed["replayed_from"]["n_contributions"] == 6
    assert "replayed_from" not in fresh
    # the mixture's members and the individual references were read from the big run's features, none computed:
    # 4 adapters on the 4 sites' test splits, at versions 2 and 4 (a member of version 2 is one of version 4)
    assert (replayed["features"]["read"], replayed["features"]["computed"]) == (16, 0)
    mixture = {name: pd.read_parquet(out / name / "metrics.parquet").query("strategy == 'mixture' and version == 4")
               for name in ("fresh", "replayed")}
    # the inference they stand for is billed (the forward passes' stored seconds, ``tests/test_features.py``)
    assert (mixture["replayed"].infer_s > 0).all() and len(mixture["replayed"]) == len(mixture["fresh"])


def test_what_cannot_be_built_from_a_larger_log_is_named(runs, tmp_path):
    out, _, _, _, small = runs
    r = dataclasses.replace
    cases = {
        "init_from is main": small.replace(schedule=r(small.schedule, init_from="main", pull_strategy="svd")),
        "data.partition is pool": small.replace(data=r(small.data, partition="pool")),
        "runtime.clock is wall": small.replace(runtime=r(small.runtime, clock="wall")),
        "faults are injected": small.replace(faults=r(small.faults, corrupt=0.5)),
        "8 institutions are more than the source run's 6": nested(small, 8),
        "train.steps differs": small.replace(train=r(small.train, steps=small.train.steps + 1)),
    }
    for message, cfg in cases.items():
        with pytest.raises(ValueError, match=message):
            replay_subset(out / "big", cfg, tmp_path / message.split()[0])
    # the merges, the evaluation schedule and the joint reference may differ: they are redone, not the commits'
    same = small.replace(merge=r(small.merge, strategies=("svd",)), runtime=r(small.runtime, eval_every=1),
                         train=r(small.train, joint=True))
    assert subset_mismatch(small, same) is None


def test_a_nested_cohort_taken_from_a_kept_larger_one_is_the_built_one(tiny_cfg, monkeypatch):
    """``cached_cohort`` takes a per_institution community from a kept larger one of the same data: every split of
    every institution equals what ``build_cohort`` renders for the smaller community; a pool partition is built."""
    import sim.data as data

    monkeypatch.setattr(data, "_KEPT", type(data._KEPT)())
    big = dataclasses.replace(tiny_cfg.data, institutions=6, partition="per_institution")
    small = dataclasses.replace(big, institutions=4)
    kept = data.cached_cohort(big, 3)
    taken, built = data.cached_cohort(small, 3), data.build_cohort(small, 3)
    assert taken.institutions[0] is kept.institutions[0]            # taken, not rendered again
    assert taken.task_classes == built.task_classes and len(taken.institutions) == 4
    for a, b in zip(taken.institutions, built.institutions, strict=True):
        assert (a.id, a.task, a.site, a.classes) == (b.id, b.task, b.site, b.classes)
        for split in ("train", "val", "test"):
            np.testing.assert_array_equal(getattr(a, split).x, getattr(b, split).x)
            np.testing.assert_array_equal(getattr(a, split).y, getattr(b, split).y)
    assert data.cached_cohort(small, 4).institutions[0] is not kept.institutions[0]     # another seed: built
    pooled = dataclasses.replace(big, partition="pool")
    data.cached_cohort(pooled, 3)
    assert data.cached_cohort(dataclasses.replace(pooled, institutions=4), 3).institutions[0] is not \
        data.cached_cohort(pooled, 3).institutions[0]
    with pytest.raises(ValueError, match="at least the number of tasks"):
        data.cached_cohort(dataclasses.replace(big, institutions=1), 3)
