"""What every stage task shares.

- `RunContext`: the small, picklable handle a flow run passes to its tasks (MLflow parent run, checkpoint store,
  scratch folder). It is left out of the cache key, so a re-run of the same config finds the finished stages.
- `stage(...)`: the block each task runs its work in: an MLflow child run, the machine's compute slot (a Prefect
  global concurrency limit, so two flow runs on one box queue instead of colliding), a throttled progress artifact
  and log line, and `publish` / `fetch` for checkpoints (URIs and manifests in, URIs and manifests out: weights never
  travel through Prefect).
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from prefect import get_run_logger
from prefect.context import TaskRunContext

from minitron.config import CompressConfig
from tasks import storage, tracking

# A stage's result depends on the upstream stages' outputs (URIs, shapes) and on the config fields it reads, not on
# which flow run asks: re-running a config after a crash resumes after the last finished stage, and changing, say,
# distill_tokens recomputes distillation onwards but not teacher correction or importance. `name` is part of every
# key, so a new run name is a fresh start. `ctx` (this run's MLflow parent, scratch folder) never is.
DATA = ("name", "data", "data_config", "data_split", "text_field", "val_fraction", "max_corpus_tokens", "seq_len",
        "seed", "dtype", "trust_remote_code", "allow_pickle")
TRAIN = ("batch_size", "grad_accum", "lr", "min_lr", "warmup_frac", "weight_decay", "grad_clip", "kd_temperature",
         "kd_top_k", "ce_weight", "intermediate_weight", "eval_every", "val_batches")
STAGE_FIELDS = {
    "correct-teacher": (*DATA, *TRAIN, "teacher", "correction_tokens"),
    "importance": (*DATA, "calib_samples", "calib_seq_len", "seq_agg", "batch_agg", "batch_size", "val_batches"),
    "search-candidates": (*DATA, "tolerance", "axes", "prune_kv_groups", "max_width_pruning", "max_depth_pruning",
                          "memory_cap_gib", "search_max_candidates", "search_proxy", "proxy_batches",
                          "depth_block_metric", "eval_limit", "val_batches", "batch_size", "grad_accum", "nproc",
                          "search_tokens", "search_eta"),
    "distill-candidate": (*DATA, *TRAIN),  # the round's budget is an input (tokens), not a config field
    "select-architecture": ("name", "search_metric", "tolerance"),
    "prune": (*DATA, "layer_metric"),
    "distill": (*DATA, *TRAIN, "distill_tokens"),
    "evaluate": (*DATA, "eval_preset", "eval_limit", "layer_metric"),  # DATA holds dtype: it changes the scores
}


def stage_cache_key(context, parameters: dict) -> str:
    """Cache key of a stage task: its name, the config fields it reads and its other inputs (not `ctx`)."""
    from prefect.utilities.hashing import hash_objects

    name = context.task.name
    config = parameters["config"]
    fields = {f: getattr(config, f) for f in STAGE_FIELDS[name]}
    upstream = {k: v for k, v in parameters.items() if k not in ("config", "ctx")}
    return f"{name}-{hash_objects(fields, upstream, raise_on_failure=True)}"

PROGRESS_EVERY_S = 5.0  # progress artifact / log line at most this often: per-step logs flood Prefect's log view


@dataclass(frozen=True)
class RunContext:
    parent_run_id: str  # MLflow parent run of this flow run
    tracking_uri: str
    store_uri: str  # checkpoint store root: s3://bucket/prefix or a folder
    run_key: str  # this flow run's folder inside the store: <name>/<flow-run-name>
    work_dir: str  # local scratch (downloads, stage outputs before upload)
    slot: str  # global concurrency limit name that compute stages hold: gpu:<host> or cpu:<host>
    slot_timeout_s: float  # how long a stage waits for the slot before failing
    stage_timeout_s: float | None  # a stage running longer is stopped (its local checkpoints stay for a retry)
    refresh: bool  # recompute stages even when a cached result exists (config.resume off)

    @property
    def task_options(self) -> dict:
        return {"timeout_seconds": self.stage_timeout_s, "refresh_cache": self.refresh}


def run_stage(task, config: CompressConfig, ctx: RunContext, *args):
    """Call a stage task with this run's timeout and cache switch."""
    return task.with_options(**ctx.task_options)(config, ctx, *args)


