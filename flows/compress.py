"""The compress flow: the Minitron pipeline, stage by stage, as in the papers' figure.

    corpus ──► 0 tokenize (once per corpus and tokenizer: the token store every stage reads)
    teacher ──► 1 correct ──► 2 importance ──► 3 search (prune k shapes, distil each briefly) ──► 4 distil ──► 5 evaluate
                                     ▲                                                             │
                                     └───────────── iterative targets: the student becomes the teacher ┘

Every stage is a Prefect task that takes and returns small values (the config, checkpoint URIs, metrics), logs to a
child run of this flow run's MLflow parent run, and writes its checkpoint to the store with a manifest. Results are
persisted and cached by input, so running the same config again after a crash resumes after the last finished stage.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.exceptions import TerminationSignal
from prefect.runtime import flow_run
from prefect.states import Cancelled, Failed

from flows.environment import (
    artifact_location,
    prepare_tracking,
    quiet_user_errors,
    state_dir,
    store_uri,
    tracking_uri,
)
from flows.preflight import preflight
from minitron.config import CompressConfig, format_count
from minitron.errors import UserError
from tasks import tracking
from tasks.common import (
    INTERRUPTED,
    RunContext,
    compute_slot,
    config_key,
    ensure_slot,
    run_stage,
    scratch_root,
)
from tasks.correct import correct_teacher
from tasks.distill import distill_student
from tasks.evaluate import evaluate_models
from tasks.export import export_student
from tasks.importance import score_importance
from tasks.search import prune_to_shape, search_architecture
from tasks.slots import visible_gpus
from tasks.tokenize import tokenize_corpus


def run_name(config: CompressConfig | None = None) -> str:
    config = config or flow_run.parameters["config"]
    if isinstance(config, dict):
        config = CompressConfig(**config)
    return f"{config.name}: {Path(config.teacher).name} → {config.target_params}"


def _git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


INTERRUPTED_MESSAGE = ("interrupted (Ctrl-C): the finished stages and the local checkpoints are kept; run the same "
                       "command again to resume")


@flow(name="compress", flow_run_name=run_name, persist_result=True, log_prints=True)
def compress(config: CompressConfig) -> dict:
    """Compress `config.teacher` to `config.target_params` by Minitron pruning + distillation."""
    from minitron.memory import return_freed_memory

    return_freed_memory()  # a served run's process does not start from our CLI
    quiet_user_errors()
    try:
        return _pipeline(config)
    except UserError as err:  # bad input or a fault the user fixes: one line, as the log and the run's state message
        get_run_logger().error("%s", err)
        return Failed(message=str(err), data=err)
    except KeyboardInterrupt:  # Ctrl-C: stages in other threads stop too; the slots go with their blocks
        INTERRUPTED.set()
        get_run_logger().warning(INTERRUPTED_MESSAGE)
        return Cancelled(message=INTERRUPTED_MESSAGE)
    except TerminationSignal:  # cancelled from the UI or API: Prefect records it; our other threads stop as well
        INTERRUPTED.set()
        raise


def _pipeline(config: CompressConfig) -> dict:
    log = get_run_logger()
    plan = preflight(config)  # seconds: bad input fails here, before any model work
    uri = tracking_uri(config.tracking_uri)
    prepare_tracking(uri)
    experiment = tracking.experiment_name(config.teacher, config.target_params)
    parent = tracking.start_parent_run(
        experiment, flow_run.name or config.name, tracking_uri=uri, artifact_location=artifact_location(uri),
        params=config.model_dump(), tags={
            "prefect.flow_run_id": flow_run.id, "prefect.flow_run_url": flow_run.ui_url or "",
            "git_sha": _git_sha(), "teacher": config.teacher, "target": config.target_params})
    ctx = RunContext(parent_run_id=parent.run_id, tracking_uri=uri, store_uri=store_uri(config.checkpoint_store),
                     run_key=f"{re.sub(r'[^A-Za-z0-9._-]+', '-', config.name)}/{flow_run.id}",
                     work_dir=str(scratch_root() / config_key(config)), slot=compute_slot(config.device),
                     slot_timeout_s=60.0 * config.queue_timeout_min,
                     stage_timeout_s=config.stage_timeout_hours and 3600.0 * config.stage_timeout_hours,
                     refresh=not config.resume, slot_dir=str(state_dir() / "slots"),
                     inventory=visible_gpus(config.device), leases=_real_server(),
                     run_name=flow_run.name or config.name)
    parent.log_dict(config.model_dump(mode="json"), "config.json")
    if ctx.leases:
        ensure_slot(ctx.slot, ctx.inventory)
    try:
        # 0. the corpus, tokenised once into the token store that every stage reads
        run_stage(tokenize_corpus, config, ctx)
        # 1. teacher correction: a light fine-tune on the distillation corpus (its pre-training data is unknown)
        teacher = run_stage(correct_teacher, config, ctx) if config.correct_teacher else plan.teacher_ref
        original_teacher = teacher
        for step in plan.steps:  # one step for a single target; 15B → 8B → 4B for iterative schedules
            log.info("target %s (%.0f%% of the teacher)", format_count(step.target),
                     100 * step.target / plan.teacher_params)
            # 2. importance: activation statistics on the calibration set, every axis, one forward pass
            scores = run_stage(score_importance, config, ctx, teacher)
            # 3. architecture search: enumerate shapes under the budget, prune, distil the best few briefly
            if step.shape is not None:  # an explicit shape skips the search
                winner = run_stage(prune_to_shape, config, ctx, teacher, scores, step.shape, step.drop)
            else:
                winner = search_architecture(config, ctx, teacher, scores, step.target)
            pruned = {**winner, "teacher": teacher, "scores": scores}
            # 4. distillation: logit KL from the teacher to the winning pruned student
            student = run_stage(distill_student, config, ctx, teacher, winner)
            teacher = student
        # 5. evaluation: teacher vs pruned-before-distillation vs final, with lm-eval
        report = (run_stage(evaluate_models, config, ctx, original_teacher, pruned, student)
                  if config.evaluate else None)
        # export: register the final student in MLflow's registry as a pointer to its verified checkpoint
        summary = export_student(config, ctx, original_teacher, pruned, student, report)
    except BaseException as err:
        parent.terminate("KILLED" if isinstance(err, KeyboardInterrupt | TerminationSignal) else "FAILED")
        raise
    parent.terminate("FINISHED")
    return summary


def _real_server() -> bool:
    """True against a Prefect server (its leases outlive us); False on the ephemeral API, which dies with us."""
    from prefect.settings import get_current_settings

    return bool(get_current_settings().api.url)
