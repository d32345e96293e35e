"""Export: the final student registered in MLflow's model registry as a pointer to its verified checkpoint, its
URI as a tag on the parent run, and a markdown summary (teacher, candidates, final) as a Prefect artifact.

Why a pointer, not `mlflow.transformers.log_model`: the weights already sit in the checkpoint store with a sha256
manifest; copying them through the MLflow server's proxied artifact upload doubles storage and times out on large
files (mlflow #7564, #11225). The registry entry's source is the checkpoint URI, so `minitron` or any S3 client loads
exactly the bytes the manifest vouches for.
"""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from minitron.config import CompressConfig, format_count
from tasks import tracking
from tasks.common import RunContext, fetch


def registered_name(config: CompressConfig) -> str:
    return f"minitron-{config.name}"


def _register(ctx: RunContext, name: str, student: dict) -> str:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=ctx.tracking_uri)
    try:
        tracking.retry(client.create_registered_model, name, description="Minitron-compressed students; each "
                       "version's source is a checkpoint URI with a sha256 manifest.")
    except Exception as err:
        if getattr(err, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
            raise
    version = tracking.retry(client.create_model_version, name, source=student["uri"], run_id=ctx.parent_run_id,
                             tags={"params": str(student["params"]), "checkpoint_uri": student["uri"]})
    return version.version


@task(name="export", task_run_name="export", persist_result=True)
def export_student(config: CompressConfig, ctx: RunContext, teacher: dict, pruned: dict, student: dict,
                   report: dict | None) -> dict:
    from prefect.artifacts import create_markdown_artifact

    from minitron.report import markdown_table, shape_label, sig
    from tasks.storage import open_store

    parent = tracking.Run(tracking._client(ctx.tracking_uri), ctx.parent_run_id)
    name = registered_name(config)
    open_store(ctx.store_uri).verify(student["uri"], config.cache_check)  # never register bytes that do not verify
    version = _register(ctx, name, student)
    parent.set_tags({"final_checkpoint_uri": student["uri"], "registered_model": f"{name}/{version}"})
    parent.log_metrics({"final_params": student["params"], "final_val_kl": student["val_kl"],
                        "compression": teacher["params"] / student["params"]})
    try:  # a plot, logged after the registration: never the reason a finished run fails
        _log_pruned_heads(config, ctx, parent, pruned)
    except Exception as err:
        get_run_logger().warning("the pruned-heads heatmap was not logged: %s: %s", type(err).__name__, err)
    experiment_id = parent.info.experiment_id
    experiment = tracking.retry(parent.client.get_experiment, experiment_id).name
    run_link, experiment_link = (tracking.run_url(ctx.tracking_uri, experiment_id, ctx.parent_run_id),
                                 tracking.experiment_url(ctx.tracking_uri, experiment_id))
    lines = [f"# {config.name}: {config.teacher} → {format_count(student['params'])}", "",
             markdown_table([
                 {"model": "teacher", "parameters": format_count(teacher["params"])},
                 {"model": f"pruned winner {shape_label(pruned['shape'], pruned.get('drop'))} (re-pruned from the "
                           "teacher)", "parameters": format_count(pruned["params"])},
                 {"model": "final student", "parameters": format_count(student["params"])}]), "",
             f"Validation KL to the teacher: {sig(pruned.get('pruned_kl'))} right after pruning, "
             f"{sig(student['val_kl_before'])} when the final distillation started, {sig(student['val_kl'])} at its "
             "end.", "", f"- teacher checkpoint: `{teacher['uri']}`", f"- final checkpoint: `{student['uri']}`", ""]
    if pruned.get("search_summary"):  # rounds, candidates, budget, depth blocks and charts (tasks/search.py)
        lines += [pruned["search_summary"], ""]
    if report:
        lines += ["## Evaluation", "", report["table"], ""]
    if run_link:
        lines += [f"MLflow: [parent run]({run_link}) in experiment [{experiment}]({experiment_link}) (stages and "
                  f"candidates are its child runs); registered model `{name}` version {version}."]
    else:  # a local store: its UI is `mlflow ui` on that store
        lines += [f"MLflow parent run `{ctx.parent_run_id}` in `{tracking.scrub(ctx.tracking_uri)}` (browse it with "
                  f"`mlflow ui --backend-store-uri {tracking.scrub(ctx.tracking_uri)}`); registered model `{name}` "
                  f"version {version}."]
    summary = "\n".join(lines)
    parent.log_text(summary, "summary.md")
    create_markdown_artifact(summary, key="summary", description="teacher, candidates and final student")
    return {"summary": summary, "final_uri": student["uri"], "registered_model": name, "version": version,
            "parent_run_id": ctx.parent_run_id, "tracking_uri": tracking.scrub(ctx.tracking_uri),
            "mlflow_url": run_link}


def _log_pruned_heads(config: CompressConfig, ctx: RunContext, parent: tracking.Run, pruned: dict) -> None:
    """The head-importance heatmap with the heads the winner prunes crossed out, on the parent run."""
    from minitron.archmath import Shape
    from minitron.importance import ImportanceScores
    from minitron.plots import plot_head_importance
    from minitron.prune import kept_heads
    from minitron.report import shape_label

    scores = ImportanceScores.load(fetch(ctx, pruned["scores"]["uri"]) / pruned["scores"]["file"])
    drop = tuple(pruned["drop"]) if pruned.get("drop") else None
    kept = kept_heads(scores, Shape(**pruned["shape"]), drop, config.layer_metric)
    out = Path(ctx.work_dir) / "export" / "head_importance_pruned.png"
    title = f"attention-head importance\n× = pruned for {shape_label(pruned['shape'], drop)}"
    parent.log_artifact(plot_head_importance(scores, out, kept=kept, title=title), "importance")