def config_key(config: CompressConfig) -> str:
    """Scratch folder name per config: a re-run of the same config finds its local checkpoints and resumes
    mid-stage, not only after the last finished stage."""
    return f"{config.name}-" + hashlib.sha256(config.model_dump_json().encode()).hexdigest()[:12]


def slug(text: str) -> str:
    """A name safe in store keys, URIs and folder names: "search 70M: proxy" → "search-70M-proxy"."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")


def compute_slot(device: str) -> str:
    from minitron.models import resolve_device

    return f"{resolve_device(device).type.replace('cuda', 'gpu')}:{socket.gethostname()}"


def ensure_slot(name: str) -> None:
    """Create the concurrency limit if missing: one slot per GPU (or one CPU slot), so stages queue per box."""
    import torch
    from prefect.client.orchestration import get_client

    slots = torch.cuda.device_count() if name.startswith("gpu:") else 1
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name, max(1, slots))


def fetch(ctx: RunContext, uri: str) -> Path:
    """A local, verified copy of a checkpoint (downloaded once per scratch folder; sha256 checked on download)."""
    local = Path(ctx.work_dir) / "cache" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    if not (local / "manifest.json").is_file():
        storage.open_store(ctx.store_uri).get_folder(uri, local)
    return local


class Stage:
    """Handle yielded by `stage(...)`: the MLflow child run plus progress reporting and checkpoint publishing.

    In a task run, the Prefect run page gets a link to the child run's MLflow page and, for a compute stage, a
    progress artifact: tokens processed for training stages (`total_tokens`), `progress(...)` for the others, and
    100% when the stage's block ends without an error."""

    def __init__(self, ctx: RunContext, name: str, run: tracking.Run, total_tokens: int | None,
                 progress: bool = True):
        self.ctx, self.name, self.run = ctx, name, run
        self.work = Path(ctx.work_dir) / slug(name)
        self.work.mkdir(parents=True, exist_ok=True)
        self.total_tokens = total_tokens
        self._last = 0.0
        self._progress_id = None
        if TaskRunContext.get() is not None:
            from prefect.artifacts import create_link_artifact, create_progress_artifact

            if url := run.url(ctx.tracking_uri):
                create_link_artifact(url, link_text=f"MLflow: {name}", description=f"the MLflow run of {name}")
            if progress:
                what = "tokens processed" if total_tokens else "done"
                self._progress_id = create_progress_artifact(0.0, description=f"{name}: {what}")

    def progress(self, percent: float, description: str | None = None) -> None:
        """Move the stage's progress artifact (0-100)."""
        if self._progress_id:
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(self._progress_id, min(100.0, percent), description=description)

    def on_metrics(self, record: dict) -> None:
        """Callback for the minitron loops: every record to MLflow (few stable keys), throttled to Prefect."""
        from minitron.report import sig

        self.run.log_progress(record)
        now = time.monotonic()
        if now - self._last < PROGRESS_EVERY_S and "val_kl" not in record and "val_ce" not in record:
            return
        self._last = now
        formats = {"step": str, "tokens": str, "loss": sig, "val_kl": sig, "val_ce": sig, "lr": "{:.3g}".format,
                   "tokens_per_s": lambda v: str(round(v))}  # 3 significant digits: KLs near 1e-4 stay readable
        shown = {k: formats[k](v) for k, v in record.items() if k in formats and v is not None}
        get_run_logger().info("%s %s", self.name, " ".join(f"{k}={v}" for k, v in shown.items()))
        if self.total_tokens and "tokens" in record:
            self.progress(100.0 * record["tokens"] / self.total_tokens)

    def publish(self, folder: Path, key: str | None = None) -> str:
        """Upload a finished folder to `<run_key>/<stage>` (manifest last) and tag the child run with its URI."""
        uri = storage.open_store(self.ctx.store_uri).put_folder(folder, f"{self.ctx.run_key}/{slug(key or self.name)}")
        self.run.set_tags({"checkpoint_uri": uri})
        return uri


