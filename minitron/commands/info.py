"""`minitron info MODEL`: architecture, exact parameter count, dtype and where it was loaded from."""

from __future__ import annotations

from minitron.commands.common import add_model_args, load_model_from_args, print_json_or_lines


def register(sub) -> None:
    p = sub.add_parser("info", help="show a model's architecture and parameter count",
                       description="Show a model's architecture, exact parameter count, dtype and source.")
    p.add_argument("model", help="model folder, .gguf, hub id or alias (smollm2-135m, tiny-random-llama)")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_model_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from minitron.config import format_count
    from minitron.models import describe

    model, _ = load_model_from_args(args.model, args)
    info = describe(model, args.model)
    if not args.json:
        info["parameters"] = f"{info['parameters']:,} ({format_count(info['parameters'])})"
    print_json_or_lines(info, args.json)
    return 0
