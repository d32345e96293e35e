"""`minitron data DATA --model MODEL`: the corpus's token store (built on first use) and its blocks at --seq-len."""

from __future__ import annotations

from cli.commands.common import add_data_args, data_kwargs, print_json_or_lines


def register(sub) -> None:
    p = sub.add_parser("data", help="report a corpus's token store (built on first use) and its blocks",
                       description="Open (or build, see `minitron tokenize`) the token store of a corpus for a "
                                   "model's tokenizer and print its path, shards, bytes, documents, tokens, "
                                   "train/validation blocks at --seq-len and the calibration shape.")
    p.add_argument("data", help="corpus: 'shakespeare', .txt/.jsonl/.parquet files or folders, or a hub dataset id")
    p.add_argument("--model", required=True, help="model whose tokenizer to use")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per block")
    p.add_argument("--samples", type=int, default=1024, help="calibration samples (papers: 1024)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--workers", type=int, default=None, help="tokeniser processes if it must be built (default: all cores)")
    add_data_args(p, flag="")
    p.set_defaults(func=run)


def run(args) -> int:
    from cli.commands.tokenize import progress_bar
    from minitron.data import load_token_data, load_tokenizer

    tokenizer = load_tokenizer(args.model)
    with progress_bar() as bar:
        data = load_token_data(args.data, tokenizer, args.seq_len, workers=args.workers, progress=bar,
                               **data_kwargs(args))
    info = data.summary()
    available = len(data.train)
    info["calibration"] = f"{min(args.samples, available)} x {args.seq_len}" + (
        f" (only {available} blocks available)" if args.samples > available else "")
    print_json_or_lines(info, args.json)
    return 0
