"""Stage 2, importance: forward-only activation statistics of the teacher on the calibration set, for every axis
(attention heads, MLP neurons, hidden channels, layers). One pass; every target and candidate reuses the scores."""

from __future__ import annotations

from minitron.config import CompressConfig
from tasks.common import RunContext, load_run_data, load_run_model, stage, stage_params, stage_task


@stage_task("importance")
def score_importance(config: CompressConfig, ctx: RunContext, teacher: dict) -> dict:
    from minitron import plots
    from minitron.importance import compute_importance

    params = stage_params(config, "calib_samples", "calib_seq_len", "seq_agg", "batch_agg", "layer_metric")
    with stage(ctx, "importance", {**params, "teacher_uri": teacher["uri"]}) as s:
        model, tokenizer = load_run_model(config, teacher, ctx)
        data = load_run_data(config, tokenizer)
        calib = data.calibration(config.calib_samples, config.calib_seq_len, seed=config.seed)
        scores = compute_importance(model, calib, batch_size=config.batch_size, seq_agg=config.seq_agg,
                                    batch_agg=config.batch_agg, val_blocks=data.val[: config.val_batches *
                                                                                     config.batch_size])
        folder = s.work / "scores"
        scores.save(folder / "scores.safetensors", {
            "source": teacher["uri"], "calibration": f"{config.data} {tuple(calib.shape)} seed={config.seed}"})
        for name in ("head", "layer", "mlp", "hidden"):  # heads x layers heatmap, layer bars, MLP/hidden curves
            png = getattr(plots, f"plot_{name}_importance")(scores, s.work / "plots" / f"{name}_importance.png")
            s.run.log_artifact(png, "importance")
        return {"uri": s.publish(folder), "file": "scores.safetensors"}
