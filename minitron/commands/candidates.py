"""`minitron candidates MODEL --target-params 70M --tolerance 0.05`: feasible pruned shapes with exact counts.

Needs the config only (a folder holding just config.json works): no weights are read."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("candidates", help="list pruned shapes under a parameter budget (config only)",
                       description="Enumerate homogeneous pruned shapes within a tolerance of a parameter budget, "
                                   "with exact parameter counts, closest first. Reads config.json only.")
    p.add_argument("model", help="model folder (config.json is enough), .gguf, hub id or alias")
    p.add_argument("--target-params", required=True, help="parameter budget, e.g. 70M or 4.5B")
    p.add_argument("--tolerance", type=float, default=0.05, help="relative distance to the budget allowed")
    p.add_argument("--axes", default="all", choices=["all", "width", "depth"],
                   help="width: keep all layers; depth: keep the width; all: both and mixed")
    p.add_argument("--prune-kv-groups", action="store_true", help="also try fewer KV groups")
    p.add_argument("--min-keep", type=float, default=0.5, help="keep at least this fraction of every axis")
    p.add_argument("--hidden-multiple", type=int, default=64, help="hidden size divisor")
    p.add_argument("--ffn-multiple", type=int, default=64, help="MLP size divisor")
    p.add_argument("--limit", type=int, default=30, help="rows to print, closest first (0 = all)")
    p.add_argument("--trust-remote-code", action="store_true", help="run the model repository's own code")
    p.set_defaults(func=run)


def run(args) -> int:
    from minitron.archmath import SearchSpace, count_params, enumerate_candidates
    from minitron.commands.common import print_table
    from minitron.config import format_count, parse_count
    from minitron.models import load_config

    target = parse_count(args.target_params)
    config = load_config(args.model, trust_remote_code=args.trust_remote_code)
    keep = args.min_keep
    space = SearchSpace(keep, keep, keep, keep, args.hidden_multiple, args.ffn_multiple, args.prune_kv_groups)
    found = enumerate_candidates(config, target, args.tolerance, axes=args.axes, space=space)
    shown = found[: args.limit] if args.limit > 0 else found
    rows = [{"kind": c.kind, "layers": c.shape.layers, "hidden": c.shape.hidden, "ffn": c.shape.ffn,
             "heads": c.shape.heads, "kv": c.shape.kv_heads, "head_dim": c.shape.head_dim,
             "params": f"{c.params:,}", "vs_target": f"{(c.params - target) / target:+.2%}",
             "drop": f"{c.drop[0] + 1}-{c.drop[1] + 1}" if c.drop else ""} for c in shown]
    total = count_params(config)
    print(f"model: {total:,} parameters ({format_count(total)}); target {target:,} ±{args.tolerance:.1%}; "
          f"{len(found)} candidates, {len(shown)} shown")
    print_table(rows)
    return 0
