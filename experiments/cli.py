"""The ``forgesim`` command line: one subcommand per capability.

Configuration is layered: defaults < ``--config FILE`` < dedicated flags (``--rank``…) < ``--set
section.field=value``. Bad input (a config field, a data file, an output dir) ends with one line
``forgesim: error: …`` and exit code 2, before any work starts.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Sequence

import yaml

from sim.config import SimConfig, apply_overrides, config_from_dict, config_to_dict, load_config


class CLIError(ValueError):
    """A user-facing error: printed as one line, exit code 2."""


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML or JSON config file (see `forgesim config`)")
    p.add_argument("--set", dest="overrides", metavar="SECTION.FIELD=VALUE", action="append", default=[],
                   help="override one config field; repeatable (e.g. --set lora.rank=4)")
    p.add_argument("--seed", type=int, help="master seed (seed)")


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", choices=("synthetic", "digits", "medmnist"), help="dataset (data.name)")
    p.add_argument("--data-dir", metavar="DIR", help="directory of MedMNIST .npz files (data.data_dir)")


def resolve_config(args: argparse.Namespace, flag_map: dict[str, str], base: SimConfig | None = None,
                   extra: Sequence[str] = ()) -> SimConfig:
    """``base`` (defaults, or a preset) < --config < flags in ``flag_map`` (arg name -> section.field) and
    ``extra`` overrides < --set. Over a preset, the file's fields replace the preset's field by field."""
    path = getattr(args, "config", None)
    if base is None:
        cfg = load_config(path) if path else SimConfig()
    else:
        cfg = base
        if path:
            load_config(path)                              # validates the file on its own, errors name the field
            merged = config_to_dict(base)
            for section, values in (yaml.safe_load(Path(path).read_text()) or {}).items():
                merged[section] = merged[section] | values if isinstance(values, dict) else values
            cfg = config_from_dict(merged)
    flags = [f"{field}={_yaml_value(getattr(args, arg))}" for arg, field in flag_map.items()
             if getattr(args, arg, None) is not None]
    return apply_overrides(cfg, flags + list(extra) + list(getattr(args, "overrides", [])))


def _yaml_value(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


COMMON_FLAGS = {"seed": "seed", "data": "data.name", "data_dir": "data.data_dir"}


def prepare_out_dir(path: str | Path, overwrite: bool = False) -> Path:
    """An output directory that is new or empty (or ``overwrite``): never mix two runs' files."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CLIError(f"--out {out} is not empty; choose a new directory (or pass --overwrite)")
    out.mkdir(parents=True, exist_ok=True)
    return out


# name -> (help, add_arguments, run); each run(args) returns an exit code
def _commands() -> dict[str, tuple[str, Callable, Callable]]:
    from experiments import cmd_config, cmd_demo, cmd_distill, cmd_merge, cmd_replay, cmd_run, cmd_train
    from experiments import cmd_report, cmd_sweep

    return {
        "run": (cmd_run.HELP, cmd_run.add_arguments, cmd_run.run),
        "sweep": (cmd_sweep.HELP, cmd_sweep.add_arguments, cmd_sweep.run),
        "replay": (cmd_replay.HELP, cmd_replay.add_arguments, cmd_replay.run),
        "train": (cmd_train.HELP, cmd_train.add_arguments, cmd_train.run),
        "distill": (cmd_distill.HELP, cmd_distill.add_arguments, cmd_distill.run),
        "merge": (cmd_merge.HELP, cmd_merge.add_arguments, cmd_merge.run),
        "demo": (cmd_demo.HELP, cmd_demo.add_arguments, cmd_demo.run),
        "config": (cmd_config.HELP, cmd_config.add_arguments, cmd_config.run),
        "report": (cmd_report.HELP, cmd_report.add_arguments, cmd_report.run),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="forgesim",
        description="Simulate a medical foundation model built like open-source software: institutions train "
                    "LoRA adapters on private data and commit them with distilled data to a merge actor.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, add_arguments, run) in _commands().items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
        p.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (CLIError, ValueError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        print(f"forgesim: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("forgesim: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
