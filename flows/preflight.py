"""Checks that run in the first seconds of a flow run, before any model work: every bad input a user can make
(unreachable tracking server, missing bucket, wrong credentials, unknown teacher, corrupt or pickled teacher weights,
a device or process count the machine does not have, a target that is not smaller than the teacher or that no shape
can meet, an infeasible explicit shape, a corpus that is missing, empty, too short or not text) fails here with one
line that says what to fix. Reading the corpus here costs nothing later: its token blocks are cached for the stages.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

from flows.environment import store_uri, tracking_uri
from minitron.config import CompressConfig, format_count
from minitron.errors import UserError


@dataclass(frozen=True)
class Step:
    """One pruning step: its parameter target and, for explicit shapes, the shape (and 0-indexed drop block)."""

    target: int
    shape: dict | None = None  # Shape fields; None = architecture search
    drop: tuple[int, int] | None = None


@dataclass(frozen=True)
class Plan:
    teacher_ref: dict  # {"uri": spec, "params": n}: the teacher as given (not in the store)
    teacher_params: int
    steps: tuple[Step, ...]


def preflight(config: CompressConfig) -> Plan:
    from minitron.archmath import count_params, count_shape, shape_of
    from minitron.data import TEXT_SUFFIXES
    from minitron.families import family_of
    from minitron.models import check_weights, load_config
    from minitron.plan import drop_block, step_shapes
    from minitron.prune import check_shape
    from minitron.search import enumerate_rows
    from tasks import storage, tracking
    from tasks.search import memory_cap

    tracking.check_tracking(tracking_uri(config.tracking_uri))
    storage.check_store(store_uri(config.checkpoint_store))
    check_devices(config)

    teacher = local_teacher(config)
    model_config = load_config(teacher, trust_remote_code=config.trust_remote_code)
    family_of(model_config)  # unsupported architecture → names the supported ones
    check_weights(teacher, allow_pickle=config.allow_pickle)  # headers only: no tensor is read
    teacher_params = count_params(model_config)
    data = Path(config.data).expanduser()
    if config.data != "shakespeare" and not data.exists() and (
            config.data.startswith((".", "/", "~")) or config.data.endswith(TEXT_SUFFIXES)):
        raise UserError(f"data path '{config.data}' does not exist")

    shapes = step_shapes(config, shape_of(model_config))  # explicit shapes are checked here (one line each)
    drop = drop_block(config, shape_of(model_config).layers)
    targets = config.targets(teacher_params) if len(shapes) > 1 or shapes[0] is None else []
    steps = []
    for i, shape in enumerate(shapes):
        if shape is not None:  # the family's own rules (hidden size vs heads, ...) before any stage runs
            where = "target shape" if len(shapes) == 1 else f"target_shapes step {i + 1}"
            try:
                check_shape(model_config, shape, drop if len(shapes) == 1 else None)
            except UserError as err:
                raise UserError(f"{where}: {err}") from None
        target = count_shape(model_config, shape) if shape is not None else targets[i]
        steps.append(Step(target, asdict(shape) if shape else None, drop if shape else None))
    previous = teacher_params
    for step in steps:
        if step.target >= previous:
            raise UserError(f"target {format_count(step.target)} is not smaller than its teacher "
                            f"({format_count(previous)} parameters): lower target_params")
        # Later steps of an iterative schedule prune a winner not known yet: the teacher's shapes stand in for it.
        if step.shape is None and not enumerate_rows(
                model_config, step.target, config.tolerance, axes=config.axes,
                prune_kv_groups=config.prune_kv_groups, max_memory_bytes=memory_cap(config),
                context=config.seq_len):
            raise UserError(f"no pruned shape of {Path(config.teacher).name} has {format_count(step.target)} ± "
                            f"{config.tolerance:.0%} parameters: raise tolerance or change target_params")
        previous = step.target

    tokens_per_step = config.batch_size * config.grad_accum * config.seq_len
    for field in ("correction_tokens", "search_tokens", "distill_tokens"):
        if config.tokens(field) < tokens_per_step:
            raise UserError(f"{field} = {getattr(config, field)} is less than one optimizer step "
                            f"({tokens_per_step} tokens = batch_size x grad_accum x seq_len)")
    check_corpus(config, teacher)
    return Plan(teacher_ref={"uri": config.teacher, "params": teacher_params}, teacher_params=teacher_params,
                steps=tuple(steps))


def check_devices(config: CompressConfig) -> None:
    """`device` must exist here, and `nproc` processes must have a GPU each (or, with device: cpu, a core each:
    CPU processes under gloo, which is what tests use)."""
    import torch

    from minitron.models import resolve_device

    device = resolve_device(config.device)  # device=cuda without a GPU: one line
    if config.nproc == 1:
        return
    if device.type == "cuda" and config.nproc > torch.cuda.device_count():
        raise UserError(f"nproc {config.nproc} needs {config.nproc} GPUs but {torch.cuda.device_count()} are "
                        "visible here: lower nproc")
    if device.type == "cpu" and config.device != "cpu":
        raise UserError(f"nproc {config.nproc} needs {config.nproc} GPUs but none is visible here: set nproc to 1 "
                        "(device: cpu with nproc > 1 runs CPU processes under gloo, for tests)")
    if device.type == "cpu" and config.nproc > (os.cpu_count() or 1):
        raise UserError(f"nproc {config.nproc} CPU processes but this machine has {os.cpu_count()} cores: lower "
                        "nproc")


def local_teacher(config: CompressConfig) -> str:
    """The teacher spec, with a checkpoint URI (s3://, file://, as the tool prints them) fetched and verified into
    this config's scratch folder, where its stages find it again."""
    if not config.teacher.startswith(("s3://", "file://")):
        return config.teacher
    from tasks.common import config_key, local_copy, scratch_root

    return str(local_copy(config.teacher, scratch_root() / config_key(config)))


def check_corpus(config: CompressConfig, teacher: str) -> None:
    """The corpus is text the teacher's tokenizer reads (minitron/textcheck.py) and holds at least one batch, one
    validation block and the calibration samples. A hub dataset is left to its first stage (it streams)."""
    from minitron.data import iter_documents
    from minitron.models import load_tokenizer
    from minitron.textcheck import check_text, sample_text
    from tasks.common import load_run_data

    if config.data != "shakespeare" and not Path(config.data).expanduser().exists():
        return
    where = f"data '{config.data}'"
    tokenizer = load_tokenizer(teacher, trust_remote_code=config.trust_remote_code)
    documents = iter_documents(config.data, hf_config=config.data_config, hf_split=config.data_split,
                               text_field=config.text_field)
    check_text(sample_text(documents), tokenizer, where)
    data = load_run_data(config, tokenizer)  # cached: the stages read these blocks in milliseconds
    if len(data.train) < config.batch_size * config.nproc:
        raise UserError(f"{where} gives {len(data.train)} training blocks of seq_len {config.seq_len} tokens, fewer "
                        f"than one batch (batch_size {config.batch_size} x nproc {config.nproc}): lower batch_size or "
                        "seq_len, or add text")
    if len(data.val) < config.nproc:
        raise UserError(f"{where} leaves no validation block of seq_len {config.seq_len} tokens: raise val_fraction "
                        "or lower seq_len, or add text")
    calib_len = config.calib_seq_len or config.seq_len
    if data.train.numel() // calib_len < config.calib_samples:
        raise UserError(f"{where} has {data.train.numel() // calib_len} training sequences of {calib_len} tokens, "
                        f"fewer than calib_samples {config.calib_samples}: lower calib_samples or add text")
