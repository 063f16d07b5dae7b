"""``forgesim config``: print the resolved configuration as YAML, or every field with its help."""
from __future__ import annotations

import argparse
import dataclasses
import typing

import yaml

from experiments.common import COMMON_FLAGS, add_config_args, add_data_args, resolve_config
from sim.config import SECTIONS, SimConfig, config_to_dict

HELP = "print the resolved configuration (YAML), or --fields to list every field with its help"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_data_args(p)
    add_config_args(p)
    p.add_argument("--fields", action="store_true", help="list every field, its default and its help")


def describe_fields() -> str:
    lines = [f"seed = {SimConfig().seed!r}  # {dataclasses.fields(SimConfig)[0].metadata['help']}"]
    for section, cls in SECTIONS.items():
        lines.append(f"\n[{section}]")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            hint = getattr(hints[f.name], "__name__", str(hints[f.name]))
            lines.append(f"{section}.{f.name}: {hint} = {f.default!r}  # {f.metadata.get('help', '')}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.fields:
        print(describe_fields())
        return 0
    print(yaml.safe_dump(config_to_dict(resolve_config(args, COMMON_FLAGS)), sort_keys=False), end="")
    return 0
