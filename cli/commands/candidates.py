"""`minitron candidates MODEL --target-params 70M --tolerance 0.05`: every pruned shape of the search space within
the budget, with exact counts, in the search's order (width before depth, then closest to the target).

Needs the config only (a folder holding just config.json works): no weights are read."""

from __future__ import annotations

from cli.commands.common import add_space_args, space_from_args


def register(sub) -> None:
    p = sub.add_parser("candidates", help="list pruned shapes under a parameter budget (config only)",
                       description="Enumerate the homogeneous pruned shapes of the search space within a tolerance "
                                   "of a parameter budget, with exact parameter counts, in the search's order "
                                   "(more layers first, then closest to the target). Reads config.json only.")
    p.add_argument("model", help="model folder (config.json is enough), .gguf, hub id or alias")
    p.add_argument("--target-params", required=True, help="parameter budget, e.g. 70M or 4.5B")
    add_space_args(p)
    p.add_argument("--limit", type=int, default=30, help="rows to print, in order (0 = all)")
    p.add_argument("--trust-remote-code", action="store_true", help="run the model repository's own code")
    p.set_defaults(func=run)


def run(args) -> int:
    from cli.commands.common import print_table
    from minitron.archmath import count_params, enumerate_candidates, shape_of
    from minitron.config import format_count, parse_count
    from minitron.models import load_config

    target = parse_count(args.target_params)
    config = load_config(args.model, trust_remote_code=args.trust_remote_code)
    space = space_from_args(args)
    found = enumerate_candidates(config, target, args.tolerance, axes=args.axes, space=space)
    shown = found[: args.limit] if args.limit > 0 else found
    rows = [{"kind": c.kind, "layers": c.shape.layers, "hidden": c.shape.hidden, "ffn": c.shape.ffn,
             "heads": c.shape.heads, "kv": c.shape.kv_heads, "head_dim": c.shape.head_dim,
             "params": f"{c.params:,}", "vs_target": f"{(c.params - target) / target:+.2%}"} for c in shown]
    total = count_params(config)
    hm, fm = space.multiples(shape_of(config), target)
    print(f"model: {total:,} parameters ({format_count(total)}); target {target:,} ±{args.tolerance:.1%}; "
          f"{len(found)} candidates, {len(shown)} shown")
    print(f"space: hidden in multiples of {hm}, MLP of {fm}; each width axis keeps ≥ "
          f"{space.width_keep(target / total):.0%}, layers ≥ {space.depth_keep(args.axes):.0%}; query heads pruned "
          "per KV group")
    print_table(rows)
    return 0
