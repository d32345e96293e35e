"""The compress flow: the Minitron pipeline, stage by stage, as in the papers' figure.

    corpus ──► 0 tokenize (once per corpus and tokenizer: the token store every stage reads)
    teacher ──► 1 correct ──► 2 importance ──► 3 search (successive halving over the shapes) ──► 4 distil ──► 5 evaluate
                                     ▲                                                             │
                                     └───────────── iterative targets: the student becomes the teacher ┘

Every stage is a Prefect task that takes and returns small values (the config, checkpoint URIs, metrics), logs to a
child run of this flow run's MLflow parent run, and writes its checkpoint to the store with a manifest. Results are
persisted and cached by input, so running the same config again after a crash resumes after the last finished stage.
"""

from __future__ import annotations

import functools
import re
import subprocess
from importlib import resources
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.exceptions import TerminationSignal
from prefect.runtime import deployment, flow_run
from prefect.states import Cancelled, Failed

from flows.environment import (
    artifact_location,
    prepare_tracking,
    quiet_user_errors,
    state_dir,
    store_uri,
    tracking_uri,
)
from flows.preflight import preflight, run_config
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


def run_name() -> str:
    """The flow run's name. A name the user gave (the form's Run Name, `--flow-run-name`, the API) is kept; a slug
    Prefect made up for a run given none ("crimson-tiger": schedules, `prefect deployment run`, `minitron run`) is
    replaced by "<name>: <teacher> → <target>"."""
    given = flow_run.name
    if given and not made_up_by_prefect(given):
        return given
    config = flow_run.parameters["config"]  # not validated yet (preflight does it): read it defensively
    config = config.model_dump() if isinstance(config, CompressConfig) else config if isinstance(config, dict) else {}
    field = {k: config.get(k, CompressConfig.model_fields[k].default) for k in ("name", "teacher", "target_params")}
    return f"{field['name']}: {Path(str(field['teacher'])).name} → {field['target_params']}"


@functools.cache
def _slug_words() -> frozenset[str]:
    """The words of Prefect's made-up run names (`generate_slug(2)`: two words from its dependency coolname)."""
    words = set()
    for f in (resources.files("coolname") / "data").iterdir():
        if f.name.endswith(".txt"):
            words.update(w for w in (line.strip() for line in f.read_text().splitlines()) if re.fullmatch("[a-z]+", w))
    return frozenset(words)


def made_up_by_prefect(name: str) -> bool:
    """True for a name Prefect generated ("crimson-tiger"); "baseline-run" or "ui-3f2a-run" are a user's."""
    words = re.fullmatch(r"([a-z]+)-([a-z]+)", name)
    return bool(words) and set(words.groups()) <= _slug_words()


def _git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


INTERRUPTED_MESSAGE = ("interrupted (Ctrl-C): the finished stages and the local checkpoints are kept; run the same "
                       "command again to resume")


# validate_parameters=False: `config` is validated in preflight, so a bad value that reaches a run (the form's
# "Validate parameters" unticked, an API client) fails with our one line, not Prefect's dump of pydantic errors.
@flow(name="compress", flow_run_name=run_name, persist_result=True, log_prints=True, validate_parameters=False)
def compress(config: CompressConfig) -> dict:
    """Compress `config.teacher` to `config.target_params` by Minitron pruning + distillation."""
    from minitron.memory import return_freed_memory

    return_freed_memory()  # a served run's process does not start from our CLI
    tracking.mask_run_logs()
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
    config = run_config(config)
    plan = preflight(config)  # seconds: bad input fails here, before any model work
    uri = tracking_uri(config.tracking_uri)
    prepare_tracking(uri)
    experiment = tracking.experiment_name(config.teacher, config.target_params)
    prefect_url = flow_run.ui_url if str(flow_run.ui_url).startswith("http") else None
    parent = tracking.start_parent_run(
        experiment, flow_run.name or config.name, tracking_uri=uri, artifact_location=artifact_location(uri),
        params=config.model_dump(), tags={
            "prefect.flow_run_id": flow_run.id, "prefect.flow_run_url": prefect_url or "",
            "git_sha": _git_sha(), "teacher": config.teacher, "target": config.target_params})
    _link_runs(parent, uri, prefect_url)
    ctx = RunContext(parent_run_id=parent.run_id, tracking_uri=uri, store_uri=store_uri(config.checkpoint_store),
                     run_key=f"{re.sub(r'[^A-Za-z0-9._-]+', '-', config.name)}/{flow_run.id}",
                     work_dir=str(scratch_root() / config_key(config)), slot=compute_slot(config.device),
                     slot_timeout_s=60.0 * config.queue_timeout_min,
                     stage_timeout_s=3600.0 * config.stage_timeout_hours or None,
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
        step_teacher = teacher  # what each step prunes and distils from: the teacher, then the previous student
        for step in plan.steps:  # one step for a single target; 15B → 8B → 4B for iterative schedules
            log.info("target %s (%.0f%% of the teacher)", format_count(step.target),
                     100 * step.target / plan.teacher_params)
            # 2. importance: activation statistics on the calibration set, every axis, one forward pass
            scores = run_stage(score_importance, config, ctx, step_teacher)
            # 3. architecture search: every shape under the budget distilled briefly, the best ones longer, round by
            # round (its own stages: the candidates, each candidate's training, the choice); an explicit shape skips it
            if step.shape is not None:
                winner = run_stage(prune_to_shape, config, ctx, step_teacher, scores, step.shape, step.drop)
            else:
                winner = search_architecture(config, ctx, step_teacher, scores, step.target)
            pruned = {**winner, "teacher": step_teacher, "scores": scores}
            # 4. distillation: logit KL from the step's teacher to the winning pruned student
            student = run_stage(distill_student, config, ctx, step_teacher, winner)
            step_teacher = student
        # 5. evaluation: teacher vs pruned-before-distillation vs final, with lm-eval
        report = run_stage(evaluate_models, config, ctx, teacher, pruned, student) if config.evaluate else None
        # export: register the final student in MLflow's registry as a pointer to its verified checkpoint
        summary = run_stage(export_student, config, ctx, teacher, pruned, student, report)
    except BaseException as err:
        parent.terminate("KILLED" if isinstance(err, KeyboardInterrupt | TerminationSignal) else "FAILED")
        raise
    parent.terminate("FINISHED")
    return summary


def _real_server() -> bool:
    """True against a Prefect server (its leases outlive us); False on the ephemeral API, which dies with us."""
    from prefect.settings import get_current_settings

    return bool(get_current_settings().api.url)


def _link_runs(parent: tracking.Run, uri: str, prefect_url: str | None) -> None:
    """Links both ways: the MLflow parent run's description points at this flow run, and this flow run's page gets
    a link artifact to the MLflow parent run (each stage adds one to its child run)."""
    from prefect.artifacts import create_link_artifact

    prefect = f"[{flow_run.name}]({prefect_url})" if prefect_url else f"`{flow_run.name}` (`{flow_run.id}`)"
    source = f" of deployment `{deployment.name}`" if deployment.name else ""
    parent.describe(f"Prefect flow run {prefect}{source}. Its stages and search candidates are this run's "
                    "child runs (expand it in the experiment's runs table); the summary, the final checkpoint and "
                    "its registry entry are on this run.")
    if url := parent.url(uri):
        create_link_artifact(url, link_text=f"MLflow run: {flow_run.name}", key="mlflow-run",
                             description="This flow run's MLflow parent run: parameters, stage child runs, "
                                         "metrics, plots and the summary")
