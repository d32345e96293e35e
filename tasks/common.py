"""What every stage task shares.

- `RunContext`: the small, picklable handle a flow run passes to its tasks (MLflow parent run, checkpoint store,
  scratch folder). It is left out of the cache key, so a re-run of the same config finds the finished stages.
- `stage(...)`: the block each task runs its work in: an MLflow child run, the machine's compute slot (concrete
  devices held through lock files the kernel releases when the holder dies, see tasks/slots.py; against a Prefect
  server also a lease on its global concurrency limit), a throttled progress artifact and log line, and
  `publish` / `fetch` for checkpoints (URIs and manifests in, URIs and manifests out: weights never travel through
  Prefect).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from prefect import get_run_logger
from prefect.context import TaskRunContext

from minitron.config import CompressConfig
from minitron.errors import UserError
from tasks import slots, storage, tracking

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
    "rank-candidates": (*DATA, "tolerance", "axes", "prune_kv_groups", "proxy_batches", "search_max_candidates",
                        "memory_cap_gib", "layer_metric", "batch_size"),
    "distill-candidate": (*DATA, *TRAIN, "search_tokens", "layer_metric"),
    "select-architecture": ("name",),
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
LEASE_S = 60.0  # Prefect server's shortest lease: a holder that dies stops renewing, its slot returns in ~1 min

# Set when the run is interrupted (Ctrl-C): stages in other threads (mapped candidates) stop at their next progress
# record or slot poll, so the process can exit in seconds instead of finishing their work.
INTERRUPTED = threading.Event()


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
    slot_dir: str = ""  # the machine's device lock files (tasks/slots.py): <MINITRON_HOME>/slots
    inventory: tuple[int, ...] = ()  # the visible GPUs; () = the machine's one CPU slot
    leases: bool = False  # also hold a lease on the Prefect server's limit `slot` (a real server, not ephemeral)
    run_name: str = ""  # this flow run's name, written into the lock files for whoever waits

    @property
    def task_options(self) -> dict:
        return {"timeout_seconds": self.stage_timeout_s, "refresh_cache": self.refresh}


def run_stage(task, config: CompressConfig, ctx: RunContext, *args):
    """Call a stage task with this run's timeout and cache switch (see `stage_options`)."""
    return task.with_options(**stage_options(task, config, ctx, *args))(config, ctx, *args)


def submit_stage(task, config: CompressConfig, ctx: RunContext, *args):
    """`run_stage`, submitted: a future (mapped candidates run side by side, each on its own devices)."""
    return task.with_options(**stage_options(task, config, ctx, *args)).submit(config, ctx, *args)


def stage_options(task, config: CompressConfig, ctx: RunContext, *args) -> dict:
    """This run's task options, plus a forced recompute when the stage's cached result points at a checkpoint that
    fails verification in the store (missing manifest, wrong size or content): a cache hit is trusted only after
    that. The recomputed stage publishes under this flow run's key, a new URI, and since every later stage's cache
    key holds its inputs' URIs, everything after it recomputes too."""
    options = ctx.task_options
    if task.cache_key_fn is not stage_cache_key:  # not cached by its inputs (tokenize: the store is its own cache)
        return options
    if not ctx.refresh and (problem := cached_checkpoint_problem(task, config, ctx, args)):
        _log(f"{task.name}: its cached result is not trusted ({problem}): recomputing {task.name} and every stage "
             "after it", warning=True)
        options = {**options, "refresh_cache": True}
    return options


def cached_checkpoint_problem(task, config: CompressConfig, ctx: RunContext, args: tuple) -> str | None:
    """What is wrong with the checkpoints a cached result of this call points at; None when there is no cached
    result or its checkpoints verify."""
    import inspect
    from types import SimpleNamespace

    from prefect.results import get_result_store

    parameters = inspect.signature(task.fn).bind(config, ctx, *args).arguments
    key = stage_cache_key(SimpleNamespace(task=task), parameters)  # the key the engine looks the result up by
    results = get_result_store().update_for_task(task, _sync=True)
    if not results.exists(key):
        return None
    try:
        result = results.read(key).result
    except Exception as err:  # an unreadable record: recompute rather than fail
        return f"unreadable cache record: {type(err).__name__}"
    store = storage.open_store(ctx.store_uri)
    for uri in checkpoint_uris(result):
        try:
            store.verify(uri, config.cache_check)
        except UserError as err:
            return str(err)
    return None


