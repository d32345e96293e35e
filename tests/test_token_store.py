"""The token store: the same blocks as packing the whole token stream at once (Shakespeare, the real tokenizer), on
a folder and on the moto S3 server, read by litdata's own loader too; a SIGKILLed tokenisation resumes without
redoing its finished shards; bad inputs get one line."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cli.main import main
from minitron import token_store
from minitron.data import is_validation, iter_documents, load_token_data, open_or_build_store

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("own_token_cache")


def todays_packing(spec: str, tokenizer, val_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """The reference: the packing before the store (one document at a time, whole streams in memory)."""
    streams = {"train": [], "val": []}
    for i, doc in enumerate(iter_documents(spec)):
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        streams["val" if is_validation(i, val_fraction, seed) else "train"].extend(ids)
    return {k: np.asarray(v, dtype=np.int64) for k, v in streams.items()}


def blocks_of(stream: np.ndarray, seq_len: int) -> torch.Tensor:
    n = len(stream) // seq_len
    return torch.from_numpy(stream[: n * seq_len].reshape(n, seq_len))


def test_store_blocks_are_todays_packing_on_shakespeare(tmp_path):
    from minitron.data import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m")
    ref = todays_packing("shakespeare", tokenizer, 0.05, 0)
    out = tmp_path / "store"
    # small shards, so blocks straddle shard borders; 2 tokeniser processes
    store = open_or_build_store("shakespeare", tokenizer, out=str(out), chunk_tokens=1 << 16, workers=2)
    assert store.meta["train"]["tokens"] == len(ref["train"]) and store.meta["val"]["tokens"] == len(ref["val"])
    assert len(store.meta["train"]["chunks"]) > 10 and store.meta["dtype"] == "uint16"
    for split in ("train", "val"):
        expected = blocks_of(ref[split], 1024)
        assert torch.equal(store.blocks(split, 1024)[:], expected)
    # a length that does not divide the shard size reads across shard borders
    assert torch.equal(store.blocks("val", 1000)[:], blocks_of(ref["val"], 1000))
    train_1000 = store.blocks("train", 1000)
    picks = torch.tensor([0, 65, 66, 131, len(train_1000) - 1])  # 65.5 blocks per shard: 65 and 131 straddle
    assert torch.equal(train_1000[picks], blocks_of(ref["train"], 1000)[picks])
    # calibration as before: random 24-token windows of the 1024-token training blocks
    data = load_token_data(str(out), tokenizer, 1024)
    stream = blocks_of(ref["train"], 1024).reshape(-1)
    order = torch.randperm(len(stream) // 24, generator=torch.Generator().manual_seed(3))[:16].sort().values
    assert torch.equal(data.calibration(16, 24, seed=3), stream[: len(stream) // 24 * 24].view(-1, 24)[order])
    # litdata's own loader reads the store (blocks within each shard: the shard size is a multiple of 1024)
    from litdata import StreamingDataset, TokensLoader

    lit = StreamingDataset(str(out / "train"), item_loader=TokensLoader(block_size=1024))
    assert len(lit) == len(data.train)
    for i in (0, 64, 65, len(lit) - 1):
        assert torch.equal(torch.from_numpy(lit[i].astype(np.int64)), data.train[i])


@pytest.mark.services
def test_store_on_s3_reads_back_the_same(tmp_path, s3_env, text_corpus, tiny_tokenizer):
    uri = f"s3://{s3_env.checkpoint_bucket}/tokens/corpus"
    local = open_or_build_store(str(text_corpus), tiny_tokenizer, out=str(tmp_path / "local"), chunk_tokens=1024)
    built = open_or_build_store(str(text_corpus), tiny_tokenizer, out=uri, chunk_tokens=1024)
    assert built.uri == uri and len(built.meta["train"]["chunks"]) > 3
    listed = s3_env.client().list_objects_v2(Bucket=s3_env.checkpoint_bucket, Prefix="tokens/corpus/")
    names = {o["Key"].removeprefix("tokens/corpus/") for o in listed["Contents"]}
    assert {"store.json", "train/index.json", "val/index.json", "train/chunk-000000.bin"} <= names
    shutil.rmtree(token_store.local_cache(uri))  # a fresh machine: everything comes from S3
    data = load_token_data(uri, tiny_tokenizer, 48)  # the store itself as the data spec
    for split in ("train", "val"):
        assert torch.equal(getattr(data, split)[:], local.blocks(split, 48)[:])
    assert data.summary()["store"] == uri and data.documents == 12


def test_killed_tokenisation_resumes_without_redoing_finished_shards(tmp_path, tiny_model_dir, tiny_tokenizer):
    corpus = tmp_path / "big.jsonl"
    rng = np.random.default_rng(0)
    words = np.array(["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"])
    with corpus.open("w") as f:
        for _ in range(1500):
            f.write(json.dumps({"text": " ".join(rng.choice(words, 700))}) + "\n")  # ~6 MB of text: 6 work units
    out = tmp_path / "store"
    argv = [sys.executable, "-m", "cli", "tokenize", str(corpus), "--model", str(tiny_model_dir),
            "--out", str(out), "--workers", "2", "--chunk-tokens", str(1 << 17)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    state = out.with_name(f".{out.name}.partial") / "state.json"
    deadline = time.monotonic() + 120
    while not state.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its tokeniser processes
    proc.wait()
    assert not (out / "store.json").exists(), "the build finished before the kill: make the corpus bigger"
    done = json.loads(state.read_text())
    finished = {c["filename"]: (state.parent / "train" / c["filename"]).stat() for c in done["train"]["chunks"]}
    assert finished and done["counts"]["next_unit"] > 0

    rerun = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    for name, before in finished.items():  # the shards finished before the kill were kept, not rewritten
        after = (out / "train" / name).stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    fresh = open_or_build_store(str(corpus), tiny_tokenizer, out=str(tmp_path / "fresh"), chunk_tokens=1 << 17,
                                workers=1)
    resumed = token_store.TokenStore.open(str(out))
    for split in ("train", "val"):
        assert resumed.meta[split]["tokens"] == fresh.meta[split]["tokens"]
        assert torch.equal(resumed.blocks(split, 4096)[:], fresh.blocks(split, 4096)[:])
    assert resumed.meta["documents"] == 1500


def test_bad_inputs_get_one_line(tmp_path, tiny_model_dir, text_corpus, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text(" \n\n  \n")
    short = tmp_path / "short.txt"
    short.write_text("a few words only")
    store = tmp_path / "store"
    assert main(["tokenize", str(text_corpus), "--model", str(tiny_model_dir), "--out", str(store),
                 "--chunk-tokens", "1024"]) == 0
    capsys.readouterr()

    def error_of(*argv) -> str:
        assert main([str(a) for a in argv]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: "), err
        return err.strip().splitlines()[-1]

    assert "no documents" in error_of("data", empty, "--model", tiny_model_dir)
    assert "fewer than one block of 1024" in error_of("data", short, "--model", tiny_model_dir, "--seq-len", 1024)
    assert "written by another tokenizer" in error_of("data", store, "--model", "smollm2-135m")
    assert "written by another tokenizer" in error_of("tokenize", text_corpus, "--model", "smollm2-135m",
                                                      "--out", store)
    assert "holds another corpus or split" in error_of("tokenize", text_corpus, "--model", tiny_model_dir,
                                                       "--out", store, "--val-fraction", "0.2")
    assert "is not a token store" in error_of("tokenize", text_corpus, "--model", tiny_model_dir, "--out",
                                              text_corpus)  # never written into (or over) a folder of other files
    shard = store / "train" / "chunk-000001.bin"
    shard.write_bytes(shard.read_bytes()[:-100])
    assert "chunk-000001.bin is truncated" in error_of("data", store, "--model", tiny_model_dir)
