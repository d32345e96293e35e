"""Arguments shared by several commands, defined once so their names and help read the same everywhere."""

from __future__ import annotations

import argparse
import json

from minitron.config import DATA_FIELDS, MODEL_FIELDS


def add_config_args(p: argparse.ArgumentParser, *names: str, aliases: dict[str, str] | None = None) -> None:
    """`--kebab-name` options for run-config fields: type, choices, default and help come from CompressConfig, so
    a stage command and the run config cannot drift (the option's dest is the field's name). `aliases` adds an
    older spelling of an option (`--batch` for `--batch-size`)."""
    import types
    import typing

    from minitron.config import CompressConfig

    for name in names:
        f = CompressConfig.model_fields[name]
        kind = f.annotation
        if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:  # X | None
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        flags = [f"--{name.replace('_', '-')}", *([aliases[name]] if aliases and name in aliases else [])]
        helptext = f.description.replace("%", "%%")  # argparse %-formats help
        if kind is bool:
            p.add_argument(*flags, action=argparse.BooleanOptionalAction, default=f.default, help=helptext)
        elif typing.get_origin(kind) is typing.Literal:
            p.add_argument(*flags, choices=typing.get_args(kind), default=f.default, help=helptext)
        else:
            p.add_argument(*flags, type=kind, default=f.default, help=helptext)




def add_model_args(p: argparse.ArgumentParser) -> None:
    add_config_args(p, *MODEL_FIELDS)


def add_data_args(p: argparse.ArgumentParser, *, flag: str = "--data") -> None:
    if flag:
        p.add_argument(flag, dest="data", required=True,
                       help="corpus: 'shakespeare', .txt/.jsonl/.parquet files or folders, or a hub dataset id")
    add_config_args(p, *DATA_FIELDS)


SPEC_ARGS = ("model", "teacher", "student")  # the commands' arguments that hold a model spec


def local_spec(spec: str) -> str:
    """A model spec a command can load: an `s3://` checkpoint URI (as the flow prints it) is fetched once into the
    cache and verified against its manifest; every other spec (`file://` URIs included) is returned as given."""
    if not spec.startswith("s3://"):
        return spec
    import hashlib

    from minitron.models import cache_dir
    from tasks.common import local_copy  # the store layer (boto3) only for an s3:// spec

    return str(local_copy(spec, cache_dir() / "checkpoints" / hashlib.sha256(spec.encode()).hexdigest()[:8]))


def add_space_args(p: argparse.ArgumentParser) -> None:
    """The candidate space (minitron.archmath.SearchSpace); defaults follow the student's size and the ratio."""
    add_config_args(p, "tolerance", "axes", "prune_kv_groups", "max_width_pruning", "max_depth_pruning")
    p.add_argument("--hidden-multiple", type=int, default=None,
                   help="hidden size divisor (default by student size: 64 below 1B, 256 to 10B, 512 above)")
    p.add_argument("--ffn-multiple", type=int, default=None, help="MLP size divisor (default as --hidden-multiple)")


def space_from_args(args):
    from minitron.archmath import SearchSpace

    return SearchSpace(args.max_width_pruning, args.max_depth_pruning, args.hidden_multiple, args.ffn_multiple,
                       args.prune_kv_groups)


def load_model_from_args(spec: str, args):
    from minitron.models import load_model

    return load_model(spec, dtype=args.dtype, device=args.device, allow_pickle=args.allow_pickle,
                      trust_remote_code=args.trust_remote_code)


def data_spec_from_args(args, seq_len: int) -> dict:
    """The corpus arguments as the `load_token_data` keyword arguments a TrainJob carries (`spec`, `seq_len`, the
    corpus cap of the training commands and the rest)."""
    from minitron.config import parse_count

    cap = getattr(args, "max_corpus_tokens", None)
    return {"spec": args.data, "seq_len": seq_len, **data_kwargs(args), "max_tokens": parse_count(cap) if cap else None}


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
