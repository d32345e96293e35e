"""What every stage task shares.

- `RunContext`: the small, picklable handle a flow run passes to its tasks (MLflow parent run, checkpoint store,
  scratch folder). It is left out of the cache key, so a re-run of the same config finds the finished stages.
- `stage(...)`: the block each task runs its work in: an MLflow child run, the machine's compute slot (concrete
  devices held through lock files the kernel releases when the holder dies, see tasks/slots.py; against a Prefect
  server also a lease on its global concurrency limit), a throttled progress artifact and log line, and
  `publish` / `fetch` for checkpoints (URIs and manifests in, URIs and manifests out: weights never travel through
  Prefect).
- `data_kwargs(config)`: the run's corpus fields as `load_token_data` keyword arguments, mapped here only.
- `training_stage(...)`: the block of a training stage (teacher correction, a candidate, distillation): it holds the
  GPUs of the parallelism the dry run prints (`training_parallelism`) and hands one `TrainJob` (`training_job`) to
  the one launch path, `minitron.distill.worker.launch`.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from prefect import get_run_logger
from prefect.context import TaskRunContext

from minitron.config import CompressConfig, shared_fields
from minitron.errors import UserError
from tasks import slots, storage, tracking


def data_kwargs(config: CompressConfig, seq_len: int | None = None) -> dict:
    """The run's corpus as `load_token_data` keyword arguments (`spec`, `seq_len` and the rest): the one place the
    config's data fields are mapped. Every stage loads through `load_run_data`, and a training stage's worker
    receives exactly this dict."""
    from minitron.config import parse_count

    return {"spec": config.data, "seq_len": seq_len or config.seq_len, "val_fraction": config.val_fraction,
            "seed": config.seed, "hf_config": config.data_config, "hf_split": config.data_split,
            "text_field": config.text_field, "store": config.token_store,
            "max_tokens": parse_count(config.max_corpus_tokens) if config.max_corpus_tokens else None}


def fields_read(build) -> tuple[str, ...]:
    """The config fields `build(config)` reads, in order (it runs on a stand-in that records each read and answers
    with the field's default)."""
    names: list[str] = []

    class Reads:
        def __getattr__(self, name):
            names.append(name)
            return CompressConfig.model_fields[name].default

    build(Reads())
    return tuple(dict.fromkeys(names))


# A stage's result depends on the upstream stages' outputs (URIs, shapes) and on the config fields it reads, not on
# which flow run asks: re-running a config after a crash resumes after the last finished stage, and changing, say,
# distill_tokens recomputes distillation onwards but not teacher correction or importance. `name` is part of every
# key, so a new run name is a fresh start. `ctx` (this run's MLflow parent, scratch folder) never is. The corpus
# fields are those `data_kwargs` reads, the training fields those a training stage's worker receives (DistillConfig's
# run-config fields, `parallel` among them) plus nproc: both decide the world size and so the global batch.
# Where the token store lives changes no result (a store is found by what it holds), so it is no part of a key.
LOCATION_ONLY = ("token_store",)
DATA = ("name", *(f for f in fields_read(data_kwargs) if f not in LOCATION_ONLY), "dtype", "trust_remote_code",
        "allow_pickle")
TRAIN = (*shared_fields(), "nproc")
STAGE_FIELDS = {
    "correct-teacher": (*DATA, *TRAIN, "teacher", "correction_tokens"),
    "importance": (*DATA, "calib_samples", "calib_seq_len", "seq_agg", "batch_agg", "batch_size", "val_batches"),
    "search-candidates": (*DATA, "tolerance", "axes", "prune_kv_groups", "max_width_pruning", "max_depth_pruning",
                          "memory_cap_gib", "search_max_candidates", "search_proxy", "proxy_batches",
                          "depth_block_metric", "eval_limit", "val_batches", "batch_size", "grad_accum", "nproc",
                          "parallel", "activation_checkpointing", "search_tokens", "search_eta"),  # the schedule's
    "distill-candidate": (*DATA, *TRAIN, "search_tokens"),  # the round's budget also comes as an input, `tokens`
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


FETCHED: dict[str, str] = {}  # local copy → the checkpoint URI it came from (backend ray hands workers the URI)


def fetch(ctx: RunContext, uri: str) -> Path:
    """A local, verified copy of a checkpoint in this run's scratch folder (see `local_copy`)."""
    local = local_copy(uri, ctx.work_dir)
    FETCHED[str(local)] = uri
    return local


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
    """Handle yielded by `stage(...)`: the MLflow child run plus progress reporting and checkpoint publishing.

    In a task run, the Prefect run page gets a link to the child run's MLflow page and, for a compute stage, a
    progress artifact: tokens processed for training stages (`total_tokens`), `progress(...)` for the others, and
    100% when the stage's block ends without an error."""

    def __init__(self, ctx: RunContext, name: str, run: tracking.Run, total_tokens: int | None,
                 progress: bool = True, devices: tuple[int, ...] = ()):
        self.ctx, self.name, self.run = ctx, name, run
        self.devices = devices  # CUDA indices this stage holds (disjoint from every other stage); () on CPU
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

        if INTERRUPTED.is_set():  # Ctrl-C: a stage in another thread stops here (its checkpoints stay)
            raise KeyboardInterrupt
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
          devices: int = 1, compute: bool = True) -> Iterator[Stage]:
    """Run a stage's work inside an MLflow child run, holding `devices` of the machine's GPUs (its one CPU slot on a
    machine without GPUs) when `compute`. `devices=0`: compute that runs elsewhere (a Ray cluster places it), so the
    stage holds nothing of this machine. The store is checked first: a stage that could not publish never starts."""
    with tracking.child_run(ctx.parent_run_id, name, params, tracking_uri=ctx.tracking_uri) as run:
        s = Stage(ctx, name, run, total_tokens, progress=compute)
        if not compute:
            yield s
            return
        if devices == 0:
            storage.check_store(ctx.store_uri)
            yield s
        else:
            with hold_devices(ctx, name, devices) as held:
                storage.check_store(ctx.store_uri)
                s.devices = held
                yield s
        s.progress(100.0)  # the last record of a loop rarely lands on the budget exactly


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
    from minitron.data import load_token_data

    kwargs = data_kwargs(config, seq_len)
    return load_token_data(kwargs.pop("spec"), tokenizer, kwargs.pop("seq_len"), progress=progress, **kwargs)


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
    """@task with the stage defaults: persisted, cached by `stage_cache_key`, named for the UI, and the stage's
    memory handed back once its function has returned (see `release_memory`)."""
    import functools

    from prefect import task

    def run_name(parameters: dict) -> str:
        return task_run_label(name, parameters)

    def decorate(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            finally:
                release_memory()

        return task(name=name, cache_key_fn=stage_cache_key, persist_result=True, task_run_name=run_name,
                    **options)(run)

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


# ----------------------------------------------------------------------------------------------------------------
# training stages: one launch path (minitron.distill.worker), one settings object, the dry run's parallelism


def counted(spec: str, shape: dict | None = None):
    """A model spec as the planner counts it (its config at its shape, or at a pruned `shape`): no weights read."""
    from minitron.archmath import Shape, shape_of
    from minitron.cost import ShapeCost
    from minitron.models import load_config

    config = load_config(spec)
    return ShapeCost(config, Shape(**shape) if shape else shape_of(config))


def training_parallelism(config: CompressConfig, name: str, trained, teacher=None, cluster: dict | None = None):
    """Stage `name`'s parallelism on this machine's GPU, or on the GPUs of the Ray cluster whose `cluster` resources
    are given (`counted` models: the one trained, the frozen teacher), decided by the function the dry run prints
    (`minitron.cost.train_parallelism`)."""
    from minitron.cost import local_gpu, train_parallelism
    from minitron.errors import UserError
    from tasks.ray_cluster import cluster_gpu

    gpu = cluster_gpu(config, cluster) if cluster is not None else local_gpu(config.device)
    chosen, _, verdict = train_parallelism(config, trained, teacher, gpu)
    if chosen is None:
        raise UserError(f"{name}: {verdict}")
    return chosen


def parallelism_params(chosen) -> dict:
    """The decision as MLflow params of the stage's child run."""
    return {"parallelism": chosen.describe(), "gpus": chosen.gpus, "parallel": chosen.parallel,
            "activation_checkpointing": chosen.checkpointing}


def training_job(config: CompressConfig, objective: str, tokens_field: str, chosen, out_dir: Path, *, model: str,
                 teacher: str | None = None):
    """The one settings object a training stage's worker runs: the run config's training fields resolved into a
    DistillConfig, the corpus as `data_kwargs`, the model specs and the stage's parallelism."""
    from minitron.distill import DistillConfig
    from minitron.distill.worker import TrainJob

    train = DistillConfig.from_run_config(config, tokens_field, progress=False, parallel=chosen.parallel,
                                          activation_checkpointing=chosen.checkpointing)
    return TrainJob(objective, model, data_kwargs(config), train, str(out_dir), teacher=teacher, nproc=chosen.gpus,
                    resume=True, allow_pickle=config.allow_pickle, trust_remote_code=config.trust_remote_code)


@contextmanager
def training_stage(ctx: RunContext, config: CompressConfig, name: str, params: dict, *, budget: str, trained,
                   teacher=None, total_tokens: int | None = None) -> Iterator[tuple[Stage, Callable[..., dict]]]:
    """`stage` for a training stage: it holds the GPUs of the stage's parallelism (the dry run's decision for the
    `counted` model it trains, against the `counted` teacher), logged with `params` on its MLflow child run. Yields
    the Stage and its one training call, `train(objective, model=spec, teacher=spec, out=folder, callback=...,
    **DistillConfig overrides)`: the job goes to `launch`, in this process on one device, under torchrun (its own
    process group, stopped with the stage) on several; under backend ray to a Ray Train job on the cluster
    (tasks/ray_train.py). It returns the worker's summary with `folder`: the trained model alone, ready to publish
    (<stage>/model; its checkpoints stay in `out`, default <stage>/run, or in the store's ray/ folder until the
    stage ends). Every metric record goes to `callback`, by default the stage's MLflow run and progress.
    `total_tokens`: what the progress counts to, where the stage trains another amount than its `budget` field (a
    search candidate's round)."""
    from minitron.distill.worker import launch
    from tasks import ray_cluster, ray_train

    on_ray = config.backend == "ray"
    cluster = ray_cluster.connect(config.ray_address) if on_ray else None
    chosen = training_parallelism(config, name, trained, teacher, cluster)
    # Under backend ray, Ray places the job on the cluster's GPUs: the stage holds none of this machine's devices
    with stage(ctx, name, {**params, **parallelism_params(chosen)}, total_tokens=total_tokens or config.tokens(budget),
               devices=0 if on_ray else chosen.gpus) as s:

        def train(objective: str, *, model: str, teacher: str | None = None, out: Path | None = None,
                  callback=None, **overrides) -> dict:
            job = training_job(config, objective, budget, chosen, out or s.work / "run", model=model, teacher=teacher)
            job.train = replace(job.train, **overrides)
            if on_ray:
                result = ray_train.fit(ctx, config, s.name, cluster, job, callback=callback or s.on_metrics)
            else:
                result = launch(job, devices=s.devices, callback=callback or s.on_metrics,
                                on_line=get_run_logger().debug)
            s.run.log_metrics({"corpus_tokens": result["corpus_tokens"],
                               "host_peak_rss_mib": max(result["peak_rss_mib"])})
            return {**result, "folder": model_folder(Path(job.out_dir), s.work / "model")}

        yield s, train
    if on_ray:  # published: the job's checkpoints and the model's copy in the store's ray/ folder can go
        ray_train.forget(ctx, name)


# What a training output folder holds besides the model (the loop's and the worker's files)
NOT_MODEL = ("metrics.jsonl", "progress.jsonl", "job.json", "result.json", "error.json", "distill_config.json")


def model_folder(run: Path, out: Path) -> Path:
    """The trained model of a training output folder alone (no checkpoints, metrics or job files), hard-linked
    where the filesystem allows: what a stage publishes."""
    out.mkdir(parents=True, exist_ok=True)
    for file in run.iterdir():
        if file.is_file() and file.name not in NOT_MODEL and not file.name.endswith(".tmp"):
            (out / file.name).unlink(missing_ok=True)
            try:
                os.link(file, out / file.name)
            except OSError:
                shutil.copy2(file, out / file.name)
    return out
