"""Where and in which precision the frozen foundation computes: autocast for ``runtime.precision`` and the release of
a worker's cached GPU memory between tasks.

``runtime.precision=bf16`` runs the foundation's forward passes under ``torch.autocast(device, torch.bfloat16)``
(mixed precision): matrix products and attention in bfloat16, reductions and everything outside the context in
float32. The parameters being trained (LoRA factors, linear heads), their gradients, the optimizer state and the
losses stay float32 — autocast casts copies of the weights for each product and leaves the parameters alone — and
features leave the context as float32 (``Foundation.features``), so heads, metrics and everything downstream see
float32 tensors either way. ``fp32`` (the default) enters no context at all: its results are bit-identical to those
of a forgesim without this option. bfloat16 autocast runs on the CPU too (which is what the tests check).
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
from typing import ContextManager

import torch

from sim.config import PRECISIONS

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16}
assert set(AUTOCAST_DTYPES) == set(PRECISIONS)


def autocast(device: torch.device | str, precision: str) -> ContextManager:
    """The autocast context of ``precision`` on ``device``'s kind; a no-op context for ``fp32``."""
    if precision not in AUTOCAST_DTYPES:
        raise ValueError(f"runtime.precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    dtype = AUTOCAST_DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def release_device_memory() -> bool:
    """Hand this process's cached, unused CUDA memory back to the driver; returns whether there was any to release.

    PyTorch's caching allocator keeps the blocks a task freed (activations, a training copy of the backbone,
    optimizer state) reserved for the process: an idle pooled worker would hold them, and the other workers sharing
    the GPU under a fractional ``runtime.num_gpus`` run out of memory — what Flower's users hit with idle simulation
    workers (flwr issues #1383, #5855). Called after every pooled task, once its references are gone (``gc.collect``
    first, for cycles). The foundation a worker caches stays on the device: it is in use. A no-op without CUDA (on
    the CPU the allocator returns freed memory itself), and it does not initialise CUDA in a process that never
    used it.
    """
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return False
    gc.collect()
    torch.cuda.empty_cache()
    return True


def off_cpu_tensors(obj: object, path: str = "result", limit: int = 3) -> list[str]:
    """Where ``obj`` holds tensors that are not on the CPU: ``["result.adapter.weights['k'] (cuda:0)", ...]``, at
    most ``limit``. Walks dataclasses, dicts, lists and tuples (what tasks return: commits, records, rows).

    A pooled task's result goes through Ray's object store to the merge actor, which has no GPU: a CUDA tensor in it
    would pin the worker's device memory and fail to load there."""
    found: list[str] = []

    def walk(x: object, where: str) -> None:
        if len(found) >= limit:
            return
        if isinstance(x, torch.Tensor):
            if x.device.type != "cpu":
                found.append(f"{where} ({x.device})")
        elif dataclasses.is_dataclass(x) and not isinstance(x, type):
            for f in dataclasses.fields(x):
                walk(getattr(x, f.name), f"{where}.{f.name}")
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(v, f"{where}[{k!r}]")
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(v, f"{where}[{i}]")

    walk(obj, path)
    return found
