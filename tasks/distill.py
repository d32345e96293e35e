"""Stage 4, distillation: logit KL from the teacher to the search winner (which already had its short
distillation, so this continues from there). Like every training stage it runs through the one launch path: in this
process on one device, under torchrun (DDP or FSDP2, as the dry run decides) on several."""

from __future__ import annotations

from minitron.config import CompressConfig
from tasks.common import (
    RunContext,
    counted,
    model_folder,
    model_spec,
    parallelism_params,
    run_training,
    stage,
    stage_params,
    stage_task,
    training_job,
    training_parallelism,
)

TRAIN_PARAMS = ("distill_tokens", "seq_len", "batch_size", "grad_accum", "lr", "min_lr", "warmup_frac",
                "weight_decay", "kd_temperature", "kd_top_k", "ce_weight", "intermediate_weight", "nproc", "compile")


@stage_task("distill")
def distill_student(config: CompressConfig, ctx: RunContext, teacher: dict, student: dict) -> dict:
    teacher_spec, student_spec = model_spec(ctx, teacher), model_spec(ctx, student)
    chosen = training_parallelism(config, "distillation", counted(student_spec), counted(teacher_spec))
    params = {**stage_params(config, *TRAIN_PARAMS), "student": student.get("name"), "student_params":
              student["params"], **parallelism_params(chosen)}
    with stage(ctx, "distill", params, total_tokens=config.tokens("distill_tokens"), devices=chosen.gpus) as s:
        result = run_training(s, training_job(config, "distill", "distill_tokens", chosen, s.work / "run",
                                              model=student_spec, teacher=teacher_spec))
        folder = model_folder(s.work / "run", s.work / "model")  # the model alone: optimizer checkpoints stay local
        s.run.log_metrics({"final_val_kl": result["val_kl"], "final_val_ce": result["val_ce"]})
        return {**student, "uri": s.publish(folder), "val_kl": result["val_kl"], "val_ce": result["val_ce"],
                "val_kl_before": result["val_kl_before"]}
