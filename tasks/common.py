"""What every stage task shares.

- `RunContext`: the small, picklable handle a flow run passes to its tasks (MLflow parent run, checkpoint store,
  scratch folder). It is left out of the cache key, so a re-run of the same config finds the finished stages.
- `stage(...)`: the block each task runs its work in: an MLflow child run, the machine's compute slot (a Prefect
  global concurrency limit, so two flow runs on one box queue instead of colliding), a throttled progress artifact
  and log line, and `publish` / `fetch` for checkpoints (URIs and manifests in, URIs and manifests out: weights never
  travel through Prefect).
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
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from prefect import get_run_logger
from prefect.context import TaskRunContext

from minitron.config import CompressConfig, shared_fields
from tasks import storage, tracking


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
                 progress: bool = True, devices: tuple[int, ...] = ()):
        self.ctx, self.name, self.run = ctx, name, run
        self.devices = devices  # CUDA indices this stage holds (none on a machine without GPUs)
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
          devices: int = 1, compute: bool = True) -> Iterator[Stage]:
    """Run a stage's work inside an MLflow child run, holding `devices` of the machine's compute slots (GPUs; the
    one CPU slot on a machine without) when `compute`."""
    from prefect.concurrency.sync import concurrency

    with tracking.child_run(ctx.parent_run_id, name, params, tracking_uri=ctx.tracking_uri) as run:
        s = Stage(ctx, name, run, total_tokens, progress=compute)
        if not compute:
            yield s
            return
        occupy = devices if ctx.slot.startswith("gpu:") else 1
        with concurrency(ctx.slot, occupy=occupy, timeout_seconds=ctx.slot_timeout_s, strict=True):
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
    """@task with the stage defaults: persisted, cached by `stage_cache_key`, named for the UI."""
    from prefect import task

    def run_name(parameters: dict) -> str:
        return task_run_label(name, parameters)

    return task(name=name, cache_key_fn=stage_cache_key, persist_result=True, task_run_name=run_name, **options)


# ----------------------------------------------------------------------------------------------------------------
# training stages: one launch path (minitron.distill.worker), one settings object, the dry run's parallelism


def counted(spec: str, shape: dict | None = None):
    """A model spec as the planner counts it (its config at its shape, or at a pruned `shape`): no weights read."""
    from minitron.archmath import Shape, shape_of
    from minitron.cost import ShapeCost
    from minitron.models import load_config

    config = load_config(spec)
    return ShapeCost(config, Shape(**shape) if shape else shape_of(config))


def training_parallelism(config: CompressConfig, name: str, trained, teacher=None):
    """Stage `name`'s parallelism on this machine's GPU (`counted` models: the one trained, the frozen teacher),
    decided by the function the dry run prints (`minitron.cost.train_parallelism`)."""
    from minitron.cost import local_gpu, train_parallelism
    from minitron.errors import UserError

    chosen, _, verdict = train_parallelism(config, trained, teacher, local_gpu(config.device))
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
    process group, stopped with the stage) on several. It returns the worker's summary with `folder`: the trained
    model alone, ready to publish (<stage>/model; its checkpoints stay in `out`, default <stage>/run). Every metric
    record goes to `callback`, by default the stage's MLflow run and progress. `total_tokens`: what the progress
    counts to, where the stage trains another amount than its `budget` field (a search candidate's round)."""
    from minitron.distill.worker import launch

    chosen = training_parallelism(config, name, trained, teacher)
    with stage(ctx, name, {**params, **parallelism_params(chosen)}, total_tokens=total_tokens or config.tokens(budget),
               devices=chosen.gpus) as s:

        def train(objective: str, *, model: str, teacher: str | None = None, out: Path | None = None,
                  callback=None, **overrides) -> dict:
            job = training_job(config, objective, budget, chosen, out or s.work / "run", model=model, teacher=teacher)
            job.train = replace(job.train, **overrides)
            result = launch(job, devices=s.devices, callback=callback or s.on_metrics,
                            on_line=get_run_logger().debug)
            s.run.log_metrics({"corpus_tokens": result["corpus_tokens"],
                               "host_peak_rss_mib": max(result["peak_rss_mib"])})
            return {**result, "folder": model_folder(Path(job.out_dir), s.work / "model")}

        yield s, train


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
