"""Pretrain forgesim's own foundation and write the file a fresh machine loads instead of pretraining.

    .venv/bin/python scripts/pretrain_foundation.py [--out DIR] [--img-size S] [--threads N] [--set model.F=V ...]

The two shipped files: ``foundation-6c0adb364313332e`` (the default, ``model.pretrain_data=shapes``: no ``--set``)
and ``foundation-6e03c582a8a03335`` (``--set model.pretrain_data=formula --threads 1``: the formula-driven corpus
of ``sim.data.formula``, 192 categories, 19,200 images, seed 0; 750 s on a busy 2-core machine, most of it the 600
steps, about 2 min the corpus).

Runs ``sim.model.pretrain_foundation`` (seeded: torch.manual_seed(0) for the initial weights, generator seed 0 for
batches and augmentation) for the model section of the default config, or the one ``--set`` gives, and writes
``foundation-<key>.safetensors`` into ``--out`` (default: ``sim/foundations``, the weights shipped with forgesim;
``sim.model`` loads a shipped file whose key matches before it would pretrain). Prints the key, the sha256 of the
file and the wall time. The same torch build on the same kind of CPU writes the same weights, bit for bit; other builds may
differ in the last bits, which is why the shipped file, not each machine's own pretraining, is the default.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from sim.config import SimConfig, apply_overrides  # noqa: E402
from sim.model import foundation_path, pretrain_foundation  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "sim" / "foundations")
    ap.add_argument("--img-size", type=int, default=None, help="input size (default: data.img_size of the config)")
    ap.add_argument("--set", action="append", default=[], metavar="model.FIELD=VALUE")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's own)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = apply_overrides(SimConfig(), args.set) if args.set else SimConfig()
    img_size = args.img_size or cfg.data.img_size
    model = dataclasses.replace(cfg.model, cache_dir=str(args.out))
    path = foundation_path(model, img_size)
    t0 = time.perf_counter()
    state = pretrain_foundation(model, img_size, log=print)
    args.out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={"forgesim": "foundation", "key": path.stem})
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    print(f"{path} ({path.stat().st_size / 1e6:.2f} MB) sha256 {digest} in {time.perf_counter() - t0:.0f} s "
          f"({torch.get_num_threads()} torch threads, torch {torch.__version__})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
