"""Benchmark: the token store on 2M and 20M tokens of corpus-en (train files), SmolLM2's tokenizer.

For each size, in fresh processes (so peak RSS is this phase's alone):
  - tokenise: `minitron.data.open_or_build_store` with all cores; tokens/s in total and per worker, against the
    tokenizer's own batch-encode rate on one core, measured in the same run on the same text; peak RSS of the main
    process and of the largest worker;
  - read: a reader iterating the whole training split at seq_len 1024 in the training loop's order (`_Batches`,
    batch 8): peak RSS, blocks/s and tokens/s.

Targets (issue 15): reader peak RSS at most +50 MB from 2M to 20M tokens; tokenisation >= 80% of (batch-encode rate x
workers); loader >= 100 x 250k tokens/s (the GPU step of bench/distill_throughput.py's anchors).

    python bench/data_pipeline.py [--corpus ../shared/data/corpus-en] [--sizes 2M,20M] [--workers N]

Prints a table and writes bench/results/data_pipeline-<device>.json (device: the CPU model; no GPU is involved).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the one-core reference must be one core
ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m"
LOADER_TARGET = 100 * 250_000  # tokens/s


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class WorkerPeak:
    """Largest VmHWM (peak RSS) of this process's children while it runs, sampled from /proc. (ru_maxrss of
    children is useless here: a spawned child's high-water mark starts at the parent's size when it forks.)"""

    def __init__(self):
        import threading

        self.peak_kb, self.stop = 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(0.1):
            for children in Path("/proc/self/task").glob("*/children"):
                for pid in children.read_text().split():
                    try:
                        if b"spawn_main" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                            continue  # not (yet) a worker: between fork and exec a child still is our copy
                        status = Path(f"/proc/{pid}/status").read_text()
                    except OSError:
                        continue
                    hwm = re.search(r"VmHWM:\s+(\d+)", status)
                    self.peak_kb = max(self.peak_kb, int(hwm.group(1)) if hwm else 0)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def train_folder(corpus: Path, tmp: Path) -> Path:
    """The corpus's train files only (links), as one data spec."""
    folder = tmp / "corpus-en-train"
    folder.mkdir()
    for f in sorted(corpus.glob("train-*.jsonl.gz")):
        (folder / f.name).symlink_to(f.resolve())
    return folder


def phase_tokenize(spec: str, out: str, tokens: int, workers: int | None) -> dict:
    from minitron.data import load_tokenizer, open_or_build_store

    tokenizer = load_tokenizer(MODEL)
    records = []
    with WorkerPeak() as workers_peak:
        t0 = time.perf_counter()
        store = open_or_build_store(spec, tokenizer, out=out, max_tokens=tokens, workers=workers,
                                    progress=records.append)
        seconds = time.perf_counter() - t0
    total = store.meta["train"]["tokens"] + store.meta["val"]["tokens"]
    return {"tokens": total, "documents": store.meta["documents"], "tokenize_s": round(seconds, 2),
            "workers": records[-1]["workers"], "shards": store.summary()["shards"], "bytes": store.summary()["bytes"],
            "main_peak_rss_mb": round(peak_rss_mb(), 1),
            "worker_peak_rss_mb": round(workers_peak.peak_kb / 1024, 1)}


def phase_read(out: str, seq_len: int, batch: int) -> dict:
    from minitron.distill.loop import _Batches
    from minitron.token_store import TokenStore

    baseline = peak_rss_mb()
    store = TokenStore.open(out)
    blocks = store.blocks("train", seq_len)
    batches = _Batches(blocks, batch, 0, 1, seed=0)
    t0 = time.perf_counter()
    for g in range(batches.per_epoch):  # one epoch: every training block once, in training order
        batches(g)
    seconds = time.perf_counter() - t0
    n = batches.per_epoch * batch
    return {"read_blocks": n, "read_s": round(seconds, 2), "blocks_per_s": round(n / seconds),
            "loader_tokens_per_s": round(n * seq_len / seconds), "reader_peak_rss_mb": round(peak_rss_mb(), 1),
            "reader_rss_after_imports_mb": round(baseline, 1)}