def checkpoint_uris(result) -> list[str]:
    """The checkpoint URIs a stage result points at: its "uri" (a list result: each item's)."""
    items = result if isinstance(result, list) else [result]
    return [r["uri"] for r in items if isinstance(r, dict) and str(r.get("uri", "")).startswith(("s3://", "file://"))]


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


def ensure_slot(name: str, inventory: tuple[int, ...]) -> None:
    """Create the Prefect server's concurrency limit if missing: one slot per GPU (or one CPU slot)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name, max(1, len(inventory)))


def fetch(ctx: RunContext, uri: str) -> Path:
    """A local, verified copy of a checkpoint in this run's scratch folder (see `local_copy`)."""
    return local_copy(uri, ctx.work_dir)


def local_copy(uri: str, work_dir: str | Path) -> Path:
    """A local, verified copy of the checkpoint at `uri` (downloaded once per scratch folder; sha256 checked on
    download, the sizes of a copy downloaded earlier checked again before it is used)."""
    from minitron.manifest import verify_folder

    local = Path(work_dir) / "cache" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    if (local / "manifest.json").is_file():
        try:
            verify_folder(local, sha256=False)
            return local
        except UserError:
            shutil.rmtree(local)
    storage.open_store(uri).get_folder("", local)  # a store rooted at the checkpoint: any bucket or folder
    return local


class Stage:
    """Handle yielded by `stage(...)`: the MLflow child run plus progress reporting and checkpoint publishing."""

    def __init__(self, ctx: RunContext, name: str, run: tracking.Run, total_tokens: int | None,
                 devices: tuple[int, ...] = ()):
        self.ctx, self.name, self.run = ctx, name, run
        self.devices = devices  # CUDA indices this stage holds (disjoint from every other stage); () on CPU
        self.work = Path(ctx.work_dir) / slug(name)
        self.work.mkdir(parents=True, exist_ok=True)
        self.total_tokens = total_tokens
        self._last = 0.0
        self._progress_id = None
        if total_tokens and TaskRunContext.get() is not None:
            from prefect.artifacts import create_progress_artifact

            self._progress_id = create_progress_artifact(0.0, description=f"{name}: tokens processed")

    @property
    def cuda_visible_devices(self) -> str:
        """CUDA_VISIBLE_DEVICES for a worker process of this stage: its devices as the machine numbers them."""
        return ",".join(slots.physical_ids(self.devices))

    def on_metrics(self, record: dict) -> None:
        """Callback for the minitron loops: every record to MLflow (few stable keys), throttled to Prefect."""
        if INTERRUPTED.is_set():  # Ctrl-C: a stage in another thread stops here (its checkpoints stay)
            raise KeyboardInterrupt
        self.run.log_progress(record)
        now = time.monotonic()
        if now - self._last < PROGRESS_EVERY_S and "val_kl" not in record and "val_ce" not in record:
            return
        self._last = now
        shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()
                 if k in ("step", "tokens", "loss", "val_kl", "val_ce", "lr", "tokens_per_s") and v is not None}
        get_run_logger().info("%s %s", self.name, " ".join(f"{k}={v}" for k, v in shown.items()))
        if self._progress_id and self.total_tokens and "tokens" in record:
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(self._progress_id, min(100.0, 100.0 * record["tokens"] / self.total_tokens))

    def publish(self, folder: Path, key: str | None = None) -> str:
        """Upload a finished folder to `<run_key>/<stage>` (manifest last) and tag the child run with its URI."""
        uri = storage.open_store(self.ctx.store_uri).put_folder(folder, f"{self.ctx.run_key}/{slug(key or self.name)}")
        self.run.set_tags({"checkpoint_uri": uri})
        return uri


@contextmanager
def stage(ctx: RunContext, name: str, params: dict | None = None, *, total_tokens: int | None = None,
          devices: int = 1, compute: bool = True) -> Iterator[Stage]:
    """Run a stage's work inside an MLflow child run, holding `devices` of the machine's GPUs (its one CPU slot on a
    machine without GPUs) when `compute`. The store is checked first: a stage that could not publish never starts."""
    with tracking.child_run(ctx.parent_run_id, name, params, tracking_uri=ctx.tracking_uri) as run:
        if not compute:
            yield Stage(ctx, name, run, total_tokens)
            return
        with hold_devices(ctx, name, devices) as held:
            storage.check_store(ctx.store_uri)
            yield Stage(ctx, name, run, total_tokens, held)


