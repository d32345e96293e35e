"""Arguments shared by several commands, defined once so their names and help read the same everywhere."""

from __future__ import annotations

import argparse
import json


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to compute")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                   help="auto = bf16 on GPU, fp32 on CPU")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow pickled .bin weights (they can run code when loaded)")
    p.add_argument("--trust-remote-code", action="store_true", help="run the model repository's own code")


def add_data_args(p: argparse.ArgumentParser, *, flag: str = "--data") -> None:
    if flag:
        p.add_argument(flag, dest="data", required=True,
                       help="corpus: 'shakespeare', .txt/.jsonl/.parquet files or folders, or a hub dataset id")
    p.add_argument("--data-config", default=None, help="hub dataset config, e.g. wikitext-2-raw-v1")
    p.add_argument("--data-split", default="train", help="hub dataset split")
    p.add_argument("--text-field", default="text", help="field holding the text in records")
    p.add_argument("--val-fraction", type=float, default=0.05, help="documents held out for validation")
    p.add_argument("--seed", type=int, default=0, help="seed for the split and sampling")
    p.add_argument("--token-store", default=None, metavar="ROOT",
                   help="folder or s3://bucket/prefix where tokenised corpora are kept (default: the cache)")


MODEL_ARGS = ("model", "teacher", "student")  # the commands' arguments that hold a model spec


def local_spec(spec: str) -> str:
    """A model spec a command can load: an `s3://` checkpoint URI (as the flow prints it) is fetched once into the
    cache and verified against its manifest; every other spec (`file://` URIs included) is returned as given."""
    if not spec.startswith("s3://"):
        return spec
    import hashlib

    from minitron.models import cache_dir
    from tasks.common import local_copy  # the store layer (boto3) only for an s3:// spec

    return str(local_copy(spec, cache_dir() / "checkpoints" / hashlib.sha256(spec.encode()).hexdigest()[:8]))


def load_model_from_args(spec: str, args):
    from minitron.models import load_model

    return load_model(spec, dtype=args.dtype, device=args.device, allow_pickle=args.allow_pickle,
                      trust_remote_code=args.trust_remote_code)


def load_data_from_args(args, tokenizer, seq_len: int):
    from minitron.data import load_token_data

    return load_token_data(args.data, tokenizer, seq_len, **data_kwargs(args))


def data_kwargs(args) -> dict:
    """The data flags as keyword arguments of load_token_data / open_or_build_store."""
    return dict(val_fraction=args.val_fraction, seed=args.seed, hf_config=args.data_config, hf_split=args.data_split,
                text_field=args.text_field, store=args.token_store)


def print_table(rows: list[dict], columns: list[str] | None = None) -> None:
    """A plain fixed-width table on stdout (no dependency, copy-pastable into issues)."""
    if not rows:
        print("(no rows)")
        return
    columns = columns or list(rows[0])
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def print_json_or_lines(obj: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(obj, indent=2))
    else:
        width = max(map(len, obj))
        for k, v in obj.items():
            print(f"{k.ljust(width)}  {v}")
