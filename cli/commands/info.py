"""`minitron info MODEL`: architecture, exact parameter count, dtype and where it was loaded from.

A config-only model (a folder with just config.json, or a shipped alias like `llama-3.1-8b`) is built on the meta
device: exact shapes and counts, no weights read, no memory used."""

from __future__ import annotations

from cli.commands.common import add_model_args, load_model_from_args, print_json_or_lines


def register(sub) -> None:
    p = sub.add_parser("info", help="show a model's architecture and parameter count",
                       description="Show a model's architecture, exact parameter count, dtype and source.")
    p.add_argument("model", help="model folder (config.json alone is enough), .gguf, hub id, alias (smollm2-135m, "
                   "tiny-random-llama; config-only: llama-3.1-8b, mistral-nemo-12b, nemotron-4-15b) or a checkpoint "
                   "URI the run printed (file://..., s3://...; its manifest is verified)")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_model_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from minitron.config import format_count
    from minitron.models import build_meta_model, describe, is_config_only, load_config

    if is_config_only(args.model):
        model = build_meta_model(load_config(args.model, trust_remote_code=args.trust_remote_code))
    else:
        model, _ = load_model_from_args(args.model, args)
    info = describe(model, args.model)
    if not args.json:
        info["parameters"] = f"{info['parameters']:,} ({format_count(info['parameters'])})"
    print_json_or_lines(info, args.json)
    return 0
