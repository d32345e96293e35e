"""The token store: a corpus tokenised once, as litdata shards, read as blocks of any length by every stage.

One store per (corpus, tokenizer, split parameters), in a folder or under an s3:// prefix:

    store.json          identity (tokenizer fingerprint, source, split parameters) and sizes; written LAST, so a
                        store that has it is complete
    train/index.json    a litdata dataset (TokensLoader layout): chunks of exactly `chunk_tokens` tokens each,
    train/chunk-*.bin   the last one shorter; uint16 tokens when the vocabulary fits, else uint32
    val/...

The chunks of a split, in order, are its token stream (its documents in corpus order, each followed by EOS). Block i
of seq_len L is tokens [i*L, (i+1)*L) of that stream: the blocks of packing the whole stream at once, for any L.
Readers `pread` exactly the tokens of the blocks they are asked for (across a shard border when a block straddles
one), so each rank reads only its share and no process maps or holds the corpus; an S3 store's shards are fetched
into a local cache when first read (one download per machine). litdata's own loader reads the store too:
`StreamingDataset(split_dir, item_loader=TokensLoader(block_size=L))`, with blocks inside each shard (the same blocks
when L divides chunk_tokens). We do not read through it: its random access remaps a shard at every shard switch
(~60-115 us a block here, against ~9 us for a pread), and its blocks never straddle shards.

Build: `build()` takes units of documents (the caller streams them and assigns the split) and hands them to worker
processes that tokenise with the tokenizer's batch API, one core each; results come back in order and are cut into
chunks. After every unit that completed a chunk, the build state (chunks done, the next unit, the partial chunk
buffers) is saved, so a killed build resumes from its last finished chunk without redoing it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from minitron.errors import UserError

os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")  # litdata asks PyPI for news on import of its reader

STORE_FORMAT = 1  # bump when the layout or the tokenisation changes: older stores are then rebuilt
CHUNK_TOKENS = 1 << 22  # tokens per shard (8 MB of uint16): a power of two, so power-of-two blocks never straddle
UNIT_CHARS = 1 << 20  # characters of text per work unit handed to a tokeniser process (and per resume step)
MAX_OPEN = 64  # shard files a reader keeps open (least recently used closed first)
META = "store.json"
SPLITS = ("train", "val")


def default_workers() -> int:
    """All cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def is_remote(uri: str) -> bool:
    return str(uri).startswith("s3://")


def storage_options() -> dict:
    """boto3 client options for S3-compatible stores: the endpoint from the variables boto3 reads, path-style
    addressing, and CRC checksums only when required (boto3 >= 1.36 sends ones such stores reject)."""
    from botocore.config import Config  # litdata's S3 client is boto3; we only shape its settings

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint:
        return {}
    return {"endpoint_url": endpoint, "config": Config(
        s3={"addressing_style": "path"}, retries={"max_attempts": 8, "mode": "standard"},
        request_checksum_calculation="when_required", response_checksum_validation="when_required")}


def _fs(uri: str):
    from litdata.streaming.fs_provider import _get_fs_provider

    return _get_fs_provider(uri, storage_options())


def _download(uri: str, path: Path) -> None:
    """An S3 object to a local file, atomically (a killed download leaves no half file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        _fs(uri).download_file(uri, tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def remote_exists(uri: str) -> bool:
    """A complete store (its store.json) at an s3:// prefix; one line for an unreachable endpoint or bucket."""
    try:
        return _fs(uri).exists(f"{uri.rstrip('/')}/{META}")
    except Exception as e:
        if not type(e).__module__.startswith(("botocore", "boto3")):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"cannot reach the token store {uri}: {first} (check AWS_ENDPOINT_URL_S3, the bucket and "
                        "the credentials)") from None


