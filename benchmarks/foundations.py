"""Training and inference throughput of two foundations, per device and precision, with peak memory.

    .venv/bin/python benchmarks/foundations.py [--quick] [--threads N] [--steps S] [--batch B]

Foundations: forgesim's default model at its default image size, and timm's ``vit_base_patch16_224`` (ViT-B/16) at
224 px with random weights, loaded through ``model.pretrained=FILE`` from a state dict saved here (no network; the
speed of a ViT-B does not depend on its weights). Per foundation × device (cpu; cuda when there is one) × precision
(``runtime.precision`` fp32, bf16):

* training images/s: LoRA rank 8 on every block's qkv, ``S`` timed optimizer steps at batch ``B`` through forgesim's
  training loop (``sim.train.train_joint_adapter`` on one task; its per-step ``sync`` hook is the clock), after one
  untimed warm-up step;
* per-contribution seconds at the default ``train.steps`` and ``train.batch_size``: the measured set-up (the training
  copy of the backbone, peft) plus ``train.steps × train.batch_size`` images at the measured images/s — an
  extrapolation (time per image taken as constant in the batch size), not a timed contribution, and training only
  (distillation and the local evaluation come on top);
* inference images/s: ``sim.metrics.predict_proba`` with the trained adapter merged, after one warm-up call;
* peak memory: on the CPU the process's peak RSS above its RSS before the row (``/proc/self/status`` VmHWM, reset
  through ``/proc/self/clear_refs``, as ``benchmarks/merge_latency.py`` measures), on a GPU
  ``torch.cuda.max_memory_allocated``.

With CUDA, the fractional rows run N concurrent Ray tasks sharing one GPU (``num_gpus`` = 1, 0.5, 0.25 each: N = 1,
2, 4), each training as above, and report the aggregate images/s and the largest peak of any of them. Without CUDA
the script says that no GPU was found and prints the CPU rows only.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import os
import re
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sim.config import DataConfig, LoraConfig, ModelConfig, SimConfig  # noqa: E402
from sim.data.base import Split  # noqa: E402
from sim.metrics import predict_proba  # noqa: E402
from sim.model import load_foundation  # noqa: E402
from sim.train import train_joint_adapter  # noqa: E402

VIT_B = "vit_base_patch16_224"
CLASSES = ("a", "b", "c", "d")
TASK = "bench"
FRACTIONS = (1.0, 0.5, 0.25)


def _rss_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


class PeakMemory:
    """Peak memory of what runs inside the ``with``: CUDA's max allocated bytes on a GPU, else RSS above the start."""

    def __init__(self, device: str) -> None:
        self.device, self.mb = device, float("nan")

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            Path("/proc/self/clear_refs").write_text("5")       # reset VmHWM to the current RSS
            self.start = _rss_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.mb = torch.cuda.max_memory_allocated() / 2**20       # the foundation on the device included
        else:
            self.mb = (_rss_kib("VmHWM") * 1024 - self.start) / 2**20


def vit_b_file(tmp: str) -> str:
    """A random-weight ViT-B/16 state dict (with its classifier, as timm's strict load wants) in ``tmp``."""
    import timm

    path = Path(tmp) / f"{VIT_B}-random.pth"
    if not path.exists():
        torch.manual_seed(0)
        torch.save(timm.create_model(VIT_B, pretrained=False).state_dict(), path)
    return str(path)


def foundations(tmp: str) -> dict[str, SimConfig]:
    default = SimConfig()
    vit_b = SimConfig(data=DataConfig(img_size=224, interpolation="bicubic"),   # its pretrained input
                      model=ModelConfig(name=VIT_B, pretrained=vit_b_file(tmp)))
    return {f"default ({default.model.name} d{default.model.embed_dim}x{default.model.depth})": default,
            "ViT-B/16": vit_b}


def images(n: int, size: int, seed: int = 0) -> Split:
    rng = np.random.default_rng(seed)
    return Split(rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8), rng.integers(0, len(CLASSES), n))


def measure_row(cfg: SimConfig, device: str, precision: str, steps: int, batch: int, infer_n: int) -> dict:
    """One foundation × device × precision: training and inference throughput and peak memory."""
    foundation = load_foundation(cfg.model, cfg.data.img_size, device, precision)
    lora = LoraConfig(rank=8, alpha=8.0, target_modules=("qkv",))
    train = replace(cfg.train, batch_size=batch, augment=False)
    split = images(max(4 * batch, 64), cfg.data.img_size)
    stamps: list[float] = []

    def clock(grads) -> None:           # called once per optimizer step, after backward
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    with PeakMemory(device) as train_mem:
        t0 = time.perf_counter()
        result = train_joint_adapter(foundation, [(split, TASK, CLASSES)], lora, train, seed=0, steps=steps + 1,
                                     sync=clock)
    step_s = (stamps[-1] - stamps[0]) / steps                  # step 0 is the warm-up
    setup_s = stamps[0] - t0 - step_s                          # backbone copy, peft, before the first step
    test = images(infer_n, cfg.data.img_size, seed=1).x
    predict_proba(foundation, result.adapter, test[:8], TASK, CLASSES)       # warm-up
    with PeakMemory(device) as infer_mem:
        t0 = time.perf_counter()
        predict_proba(foundation, result.adapter, test, TASK, CLASSES, batch_size=64)
        infer_s = time.perf_counter() - t0
    train_img_s = batch / step_s
    contribution_s = setup_s + cfg.train.steps * cfg.train.batch_size / train_img_s
    return {"train_img_s": train_img_s, "contribution_s": contribution_s,
            "infer_img_s": infer_n / infer_s, "train_peak_mb": train_mem.mb, "infer_peak_mb": infer_mem.mb,
            "default_steps": cfg.train.steps}