def _log(message: str, warning: bool = False) -> None:
    try:
        logger = get_run_logger()
    except Exception:  # outside a Prefect run (tests, scripts)
        import logging

        logger = logging.getLogger(__name__)
    (logger.warning if warning else logger.info)(message)


@contextmanager
def hold_devices(ctx: RunContext, name: str, count: int = 1) -> Iterator[tuple[int, ...]]:
    """`count` devices of this machine for the block (see tasks/slots.py); yields their CUDA indices.

    On one machine the lock files are the truth: they give concrete, disjoint device indices, and the kernel frees
    them the moment a holder dies. Against a Prefect server we take a lease on its limit too, first (always in that
    order, so two holders never wait on each other crosswise): it shows the machine's occupancy in the Prefect UI
    and queues runs whose processes do not share a state folder, and since a lease that is not renewed expires
    (LEASE_S), a dead holder's slot returns within about a minute there as well. With Prefect's ephemeral API
    there is no lease: its leases live in the API process's memory, so the slot count of a run killed together
    with its API would never come back (the bug this replaces)."""
    from contextlib import ExitStack

    holder = {"run": ctx.run_name, "stage": name}
    with ExitStack() as stack:
        if ctx.leases:
            stack.enter_context(_lease(ctx, name, count if ctx.inventory else 1))
        devices = stack.enter_context(slots.Slots(ctx.slot_dir, ctx.inventory).hold(
            count, holder, timeout_s=ctx.slot_timeout_s, log=_log, stop=INTERRUPTED))
        if devices:
            import torch

            if torch.cuda.is_available():  # "cuda" in this thread now means this stage's first device
                torch.cuda.set_device(devices[0])
        yield devices


@contextmanager
def _lease(ctx: RunContext, name: str, occupy: int) -> Iterator[None]:
    """A renewed lease of `occupy` slots on the Prefect server's limit `ctx.slot`, waiting (and saying so every 30 s)
    up to `ctx.slot_timeout_s`."""
    from prefect.client.schemas.objects import ConcurrencyLeaseHolder
    from prefect.concurrency.sync import concurrency

    task_run = TaskRunContext.get()
    holder = ConcurrencyLeaseHolder(type="task_run", id=task_run.task_run.id) if task_run else None
    start, acquired = time.monotonic(), False
    while True:
        try:
            with concurrency(ctx.slot, occupy=occupy, timeout_seconds=slots.WAIT_LOG_EVERY_S, lease_duration=LEASE_S,
                             strict=True, holder=holder):
                acquired = True
                yield
            return
        except TimeoutError:
            if acquired:  # raised by the stage itself, not by the wait
                raise
            if INTERRUPTED.is_set():
                raise KeyboardInterrupt from None
            waited = time.monotonic() - start
            if waited > ctx.slot_timeout_s:
                raise UserError(f"{name} waited {waited / 60:.0f} min for the Prefect concurrency limit {ctx.slot}: "
                                "see who holds it in the UI (Concurrency), or raise queue_timeout_min") from None
            _log(f"{name} waits for {occupy} slot(s) of the Prefect concurrency limit {ctx.slot} "
                 f"({waited:.0f} s so far)")


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


def stage_task(name: str, **options):
    """@task with the stage defaults: persisted, cached by `stage_cache_key`, named for the UI, and the stage's
    memory handed back once its function has returned (see `release_memory`)."""
    import functools

    from prefect import task

    def decorate(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            finally:
                release_memory()

        return task(name=name, cache_key_fn=stage_cache_key, persist_result=True, **options)(run)

    return decorate


def release_memory() -> None:
    """Give a finished stage's memory back to the OS: its models die with the task function's frame, and what glibc
    keeps of them is trimmed (see minitron/memory.py); the CPU demo's flow process once peaked at 10 GB for a 135M
    teacher, stage after stage adding to it."""
    import gc

    import torch

    from minitron import memory

    gc.collect()  # models in reference cycles (hooks, tied weights) are not freed by refcounting alone
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    memory.trim()