def one_core_rate(spec: str, chars: int) -> dict:
    """The tokenizer's own batch encode, one core, on the first `chars` characters of the corpus."""
    from minitron.data import iter_documents, load_tokenizer

    tokenizer = load_tokenizer(MODEL)
    texts, size = [], 0
    for doc in iter_documents(spec):
        texts.append(doc)
        size += len(doc)
        if size >= chars:
            break
    t0 = time.perf_counter()
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    seconds = time.perf_counter() - t0
    n = sum(map(len, ids))
    return {"sample_tokens": n, "batch_encode_1core_tokens_per_s": round(n / seconds)}


def run_phase(*argv: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, __file__, *argv], env=env, capture_output=True, text=True, check=False)
    if res.returncode:
        raise SystemExit(res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default=str(ROOT.parent / "shared" / "data" / "corpus-en"))
    p.add_argument("--sizes", default="2M,20M", help="corpus tokens per run")
    p.add_argument("--workers", type=int, default=None, help="tokeniser processes (default: all cores)")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--out-dir", default=str(Path(__file__).parent / "results"), help="where the JSON goes")
    p.add_argument("--phase", choices=["tokenize", "read", "rate"], help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--store", help=argparse.SUPPRESS)
    p.add_argument("--tokens", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.phase:  # a child process: one phase, one JSON line
        result = {"tokenize": lambda: phase_tokenize(args.spec, args.store, args.tokens, args.workers),
                  "read": lambda: phase_read(args.store, args.seq_len, args.batch),
                  "rate": lambda: one_core_rate(args.spec, 8 << 20)}[args.phase]()
        print(json.dumps(result))
        return

    from minitron.config import parse_count
    from minitron.token_store import default_workers

    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        spec = str(train_folder(Path(args.corpus), Path(tmp)))
        rate = run_phase("--phase", "rate", "--spec", spec)
        for size in args.sizes.split(","):
            store = str(Path(tmp) / f"store-{size}")
            tok = run_phase("--phase", "tokenize", "--spec", spec, "--store", store, "--tokens",
                            str(parse_count(size)), *(["--workers", str(args.workers)] if args.workers else []))
            read = run_phase("--phase", "read", "--store", store, "--seq-len", str(args.seq_len),
                             "--batch", str(args.batch))
            total_rate = tok["tokens"] / tok["tokenize_s"]
            rows.append({"size": size, **tok, "tokens_per_s": round(total_rate),
                         "tokens_per_s_per_worker": round(total_rate / tok["workers"]),
                         "vs_1core_x_workers": round(total_rate / (rate["batch_encode_1core_tokens_per_s"]
                                                                   * tok["workers"]), 3), **read})
    load_after = os.getloadavg()
    device = cpu_name()
    rss_growth = rows[-1]["reader_peak_rss_mb"] - rows[0]["reader_peak_rss_mb"]
    result = {"device": device, "cores": default_workers(), "host": platform.node(), "model": MODEL,
              "seq_len": args.seq_len, "batch": args.batch, **rate,
              "load_average_before": [round(x, 2) for x in load_before],
              "load_average_after": [round(x, 2) for x in load_after], "rows": rows,
              "targets": {"reader_rss_growth_mb": round(rss_growth, 1), "reader_rss_flat": rss_growth <= 50,
                          "tokenize_at_least_80pct": all(r["vs_1core_x_workers"] >= 0.8 for r in rows),
                          "loader_at_least_25M_tokens_per_s": all(r["loader_tokens_per_s"] >= LOADER_TARGET
                                                                  for r in rows)}}
    columns = ["size", "tokens", "workers", "tokenize_s", "tokens_per_s", "tokens_per_s_per_worker",
               "vs_1core_x_workers", "main_peak_rss_mb", "worker_peak_rss_mb", "reader_peak_rss_mb", "blocks_per_s",
               "loader_tokens_per_s", "shards", "bytes"]
    from cli.commands.common import print_table

    print(f"device {device} ({result['cores']} cores), load average {load_before} -> {load_after}")
    print(f"tokenizer batch encode on one core: {rate['batch_encode_1core_tokens_per_s']:,} tokens/s "
          f"({rate['sample_tokens']:,} tokens)")
    print_table(rows, columns)
    print("targets:", json.dumps(result["targets"]))
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device).strip("-").lower()
    out = Path(args.out_dir) / f"data_pipeline-{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
