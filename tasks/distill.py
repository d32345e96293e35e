"""Stage 4, distillation: logit KL from the teacher to the search winner (which already had its short
distillation, so this continues from there). One GPU runs in this process; `nproc > 1` runs the same entry point
under torchrun in its own process group, and its metrics.jsonl is tailed into MLflow."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import get_run_logger

from minitron.config import CompressConfig
from tasks.common import (
    RunContext,
    Stage,
    load_run_data,
    load_run_model,
    model_spec,
    stage,
    stage_params,
    stage_task,
)

TRAIN_PARAMS = ("distill_tokens", "seq_len", "batch_size", "grad_accum", "lr", "min_lr", "warmup_frac",
                "weight_decay", "kd_temperature", "kd_top_k", "ce_weight", "intermediate_weight", "nproc", "compile")


@stage_task("distill")
def distill_student(config: CompressConfig, ctx: RunContext, teacher: dict, student: dict) -> dict:
    from minitron.models import count_parameters, load_model, save_model

    params = {**stage_params(config, *TRAIN_PARAMS), "student": student.get("name"), "student_params":
              student["params"]}
    with stage(ctx, "distill", params, total_tokens=config.tokens("distill_tokens"), devices=config.nproc) as s:
        if config.nproc > 1:
            result = _distill_torchrun(config, ctx, teacher, student, s)
        else:
            result = _distill_here(config, ctx, teacher, student, s)
        model, tokenizer = load_model(str(s.work / "run"), dtype="fp32", device="cpu")
        save_model(model, tokenizer, s.work / "model")  # the model alone: optimizer checkpoints stay local
        s.run.log_metrics({"final_val_kl": result["val_kl"], "final_val_ce": result["val_ce"]})
        return {**student, "uri": s.publish(s.work / "model"), "params": count_parameters(model),
                "val_kl": result["val_kl"], "val_ce": result["val_ce"], "val_kl_before": result["val_kl_before"]}


def _distill_here(config, ctx, teacher, student, s: Stage) -> dict:
    from minitron.distill import DistillConfig, distill

    teacher_model, tokenizer = load_run_model(config, teacher, ctx)
    student_model, _ = load_run_model(config, student, ctx)
    result = distill(teacher_model, student_model, load_run_data(config, tokenizer),
                     DistillConfig.from_run_config(config, "distill_tokens", progress=False),
                     out_dir=s.work / "run", tokenizer=tokenizer, callback=s.on_metrics, resume=True)
    return {"val_kl": result.last_val_kl, "val_ce": result.last_val["val_ce"], "val_kl_before": result.first_val_kl}


def _distill_torchrun(config, ctx, teacher, student, s: Stage) -> dict:
    """`minitron distill --nproc N` (it re-launches itself under torchrun); metrics.jsonl is tailed into MLflow."""
    from tasks.proc import run_group

    out = s.work / "run"
    metrics = out / "metrics.jsonl"
    seen = 0

    def tail() -> None:
        nonlocal seen
        if metrics.is_file():
            lines = metrics.read_text().splitlines()
            for line in lines[seen:]:
                s.on_metrics(json.loads(line))
            seen = len(lines)

    log = get_run_logger()
    code = run_group(["distill", "--teacher", model_spec(ctx, teacher), "--student", model_spec(ctx, student), *cli_flags(config),
                      "--out", str(out), "--resume", "--no-progress"], on_line=lambda line: log.debug(line),
                     poll=tail)
    if code != 0:
        raise RuntimeError(f"torchrun distillation exited with status {code}: see {out}")
    records = [json.loads(x) for x in Path(metrics).read_text().splitlines()]
    first, last = records[0], records[-1]
    return {"val_kl": last["val_kl"], "val_ce": last["val_ce"], "val_kl_before": first["val_kl"]}


def cli_flags(config: CompressConfig) -> list[str]:
    """The config's distillation settings as `minitron distill` flags (the torchrun path runs the CLI)."""
    flags = {"--data": config.data, "--data-split": config.data_split, "--text-field": config.text_field,
             "--val-fraction": config.val_fraction, "--seed": config.seed, "--tokens": config.distill_tokens,
             "--seq-len": config.seq_len, "--batch": config.batch_size, "--grad-accum": config.grad_accum,
             "--lr": config.lr, "--min-lr": config.min_lr, "--warmup-frac": config.warmup_frac,
             "--weight-decay": config.weight_decay, "--grad-clip": config.grad_clip, "--eval-every": config.eval_every,
             "--val-batches": config.val_batches, "--checkpoint-every": config.checkpoint_every,
             "--temperature": config.kd_temperature, "--ce-weight": config.ce_weight,
             "--intermediate-weight": config.intermediate_weight, "--nproc": config.nproc,
             "--device": config.device, "--dtype": config.dtype, "--data-config": config.data_config,
             "--top-k": config.kd_top_k}
    args = [x for k, v in flags.items() if v is not None for x in (k, str(v))]
    switches = {"--compile": config.compile, "--activation-checkpointing": config.activation_checkpointing}
    return args + [flag for flag, on in switches.items() if on]
