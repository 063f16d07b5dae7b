"""Distillation on the default synthetic cohort: IPC sweep × method table of fidelity and privacy, and the time of
one default ``dm`` distillation at IPC 10 for one institution.

    .venv/bin/python benchmarks/distill.py [--threads 1] [--institutions 0] [--ipcs 1,5,10,20,50]
                                           [--methods dm,random,herding,noise] [--set distill.iterations=...]

Per institution the real-data adapter is trained once and shared by every row (same LoRA/train config and seed);
each row trains one adapter on the distilled set. The full sweep trains 21 adapters per institution (minutes).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sim.config import SimConfig, apply_overrides  # noqa: E402
from sim.data import build_cohort  # noqa: E402
from sim.distill import distill  # noqa: E402
from sim.distill.audit import audit_institution, point_text  # noqa: E402
from sim.model import load_foundation  # noqa: E402
from sim.train import train_adapter  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the timing target is for one core)")
    ap.add_argument("--institutions", default="0", help="comma-separated institution ids")
    ap.add_argument("--ipcs", default="1,5,10,20,50")
    ap.add_argument("--methods", default="dm,random,herding,noise")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override, repeatable")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = apply_overrides(SimConfig(), args.overrides)
    cohort = build_cohort(cfg.data, cfg.seed)
    foundation = load_foundation(cfg.model, cfg.data.img_size)
    d = cfg.distill
    print(f"default dm: embed {d.embed} (width {d.embed_width}, depth {d.embed_depth}), init {d.init}, "
          f"{d.iterations} iterations, lr_img {d.lr_img} (SGD, momentum 0.5), real_batch {d.real_batch}, "
          f"DSA {d.dsa_strategy if d.dsa else 'off'}; {args.threads} thread(s), {os.cpu_count()} cores")

    # The headline number: one default dm distillation at IPC 10 for one institution.
    inst = cohort.institutions[int(args.institutions.split(",")[0])]
    ten = dataclasses.replace(cfg.distill, method="dm", ipc=10)
    t0 = time.perf_counter()
    distill(inst.train, inst.task, inst.classes, ten, cfg.seed, foundation)
    print(f"\none dm distillation, IPC 10, {inst.name} ({inst.task}, {len(inst.train)} images, "
          f"{len(inst.classes)} classes): {time.perf_counter() - t0:.1f} s (target <= 30 s)\n")

    print("| institution | task | method | IPC | images | distill s | fidelity | gain recovered | acc distilled | "
          "acc real | memorised | MIA TPR@1%FPR exposed | MIA TPR@1%FPR all | flagged |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for inst_id in (int(i) for i in args.institutions.split(",")):
        inst = cohort.institutions[inst_id]
        ref = train_adapter(foundation, inst.train, inst.task, inst.classes, cfg.lora, cfg.train, cfg.seed,
                            head=cfg.model.head).adapter
        for ipc in (int(k) for k in args.ipcs.split(",")):
            for method in args.methods.split(","):
                dcfg = dataclasses.replace(cfg.distill, method=method, ipc=ipc)
                ds = distill(inst.train, inst.task, inst.classes, dcfg, cfg.seed, foundation)
                r = audit_institution(foundation, inst, ds, cfg.replace(distill=dcfg), cfg.seed, real_adapter=ref)
                print(f"| {inst.name} | {inst.task} | {method} | {ipc} | {len(ds)} | {ds.meta['distill_s']:.1f} | "
                      f"{r['fidelity']:.3f} | {r['gain_recovered']:.3f} | {r['acc_distilled']:.3f} | "
                      f"{r['acc_real']:.3f} | {r['memorised_fraction']:.2f} | "
                      f"{point_text(r['mia']['combined']['exposed']['1pct'])} | "
                      f"{point_text(r['mia']['combined']['all']['1pct'])} | "
                      f"{'yes' if r['flagged'] else 'no'} |", flush=True)


if __name__ == "__main__":
    main()
