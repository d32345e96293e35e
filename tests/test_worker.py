"""The one launch path of the training stages: what a stage's worker receives is the run config, field for field
(nothing rebuilt from flags), its cache key covers exactly that, the plan's parallelism decision is the run's, and
each drift the old flag list had stays fixed."""

from __future__ import annotations

import json
import typing
from pathlib import Path

import pytest

from minitron.config import CompressConfig, DistillConfig, load_config_file, shared_fields
from minitron.distill.worker import TrainJob
from minitron.errors import UserError
from tasks.common import (
    LOCATION_ONLY,
    STAGE_FIELDS,
    counted,
    data_kwargs,
    fields_read,
    training_job,
    training_parallelism,
)

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
PAPER_PRESETS = ("llama-3.1-8b-minitron-4b-width.yaml", "llama-3.1-8b-minitron-4b-depth.yaml",
                 "llama-3.1-8b-minitron.yaml", "mistral-nemo-minitron-8b.yaml", "nemotron-4-15b-minitron.yaml")
# training stage → (objective, budget field): as tasks/correct.py, tasks/search.py and tasks/distill.py build them
STAGES = {"correct-teacher": ("correct", "correction_tokens"), "distill-candidate": ("distill", "search_tokens"),
          "distill": ("distill", "distill_tokens")}
SPECIAL = {"target_params": "50%", "target_shapes": "L2-H32", "drop_layers": "2-3", "tracking_uri": "sqlite:////x",
           "ray_address": "127.0.0.1:6379"}


def worker_job(stage: str, config: CompressConfig, tmp_path: Path) -> TrainJob:
    """The job a training stage hands to its ranks, as the ranks read it back from job.json."""
    objective, budget = STAGES[stage]
    chosen = training_parallelism(config, stage, counted("tiny-random-llama"), counted("tiny-random-llama"))
    teacher = "teacher-folder" if objective == "distill" else None
    model = config.teacher if stage == "correct-teacher" else "student-folder"
    job = training_job(config, objective, budget, chosen, tmp_path, model=model, teacher=teacher)
    return TrainJob.from_json(job.to_json())


def changed(name: str, value):
    """Another valid value of config field `name`."""
    kind = CompressConfig.model_fields[name].annotation
    if typing.get_origin(kind) is not typing.Literal:  # X | None → X
        kind = next((a for a in typing.get_args(kind) if a is not type(None)), kind)
    if name in SPECIAL:
        return SPECIAL[name]
    if name.endswith("_tokens"):  # token counts
        return "3M"
    if kind is bool:
        return not value
    if typing.get_origin(kind) is typing.Literal:
        return [c for c in typing.get_args(kind) if c != value][-1]
    if kind is int:
        return (value or 16) + 1
    if kind is float:
        return value * 1.5 if value else 0.5
    return f"{value or 'x'}-2"


def inputs_of(stage: str) -> set[str]:
    """The run-config fields a training stage's worker must see: corpus, training settings, budget, processes."""
    extra = {"teacher"} if stage == "correct-teacher" else set()
    return {*fields_read(data_kwargs), *shared_fields(), STAGES[stage][1], "nproc", "parallel", "allow_pickle",
            "trust_remote_code", *extra}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_field_a_training_stage_reads_reaches_its_worker(stage, tmp_path):
    base = load_config_file(CONFIGS / "tiny.yaml")
    reference = worker_job(stage, base, tmp_path)
    seen = set()
    for name in CompressConfig.model_fields:
        new = CompressConfig(**{**base.model_dump(), name: changed(name, getattr(base, name))})
        if worker_job(stage, new, tmp_path) != reference:
            seen.add(name)
            assert name in STAGE_FIELDS[stage] or name in LOCATION_ONLY, f"{name} changes the {stage} worker but not " \
                                                                         "its cache key"
    assert seen == inputs_of(stage)
    # and the values are the config's, where the worker reads them
    new = CompressConfig(**{**base.model_dump(), **{f: changed(f, getattr(base, f)) for f in inputs_of(stage)}})
    job = worker_job(stage, new, tmp_path)
    assert job.data == data_kwargs(new)
    assert all(getattr(job.train, f) == getattr(new, f) for f in shared_fields())
    assert (job.train.tokens, job.nproc, job.allow_pickle) == (new.tokens(STAGES[stage][1]), 2, True)