@contextmanager
def stage(ctx: RunContext, name: str, params: dict | None = None, *, total_tokens: int | None = None,
          compute: bool = True) -> Iterator[Stage]:
    """Run a stage's work inside an MLflow child run, holding the machine's compute slot when `compute`."""
    from prefect.concurrency.sync import concurrency

    with tracking.child_run(ctx.parent_run_id, name, params, tracking_uri=ctx.tracking_uri) as run:
        s = Stage(ctx, name, run, total_tokens, progress=compute)
        if not compute:
            yield s
            return
        with concurrency(ctx.slot, occupy=1, timeout_seconds=ctx.slot_timeout_s, strict=True):
            yield s
        s.progress(100.0)  # the last record of a loop rarely lands on the budget exactly


def stage_params(config: CompressConfig, *fields: str) -> dict:
    """The config fields a stage depends on, as MLflow params."""
    return {f: getattr(config, f) for f in fields}


def scratch_root() -> Path:
    return Path(os.environ.get("MINITRON_WORK", Path(".minitron") / "work")).resolve()


def load_run_data(config: CompressConfig, tokenizer, seq_len: int | None = None, progress=None):
    """The run's corpus as blocks read from its token store (built once by the tokenize stage, or here on first
    use; `progress` receives the build's records)."""
    from minitron.config import parse_count
    from minitron.data import load_token_data

    return load_token_data(
        config.data, tokenizer, seq_len or config.seq_len, val_fraction=config.val_fraction, seed=config.seed,
        hf_config=config.data_config, hf_split=config.data_split, text_field=config.text_field,
        max_tokens=parse_count(config.max_corpus_tokens) if config.max_corpus_tokens else None,
        store=config.token_store, progress=progress)


def model_spec(ctx: RunContext, ref: dict) -> str:
    """A model ref as a spec `minitron` loads: the teacher spec as given, or a checkpoint URI fetched and verified."""
    uri = ref["uri"]
    return str(fetch(ctx, uri)) if uri.startswith(("s3://", "file://")) else uri


def load_run_model(config: CompressConfig, ref: dict, ctx: RunContext):
    """(model, tokenizer) for a model ref, in the run's dtype and device."""
    from minitron.models import load_model

    return load_model(model_spec(ctx, ref), dtype=config.dtype, device=config.device, allow_pickle=config.allow_pickle,
                      trust_remote_code=config.trust_remote_code)


def task_run_label(stage_name: str, parameters: dict) -> str:
    """A stage's task-run name in the Prefect UI: the stage, and the candidate's shape or the target it works on
    and round ("distill-candidate L24-H576-F1536-A9-KV3 r2", "search-candidates 72.60M")."""
    from minitron.config import format_count
    from minitron.report import shape_label

    if isinstance(parameters.get("row"), dict):
        label = f"{stage_name} {shape_label(parameters['row']['shape'], parameters['row'].get('drop'))}"
        return label + (f" r{parameters['number']}" if isinstance(parameters.get("number"), int) else "")
    if isinstance(parameters.get("shape"), dict):
        return f"{stage_name} {shape_label(parameters['shape'], parameters.get('drop'))}"
    if isinstance(parameters.get("target"), int):
        return f"{stage_name} {format_count(parameters['target'])}"
    return stage_name


def stage_task(name: str, **options):
    """@task with the stage defaults: persisted, cached by `stage_cache_key`, named for the UI."""
    from prefect import task

    def run_name(parameters: dict) -> str:
        return task_run_label(name, parameters)

    return task(name=name, cache_key_fn=stage_cache_key, persist_result=True, task_run_name=run_name, **options)
