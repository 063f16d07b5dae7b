"""Membership-inference power of the privacy audit on one default institution: TPR at 1 % / 0.1 % FPR per method.

    .venv/bin/python benchmarks/mia.py [--institution 0] [--methods random,noise] [--shadows 2] [--threads 1]
                                       [--set distill.ipc=10 ...]

Per method and number of shadows: distil the institution's training split and run the audit's membership attack
(``sim.distill.audit.membership_audit``: target adapter trained on the distilled set, ``k`` shadows; 0 = the
global-threshold loss attack). Prints one row per observable (model, data, combined) with the sample counts,
95 % Clopper–Pearson intervals and the audit's time (dominated by one adapter training per shadow + the target).
"""
from __future__ import annotations

import argparse
import dataclasses
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--institution", type=int, default=0)
    ap.add_argument("--methods", default="random,noise")
    ap.add_argument("--shadows", default="2")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override, repeatable")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = apply_overrides(SimConfig(), args.overrides)
    inst = build_cohort(cfg.data, cfg.seed).institutions[args.institution]
    foundation = load_foundation(cfg.model, cfg.data.img_size)
    print(f"{inst.name} ({inst.task}): {len(inst.train)} members, {len(inst.val) + len(inst.test)} non-members; "
          f"IPC {cfg.distill.ipc}; train {cfg.train.steps} steps x {cfg.train.batch_size}; {args.threads} thread(s)")
    print("| method | attack | shadows | observable | n mem / n non | TPR@1%FPR all [95% CP] at FPR | n exposed | "
          "TPR@1%FPR exposed [95% CP] at FPR | TPR@0.1%FPR exposed | AUC all | AUC exposed | flagged | audit s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for method in args.methods.split(","):
        for k in (int(v) for v in args.shadows.split(",")):
            d = dataclasses.replace(cfg.distill, method=method, audit_shadows=k)
            ds = distill(inst.train, inst.task, inst.classes, d, cfg.seed, foundation)
            t0 = time.perf_counter()
            r = audit_institution(foundation, inst, ds, cfg.replace(distill=d), cfg.seed, with_fidelity=False)
            audit_s = time.perf_counter() - t0
            for name in ("model", "data", "combined"):
                if name not in r["mia"]:
                    continue
                a, e = r["mia"][name]["all"], r["mia"][name]["exposed"]
                print(f"| {method} | {r['mia']['attack']} | {k} | {name} | {a['1pct']['n_members']} / "
                      f"{a['1pct']['n_nonmembers']} | {point_text(a['1pct'])} | {e['1pct']['n_members']} | "
                      f"{point_text(e['1pct'])} | {point_text(e['0p1pct'])} | {a['auc']:.3f} | {e['auc']:.3f} | "
                      f"{'yes' if r['flagged'] else 'no'} | {audit_s:.0f} |", flush=True)


if __name__ == "__main__":
    main()