def test_max_corpus_tokens_reaches_the_worker(tmp_path, tiny_tokenizer):
    """Drift: the torchrun ranks read the whole corpus. The cap travels in the job and bounds what a rank reads."""
    from minitron.data import load_token_data

    config = load_config_file(CONFIGS / "tiny.yaml", ["max_corpus_tokens=20K", "nproc=2", "device=cpu"])
    job = worker_job("distill", config, tmp_path)
    assert job.nproc == 2 and job.data["max_tokens"] == 20_000
    spec = dict(job.data)
    data = load_token_data(spec.pop("spec"), tiny_tokenizer, spec.pop("seq_len"), **spec)
    assert 20_000 <= data.tokens <= 60_000  # the document that crosses the cap is the last read (the corpus holds millions)


def test_parallel_reaches_the_form_yaml_set_and_the_worker(tmp_path):
    """Drift: `parallel` could not be passed. It is a run-config field with three choices, like the others."""
    schema = CompressConfig.model_json_schema()["properties"]["parallel"]
    assert schema["enum"] == ["auto", "ddp", "fsdp"] and schema["default"] == "auto"
    config = load_config_file(CONFIGS / "tiny.yaml", ["parallel=fsdp", "nproc=2"])
    assert worker_job("correct-teacher", config, tmp_path).train.parallel == "fsdp"
    with pytest.raises(UserError, match="parallel"):
        load_config_file(None, ["parallel=zero3"])


@pytest.mark.parametrize("field", ["nproc", "parallel"])
@pytest.mark.parametrize("stage", sorted(STAGES))
def test_nproc_and_parallel_are_in_the_training_cache_keys(stage, field):
    """Drift: nproc changes the global batch but did not change the cache key."""
    from types import SimpleNamespace

    from tasks.common import stage_cache_key

    def key(name, config, **inputs):
        return stage_cache_key(SimpleNamespace(task=SimpleNamespace(name=name)), {"config": config, **inputs})

    base = CompressConfig(name="a")
    other = base.model_copy(update={field: changed(field, getattr(base, field))})
    assert key(stage, base, teacher={"uri": "t"}) != key(stage, other, teacher={"uri": "t"})
    assert key("importance", base, teacher={"uri": "t"}) == key("importance", other, teacher={"uri": "t"})


def test_evaluate_gets_every_data_and_model_field(tmp_path):
    """Drift: the evaluate task passed --data without --data-config, --data-split or --text-field."""
    from cli.main import build_parser
    from minitron.config import DATA_FIELDS, MODEL_FIELDS
    from tasks.evaluate import evaluate_args

    config = load_config_file(CONFIGS / "tiny.yaml", ["data=wikitext", "data_config=wikitext-2-raw-v1",
                                                      "data_split=validation", "text_field=body", "seed=3",
                                                      "val_fraction=0.1", "dtype=bf16", "trust_remote_code=true"])
    args = build_parser().parse_args(evaluate_args(config, "model-folder", tmp_path / "out.json"))
    assert (args.model, args.data, args.preset, args.limit) == ("model-folder", "wikitext", "offline", 20)
    for name in (*DATA_FIELDS, *MODEL_FIELDS):
        assert getattr(args, name) == getattr(config, name), name


