"""`minitron prune MODEL --scores SCORES [--layers N | --drop-layers A-B] [--hidden H] ... --out DIR`."""

from __future__ import annotations

from cli.commands.common import add_model_args, load_model_from_args


def register(sub) -> None:
    p = sub.add_parser("prune", help="prune a model to a target shape using importance scores",
                       description="Structured pruning: keep the most important layers, hidden channels, MLP "
                                   "neurons, KV groups and query heads. An axis not given keeps its size (units "
                                   "are still reordered by importance). The output reloads with plain transformers.")
    p.add_argument("model", help="model folder, .gguf, hub id or alias")
    p.add_argument("--scores", required=True, help="scores file from `minitron importance` on this model")
    depth = p.add_mutually_exclusive_group()
    depth.add_argument("--layers", type=int, help="layers to keep (drops the lowest-ranked)")
    depth.add_argument("--drop-layers", help="contiguous 1-indexed block to drop, e.g. 16-31")
    p.add_argument("--layer-metric", default="loss", choices=["loss", "bi"],
                   help="layer ranking: validation loss increase when skipped, or Block Influence")
    p.add_argument("--hidden", type=int, help="hidden size to keep")
    p.add_argument("--ffn", type=int, help="MLP intermediate size to keep")
    p.add_argument("--heads-per-group", type=int, help="query heads to keep in every KV group")
    p.add_argument("--kv-groups", type=int, help="KV groups to keep")
    p.add_argument("--rescale-norms", action="store_true",
                   help="ablation: scale the kept norms by rms_kept/rms_full so norm outputs keep their size "
                        "after hidden pruning")
    p.add_argument("--compensate-mlp", action="store_true",
                   help="ablation (FLAP): fold removed MLP neurons' mean output into a down_proj bias "
                        "(llama, nemotron)")
    p.add_argument("--out", required=True, help="output folder (save_pretrained + tokenizer)")
    add_model_args(p)
    p.set_defaults(func=run)


def parse_block(text: str) -> tuple[int, int]:
    """'16-31' (1-indexed, inclusive) → (15, 30) (0-indexed)."""
    from minitron.errors import UserError

    try:
        a, b = (int(x) for x in text.split("-"))
    except ValueError:
        raise UserError(f"--drop-layers wants A-B (1-indexed, inclusive), e.g. 16-31, not '{text}'") from None
    return a - 1, b - 1


def run(args) -> int:
    import time

    from minitron.archmath import Shape, check_shape, count_shape, shape_of
    from minitron.config import format_count
    from minitron.importance import ImportanceScores
    from minitron.models import load_config
    from minitron.prune import check_options, prune, save_pruned

    # Everything that can be wrong is checked on the config and the scores file, before weights are read.
    config = load_config(args.model, trust_remote_code=args.trust_remote_code)
    full = shape_of(config)
    scores = ImportanceScores.load(args.scores)
    scores.check_matches(config)
    drop = parse_block(args.drop_layers) if args.drop_layers else None
    layers = full.layers - (drop[1] - drop[0] + 1) if drop else (args.layers or full.layers)
    kv = args.kv_groups or full.kv_heads
    per = args.heads_per_group or full.heads_per_group
    shape = Shape(layers, args.hidden or full.hidden, args.ffn or full.ffn, per * kv, kv, full.head_dim)
    check_shape(shape, full, config=config, drop=drop)
    check_options(config, scores, rescale_norms=args.rescale_norms, compensate_mlp=args.compensate_mlp)
    if args.layers and args.layers < full.layers:
        scores.layer_ranking(args.layer_metric)  # the chosen ranking must exist
    model, tokenizer = load_model_from_args(args.model, args)
    start = time.perf_counter()
    pruned = prune(model, scores, shape, drop_layers=drop, layer_metric=args.layer_metric,
                   rescale_norms=args.rescale_norms, compensate_mlp=args.compensate_mlp)
    save_pruned(pruned, tokenizer, args.out)
    before, after = count_shape(config, full), count_shape(pruned.config, shape)  # MLP biases if compensated
    print(f"{full} ({format_count(before)}) -> {shape} ({format_count(after)}, {after / before:.1%}) "
          f"in {time.perf_counter() - start:.1f} s -> {args.out}")
    return 0
