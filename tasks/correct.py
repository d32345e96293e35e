"""Stage 1, teacher correction: a light LM fine-tune of the teacher on the distillation corpus.

The second Minitron paper found that distilling from a teacher that never saw the distillation data costs
accuracy; a short fine-tune on it (the original pre-training data is not available) fixes that. The teacher is
the trained model here, so it is what gets sharded when it does not fit one GPU (FSDP, as the dry run says).
"""

from __future__ import annotations

from minitron.config import CompressConfig
from tasks.common import RunContext, counted, model_spec, stage_params, stage_task, training_stage


@stage_task("correct-teacher")
def correct_teacher(config: CompressConfig, ctx: RunContext) -> dict:
    from minitron.archmath import count_params
    from minitron.models import load_config

    teacher = model_spec(ctx, {"uri": config.teacher})
    params = stage_params(config, "teacher", "data", "correction_tokens", "lr", "min_lr", "batch_size", "seq_len")
    with training_stage(ctx, config, "correct-teacher", params, budget="correction_tokens",
                        trained=counted(teacher)) as (s, train):
        result = train("correct", model=teacher)
        before, after = result["val_ce_before"], result["val_ce"]
        s.run.log_metrics({"val_ce_before": before, "val_ce_after": after})
        return {"uri": s.publish(result["folder"]), "params": count_params(load_config(str(result["folder"]))),
                "val_ce_before": before, "val_ce_after": after}
