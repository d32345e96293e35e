"""`minitron`: one CLI for every stage (`minitron <command> --help`).

Each command lives in `cli/commands/<name>.py` with `register(subparsers)`, which adds its parser and sets
`func`. Heavy imports (torch, transformers, prefect, mlflow) happen inside the command, so `--help` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from minitron.errors import UserError

# Order = order in `minitron --help`: pipeline stages first, then planning and operations.
COMMANDS = ("info", "data", "tokenize", "importance", "prune", "candidates", "search", "correct-teacher", "distill", "evaluate", "run", "serve", "stack")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minitron",
        description="Minitron compression: importance scoring, structured pruning, architecture search and "
                    "knowledge distillation for Hugging Face causal LMs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"cli.commands.{name.replace('-', '_')}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
