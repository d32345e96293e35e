"""Checks that run in the first seconds of a flow run, before any model work: every bad input a user can make
(unreachable tracking server, missing bucket, wrong credentials, unknown teacher, a target that is not smaller than
the teacher or that no shape can meet, an infeasible explicit shape) fails here with one line that says what to fix.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from flows.environment import store_uri, tracking_uri
from minitron.config import CompressConfig, format_count, make_config, optimizer_steps
from minitron.errors import UserError
from minitron.steps import Step


@dataclass(frozen=True)
class Plan:
    teacher_ref: dict  # {"uri": spec, "params": n}: the teacher as given (not in the store)
    teacher_params: int
    steps: tuple[Step, ...]


def run_config(config: CompressConfig | dict) -> CompressConfig:
    """The flow's `config` parameter as a validated config. Prefect's own parameter validation is off for the flow:
    a value the server's schema check did not stop (the form's "Validate parameters" unticked, an API client) fails
    here, with one line that names the field and its accepted forms."""
    if isinstance(config, CompressConfig):
        return config
    if not isinstance(config, dict):
        raise UserError(f"the flow parameter 'config' must be a mapping of config fields, not {type(config).__name__}")
    return make_config(config)


def preflight(config: CompressConfig) -> Plan:
    from minitron.archmath import count_params, count_shape, shape_of
    from minitron.data import TEXT_SUFFIXES
    from minitron.families import family_of
    from minitron.models import load_config
    from minitron.search import rows_for_run, schedule_for
    from minitron.steps import drop_block, step_shapes
    from tasks import storage, tracking

    tracking.check_tracking(tracking_uri(config.tracking_uri))
    storage.check_store(store_uri(config.checkpoint_store))

    model_config = load_config(config.teacher, trust_remote_code=config.trust_remote_code)
    family_of(model_config)  # unsupported architecture → names the supported ones
    teacher_params = count_params(model_config)
    data = Path(config.data).expanduser()
    if config.data != "shakespeare" and not data.exists() and (
            config.data.startswith((".", "/", "~")) or config.data.endswith(TEXT_SUFFIXES)):
        raise UserError(f"data path '{config.data}' does not exist")

    shapes = step_shapes(config, shape_of(model_config))  # explicit shapes are checked here (one line each)
    drop = drop_block(config, shape_of(model_config).layers)
    targets = config.targets(teacher_params) if len(shapes) > 1 or shapes[0] is None else []
    steps = []
    for i, shape in enumerate(shapes):
        target = count_shape(model_config, shape) if shape is not None else targets[i]
        steps.append(Step(target=target, shape=asdict(shape) if shape else None, drop=drop if shape else None))
    previous = teacher_params
    for step in steps:
        if step.target >= previous:
            raise UserError(f"target {format_count(step.target)} is not smaller than its teacher "
                            f"({format_count(previous)} parameters): lower target_params")
        # Later steps of an iterative schedule prune a winner not known yet: the teacher's shapes stand in for it.
        if step.shape is None:
            rows = rows_for_run(config, model_config, step.target)  # no shape in the budget: one line, here
            # a budget too small for one step per candidate (on nproc ranks each, the run's least)
            schedule_for(config, min(len(rows), config.search_max_candidates), ranks=config.nproc)
        previous = step.target

    budgets = ("correction_tokens",) * config.correct_teacher + ("distill_tokens",)  # the search's: its schedule
    for field in budgets:  # of the stages that run
        optimizer_steps(config.tokens(field), batch_size=config.batch_size, seq_len=config.seq_len,
                        grad_accum=config.grad_accum, world=1, budget=f"{field} = {getattr(config, field)}")
    if config.backend == "ray":  # last: joining a cluster takes seconds; it must answer, take our token and fit
        from tasks.ray_cluster import check_cluster

        check_cluster(config, {"each training stage": config.nproc})
    else:
        check_gpus(config, model_config)
    return Plan(teacher_ref={"uri": config.teacher, "params": teacher_params}, teacher_params=teacher_params,
                steps=tuple(steps))


REFERENCE_GPU = "h100-80gb"  # what stages are sized for where no GPU is visible (the dry run's default)


def check_gpus(config: CompressConfig, teacher_config) -> None:
    """Every training stage gets at most the GPUs this machine has, by the decision the dry run prints: one line
    naming what each stage needs otherwise. Where no GPU is visible a one-process stage runs on the CPU;
    `device: cpu` runs every stage as CPU processes (gloo), and nothing is checked."""
    import torch

    from minitron.cost import local_gpu
    from minitron.plan import make_plan

    if config.device == "cpu":
        return
    visible = torch.cuda.device_count()
    gpu = local_gpu(config.device)
    plan = make_plan(config, gpu or REFERENCE_GPU, teacher_config=teacher_config)
    stages = [(st.name.split(" ", 1)[1], st) for st in plan.stages if st.kind == "train"]
    sized = gpu.name if gpu else f"{REFERENCE_GPU}, as this machine has none"
    for name, st in stages:
        if st.parallelism is None:
            raise UserError(f"{name} on {sized}: {st.fit}")
    if any(st.gpus > max(visible, 1) for _, st in stages):
        needs = ", ".join(f"{name} needs {st.gpus} ({st.parallelism.describe()})" for name, st in stages)
        raise UserError(f"this machine has {visible} GPU{'s' * (visible != 1)} but {needs}, sized for {sized}: run "
                        f"on a node with {max(st.gpus for _, st in stages)} GPUs (--dry-run --gpu for other cards), "
                        "lower nproc, or set device: cpu for CPU processes")
