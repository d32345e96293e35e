"""Stage 5, evaluation: LM-Eval-Harness on the teacher, the pruned winner before distillation and the final
student. Each lm-eval run is a `minitron evaluate` child process in its own process group (cancellation kills it;
its memory is returned when it ends); under backend ray the three run at once, as Ray tasks that each request a GPU
on whichever node has one free (tasks/ray_train.py), with the models fetched there from the store. Each model gets an MLflow child run with `eval/<task>/<metric>` metrics and
results.json; the comparison table (absolute and % of teacher) goes to MLflow, Prefect and the flow's summary."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from prefect import get_run_logger

from minitron.config import CompressConfig
from tasks import tracking
from tasks.common import RunContext, model_spec, release_memory, stage, stage_params, stage_task


def _run_cli(args: list[str], what: str) -> None:
    """`minitron <args>` in its own process group (cancellation kills it), its last lines kept for the error."""
    from minitron.proc import run_group

    log = get_run_logger()
    tail: list[str] = []
    code = run_group([sys.executable, "-m", "cli", *args],
                     on_line=lambda line: (tail.append(line), tail.__delitem__(slice(0, -20))))
    if code != 0:
        log.error("%s failed:\n%s", what, "\n".join(tail))
        raise RuntimeError(f"{what} exited with status {code}: {tail[-1] if tail else ''}")


def _pruned_folder(config: CompressConfig, ctx: RunContext, pruned: dict, out: Path) -> str:
    """The search winner as it was right after pruning (re-pruned from its teacher: cheaper than storing it), by the
    library call the prune stage makes."""
    from tasks.search import prune_into

    if not (out / "config.json").is_file():
        drop = tuple(pruned["drop"]) if pruned.get("drop") else None
        prune_into(config, ctx, pruned["teacher"], pruned["scores"], pruned["shape"], drop, out)
        release_memory()  # the teacher and the pruned copy go before lm-eval's child processes start
    return str(out)


def evaluate_args(config: CompressConfig, model: str, out: Path) -> list[str]:
    """`minitron evaluate` of `model` on the run's corpus split and runtime: its data and model options are run-config
    fields under the same names (minitron.config.DATA_FIELDS, MODEL_FIELDS), so each is passed as the config holds it."""
    from minitron.config import DATA_FIELDS, MODEL_FIELDS

    args = ["evaluate", model, "--preset", config.eval_preset, "--data", config.data, "--out", str(out)]
    for name in (*DATA_FIELDS, *MODEL_FIELDS):
        value, flag = getattr(config, name), f"--{name.replace('_', '-')}"
        if isinstance(value, bool):
            args.append(flag if value else f"--no-{flag[2:]}")
        elif value is not None:
            args += [flag, str(value)]
    return args + (["--limit", str(config.eval_limit)] if config.eval_limit else [])


def _evaluate_on_ray(config: CompressConfig, ctx: RunContext, models: dict[str, tuple[str, Path]]) -> None:
    """The evaluations not done yet, as concurrent Ray tasks; each result lands where the local path puts it."""
    from tasks.ray_cluster import connect, uses_gpus
    from tasks.ray_train import run_commands, worker_spec

    commands = {}
    for name, (path, out) in models.items():
        if not out.is_file():
            args = evaluate_args(config, worker_spec(ctx, path, f"evaluate-{name}"), out)
            commands[f"evaluate {name}"] = (args, args.index("--out") + 1)
    done = run_commands(commands, use_gpu=uses_gpus(config, connect(config.ray_address))) if commands else {}
    for name, (_, out) in models.items():
        if f"evaluate {name}" in done:
            out.write_text(json.dumps(done[f"evaluate {name}"]))


@stage_task("evaluate")
def evaluate_models(config: CompressConfig, ctx: RunContext, teacher: dict, pruned: dict, student: dict) -> dict:
    from prefect.artifacts import create_table_artifact

    from minitron.evaluate import comparison_table, flatten_metrics
    from minitron.report import evaluation_tables, markdown_table

    params = stage_params(config, "eval_preset", "eval_limit", "data")
    results: dict[str, dict] = {}
    on_ray = config.backend == "ray"  # Ray places the evaluations: the stage holds none of this machine's devices
    with stage(ctx, "evaluate", params, devices=0 if on_ray else 1) as s:
        models = {"teacher": model_spec(ctx, teacher), "pruned": _pruned_folder(config, ctx, pruned, s.work / "pruned"),
                  "final": model_spec(ctx, student)}
        if on_ray:
            _evaluate_on_ray(config, ctx, {name: (path, s.work / f"{name}.json") for name, path in models.items()})
        for i, (name, path) in enumerate(models.items()):
            s.progress(100.0 * i / len(models), f"evaluate: {name} model ({i + 1} of {len(models)})")
            out = s.work / f"{name}.json"
            if not out.is_file():  # finished evaluations survive a retry of the stage
                _run_cli(evaluate_args(config, path, out), f"lm-eval on the {name} model")
            results[name] = json.loads(out.read_text())
            with tracking.child_run(ctx.parent_run_id, f"evaluate {name}", {"model": path},
                                    tracking_uri=ctx.tracking_uri) as run:
                run.log_metrics(flatten_metrics(results[name]))
                run.log_artifact(out, None)
        rows = comparison_table(results, teacher="teacher")
        absolute, relative = evaluation_tables(rows, list(models), teacher="teacher")
        table = f"{markdown_table(absolute)}\n\n{markdown_table(relative)}"
        s.run.log_text(table, "comparison.md")
        s.run.log_dict(results, "results.json")
        create_table_artifact(absolute, key="evaluation", description="teacher vs pruned (before distillation) vs "
                              "final student")
        create_table_artifact(relative, key="evaluation-vs-teacher", description="pruned and final student as % "
                              "of the teacher (for ↓ metrics, above 100 is worse)")
    get_run_logger().info("evaluation:\n%s", table)
    return {"results": results, "table": table}
