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
    from minitron.memory import return_freed_memory

    return_freed_memory()  # before any model is loaded
    args = build_parser().parse_args(argv)
    try:
        _fetch_checkpoints(args)
        return args.func(args) or 0
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _fetch_checkpoints(args) -> None:
    """Model specs that are s3:// checkpoint URIs become verified local copies, for every command at once."""
    from cli.commands.common import SPEC_ARGS, local_spec

    for name in SPEC_ARGS:
        if isinstance(getattr(args, name, None), str):
            setattr(args, name, local_spec(getattr(args, name)))


if __name__ == "__main__":
    sys.exit(main())