def local_cache(uri: str) -> Path:
    """Where a store is read from on this machine: the folder itself, or a cache of an S3 store's files."""
    if not is_remote(uri):
        return Path(uri).expanduser().resolve()
    from minitron.models import cache_dir

    return cache_dir() / "token-stores" / hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]


def _write_json(path: Path, obj) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)  # atomic: a reader (or a resumed build) never sees half a file


@contextlib.contextmanager
def build_lock(path: Path) -> Iterator[None]:
    """One builder per store on this machine (two ranks or two flow runs asking at once): an OS file lock, which
    the kernel releases when its holder dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------------------------------------------
# reading


class Blocks:
    """The blocks of `seq_len` tokens of one split: `len()`, `x[i]` → int64 tensor [seq_len], `x[a:b]` or
    `x[index tensor]` → int64 tensor [n, seq_len]. Reads only the blocks asked for."""

    def __init__(self, store: TokenStore, split: str, seq_len: int):
        self.store, self.split, self.seq_len = store, split, seq_len

    def __len__(self) -> int:
        return self.store.meta[self.split]["tokens"] // self.seq_len

    def __getitem__(self, index):
        import torch

        n = len(self)
        if isinstance(index, slice):
            rows = range(*index.indices(n))
        elif isinstance(index, int | np.integer) or (isinstance(index, torch.Tensor) and index.ndim == 0):
            i = int(index)
            if not -n <= i < n:
                raise IndexError(f"block {i} out of range ({n} blocks)")
            return torch.from_numpy(self.store.read(self.split, (i % n) * self.seq_len, self.seq_len))
        else:
            rows = [int(i) for i in index]
        out = np.empty((len(rows), self.seq_len), dtype=np.int64)
        for r, i in enumerate(rows):
            out[r] = self.store.read(self.split, i * self.seq_len, self.seq_len)
        return torch.from_numpy(out)


@dataclass
class TokenStore:
    uri: str  # the folder or s3:// prefix
    meta: dict  # store.json
    _files: OrderedDict = field(default_factory=OrderedDict, repr=False)  # (split, chunk) → (fd, data offset)

    def __getstate__(self):  # open files stay in their process
        return {**self.__dict__, "_files": OrderedDict()}

    @classmethod
    def open(cls, uri: str, tokenizer_fp: str | None = None) -> TokenStore:
        """Open a complete store; one-line errors for a store of another tokenizer or a truncated shard."""
        uri = str(uri).rstrip("/")
        local = local_cache(uri)
        meta_path = local / META
        if is_remote(uri) and not meta_path.is_file() and remote_exists(uri):
            local.mkdir(parents=True, exist_ok=True)
            for name in (*(f"{s}/index.json" for s in SPLITS), META):  # store.json last, as it was written
                (local / name).parent.mkdir(parents=True, exist_ok=True)
                _download(f"{uri}/{name}", local / name)
        if not meta_path.is_file():
            raise UserError(f"no complete token store at {uri} ({META} missing): build it with "
                            "`minitron tokenize DATA --model M --out URI`")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != STORE_FORMAT:
            raise UserError(f"token store {uri} has format {meta.get('format')}, this version reads "
                            f"{STORE_FORMAT}: build it again with `minitron tokenize`")
        if tokenizer_fp is not None and meta["tokenizer"] != tokenizer_fp:
            raise UserError(f"token store {uri} was written by another tokenizer ({meta.get('model') or 'unknown'}, "
                            f"fingerprint {meta['tokenizer']}, not {tokenizer_fp}): tokenise the corpus with this "
                            "model (`minitron tokenize DATA --model M`) or use that model's tokenizer")
        store = cls(uri, meta)
        store.check_shards()
        return store

    def check_shards(self) -> None:
        """Every shard present here has its indexed size (a local store must have all of them)."""
        for split in SPLITS:
            for chunk in self.meta[split]["chunks"]:
                path = local_cache(self.uri) / split / chunk["filename"]
                if path.is_file():
                    self._check_size(path, chunk)
                elif not is_remote(self.uri):  # an S3 store's shards are fetched when first read
                    raise UserError(f"token store shard {path} is missing: delete {self.uri} and build it again "
                                    "with `minitron tokenize`")

    def _check_size(self, path: Path, chunk: dict) -> None:
        size = path.stat().st_size
        if size != chunk["chunk_bytes"]:
            raise UserError(f"token store shard {path} is truncated ({size:,} of {chunk['chunk_bytes']:,} bytes): "
                            f"delete {path if is_remote(self.uri) else self.uri} and run `minitron tokenize` again")

    def _file(self, split: str, k: int) -> tuple[int, int]:
        """(fd, byte offset of the tokens) of chunk k; an S3 store's chunk is downloaded on first use."""
        if (split, k) in self._files:
            self._files.move_to_end((split, k))
        else:
            chunk = self.meta[split]["chunks"][k]
            path = local_cache(self.uri) / split / chunk["filename"]
            if not path.is_file():
                with build_lock(path.with_name(f".{path.name}.lock")):  # one download per machine
                    if not path.is_file():
                        _download(f"{self.uri}/{split}/{chunk['filename']}", path)
            self._check_size(path, chunk)
            fd = os.open(path, os.O_RDONLY)
            # litdata's chunk header: uint32 item count, then uint32 item offsets (the first: where data begins)
            _, data_start = np.frombuffer(os.pread(fd, 8, 0), dtype=np.uint32)
            self._files[split, k] = (fd, int(data_start))
            if len(self._files) > MAX_OPEN:  # a store has thousands of shards; a process, ~1024 descriptors
                os.close(self._files.popitem(last=False)[1][0])
        return self._files[split, k]

    def read(self, split: str, start: int, n: int) -> np.ndarray:
        """Tokens [start, start + n) of a split's stream as int64, across shard borders: a read per shard, no
        mapping, so a reader's memory stays flat however much of the store it reads."""
        size, per_chunk = np.dtype(self.meta["dtype"]).itemsize, self.meta["chunk_tokens"]
        out, done = np.empty(n, dtype=np.int64), 0
        while done < n:
            k, offset = divmod(start + done, per_chunk)
            take = min(n - done, per_chunk - offset)
            fd, data_start = self._file(split, k)
            raw = os.pread(fd, take * size, data_start + offset * size)
            if len(raw) != take * size:
                raise UserError(f"token store {self.uri} shard {split}/{k} ended early: run `minitron tokenize` again")
            out[done:done + take] = np.frombuffer(raw, dtype=self.meta["dtype"])
            done += take
        return out

    def blocks(self, split: str, seq_len: int) -> Blocks:
        return Blocks(self, split, seq_len)

    def summary(self) -> dict:
        m = self.meta
        return {"store": self.uri, "shards": sum(len(m[s]["chunks"]) for s in SPLITS),
                "bytes": sum(c["chunk_bytes"] for s in SPLITS for c in m[s]["chunks"]),
                "store_train_tokens": m["train"]["tokens"], "store_val_tokens": m["val"]["tokens"]}


