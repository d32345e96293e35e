"""Stage 1, teacher correction: a light LM fine-tune of the teacher on the distillation corpus.

The second Minitron paper found that distilling from a teacher that never saw the distillation data costs
accuracy; a short fine-tune on it (the original pre-training data is not available) fixes that. The teacher is
the trained model here, so it is what gets sharded when it does not fit one GPU (FSDP, as the dry run says).
"""

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


@stage_task("correct-teacher")
def correct_teacher(config: CompressConfig, ctx: RunContext) -> dict:
    from minitron.archmath import count_params
    from minitron.models import load_config

    teacher = model_spec(ctx, {"uri": config.teacher})
    chosen = training_parallelism(config, "teacher correction", counted(teacher))
    params = {**stage_params(config, "teacher", "data", "correction_tokens", "lr", "min_lr", "batch_size",
                             "seq_len"), **parallelism_params(chosen)}
    with stage(ctx, "correct-teacher", params, total_tokens=config.tokens("correction_tokens"),
               devices=chosen.gpus) as s:
        result = run_training(s, training_job(config, "correct", "correction_tokens", chosen, s.work / "run",
                                              model=teacher))
        before, after = result["val_ce_before"], result["val_ce"]
        s.run.log_metrics({"val_ce_before": before, "val_ce_after": after})
        folder = model_folder(s.work / "run", s.work / "model")  # the model alone: optimizer checkpoints stay local
        return {"uri": s.publish(folder), "params": count_params(load_config(str(folder))),
                "val_ce_before": before, "val_ce_after": after}