def test_kd_temperature_default_is_written_once():
    """Drift: the default was written four times. Every reader takes the run config's default object itself (a
    float written again elsewhere would be another object, so `is` fails)."""
    from cli.main import build_parser
    from minitron.distill.loss import KDLossConfig

    default = CompressConfig.model_fields["kd_temperature"].default
    args = build_parser().parse_args(["distill", "--teacher", "t", "--student", "s", "--data", "d", "--tokens", "1K",
                                      "--out", "o"])
    assert DistillConfig.kd_temperature is default and KDLossConfig.temperature is default
    assert args.kd_temperature is default
    for name in shared_fields():  # the same for every training setting of the run config
        assert getattr(DistillConfig, name) is CompressConfig.model_fields[name].default or name == "parallel", name


def test_cli_builds_the_same_job(tmp_path):
    """`minitron distill` flags are the run config's fields: the job it launches equals the flow's for the same
    values (`--temperature`, `--top-k` and `--batch` stay as older spellings)."""
    from cli.commands.distill import train_job
    from cli.main import build_parser

    args = build_parser().parse_args([
        "distill", "--teacher", "tiny-random-llama", "--student", "student-folder", "--data", "shakespeare",
        "--tokens", "16K", "--seq-len", "64", "--batch", "8", "--lr", "1e-3", "--min-lr", "1e-4", "--eval-every",
        "10", "--val-batches", "2", "--checkpoint-every", "20", "--max-corpus-tokens", "400K", "--temperature",
        "2.0", "--top-k", "16", "--nproc", "2", "--parallel", "fsdp", "--device", "cpu", "--no-progress", "--resume",
        "--out", str(tmp_path)])
    config = load_config_file(CONFIGS / "tiny.yaml", ["kd_temperature=2.0", "kd_top_k=16", "nproc=2",
                                                      "parallel=fsdp", "device=cpu"])
    chosen = training_parallelism(config, "distill", None, None)
    flow = training_job(config, "distill", "distill_tokens", chosen, tmp_path, model="student-folder",
                        teacher="tiny-random-llama")
    cli = train_job(args, "distill", "student-folder", "tiny-random-llama")
    assert cli.train.tokens == 16_000 and flow.train.tokens == 16_000
    assert cli == flow


# ----------------------------------------------------------------------------------------------------------------
# parallelism: one decision for the dry run and the run


def fits_below(limit: dict[bool, int]):
    """A memory model where the stage fits from `limit[checkpointing]` shards up (missing: never)."""
    return lambda shards, ck: ck in limit and shards >= limit[ck]


@pytest.mark.parametrize("nproc, parallel, ck, limit, expected", [
    (8, "auto", False, {False: 1, True: 1}, ("DDP x8", False)),  # fits one GPU: replicate
    (1, "auto", False, {False: 1, True: 1}, ("1 process", False)),
    (8, "auto", False, {False: 4, True: 2}, ("FSDP x8", False)),  # fits within nproc without checkpointing
    (8, "auto", False, {False: 16, True: 4}, ("FSDP x8", True)),  # checkpointing keeps it within nproc
    (8, "auto", False, {False: 64, True: 16}, ("FSDP x16", True)),  # neither: the fewer GPUs
    (1, "auto", False, {False: 4}, ("FSDP x4", False)),
    (8, "auto", True, {False: 1, True: 2}, ("FSDP x8", True)),  # asked for checkpointing: kept
    (8, "fsdp", False, {False: 1, True: 1}, ("FSDP x8", False)),
    (2, "ddp", False, {False: 1}, ("DDP x2", False)),
    (2, "ddp", False, {False: 2, True: 1}, None),  # ddp never shards and never switches checkpointing on
    (8, "auto", False, {}, None),
])
def test_choose_parallelism(nproc, parallel, ck, limit, expected):
    from minitron.cost import choose_parallelism

    chosen = choose_parallelism(nproc, parallel, ck, fits_below(limit))
    assert (chosen and (chosen.describe().split(",")[0], chosen.checkpointing)) == expected


