"""Export: the final student registered in MLflow's model registry as a pointer to its verified checkpoint, its
URI as a tag on the parent run, and a markdown summary (teacher, candidates, final) as a Prefect artifact.

Why a pointer, not `mlflow.transformers.log_model`: the weights already sit in the checkpoint store with a sha256
manifest; copying them through the MLflow server's proxied artifact upload doubles storage and times out on large
files (mlflow #7564, #11225). The registry entry's source is the checkpoint URI, so `minitron` or any S3 client loads
exactly the bytes the manifest vouches for.
"""

from __future__ import annotations

from prefect import task

from minitron.config import CompressConfig, format_count
from tasks import tracking
from tasks.common import RunContext


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


@task(name="export", persist_result=True)
def export_student(config: CompressConfig, ctx: RunContext, teacher: dict, pruned: dict, student: dict,
                   report: dict | None) -> dict:
    from prefect.artifacts import create_markdown_artifact

    from tasks.storage import open_store

    parent = tracking.Run(tracking._client(ctx.tracking_uri), ctx.parent_run_id)
    name = registered_name(config)
    open_store(ctx.store_uri).verify(student["uri"], config.cache_check)  # never register bytes that do not verify
    version = _register(ctx, name, student)
    parent.set_tags({"final_checkpoint_uri": student["uri"], "registered_model": f"{name}/{version}"})
    parent.log_metrics({"final_params": student["params"], "final_val_kl": student["val_kl"],
                        "compression": teacher["params"] / student["params"]})
    lines = [f"# {config.name}: {config.teacher} → {format_count(student['params'])}", "",
             "| model | parameters | checkpoint |", "|---|---|---|",
             f"| teacher | {format_count(teacher['params'])} | `{teacher['uri']}` |",
             f"| pruned winner `{pruned.get('name')}` | {format_count(pruned['params'])} | re-pruned from teacher |",
             f"| final student | {format_count(student['params'])} | `{student['uri']}` |", "",
             f"Validation KL to the teacher: {_fmt(pruned.get('proxy_kl'))} right after pruning, "
             f"{student['val_kl_before']:.4f} when the final distillation started, {student['val_kl']:.4f} at its end.",
             ""]
    if pruned.get("table"):
        lines += ["## Candidates", "", "| candidate | params | proxy KL | KL after short distillation | status |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['name']} | {format_count(r['params'])} | {_fmt(r.get('proxy_kl'))} | "
                  f"{_fmt(r.get('final_kl'))} | {r['status']} |" for r in pruned["table"]]
        lines += ["", f"Kendall τ (proxy vs distilled ranking): {_fmt(pruned.get('kendall_tau'))}", ""]
    if report:
        lines += ["## Evaluation", "", report["table"], ""]
    lines += [f"MLflow parent run: `{ctx.parent_run_id}` at {tracking.scrub(ctx.tracking_uri)}; "
              f"registered model `{name}` version {version}."]
    summary = "\n".join(lines)
    parent.log_text(summary, "summary.md")
    create_markdown_artifact(summary, key="summary", description="teacher, candidates and final student")
    return {"summary": summary, "final_uri": student["uri"], "registered_model": name, "version": version,
            "parent_run_id": ctx.parent_run_id, "tracking_uri": tracking.scrub(ctx.tracking_uri)}


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.4f}"
