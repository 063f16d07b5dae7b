"""``forgesim distill``: distil one institution's training data and audit the result.

Writes ``distilled.npz`` (images, labels, class names: what the institution would commit), ``preview.png``
(the distilled images, one row per class), ``audit.json`` (fidelity, memorised fraction, membership-inference
AUC, the leak verdict, per-class counts, timings) and ``config.json``.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from experiments.common import COMMON_FLAGS, CLIError, add_config_args, add_data_args, prepare_out_dir, resolve_config
from sim.config import config_to_dict
from sim.data import Cohort, DistilledSet, Institution, build_cohort
from sim.distill import distill
from sim.distill.audit import audit_institution, point_text
from sim.model import load_foundation
from sim.records import json_safe

HELP = "distil one institution's data (dm, random, herding, noise); writes distilled.npz, preview.png, audit.json"
PREVIEW_MAX_COLS = 20


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_data_args(p)
    p.add_argument("--task", help="task name: distil the first institution (site 0) holding it "
                                  "(default: the dataset's first task)")
    p.add_argument("--institution", type=int, metavar="ID", help="institution id to distil (instead of --task)")
    # Method and IPC are validated by the config (one-line errors naming distill.method / distill.ipc).
    p.add_argument("--method", metavar="{dm,random,herding,noise}", help="distiller (distill.method)")
    p.add_argument("--ipc", metavar="K", help="distilled images per class (distill.ipc)")
    p.add_argument("--no-fidelity", action="store_true",
                   help="skip the fidelity check (it trains two adapters: on the distilled and on the real data)")
    add_config_args(p)
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (new or empty)")
    p.add_argument("--overwrite", action="store_true", help="allow a non-empty --out")


def pick_institution(cohort: Cohort, task: str | None, institution: int | None) -> Institution:
    """``--institution`` by id, else the first institution holding ``--task`` (default: the first task)."""
    if institution is not None:
        if not 0 <= institution < len(cohort.institutions):
            raise CLIError(f"--institution must be in [0, {len(cohort.institutions) - 1}], got {institution}")
        inst = cohort.institutions[institution]
        if task is not None and inst.task != task:
            raise CLIError(f"--institution {institution} holds task {inst.task!r}, not --task {task!r}")
        return inst
    task = task or cohort.tasks[0]
    if task not in cohort.task_classes:
        raise CLIError(f"--task {task!r} is not a task of this dataset; tasks: {', '.join(cohort.tasks)}")
    return next(i for i in cohort.institutions if i.task == task)


def save_preview(distilled: DistilledSet, path: Path, max_cols: int = PREVIEW_MAX_COLS) -> Path:
    """A PNG grid of the distilled images: one row per class (label on the left), at most ``max_cols`` each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k, size, pad = len(distilled.classes), distilled.x.shape[-1], 2
    counts = np.bincount(distilled.y, minlength=k)
    cols = max(1, min(max_cols, int(counts.max(initial=0))))
    cell = size + pad
    grid = np.ones((k * cell + pad, cols * cell + pad, 3), np.float32)           # white background
    for c in range(k):
        for j, img in enumerate(distilled.x[distilled.y == c][:cols]):
            top, left = pad + c * cell, pad + j * cell
            grid[top:top + size, left:left + size] = img.transpose(1, 2, 0)    # (S, S, 3)
    scale = max(1.0, 48 / size) * 0.02                                          # inches per pixel
    fig, ax = plt.subplots(figsize=(max(3.0, grid.shape[1] * scale + 1.6), max(1.6, grid.shape[0] * scale + 0.6)))
    ax.imshow(np.clip(grid, 0, 1), interpolation="nearest")
    ax.set_yticks([pad + c * cell + size / 2 for c in range(k)],
                  [f"{name} ({counts[c]})" for c, name in enumerate(distilled.classes)], fontsize=8)
    ax.set_xticks([])
    shown = "" if counts.max(initial=0) <= cols else f", first {cols} per class shown"
    ax.set_title(f"{distilled.task}: {distilled.method}, IPC {distilled.meta.get('ipc', '?')}{shown}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run(args: argparse.Namespace) -> int:
    cfg = resolve_config(args, COMMON_FLAGS | {"method": "distill.method", "ipc": "distill.ipc"})
    prepare_out_dir(args.out, args.overwrite, create=False)      # bad input writes nothing
    t0 = time.perf_counter()
    cohort = build_cohort(cfg.data, cfg.seed)
    inst = pick_institution(cohort, args.task, args.institution)
    foundation = load_foundation(cfg.model, cfg.data.img_size, cfg.runtime.device, cfg.runtime.precision)
    foundation.check_tasks(cohort.task_classes)
    # Step 1: distil the institution's private training split.
    distilled = distill(inst.train, inst.task, inst.classes, cfg.distill, cfg.seed, foundation)
    # Step 2: audit it against the institution's own data (privacy always; fidelity unless skipped).
    t1 = time.perf_counter()
    report = audit_institution(foundation, inst, distilled, cfg, cfg.seed, with_fidelity=not args.no_fidelity)
    audit_s = time.perf_counter() - t1
    # Step 3: write the commit payload, the preview and the audit.
    out = prepare_out_dir(args.out, args.overwrite)
    distilled.save(out / "distilled.npz")
    save_preview(distilled, out / "preview.png")
    meta = distilled.meta
    audit = {
        **report, "institution_name": inst.name, "site": inst.site, "classes": list(inst.classes),
        "n_images": len(distilled), "storage_bytes": distilled.num_bytes(),
        "per_class": {k: meta[k] for k in ("real_counts", "distilled_counts", "prevalence", "short_classes",
                                            "empty_classes", "rare_classes")},
        "distill": {k: v for k, v in meta.items() if k not in ("real_counts", "distilled_counts", "prevalence")},
        "timings": {"distill_s": meta["distill_s"], "audit_s": audit_s, "total_s": time.perf_counter() - t0},
        "seed": cfg.seed, "base_fingerprint": foundation.fingerprint,
    }
    (out / "audit.json").write_text(json.dumps(json_safe(audit), indent=2))
    (out / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2))
    fid = "skipped" if report["fidelity"] is None else f"{report['fidelity']:.3f}"
    mia = report["mia"]["combined"]
    print(f"{inst.name} ({inst.task}) {cfg.distill.method} IPC {cfg.distill.ipc}: {len(distilled)} images in "
          f"{meta['distill_s']:.1f}s | fidelity {fid} | memorised {report['memorised_fraction']:.2f} | "
          f"MIA TPR@1%FPR {point_text(mia['exposed']['1pct'])} exposed, {point_text(mia['all']['1pct'])} all | "
          f"{'FLAGGED' if report['flagged'] else 'not flagged'} -> {out}")
    return 0