def test_cpu_processes_follow_the_config():
    from minitron.cost import choose_parallelism

    assert choose_parallelism(2, "auto", False, None).describe() == "DDP x2"
    assert choose_parallelism(2, "fsdp", True, None).describe() == "FSDP x2, activation checkpointing"


@pytest.mark.parametrize("gpu", ["h100-80gb", "h200-141gb"])
@pytest.mark.parametrize("preset", PAPER_PRESETS)
def test_dry_run_and_run_choose_the_same_parallelism(preset, gpu, tmp_path, monkeypatch):
    """Every training stage of every paper preset: the run's decision (tasks/common.training_parallelism on the
    model folders the stages read, on a machine with that GPU) is the one the dry run prints."""
    import minitron.cost
    from minitron.cost import GPUS
    from minitron.models import load_config
    from minitron.plan import _at, make_plan

    config = load_config_file(CONFIGS / preset)
    plan = make_plan(config, gpu, root="/nonexistent")
    monkeypatch.setattr(minitron.cost, "local_gpu", lambda device="auto": GPUS[gpu])
    teacher_config = load_config(config.teacher)

    def folder(model) -> str:  # what a stage reads: a checkpoint folder's config.json
        path = tmp_path / model.describe()
        path.mkdir(exist_ok=True)
        (path / "config.json").write_text(_at(teacher_config, model.shape).to_json_string())
        return str(path)

    compared, parent = 0, plan.teacher
    for st in plan.stages:
        if st.kind != "train":
            continue
        name = st.name.split(" ", 1)[1]
        trained = counted(folder(st.model_out))
        teacher = None if name == "teacher correction" else counted(folder(parent))
        if st.parallelism is None:
            with pytest.raises(UserError, match="does not fit"):
                training_parallelism(config, name, trained, teacher)
        else:
            assert training_parallelism(config, name, trained, teacher) == st.parallelism, name
        parent = st.model_out if name.endswith("distillation") else parent  # the next step's teacher
        compared += 1
    assert compared >= 2
    assert all(s.parallelism.describe() in s.fit for s in plan.stages if s.parallelism)  # the dry run prints it


def test_dry_run_prints_the_decision(capsys):
    from cli.main import main

    assert main(["run", "--config", str(CONFIGS / "llama-3.1-8b-minitron-4b-width.yaml"), "--dry-run", "--json"]) == 0
    stages = {s["name"]: s for s in json.loads(capsys.readouterr().out)["stages"]}
    assert stages["1 teacher correction"]["parallelism"] == "FSDP x8, activation checkpointing"
    assert stages["4 distillation"]["gpus"] == 8


def test_preflight_names_the_gpus_each_stage_needs(tmp_path, monkeypatch):
    """The flagship preset on a machine without GPUs (this one) fails in seconds with one line; on a simulated
    8-GPU H100 node it passes, on 4 it does not."""
    import time

    import torch

    import minitron.cost
    from flows.preflight import preflight
    from minitron.cost import GPUS

    config = load_config_file(CONFIGS / "llama-3.1-8b-minitron-4b-width.yaml", [
        f"tracking_uri=sqlite:///{tmp_path}/mlflow.db", f"checkpoint_store={tmp_path}/store"])
    start = time.monotonic()
    with pytest.raises(UserError) as err:
        preflight(config)
    assert time.monotonic() - start < 30
    message = str(err.value)
    assert "\n" not in message and message.startswith("this machine has 0 GPUs but teacher correction needs 8 "
                                                      "(FSDP x8, activation checkpointing), distillation needs 8")
    monkeypatch.setattr(minitron.cost, "local_gpu", lambda device="auto": GPUS["h100-80gb"])
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    preflight(config)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    with pytest.raises(UserError, match="this machine has 4 GPUs but teacher correction needs 8"):
        preflight(config)
    preflight(config.model_copy(update={"device": "cpu"}))  # CPU processes: nothing to check

