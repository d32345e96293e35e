"""`minitron importance MODEL --data DATA --calib-samples N --calib-seq-len L --out SCORES`: one calibration pass, all axes."""

from __future__ import annotations

from cli.commands.common import (
    add_config_args,
    add_data_args,
    add_model_args,
    load_data_from_args,
    load_model_from_args,
)


def register(sub) -> None:
    p = sub.add_parser("importance", help="score heads, neurons, hidden channels and layers on calibration data",
                       description="Forward-only activation importance (Minitron): one pass over calibration data; "
                                   "the scores file is reused by every `minitron prune` target.")
    p.add_argument("model", help="model folder, .gguf, hub id or alias")
    add_data_args(p)
    add_config_args(p, "calib_samples", "calib_seq_len", aliases={"calib_samples": "--samples",
                                                                  "calib_seq_len": "--seq-len"})
    p.add_argument("--val-samples", type=int, default=16,
                   help="validation blocks for the layer-skip loss ranking (0 = Block Influence only)")
    add_config_args(p, "batch_size", "seq_agg", "batch_agg")  # the run config's fields, names and defaults
    p.add_argument("--out", required=True, help="scores file to write (.safetensors)")
    add_model_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import time

    from minitron.config import CompressConfig
    from minitron.errors import UserError
    from minitron.families import family_of
    from minitron.importance import compute_importance
    from minitron.models import load_config

    seq_len = args.calib_seq_len or CompressConfig.model_fields["seq_len"].default  # empty = the run's seq_len
    for flag, value in (("calib_samples", args.calib_samples), ("calib_seq_len", seq_len),
                        ("batch_size", args.batch_size)):
        if value < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1")
    family_of(load_config(args.model, trust_remote_code=args.trust_remote_code))  # unsupported → error, no load
    model, tokenizer = load_model_from_args(args.model, args)
    data = load_data_from_args(args, tokenizer, seq_len)
    calib = data.calibration(args.calib_samples, seq_len, seed=args.seed)
    val = data.val[: args.val_samples] if args.val_samples > 0 and len(data.val) else None
    start = time.perf_counter()
    scores = compute_importance(model, calib, batch_size=args.batch_size, seq_agg=args.seq_agg,
                                batch_agg=args.batch_agg, val_blocks=val)
    seconds = time.perf_counter() - start
    scores.meta["source"] = args.model
    scores.meta["calibration"].update(data=args.data, seed=args.seed)
    scores.save(args.out)
    print(f"scored {calib.numel():,} tokens ({len(calib)} x {seq_len})"
          f"{'' if val is None else f' + layer skips on {len(val)} validation blocks'} in {seconds:.1f} s "
          f"-> {args.out}")
    return 0
