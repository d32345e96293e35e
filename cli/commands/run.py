"""`minitron run --config FILE [--set key=value ...] [--dry-run [--gpu h100-80gb] [--nodes N]]`: the whole
compression.

`--dry-run` prints the plan (shapes, exact parameter counts, peak GPU memory per stage, tokens, GPU-hours) from the
config alone: no weights, no data, seconds. Without it the run goes to the orchestration (flows/run.py), which
imports Prefect and MLflow lazily so the planner and `--help` stay light."""

from __future__ import annotations

import json


def register(sub) -> None:

    from minitron.cost import GPUS, REFERENCE_GPU

    p = sub.add_parser("run", help="run (or --dry-run: plan) a whole compression from a config",
                       description="Run teacher correction, importance, search, distillation and evaluation as "
                                   "configured, or with --dry-run print what it would cost without reading weights.")
    p.add_argument("--config", default=None, help="YAML preset (configs/*.yaml); fields: --help-config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config field (repeatable), e.g. --set distill_tokens=2B")
    p.add_argument("--dry-run", action="store_true", help="print the plan: shapes, parameters, memory, GPU-hours")
    p.add_argument("--gpu", default=REFERENCE_GPU, choices=list(GPUS), help="GPU the dry run sizes stages for")
    p.add_argument("--nodes", type=int, default=None, metavar="N",
                   help="dry run: also plan every stage on N nodes (backend: ray) and print their wall-hours")
    p.add_argument("--gpus-per-node", type=int, default=8, metavar="G", help="with --nodes: GPUs per node (default 8)")
    p.add_argument("--mfu", type=float, default=None,
                   help="model-FLOPs utilisation for GPU-hours (default: our benchmark's, else 0.40)")
    p.add_argument("--json", action="store_true", help="dry run: print the plan as JSON")
    p.add_argument("--help-config", action="store_true", help="print every config field with type, default and "
                   "description, then exit")
    p.set_defaults(func=run)


def help_config() -> str:
    from minitron.config import CompressConfig

    lines = []
    for name, f in CompressConfig.model_fields.items():
        kind = getattr(f.annotation, "__name__", None) or str(f.annotation).replace("typing.", "")
        lines.append(f"{name}: {kind} = {f.default!r}\n    {f.description}")
    return "\n".join(lines)


def run(args) -> int:
    if args.help_config:
        print(help_config())
        return 0
    from minitron.config import load_config_file

    cfg = load_config_file(args.config, args.overrides)
    if args.dry_run:
        from minitron.plan import format_plan, make_plan

        plan = make_plan(cfg, args.gpu, args.mfu, nodes=args.nodes, gpus_per_node=args.gpus_per_node)
        print(json.dumps(plan.to_dict(), indent=2) if args.json else format_plan(plan))
        return 0
    from flows.run import run_from_cli

    return run_from_cli(cfg, args)
