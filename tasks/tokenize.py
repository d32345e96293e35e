"""Stage 0, tokenize: the corpus as a sharded token store, built once per (corpus, tokenizer, split) and read by
every later stage and by later runs (an existing store is opened and checked in milliseconds, so this task is
never cached by Prefect: the store itself is the cache, verified on every run)."""

from __future__ import annotations

import time

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from minitron.config import CompressConfig
from tasks.common import PROGRESS_EVERY_S, RunContext, load_run_data, model_spec, stage, stage_params


@task(name="tokenize", cache_policy=NO_CACHE)
def tokenize_corpus(config: CompressConfig, ctx: RunContext) -> dict:
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    from minitron.data import load_tokenizer

    log = get_run_logger()
    params = stage_params(config, "data", "data_config", "data_split", "text_field", "val_fraction",
                          "max_corpus_tokens", "seed", "token_store", "teacher")
    with stage(ctx, "tokenize", params, compute=False) as s:  # CPU work: it holds no GPU
        artifact = create_progress_artifact(0.0, description="tokenize: share of the corpus read")
        last = {"t": 0.0, "record": None}

        def progress(record: dict) -> None:
            last["record"] = record
            now = time.monotonic()
            if now - last["t"] < PROGRESS_EVERY_S:
                return
            last["t"] = now
            if record["fraction"] is not None:
                update_progress_artifact(artifact, 100.0 * record["fraction"])
            log.info("tokenize: %s documents, %s tokens, %s tokens/s on %d workers", f"{record['documents']:,}",
                     f"{record['tokens']:,}", f"{record['tokens_per_s']:,.0f}", record["workers"])

        t0 = time.perf_counter()
        teacher = model_spec(ctx, {"uri": config.teacher})  # a checkpoint URI: its verified local copy
        data = load_run_data(config, load_tokenizer(teacher), progress=progress)
        seconds = time.perf_counter() - t0
        update_progress_artifact(artifact, 100.0)
        info = data.store.summary()
        built = last["record"]
        if built is None:
            log.info("tokenize: store %s already built (%s shards, %s tokens)", info["store"], info["shards"],
                     f"{data.tokens:,}")
        else:
            log.info("tokenize: built %s in %.1f s: %s tokens, %s tokens/s on %d workers, %s shards, %s bytes",
                     info["store"], seconds, f"{data.tokens:,}", f"{built['tokens_per_s']:,.0f}", built["workers"],
                     info["shards"], f"{info['bytes']:,}")
            s.run.log_metrics({"tokenize_tokens_per_s": built["tokens_per_s"], "tokenize_seconds": seconds})
        s.run.set_tags({"token_store": info["store"]})
        return {**info, "documents": data.documents, "tokens": data.tokens}
