"""`minitron data DATA --model MODEL`: documents, tokens, train/validation blocks and the calibration shape."""

from __future__ import annotations

from minitron.commands.common import add_data_args, load_data_from_args, print_json_or_lines


def register(sub) -> None:
    p = sub.add_parser("data", help="tokenise and pack a corpus; print its sizes",
                       description="Tokenise a corpus with a model's tokenizer, pack it into blocks, cache it and "
                                   "print documents, tokens, split sizes and the calibration shape.")
    p.add_argument("data", help="corpus: 'shakespeare', .txt/.jsonl/.parquet files or folders, or a hub dataset id")
    p.add_argument("--model", required=True, help="model whose tokenizer to use")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per block")
    p.add_argument("--samples", type=int, default=1024, help="calibration samples (papers: 1024)")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_data_args(p, flag="")
    p.set_defaults(func=run)


def run(args) -> int:
    from transformers import AutoTokenizer

    from minitron.models import _materialise

    # Only the tokenizer is needed: resolve the spec to a folder and skip loading weights.
    _, where = _materialise(args.model)
    tokenizer = AutoTokenizer.from_pretrained(where)
    data = load_data_from_args(args, tokenizer, args.seq_len)
    info = data.summary()
    available = data.train.numel() // args.seq_len
    info["calibration"] = f"{min(args.samples, available)} x {args.seq_len}" + (
        f" (only {available} blocks available)" if args.samples > available else "")
    print_json_or_lines(info, args.json)
    return 0
