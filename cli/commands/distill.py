"""`minitron distill --teacher MODEL --student DIR --data DATA --tokens N --out OUT`: knowledge distillation."""

from __future__ import annotations

import argparse

from cli.commands.common import add_config_args, add_data_args, add_model_args, data_spec_from_args
from minitron.config import DATA_FIELDS, MODEL_FIELDS

KD_ARGS = ("kd_temperature", "kd_top_k", "ce_weight", "intermediate_weight")  # what teacher correction has not
ALIASES = {"batch_size": "--batch", "kd_temperature": "--temperature", "kd_top_k": "--top-k"}  # older spellings


def train_args() -> tuple[str, ...]:
    """The run-config fields a training command takes: every training setting (DistillConfig's run-config fields)
    that is not a model or data option, plus the corpus cap, the sequence length and the processes."""
    from minitron.config import shared_fields

    return ("seq_len", "max_corpus_tokens", "nproc",
            *(f for f in shared_fields() if f not in MODEL_FIELDS + DATA_FIELDS))


def add_train_args(p: argparse.ArgumentParser, *, kd: bool) -> None:
    """Budget, run-config and runtime options of `distill` (`kd`) and `correct-teacher`."""
    p.add_argument("--tokens", required=True, help="training budget in tokens, e.g. 200K, 10M")
    add_config_args(p, *(f for f in train_args() if kd or f not in KD_ARGS), aliases=ALIASES)
    p.add_argument("--out", required=True, help="output folder: model, checkpoints/, metrics.jsonl")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_args(p)
    add_data_args(p)


def register(sub) -> None:
    p = sub.add_parser("distill", help="distil a teacher into a student (logit KL)",
                       description="Train a student against a frozen teacher with forward KL on the logits "
                                   "(optional top-k, CE and intermediate-state terms). Writes the student, "
                                   "checkpoints/ and metrics.jsonl to --out.")
    p.add_argument("--teacher", required=True, help="teacher: folder, .gguf, hub id or alias")
    p.add_argument("--student", required=True, help="student model folder (e.g. a pruned teacher)")
    add_train_args(p, kd=True)
    p.set_defaults(func=run)


def train_job(args, objective: str, model: str, teacher: str | None = None):
    """The command's arguments as the TrainJob the worker runs: the same object the flow's stages build."""
    from minitron.config import DistillConfig, parse_count, shared_fields
    from minitron.distill.worker import TrainJob

    chosen = parallelism(args, model, teacher)
    cfg = DistillConfig(tokens=parse_count(args.tokens), progress=not args.no_progress,
                        **{**{f: getattr(args, f) for f in shared_fields() if hasattr(args, f)},
                           "parallel": chosen.parallel, "activation_checkpointing": chosen.checkpointing})
    cfg.steps(args.seq_len, chosen.gpus)  # a budget below one step fails before any model is read
    return TrainJob(objective, model, data_spec_from_args(args, args.seq_len), cfg, args.out, teacher=teacher,
                    nproc=chosen.gpus, resume=args.resume, allow_pickle=args.allow_pickle,
                    trust_remote_code=args.trust_remote_code)


def parallelism(args, model: str, teacher: str | None):
    """The plan's decision for this machine (`--parallel auto` sizes the stage for its GPU, as the dry run does)."""
    from minitron.cost import local_gpu, train_parallelism
    from minitron.errors import UserError

    gpu = local_gpu(args.device)
    trained, frozen = (None, None) if gpu is None else (_counted(model, args), teacher and _counted(teacher, args))
    chosen, _, verdict = train_parallelism(args, trained, frozen, gpu)
    if chosen is None:
        raise UserError(f"this training {verdict}")
    if gpu is not None:
        import torch

        if chosen.gpus > torch.cuda.device_count():
            raise UserError(f"this training needs {chosen.gpus} GPUs ({chosen.describe()} on {gpu.name}) but "
                            f"{torch.cuda.device_count()} are visible: lower --nproc, --batch-size or --seq-len")
    return chosen


def _counted(spec: str, args):
    from minitron.archmath import shape_of
    from minitron.cost import ShapeCost
    from minitron.models import load_config

    config = load_config(spec, trust_remote_code=args.trust_remote_code)
    return ShapeCost(config, shape_of(config))


def run(args) -> int:
    from minitron.distill.worker import launch

    report(launch(train_job(args, "distill", args.student, args.teacher)), args.out)
    return 0


def report(result: dict, out: str) -> None:
    """One summary line (the worker's summary: the same on one process or many)."""
    kl = f"val_kl {result['val_kl_before']:.4f} -> {result['val_kl']:.4f}, " if result["val_kl"] is not None else ""
    print(f"{kl}val_ce {result['val_ce_before']:.4f} -> {result['val_ce']:.4f}, {result['steps']} steps, "
          f"{result['tokens']:,} tokens, {result['tokens_per_s'] or 0:,.0f} tokens/s -> {out}")
