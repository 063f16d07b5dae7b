"""``forgesim merge``: merge peft LoRA adapter dirs offline with one strategy of ``sim.merge``."""
from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import numpy as np

from experiments.common import CLIError, add_config_args, prepare_out_dir, resolve_config
from sim.config import config_to_dict
from sim.data.base import DistilledSet
from sim.merge import SPECS, Mixture, check_compatible, get_spec, merge, save_predictor
from sim.model import Adapter, Foundation, load_adapter, load_foundation

HELP = ("merge peft LoRA adapter dirs with one strategy; writes a peft adapter dir (or a mixture or router dir) and "
        "merge.json")

FLAGS = {"seed": "seed", "density": "merge.density", "svd_threshold": "merge.svd_threshold", "rank": "merge.svd_rank",
         "trim": "merge.trim", "clip_norm": "merge.clip_norm",
         "optimizer": "merge.optimizer", "budget": "merge.budget", "search_mode": "merge.search_mode",
         "search_batch": "merge.search_batch", "granularity": "merge.granularity"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--strategy", required=True, metavar="NAME",
                   help=f"merge strategy: {', '.join(SPECS)}")
    p.add_argument("--adapters", required=True, nargs="+", metavar="DIR",
                   help="peft adapter dirs (written by forgesim or by peft itself), in arrival order")
    p.add_argument("--weights", metavar="W1,W2,...",
                   help="one weight per adapter (default: the strategy's own, 1/N or 1; see sim.merge)")
    p.add_argument("--density", type=float, help="ties/dare/magnitude_prune: fraction of entries kept (merge.density)")
    p.add_argument("--svd-threshold", type=float,
                   help="svd: cumulative singular-value share kept (merge.svd_threshold)")
    p.add_argument("--rank", type=int, help="svd: cap on the merged rank, 0 = none (merge.svd_rank)")
    p.add_argument("--trim", type=float, help="trimmed_mean: fraction removed at each end of every entry, in [0, 0.5) "
                                              "(merge.trim; default 0.1)")
    p.add_argument("--clip-norm", type=float, help="clipped_mean: norm bound of each whole update, 0 = the median of "
                                                   "the contributors' norms (merge.clip_norm)")
    p.add_argument("--proxy", nargs="+", metavar="FILE.npz", default=[],
                   help="distilled sets (distilled.npz): search the coefficients on them with nevergrad (fusion and "
                        "mixture: merge.search_mode; other strategies: all N weights at once). A sequential search "
                        "takes one file per --adapters dir, in the same order (the set each adapter came with): "
                        "stage i searches on the sets of adapters 0..i, as in a run. Needs the foundation the "
                        "adapters were trained on: give its --config (model and data.img_size). Without --proxy "
                        "fusion and mixture use --weights or 1/N. regmean and fisher need it, one file per --adapters "
                        "dir in the same order: their statistics (input Grams, Fisher diagonals) come from each "
                        "adapter's own set, and their weights are not searched. router and task_route need it too, one file "
                        "per --adapters dir in the same order: the gate (task classifier) is trained on those sets")
    p.add_argument("--optimizer", help="nevergrad optimizer of the search (merge.optimizer)")
    p.add_argument("--budget", type=int, help="evaluations of the search (merge.budget)")
    p.add_argument("--search-mode", choices=("sequential", "global"), help="fusion/mixture search (merge.search_mode)")
    p.add_argument("--search-batch", type=int, help="candidates asked and scored together, 1 = one at a time; B > 1 needs "
                                                    "a parallel --optimizer such as TwoPointsDE (merge.search_batch)")
    p.add_argument("--granularity", choices=("adapter", "layer"), help="one coefficient per adapter or per module "
                                                                       "(merge.granularity)")
    add_config_args(p)
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (new or empty)")
    p.add_argument("--overwrite", action="store_true", help="allow a non-empty --out")


def parse_weights(text: str | None, n: int) -> np.ndarray | None:
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CLIError(f"--weights must be comma-separated numbers, got {text!r}") from None
    if len(values) != n or not all(math.isfinite(v) for v in values):
        raise CLIError(f"--weights needs {n} finite numbers (one per adapter), got {text!r}")
    return np.asarray(values)


# peft's LoRA keys (after ``load_adapter`` drops the adapter name): base_model.model.<module>.lora_{A,B}.weight
LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>[\w.]+)\.lora_(?P<factor>[AB])\.weight$")


def check_keys(adapter: Adapter, where: str) -> None:
    """Every tensor is a peft LoRA factor, and every module has both factors, as 2-d tensors of one rank."""
    factors: dict[str, set[str]] = {}
    for key, t in adapter.weights.items():
        m = LORA_KEY.match(key)
        if m is None:
            raise CLIError(f"--adapters {where}: tensor {key!r} is not a peft LoRA key "
                           f"(base_model.model.<module>.lora_A.weight / .lora_B.weight)")
        if t.ndim != 2:
            raise CLIError(f"--adapters {where}: tensor {key!r} has shape {tuple(t.shape)}, expected 2-d")
        factors.setdefault(m["module"], set()).add(m["factor"])
    if not factors:
        raise CLIError(f"--adapters {where}: the adapter holds no LoRA tensors")
    for module, have in factors.items():
        if have != {"A", "B"}:
            raise CLIError(f"--adapters {where}: module {module} has lora_{''.join(sorted(have))} but not "
                           f"lora_{''.join(sorted({'A', 'B'} - have))}")