# ----------------------------------------------------------------------------------------------------------------
# tokenising (worker processes)

_ENCODE: Callable | None = None


def encoder_spec(tokenizer):
    """What a worker needs to rebuild the tokenizer: the fast backend's JSON (cheap: no transformers import in the
    worker), else the tokenizer object itself."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return ("tokenizers", backend.to_str()) if backend is not None else ("hf", tokenizer)


def _init_worker(spec) -> None:
    global _ENCODE
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker: the pool is the parallelism
    kind, payload = spec
    if kind == "tokenizers":
        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(payload)
        _ENCODE = lambda texts: [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]  # noqa: E731
    else:
        _ENCODE = lambda texts: payload(texts, add_special_tokens=False)["input_ids"]  # noqa: E731


def _tokenize_unit(texts: list[str], eos: int, dtype: str) -> tuple[list[np.ndarray], np.ndarray]:
    """One unit: the tokens of each document followed by EOS, concatenated per document; and each length."""
    ids = _ENCODE(texts)
    lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
    flat = np.empty(int(lengths.sum()), dtype=dtype)
    ends = np.cumsum(lengths)
    for x, end, n in zip(ids, ends, lengths, strict=True):
        flat[end - n:end - 1] = x
        flat[end - 1] = eos
    return flat, lengths


class _Pool:
    """Ordered map of units over worker processes, at most 2 units per worker in flight (memory stays flat however
    big the corpus). The pool starts with the second unit, so a corpus of one unit is tokenised in-process."""

    def __init__(self, spec, workers: int):
        self.spec, self.workers, self.executor = spec, workers, None
        self.inflight: deque = deque()

    def _local(self, args):
        if _ENCODE is None:
            _init_worker(self.spec)
        return _tokenize_unit(*args)

    def map(self, items: Iterator[tuple[object, tuple]]) -> Iterator[tuple[object, tuple]]:
        """(tag, args) in → (tag, result) out, in order."""
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        first = None  # the first unit waits for a second one: it may be the whole corpus
        try:
            for tag, args in items:
                if self.workers == 1:
                    yield tag, self._local(args)
                    continue
                if self.executor is None:
                    if first is None:
                        first = (tag, args)
                        continue
                    self.executor = ProcessPoolExecutor(
                        self.workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                        initargs=(self.spec,))
                    self.inflight.append((first[0], self.executor.submit(_tokenize_unit, *first[1])))
                self.inflight.append((tag, self.executor.submit(_tokenize_unit, *args)))
                while len(self.inflight) >= 2 * self.workers:
                    done_tag, future = self.inflight.popleft()
                    yield done_tag, future.result()
            if first is not None and self.executor is None:
                yield first[0], self._local(first[1])
            while self.inflight:
                done_tag, future = self.inflight.popleft()
                yield done_tag, future.result()
        finally:
            if self.executor is not None:
                self.executor.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------------------------------------------
# writing


@dataclass
class Unit:
    index: int  # position in the deterministic sequence of units (the resume point)
    texts: list[str]
    is_val: list[bool]
    fraction: float | None  # of the source read once this unit is done (None: unknown, e.g. a hub stream)


class _SplitWriter:
    """Cuts one split's token stream into chunks of exactly `chunk_tokens` (litdata's chunk format and index)."""

    def __init__(self, folder: Path, chunk_tokens: int, dtype: str, state: dict | None):
        self.folder, self.chunk_tokens, self.dtype = folder, chunk_tokens, dtype
        folder.mkdir(parents=True, exist_ok=True)
        self.chunks: list[dict] = list(state["chunks"]) if state else []
        self.config: dict | None = state["config"] if state else None
        self.tokens = state["tokens"] if state else 0
        pending = np.load(folder / state["pending"]) if state and state["pending"] else np.zeros(0, dtype)
        self.pending = [pending] if len(pending) else []
        self.n_pending = len(pending)

    def add(self, tokens: np.ndarray, hold: int = 0) -> bool:
        """Append tokens; write every full chunk that ends before the last `hold` tokens. True if one was written."""
        if len(tokens):
            self.pending.append(tokens)
            self.n_pending += len(tokens)
            self.tokens += len(tokens)
        wrote = False
        while self.n_pending - hold >= self.chunk_tokens:
            stream = np.concatenate(self.pending)
            self._write(stream[: self.chunk_tokens])
            rest = stream[self.chunk_tokens:]
            self.pending, self.n_pending = [rest] if len(rest) else [], len(rest)
            wrote = True
        return wrote

    def take_tail(self, n: int) -> np.ndarray:
        """Remove and return the last n pending tokens (held back for exactly this)."""
        stream = np.concatenate(self.pending)
        self.pending, self.n_pending = [stream[:-n]], len(stream) - n
        self.tokens -= n
        return stream[-n:]

    def _write(self, tokens: np.ndarray) -> None:
        from litdata import TokensLoader
        from litdata.streaming.writer import BinaryWriter

        index = len(self.chunks)
        with tempfile.TemporaryDirectory(dir=self.folder, prefix=".chunk-") as tmp:
            writer = BinaryWriter(tmp, chunk_size=len(tokens), item_loader=TokensLoader(), chunk_index=index)
            writer.add_item(0, tokens)
            writer.done()
            written = json.loads((Path(tmp) / f"{writer.rank}.index.json").read_text())
            (chunk,) = written["chunks"]
            chunk["filename"] = f"chunk-{index:06d}.bin"  # our name: independent of the writer's rank
            os.replace(Path(tmp) / f"chunk-{writer.rank}-{index}.bin", self.folder / chunk["filename"])
        self.chunks.append(chunk)
        self.config = written["config"]

    def state(self, seq: int) -> dict:
        """Save the partial chunk; the dict to keep in the build state."""
        name = ""
        if self.n_pending:
            name = f"pending-{seq}.npy"
            np.save(self.folder / name, np.concatenate(self.pending))
        return {"chunks": self.chunks, "config": self.config, "tokens": self.tokens, "pending": name}

    def finish(self) -> dict:
        if self.n_pending:
            self._write(np.concatenate(self.pending))
            self.pending, self.n_pending = [], 0
        for stale in self.folder.glob("pending-*.npy"):
            stale.unlink()
        _write_json(self.folder / "index.json", {"chunks": self.chunks, "config": self.config or {}})
        return {"tokens": self.tokens, "chunks": self.chunks}


def build(units: Iterator[Unit], tokenizer, out: str, identity: dict, *, workers: int | None = None,
          chunk_tokens: int = CHUNK_TOKENS, max_tokens: int | None = None, val_fraction: float = 0.0,
          progress: Callable[[dict], None] | None = None) -> TokenStore:
    """Tokenise `units` into a complete store at `out` (folder or s3:// prefix), resuming a killed build."""
    if chunk_tokens < 1 or chunk_tokens & (chunk_tokens - 1):
        raise UserError(f"chunk_tokens must be a power of two, got {chunk_tokens}")
    if workers is not None and workers < 1:
        raise UserError(f"workers must be at least 1, got {workers}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError("the tokenizer has no EOS token, which packing needs between documents")
    out = str(out).rstrip("/")
    final = local_cache(out)
    if not is_remote(out) and final.is_dir() and any(final.iterdir()) and not (final / META).is_file():
        raise UserError(f"{out} exists and is not a token store: choose a new or empty folder for --out")
    staging = final.with_name(f".{final.name}.partial")
    with build_lock(final.with_name(f".{final.name}.lock")):
        if (final / META).is_file() or (is_remote(out) and remote_exists(out)):
            return TokenStore.open(out, identity["tokenizer"])  # built meanwhile by another process
        store = _build_locked(units, tokenizer, out, staging, identity, workers or default_workers(), chunk_tokens,
                              max_tokens, val_fraction, eos, progress)
    return store


def _build_locked(units, tokenizer, out, staging, identity, workers, chunk_tokens, max_tokens, val_fraction, eos,
                  progress) -> TokenStore:
    state_path = staging / "state.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else None
    if state and (state["identity"] != identity or state["chunk_tokens"] != chunk_tokens):
        shutil.rmtree(staging)  # a leftover of another build at this path: start over
        state = None
    staging.mkdir(parents=True, exist_ok=True)
    dtype = "uint16" if len(tokenizer) <= 1 << 16 else "uint32"
    writers = {s: _SplitWriter(staging / s, chunk_tokens, dtype, state and state[s]) for s in SPLITS}
    c = state["counts"] if state else {"next_unit": 0, "documents": 0, "val_documents": 0, "last_train_doc": 0}
    resumed_at, seq = c["next_unit"], (state["seq"] + 1 if state else 0)
    t0, done_tokens = time.perf_counter(), 0
    pool = _Pool(encoder_spec(tokenizer), workers)
    todo = ((u, (u.texts, eos, dtype)) for u in units if u.index >= resumed_at)
    for unit, (flat, lengths) in pool.map(todo):
        is_val = np.asarray(unit.is_val, dtype=bool)
        total = writers["train"].tokens + writers["val"].tokens
        stop = False
        if max_tokens:
            crossed = np.nonzero(total + np.cumsum(lengths) >= max_tokens)[0]
            if len(crossed):  # stop after the document that reaches the budget
                keep = crossed[0] + 1
                flat, lengths, is_val, stop = flat[: lengths[:keep].sum()], lengths[:keep], is_val[:keep], True
        in_val = np.repeat(is_val, lengths)
        parts = {"train": flat[~in_val], "val": flat[in_val]}
        c["documents"] += len(lengths)
        c["val_documents"] += int(is_val.sum())
        if (~is_val).any():
            c["last_train_doc"] = int(lengths[~is_val][-1])
        # while no document went to validation, the last training document is held back: a tiny corpus moves it
        hold = c["last_train_doc"] if c["val_documents"] == 0 and val_fraction > 0 else 0
        wrote = writers["train"].add(parts["train"], hold) | writers["val"].add(parts["val"])
        done_tokens += len(flat)
        c["next_unit"] = unit.index + 1
        if wrote:
            _write_json(state_path, {"identity": identity, "chunk_tokens": chunk_tokens, "seq": seq, "counts": c,
                                     **{s: w.state(seq) for s, w in writers.items()}})
            for w in writers.values():  # the previous partial chunks are superseded now
                for stale in w.folder.glob("pending-*.npy"):
                    if stale.name != f"pending-{seq}.npy":
                        stale.unlink()
            seq += 1
        if progress is not None:
            elapsed = time.perf_counter() - t0
            progress({"documents": c["documents"], "tokens": writers["train"].tokens + writers["val"].tokens,
                      "fraction": 1.0 if stop else unit.fraction, "tokens_per_s": done_tokens / max(elapsed, 1e-9),
                      "workers": pool.workers if pool.executor is not None else 1, "resumed_at_unit": resumed_at})
        if stop:
            break
    if c["documents"] == 0:
        raise UserError("the corpus has no documents (empty files or empty text field)")
    if c["val_documents"] == 0 and val_fraction > 0:  # tiny corpora: move the last document so validation is not empty
        writers["val"].add(writers["train"].take_tail(c["last_train_doc"]))
        c["val_documents"] = 1
    splits = {s: w.finish() for s, w in writers.items()}
    meta = {"format": STORE_FORMAT, **identity, "chunk_tokens": chunk_tokens, "dtype": dtype,
            "documents": c["documents"], "val_documents": c["val_documents"], **splits}
    state_path.unlink(missing_ok=True)  # (no state when no chunk filled before the end)
    _write_json(staging / META, meta)
    if is_remote(out):
        _upload(staging, out)
    final = local_cache(out)
    if final.exists():
        shutil.rmtree(final)  # an incomplete copy (no store.json: we hold the lock and checked)
    os.replace(staging, final)
    return TokenStore.open(out, identity["tokenizer"])


def _upload(folder: Path, uri: str) -> None:
    """Shards and indexes first, store.json last: a reader that finds store.json finds every shard."""
    fs = _fs(uri)
    for split in SPLITS:
        for path in sorted((folder / split).iterdir()):
            if path.suffix in (".bin", ".json"):
                fs.upload_file(str(path), f"{uri}/{split}/{path.name}")
    fs.upload_file(str(folder / META), f"{uri}/{META}")
