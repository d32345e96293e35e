"""Stage 4, distillation: logit KL from the teacher to the search winner (which already had its short
distillation, so this continues from there). Like every training stage it runs through the one launch path: in this
process on one device, under torchrun (DDP or FSDP2, as the dry run decides) on several."""

from __future__ import annotations

from minitron.config import CompressConfig
from tasks.common import RunContext, counted, model_spec, stage_params, stage_task, training_stage

TRAIN_PARAMS = ("distill_tokens", "seq_len", "batch_size", "grad_accum", "lr", "min_lr", "warmup_frac",
                "weight_decay", "kd_temperature", "kd_top_k", "ce_weight", "intermediate_weight", "nproc", "compile")


@stage_task("distill")
def distill_student(config: CompressConfig, ctx: RunContext, teacher: dict, student: dict) -> dict:
    teacher_spec, student_spec = model_spec(ctx, teacher), model_spec(ctx, student)
    params = {**stage_params(config, *TRAIN_PARAMS), "student": student.get("name"), "student_params":
              student["params"]}
    with training_stage(ctx, config, "distill", params, budget="distill_tokens", trained=counted(student_spec),
                        teacher=counted(teacher_spec)) as (s, train):
        result = train("distill", model=student_spec, teacher=teacher_spec)
        s.run.log_metrics({"final_val_kl": result["val_kl"], "final_val_ce": result["val_ce"]})
        return {**student, "uri": s.publish(result["folder"]), "val_kl": result["val_kl"], "val_ce": result["val_ce"],
                "val_kl_before": result["val_kl_before"]}