def pair_proxy(dirs: list[str], adapters: list[Adapter], files: list[str], proxy: list[DistilledSet],
               why: str = "a sequential search (merge.search_mode: sequential)",
               detail: str = "stage i searches on the sets of adapters 0..i") -> None:
    """A sequential search, or a strategy with per-contributor statistics (``why``), pairs ``--proxy`` with
    ``--adapters`` by position: one file each, of the adapter's task where the adapter records one (forgesim adapters
    do; a joint adapter or a peft-written dir does not)."""
    if len(files) != len(dirs):
        raise CLIError(f"--proxy: {why} needs one distilled set per --adapters dir, in the same order ({detail}); got "
                       f"{len(files)} file(s) for {len(dirs)} adapters")
    for d, a, f, ds in zip(dirs, adapters, files, proxy):
        task = a.meta.get("task")
        if isinstance(task, str) and task != "joint" and task != ds.task:
            raise CLIError(f"--proxy {f} holds task {ds.task!r} but is paired with --adapters {d}, trained on task "
                           f"{task!r}: give --proxy in the order of --adapters")


def load_adapters(dirs: list[str]) -> list[Adapter]:
    adapters = []
    for d in dirs:
        if not Path(d).is_dir():
            raise CLIError(f"--adapters {d} is not a directory")
        try:
            adapter = load_adapter(d)
        except ValueError as exc:   # name the dir once: load_adapter's own messages mostly do already
            raise CLIError(str(exc) if str(d) in str(exc) else f"--adapters {d}: {exc}") from None
        check_keys(adapter, d)
        adapters.append(adapter)
    return adapters


def check_fits(foundation: Foundation, adapters: list[Adapter]) -> None:
    """Every adapter matches the foundation's fingerprint (where recorded) and its module shapes."""
    for i, a in enumerate(adapters):
        a.check_base(foundation)
        for m in a.modules():
            try:
                shape = tuple(foundation.weight(m).shape)
            except AttributeError:
                raise ValueError(f"adapter {i} targets {m}, which the foundation of this config "
                                 f"does not have") from None
            own = (a.factors(m)[1].shape[0], a.factors(m)[0].shape[1])
            if own != shape:
                raise ValueError(f"adapter {i} module {m} has shape {own}; the foundation's weight is {shape}")


def run(args: argparse.Namespace) -> int:
    # Step 1: check every input before anything is written.
    cfg = resolve_config(args, FLAGS)
    if args.strategy not in SPECS:
        raise CLIError(f"--strategy {args.strategy!r} is unknown; known: {', '.join(SPECS)}")
    spec = get_spec(args.strategy)
    adapters = load_adapters(args.adapters)
    weights = parse_weights(args.weights, len(adapters))
    check_compatible(adapters, same_modules=spec.same_modules, same_ranks=not spec.mixed_ranks)
    foundation, proxy = None, [DistilledSet.load(f) for f in args.proxy]
    per_adapter = spec.statistic_impl is not None or spec.fitted     # one set per adapter, paired by position
    if per_adapter and not proxy:
        what = "its gate is trained on them" if spec.fitted else "its statistics are computed on them"
        raise CLIError(f"--strategy {args.strategy} needs --proxy: the distilled set each adapter was committed with, "
                       f"one FILE.npz per --adapters dir in the same order ({what})")
    if spec.fitted and weights is not None:
        raise CLIError(f"--strategy {args.strategy} takes no --weights: its weights over the adapters are per image, "
                       f"learned on the --proxy sets")
    if proxy:
        if weights is not None:
            raise CLIError("--weights and --proxy exclude each other: give weights, or let the search find them")
        from sim.coefficients import get_optimizer

        get_optimizer(cfg.merge.optimizer)
        if per_adapter:
            pair_proxy(args.adapters, adapters, args.proxy, proxy, f"--strategy {args.strategy}",
                       "the gate is trained on the sets received" if spec.fitted
                       else "each adapter's statistics are computed on its own set")
        elif spec.sequential and cfg.merge.search_mode == "sequential":
            pair_proxy(args.adapters, adapters, args.proxy, proxy, detail="stage i searches on the sets of adapters "
                       "0..i; --search-mode global uses any number")
        foundation = load_foundation(cfg.model, cfg.data.img_size, cfg.runtime.device, cfg.runtime.precision)
        check_fits(foundation, adapters)
    out = prepare_out_dir(args.out, args.overwrite)
    # Step 2: merge.
    result = merge(args.strategy, adapters, weights, cfg=cfg.merge, foundation=foundation, proxy=proxy or None,
                   seed=cfg.seed, search=bool(proxy) and not per_adapter)
    # Step 3: write the merged predictor and how it was made.
    save_predictor(result.merged, out)
    summary = {"strategy": args.strategy, "adapters": [str(Path(d).resolve()) for d in args.adapters],
               "proxy": [str(Path(f).resolve()) for f in args.proxy], "seed": cfg.seed,
               "coefficients": None if result.coefficients is None else np.asarray(result.coefficients).tolist(),
               "trace": result.trace, "stages": result.stages, "merge_s": result.merge_s,
               "record": result.record(), "merge_config": config_to_dict(cfg.merge)}
    (out / "merge.json").write_text(json.dumps(summary, indent=2, default=str))
    rec = result.record()
    what = (f"adapter of max rank {rec['max_rank']}" if isinstance(result.merged, Adapter)
            else f"{'mixture' if isinstance(result.merged, Mixture) else result.merged.kind} of "
                 f"{len(result.merged.adapters)} adapters")
    search = (f" | search {rec['initial_objective']:.4f} -> {rec['objective']:.4f} in {rec['evaluations']} evals"
              if result.trace else "")
    print(f"{args.strategy}: {len(adapters)} adapters -> {what} in {result.merge_s:.2f}s{search} -> {out}")
    return 0
