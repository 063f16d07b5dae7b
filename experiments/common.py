"""What every ``forgesim`` command shares: CLIError, the config and data flags, config layering, output dirs."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Sequence

import yaml

from sim.config import SimConfig, apply_overrides, config_from_dict, config_to_dict, load_config
from sim.data import DATASETS

__all__ = ["CLIError", "COMMON_FLAGS", "add_config_args", "add_data_args", "resolve_config", "prepare_out_dir"]

# arg name -> config field of the flags ``add_config_args`` and ``add_data_args`` add
COMMON_FLAGS = {"seed": "seed", "data": "data.name", "data_dir": "data.data_dir", "classes": "data.classes"}


class CLIError(ValueError):
    """A user-facing error: printed as one line, exit code 2."""


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML or JSON config file (see `forgesim config`)")
    p.add_argument("--set", dest="overrides", metavar="SECTION.FIELD=VALUE", action="append", default=[],
                   help="override one config field; repeatable (e.g. --set lora.rank=4)")
    p.add_argument("--seed", type=int, help="master seed (seed)")


def add_data_args(p: argparse.ArgumentParser) -> None:
    """``--data`` (its choices are the dataset registry's names), ``--data-dir`` and ``--classes``."""
    p.add_argument("--data", choices=tuple(DATASETS), help="dataset (data.name)")
    # Paths typed on the command line are taken from the shell's directory and recorded absolute: Ray's workers
    # read them in their own working directory, and a resumed or replayed run may start from another one.
    p.add_argument("--data-dir", metavar="DIR", nargs="+", type=os.path.abspath,
                   help="medmnist: the directory of .npz files; imagefolder: one folder per task, each with one "
                        "subfolder of images per class (data.data_dir)")
    p.add_argument("--classes", metavar="FILE", type=os.path.abspath,
                   help="JSON/YAML file mapping a task to its class names in label order (data.classes)")


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
    if isinstance(value, (list, tuple)):         # a flag with several values (--data-dir A B): a JSON list is YAML
        return json.dumps([str(v) for v in value])
    return str(value).lower() if isinstance(value, bool) else str(value)


def prepare_out_dir(path: str | Path, overwrite: bool = False, create: bool = True) -> Path:
    """An output directory that is new or empty (or ``overwrite``): never mix two runs' files.

    With ``create=False`` only the checks run and nothing is created, so that a command can refuse bad input
    before it writes anything and create the dir once its work is done.
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CLIError(f"--out {out} is not empty; choose a new directory (or pass --overwrite)")
    if create:
        out.mkdir(parents=True, exist_ok=True)
    return out
