"""Stage 1, teacher correction: a light LM fine-tune of the teacher on the distillation corpus.

The second Minitron paper found that distilling from a teacher that never saw the distillation data costs
accuracy; a short fine-tune on it (the original pre-training data is not available) fixes that.
"""

from __future__ import annotations

from minitron.config import CompressConfig
from tasks.common import RunContext, load_run_data, load_run_model, stage, stage_params, stage_task


@stage_task("correct-teacher")
def correct_teacher(config: CompressConfig, ctx: RunContext) -> dict:
    from minitron.distill import DistillConfig
    from minitron.distill import correct_teacher as correct
    from minitron.models import count_parameters, save_model

    params = stage_params(config, "teacher", "data", "correction_tokens", "lr", "min_lr", "batch_size", "seq_len")
    with stage(ctx, "correct-teacher", params, total_tokens=config.tokens("correction_tokens")) as s:
        teacher, tokenizer = load_run_model(config, {"uri": config.teacher}, ctx)
        data = load_run_data(config, tokenizer)
        result = correct(teacher, data, DistillConfig.from_run_config(config, "correction_tokens", progress=False),
                         out_dir=s.work / "run", tokenizer=tokenizer, callback=s.on_metrics, resume=True)
        before, after = result.val_loss_before, result.val_loss_after
        s.run.log_metrics({"val_ce_before": before, "val_ce_after": after})
        save_model(teacher, tokenizer, s.work / "model")  # the model alone: optimizer checkpoints stay local
        return {"uri": s.publish(s.work / "model"), "params": count_parameters(teacher),
                "val_ce_before": before, "val_ce_after": after}