def fractional_rows(cfg: SimConfig, precision: str, steps: int, batch: int, threads: int) -> list[dict]:
    """N concurrent Ray tasks on one GPU with ``num_gpus = 1 / N`` each; aggregate training images/s."""
    import ray

    ray.init(num_gpus=1, num_cpus=max(4, os.cpu_count() or 4), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    try:
        @ray.remote
        def worker(cfg: SimConfig, precision: str) -> dict:
            torch.set_num_threads(threads)
            return measure_row(cfg, "cuda", precision, steps, batch, infer_n=4 * batch)

        rows = []
        for fraction in FRACTIONS:
            n = round(1 / fraction)
            t0 = time.perf_counter()
            out = ray.get([worker.options(num_gpus=fraction, num_cpus=1).remote(cfg, precision) for _ in range(n)])
            rows.append({"fraction": fraction, "workers": n, "train_img_s": sum(r["train_img_s"] for r in out),
                         "peak_mb": max(r["train_peak_mb"] for r in out), "wall_s": time.perf_counter() - t0})
        return rows
    finally:
        ray.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 timed steps at batch 16, 32 inference images")
    ap.add_argument("--steps", type=int, help="timed training steps (default 10; --quick 2)")
    ap.add_argument("--batch", type=int, help="training batch size (default 32; --quick 16)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads")
    args = ap.parse_args()
    steps = args.steps or (2 if args.quick else 10)
    batch = args.batch or (16 if args.quick else 32)
    infer_n = 32 if args.quick else 256
    torch.set_num_threads(args.threads)
    import peft  # noqa: F401  (imported before the first row, whose time and memory would otherwise include it)
    cuda = torch.cuda.is_available()
    devices = ["cpu"] + (["cuda"] if cuda else [])
    print(f"{os.cpu_count()} CPU cores, {args.threads} torch threads; LoRA r=8 on qkv; {steps} timed steps at "
          f"batch {batch} (+1 warm-up), inference on {infer_n} images")
    print(f"GPU: {torch.cuda.get_device_name(0)}" if cuda else "GPU: none found (torch.cuda.is_available() is "
          "False): CPU rows only, no GPU or fractional-GPU rows")
    header = (f"{'foundation':<34} {'img':>4} {'device':>6} {'prec':>5} {'train img/s':>11} {'contrib s*':>10} "
              f"{'infer img/s':>11} {'train peak MB':>13} {'infer peak MB':>13}")
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory() as tmp:
        cfgs = foundations(tmp)
        for name, cfg in cfgs.items():
            for device in devices:
                for precision in ("fp32", "bf16"):
                    r = measure_row(cfg, device, precision, steps, batch, infer_n)
                    print(f"{name:<34} {cfg.data.img_size:>4} {device:>6} {precision:>5} {r['train_img_s']:>11.1f} "
                          f"{r['contribution_s']:>10.1f} {r['infer_img_s']:>11.1f} {r['train_peak_mb']:>13.0f} "
                          f"{r['infer_peak_mb']:>13.0f}", flush=True)
        default = SimConfig().train
        print(f"* per contribution: EXTRAPOLATED, not timed: set-up + train.steps x train.batch_size = {default.steps} "
              f"x {default.batch_size} images at the measured train img/s (measured at batch {batch}); training "
              f"only. CPU peak = RSS above the row's start; GPU peak = max allocated")
        if not cuda:
            print("fractional GPU rows (1, 0.5, 0.25 GPU per worker): skipped, no GPU found")
            return
        print(f"\nfractional GPU: N concurrent Ray workers sharing one GPU, training at batch {batch}")
        print(f"{'foundation':<34} {'prec':>5} {'GPU/worker':>10} {'workers':>7} {'aggregate img/s':>15} "
              f"{'max peak MB':>11}")
        for name, cfg in cfgs.items():
            for precision in ("fp32", "bf16"):
                for row in fractional_rows(cfg, precision, steps, batch, threads=1):
                    print(f"{name:<34} {precision:>5} {row['fraction']:>10g} {row['workers']:>7} "
                          f"{row['train_img_s']:>15.1f} {row['peak_mb']:>11.0f}", flush=True)


if __name__ == "__main__":
    main()
