"""The GPU path, tested on the CPU: runtime.precision (bf16 autocast runs on the CPU too), the device/GPU checks of the
config and of the worker pool, the release of cached device memory and the CPU-only results of pooled tasks.

No test here fakes a GPU: what needs one (CUDA memory released, fractional GPUs shared) is measured by
``benchmarks/foundations.py`` on a machine that has one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time

import numpy as np
import pytest
import torch

from sim.config import RuntimeConfig


# ------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------
def test_precision_defaults_to_fp32_and_rejects_unknown_values():
    assert RuntimeConfig().precision == "fp32"
    assert RuntimeConfig(precision="bf16").precision == "bf16"
    with pytest.raises(ValueError, match="runtime.precision"):
        RuntimeConfig(precision="fp16")


def test_cuda_without_gpus_per_worker_is_an_error_naming_num_gpus():
    with pytest.raises(ValueError, match=r"runtime\.num_gpus must be > 0 with runtime\.device=cuda"):
        RuntimeConfig(device="cuda")
    with pytest.raises(ValueError, match="runtime.num_gpus"):
        RuntimeConfig(device="cuda:1", num_gpus=0)
    assert RuntimeConfig(device="cuda", num_gpus=0.25).num_gpus == 0.25


def test_commit_cache_key_holds_the_precision_only_when_not_fp32(tiny_cfg):
    from sim.cache import commit_config

    fp32 = commit_config(tiny_cfg)
    bf16 = commit_config(tiny_cfg.replace(runtime=dataclasses.replace(tiny_cfg.runtime, precision="bf16")))
    assert "precision" not in fp32                       # existing caches keep their keys
    assert bf16.pop("precision") == "bf16" and bf16 == fp32


def test_a_smaller_community_is_not_built_from_a_run_of_another_precision():
    from sim.config import DataConfig, SimConfig
    from sim.replay import subset_mismatch

    source = SimConfig(data=DataConfig(partition="per_institution", n_tasks=2, institutions=4))
    smaller = dataclasses.replace(source.data, institutions=2)
    assert subset_mismatch(source, source.replace(data=smaller)) is None
    bf16 = source.replace(data=smaller, runtime=dataclasses.replace(source.runtime, precision="bf16"))
    assert subset_mismatch(source, bf16) == "runtime.precision differs ('fp32' in the source run, 'bf16' here)"


# ------------------------------------------------------------------------------------------
# Precision
# ------------------------------------------------------------------------------------------
def test_fp32_enters_no_autocast_context(tiny_foundation):
    from sim.accelerator import autocast

    # fp32 runs exactly the code it ran before the option existed: no context, and features are not copied
    assert isinstance(autocast("cpu", "fp32"), contextlib.nullcontext)
    assert isinstance(tiny_foundation.autocast(), contextlib.nullcontext)
    with pytest.raises(ValueError, match="runtime.precision"):
        autocast("cpu", "fp8")


def test_fp32_features_are_bit_identical_to_the_plain_backbone(tiny_foundation, tiny_cohort, single_thread):
    # Prepare: the pre-option computation, written out
    x = torch.from_numpy(tiny_cohort.task_split(tiny_cohort.tasks[0], "test").x[:8])
    z = tiny_foundation.normalize(x)
    with torch.no_grad():
        # Execute
        plain = tiny_foundation.backbone(z)
        feats = tiny_foundation.features(x)
    # Assert
    assert torch.equal(feats, plain)


@pytest.fixture(scope="module")
def bf16_foundation(tiny_cfg, tiny_foundation):
    from sim.model import load_foundation

    return load_foundation(tiny_cfg.model, tiny_cfg.data.img_size, "cpu", "bf16")


def test_bf16_foundation_shares_the_backbone_and_the_base(tiny_foundation, bf16_foundation):
    assert bf16_foundation.precision == "bf16" and tiny_foundation.precision == "fp32"
    assert bf16_foundation.backbone is tiny_foundation.backbone           # loaded once per process
    assert bf16_foundation.fingerprint == tiny_foundation.fingerprint     # same weights: adapters are exchangeable


def test_bf16_features_are_float32_close_to_fp32_but_not_equal(tiny_foundation, bf16_foundation, tiny_cohort,
                                                               single_thread):
    x = torch.from_numpy(tiny_cohort.task_split(tiny_cohort.tasks[0], "test").x[:16])
    with torch.no_grad():
        f32, bf16 = tiny_foundation.features(x), bf16_foundation.features(x)
    assert bf16.dtype == torch.float32
    assert not torch.equal(bf16, f32)                                     # the autocast context was entered
    assert torch.allclose(bf16, f32, atol=0.1 * f32.abs().max().item())   # bfloat16 keeps ~3 significant digits


def test_bf16_training_and_inference_stay_close_to_fp32(tiny_cfg, tiny_foundation, bf16_foundation, tiny_cohort,
                                                        single_thread):
    from sim.metrics import predict_proba
    from sim.train import train_adapter

    # Prepare: a short training of one task, in each precision
    task = tiny_cohort.tasks[0]
    split, classes = tiny_cohort.task_split(task, "train"), tiny_cohort.task_classes[task]
    train = dataclasses.replace(tiny_cfg.train, steps=6)
    test = tiny_cohort.task_split(task, "test").x
    # Execute
    runs = {f.precision: train_adapter(f, split, task, classes, tiny_cfg.lora, train, seed=3)
            for f in (tiny_foundation, bf16_foundation)}
    proba = {p: predict_proba(f, runs[p].adapter, test, task, classes)
             for p, f in (("fp32", tiny_foundation), ("bf16", bf16_foundation))}
    # Assert: finite, float32 parameters, different numbers that stay close
    for run in runs.values():
        assert np.isfinite([run.stats["loss_first"], run.stats["loss_last"]]).all()
        assert all(w.dtype == torch.float32 and w.device.type == "cpu" for w in run.adapter.weights.values())
    a, b = runs["fp32"].adapter.weights, runs["bf16"].adapter.weights
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert abs(runs["fp32"].stats["loss_last"] - runs["bf16"].stats["loss_last"]) < 0.1
    assert proba["bf16"].dtype == np.float32 and np.abs(proba["bf16"] - proba["fp32"]).max() < 0.05


def test_bf16_coefficient_search_forward_goes_through_autocast(tiny_foundation, bf16_foundation, tiny_cohort,
                                                               single_thread):
    from sim.coefficients import prepare_proxy, proxy_features
    from sim.data.base import DistilledSet, to_unit_float

    task = tiny_cohort.tasks[0]
    split = tiny_cohort.task_split(task, "test")
    ds = DistilledSet(task, tuple(tiny_cohort.task_classes[task]), to_unit_float(split.x[:6]).numpy(),
                      split.y[:6].astype(np.int64), "random", {})
    data = prepare_proxy(tiny_foundation, [ds])
    f32, bf16 = proxy_features(tiny_foundation, data), proxy_features(bf16_foundation, data)
    assert bf16.dtype == torch.float32 and not torch.equal(bf16, f32)
    assert torch.allclose(bf16, f32, atol=0.1 * f32.abs().max().item())


# ------------------------------------------------------------------------------------------
# Device memory and results
# ------------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_releasing_device_memory_is_a_no_op_without_cuda():
    from sim.accelerator import release_device_memory

    assert release_device_memory() is False


def test_off_cpu_tensors_names_where_a_result_holds_a_device_tensor():
    from sim.accelerator import off_cpu_tensors

    @dataclasses.dataclass
    class Box:
        weights: dict
        rows: list

    # a "meta" tensor stands in for a CUDA one: any device but the CPU is reported
    clean = Box({"a": torch.zeros(2)}, [{"acc": 0.5}, torch.ones(1)])
    dirty = Box({"a": torch.zeros(2), "b": torch.empty(2, device="meta")}, [(1, torch.empty(1, device="meta"))])
    assert off_cpu_tensors(clean) == []
    assert off_cpu_tensors(dirty, "commit") == ["commit.weights['b'] (meta)", "commit.rows[0][1] (meta)"]


def test_a_pooled_task_refuses_to_return_a_tensor_off_the_cpu():
    from actors.tasks import _releases_device_memory

    def leaky_task():
        return {"w": torch.empty(1, device="meta")}

    with pytest.raises(RuntimeError, match=r"leaky_task returned tensors off the CPU: leaky_task\['w'\] \(meta\)"):
        _releases_device_memory(leaky_task)()
    assert _releases_device_memory(lambda: {"w": torch.ones(1)})()["w"].item() == 1.0


# ------------------------------------------------------------------------------------------
# The worker pool on a cluster without the requested GPUs
# ------------------------------------------------------------------------------------------
def test_pool_shortfall_counts_bundles_per_node():
    from actors.runner import pool_shortfall

    gpu_node = [{"Alive": True, "Resources": {"CPU": 16.0, "GPU": 1.0}}]
    assert pool_shortfall({"CPU": 1.0, "GPU": 0.25}, 4, gpu_node) is None          # 4 workers share one GPU
    short = pool_shortfall({"CPU": 1.0, "GPU": 0.5}, 3, gpu_node)
    assert "runtime.workers=3" in short and "runtime.num_gpus=0.5" in short and "room for 2" in short
    # two nodes of half a GPU each cannot hold one worker of a whole GPU: a bundle sits on one node
    halves = [{"Resources": {"CPU": 4.0, "GPU": 0.5}}, {"Resources": {"CPU": 4.0, "GPU": 0.5}}]
    assert "room for 0" in pool_shortfall({"CPU": 1.0, "GPU": 1.0}, 1, halves)
    assert pool_shortfall({"CPU": 1.0}, 2, [{"Alive": False, "Resources": {"CPU": 8.0}}]) is not None


def test_a_gpu_pool_on_a_cpu_only_ray_fails_at_once_with_exit_code_2(ray_session, tiny_run_cfg, tmp_path, capsys):
    import yaml

    from actors.runner import worker_pool
    from experiments.cli import main
    from sim.config import config_to_dict

    # Prepare: the suite's Ray has no GPU
    assert not ray_session.cluster_resources().get("GPU")
    cfg = tiny_run_cfg.replace(runtime=dataclasses.replace(tiny_run_cfg.runtime, device="cuda", num_gpus=1.0))
    # Execute / Assert: the pool, then the CLI
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"runtime\.num_gpus=1 GPU.*has no GPU"):
        worker_pool(cfg)
    assert time.perf_counter() - t0 < 5                   # not the placement group's two-minute wait
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config_to_dict(cfg)))
    code = main(["run", "--config", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "runtime.num_gpus" in err and "GPU" in err and "runtime.workers=2" in err
