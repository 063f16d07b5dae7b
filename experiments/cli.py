"""The ``forgesim`` command line: builds the parser from the commands (``experiments/cmd_*.py``) and runs one.

Each command module has ``HELP``, ``add_arguments(parser)`` and ``run(args) -> exit code``; what they share (flags,
config layering, output dirs, ``CLIError``) is in ``experiments.common``, so no command imports this module.

Configuration is layered: defaults < ``--config FILE`` < dedicated flags (``--rank``…) < ``--set
section.field=value``. Bad input (a config field, a data file, an output dir) ends with one line
``forgesim: error: …`` and exit code 2, before any work starts.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from experiments import (cmd_config, cmd_demo, cmd_distill, cmd_merge, cmd_replay, cmd_report, cmd_run, cmd_sweep,
                         cmd_train)
from experiments.common import CLIError


# name -> (help, add_arguments, run); each run(args) returns an exit code
def _commands() -> dict[str, tuple[str, Callable, Callable]]:
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
