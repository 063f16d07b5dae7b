"""The gate's claim at demo size: with the gate on, 20 % ``scale`` / ``sign_flip`` attackers end within 0.02 ACC of
the clean run.

    .venv/bin/python benchmarks/poisoning.py [--seeds 0] [--share 0.2] [--start 0] [--kinds scale,sign_flip]
                                             [--checks norm,cosine,duplicate,fit,regression]
                                             [--strategies ties,svd,mixture] [--cache DIR] [--out DIR]
                                             [--set section.field=value ...]

Per seed it runs the ``poisoning`` study's community (10 institutions over 4 tasks, the ``demo`` preset's training,
distillation and search sizes, 2 contributions each) without attackers (no gate, and the gate alone: its false
positives on honest commits), then each attack kind at ``--share`` (from merge position ``--start``; the study's
``attacks.start`` is 0) with the gate off and on. All runs share one commit cache (``runtime.commit_cache``,
``--cache``), so an honest contribution is trained once and every run merges the same honest commits; an attacked
one is trained once per kind. Prints per run and strategy the final ACC, its difference from the seed's clean run
without the gate and from the clean run with the same gate, under a backdoor its success (triggered test images of
other classes sent to the target class), the gate's TPR, FPR and seconds per commit checked; then the verdict of
the claim per kind and strategy (|Δ ACC| ≤ 0.02 with the gate on, against either clean run) and the measured values
of the checks that rejected honest commits. ``--out`` keeps the run dirs. The ACC figures are deterministic per seed
(virtual clock); the gate's seconds depend on the machine's load.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from actors.runner import run_simulation  # noqa: E402
from experiments.presets import GATE_ALL, demo  # noqa: E402
from sim.config import apply_overrides  # noqa: E402

TOLERANCE = 0.02


def one_run(seed: int, kind: str | None, share: float, start: int, checks: tuple[str, ...],
            strategies: tuple[str, ...], cache: str, out: Path, overrides: list[str]) -> dict:
    cfg = demo()
    cfg = cfg.replace(data=dataclasses.replace(cfg.data, institutions=10),
                      merge=dataclasses.replace(cfg.merge, strategies=strategies),
                      runtime=dataclasses.replace(cfg.runtime, commit_cache=cache, eval_every=0), seed=seed)
    sets = [f"gate.checks=[{','.join(checks)}]"]
    if kind:
        sets += [f"attacks.kind={kind}", f"attacks.share={share}", f"attacks.start={start}"]
    cfg = apply_overrides(cfg, sets + overrides)
    t0 = time.perf_counter()
    run_dir = out / f"seed{seed}-{kind or 'none'}-{'gate' if checks else 'nogate'}"
    summary = run_simulation(cfg, run_dir)
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    false_pos = [(r["id"], r["gate_failed"], r.get(f"gate_{r['gate_failed']}")) for r in log
                 if r.get("event") == "rejected" and r.get("gate_failed") and not r.get("attack")]
    gate = summary.get("gate", {})
    return {"seed": seed, "attack": kind or "none", "gate": ",".join(checks) or "off",
            "acc": {s: summary["strategies"][s]["acc"] for s in strategies},
            "asr": {s: summary["strategies"][s].get("asr", math.nan) for s in strategies},
            "accepted": summary["commits_accepted"], "commits": summary["commits_accepted"] + summary["commits_rejected"],
            "tpr": gate.get("tpr", math.nan), "fpr": gate.get("fpr", math.nan),
            "by_check": gate.get("by_check", {}), "gate_s": gate.get("gate_s_per_commit", math.nan),
            "false_positives": false_pos, "wall_s": time.perf_counter() - t0}


def rate(x: float) -> str:
    return "–" if x != x else f"{x:.2f}"


def deltas(r: dict, ref: dict, strategies) -> dict:
    return {s: r["acc"][s] - ref["acc"][s] for s in strategies}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--share", type=float, default=0.2)
    ap.add_argument("--start", type=int, default=0, help="attacks.start: merge position from which attackers attack")
    ap.add_argument("--kinds", default="scale,sign_flip")
    ap.add_argument("--checks", default=",".join(GATE_ALL))
    ap.add_argument("--strategies", default="ties,svd,mixture")
    ap.add_argument("--cache", default=None, help="commit cache dir shared by the runs (default: a temporary one)")
    ap.add_argument("--out", default=None, help="keep the run dirs here (default: a temporary dir, removed)")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    strategies, checks = tuple(args.strategies.split(",")), tuple(c for c in args.checks.split(",") if c)
    kinds = tuple(args.kinds.split(","))
    cache = args.cache or tempfile.mkdtemp(prefix="forgesim-poisoning-cache-")
    keep = tempfile.TemporaryDirectory() if args.out is None else None
    out = Path(args.out or keep.name)
    print(f"{os.cpu_count()} cores; demo sizes, 10 institutions × 2 contributions; gate {checks}; share {args.share} "
          f"from merge position {args.start}; commit cache {cache}")
    names = ", ".join(strategies)
    print(f"| seed | attack | gate | {' | '.join(strategies)} | Δ ACC vs clean, no gate ({names}) | "
          f"Δ ACC vs clean, same gate | backdoor success | accepted | TPR | FPR | rejected by | gate s / commit | wall s |")
    print("|" + "---|" * (11 + len(strategies)))
    verdicts, false_pos = [], []
    for seed in (int(s) for s in args.seeds.split(",")):
        clean: dict = {}
        for kind, gate in [(None, ()), (None, checks)] + [(k, g) for k in kinds for g in ((), checks)]:
            r = one_run(seed, kind, args.share, args.start, gate, strategies, cache, out, args.overrides)
            clean.setdefault(gate, r)
            plain, same = deltas(r, clean[()], strategies), deltas(r, clean[gate], strategies)
            if kind and gate:
                verdicts += [(seed, kind, s, plain[s], same[s]) for s in strategies]
            false_pos += [(seed, r["attack"], *fp) for fp in r["false_positives"]]
            rejected = ", ".join(f"{c} {n}" for c, n in r["by_check"].items() if n) or "–"
            print(f"| {seed} | {r['attack']} | {r['gate']} | " + " | ".join(f"{r['acc'][s]:.3f}" for s in strategies)
                  + " | " + ", ".join(f"{d:+.3f}" for d in plain.values())
                  + " | " + ", ".join(f"{d:+.3f}" for d in same.values())
                  + " | " + (", ".join(f"{r['asr'][s]:.3f}" for s in strategies) if kind == "backdoor" else "–")
                  + f" | {r['accepted']} / {r['commits']} | {rate(r['tpr'])} | {rate(r['fpr'])} | {rejected} | "
                  f"{rate(r['gate_s']) if gate else '–'} | {r['wall_s']:.0f} |", flush=True)
    print(f"\nclaim: with the gate on, |ACC − clean ACC| <= {TOLERANCE} at share {args.share} (vs the clean run without "
          f"the gate / with the same gate)")
    for seed, kind, s, d, e in verdicts:
        print(f"  seed {seed} {kind:10s} {s:12s} Δ {d:+.3f} / {e:+.3f}: "
              f"{'met' if abs(d) <= TOLERANCE else 'MISSED'} / {'met' if abs(e) <= TOLERANCE else 'MISSED'}")
    if false_pos:
        print("\nhonest commits the gate rejected (seed, run's attack, commit, check, its measured value):")
        for seed, attack, cid, check, value in false_pos:
            print(f"  {seed} {attack:10s} {cid} {check:10s} {value:.3f}")
    if keep is not None:
        keep.cleanup()


if __name__ == "__main__":
    main()
