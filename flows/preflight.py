"""Checks that run in the first seconds of a flow run, before any model work: every bad input a user can make
(unreachable tracking server, missing bucket, wrong credentials, unknown teacher, corrupt or pickled teacher weights,
a device or process count the machine does not have, a target that is not smaller than the teacher or that no shape
can meet, an infeasible explicit shape, a corpus that is missing, empty, too short or not text) fails here with one
line that says what to fix. Reading the corpus here costs nothing later: its token blocks are cached for the stages.
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
    from minitron.archmath import check_shape, count_params, count_shape, shape_of
    from minitron.data import TEXT_SUFFIXES
    from minitron.families import family_of
    from minitron.models import check_weights, load_config
    from minitron.search import rows_for_run, schedule_for
    from minitron.steps import drop_block, step_shapes
    from tasks import storage, tracking

    tracking.check_tracking(tracking_uri(config.tracking_uri))
    storage.check_store(store_uri(config.checkpoint_store))

    teacher = local_teacher(config)
    model_config = load_config(teacher, trust_remote_code=config.trust_remote_code)
    family_of(model_config)  # unsupported architecture → names the supported ones
    check_weights(teacher, allow_pickle=config.allow_pickle)  # headers only: no tensor is read
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
        if shape is not None:  # the family's own rules (hidden size vs heads, ...) before any stage runs
            check_shape(shape, shape_of(model_config), config=model_config, drop=drop if len(shapes) == 1 else None,
                        where="target shape" if len(shapes) == 1 else f"target_shapes step {i + 1}")
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
    check_corpus(config, teacher)
    if config.backend == "ray":  # last: joining a cluster takes seconds; it must answer, take our token and fit
        from tasks.ray_cluster import check_cluster

        check_cluster(config, lambda gpu: cluster_needs(config, model_config, gpu))
    else:
        check_gpus(config, model_config)
    return Plan(teacher_ref={"uri": config.teacher, "params": teacher_params}, teacher_params=teacher_params,
                steps=tuple(steps))


def local_teacher(config: CompressConfig) -> str:
    """The teacher spec, with a checkpoint URI (s3://, file://, as the tool prints them) fetched and verified into
    this config's scratch folder, where its stages find it again."""
    if not config.teacher.startswith(("s3://", "file://")):
        return config.teacher
    from tasks.common import config_key, local_copy, scratch_root

    return str(local_copy(config.teacher, scratch_root() / config_key(config)))


def check_corpus(config: CompressConfig, teacher: str) -> None:
    """The corpus is text the teacher's tokenizer reads (minitron/textcheck.py) and has at least the tokens the run
    needs: the calibration samples or one batch for training, whichever is more, plus one validation block per
    process. Counting stops as soon as that many are seen, so a big corpus costs no more than a small one; building
    its token store is the tokenize stage's work. A hub dataset is left to that stage (it streams)."""
    from minitron.config import parse_count
    from minitron.data import DOC_CHARS, iter_documents, load_tokenizer
    from minitron.textcheck import check_text, sample_text

    if config.data != "shakespeare" and not Path(config.data).expanduser().exists():
        return
    where = f"data '{config.data}'"
    tokenizer = load_tokenizer(teacher)

    def documents():
        return iter_documents(config.data, hf_config=config.data_config, hf_split=config.data_split,
                              text_field=config.text_field)

    check_text(sample_text(documents()), tokenizer, where)
    calib = config.calib_samples * (config.calib_seq_len or config.seq_len)
    need = max(calib, config.batch_size * config.nproc * config.seq_len) + config.nproc * config.seq_len
    cap = parse_count(config.max_corpus_tokens) if config.max_corpus_tokens else None
    tokens = docs = 0
    for doc in documents():
        tokens += len(tokenizer(doc, add_special_tokens=False)["input_ids"]) + 1  # + EOS between documents
        docs += 1
        if tokens >= need and docs >= 2 or (cap and tokens >= cap):
            break
    capped = bool(cap and tokens >= cap)
    reading = f"max_corpus_tokens {config.max_corpus_tokens} reads" if capped else "it holds"
    if tokens < need:
        raise UserError(f"{where}: {reading} {tokens:,} tokens, fewer than the {need:,} this run needs (calib_samples "
                        "x calib_seq_len, or one batch of batch_size x nproc x seq_len, plus a validation block per "
                        "process): add text, or lower calib_samples, batch_size or seq_len")
    if docs < 2:
        raise UserError(f"{where}: {reading} {docs} document, but the document-level train/validation split needs at "
                        f"least 2 (a .txt file is cut at blank lines into documents of up to {DOC_CHARS:,} "
                        f"characters): {'raise max_corpus_tokens' if capped else 'add text'}")


def training_stages(config: CompressConfig, teacher_config, gpu, sized: str) -> list:
    """The plan's training stages on `gpu` as (name, plan stage): the GPUs each runs on, as the dry run prints and
    the run executes; one line for a stage that fits no number of them (`sized` names the card in it)."""
    from minitron.plan import make_plan

    plan = make_plan(config, gpu, teacher_config=teacher_config)
    stages = [(st.name.split(" ", 1)[1], st) for st in plan.stages if st.kind == "train"]
    for name, st in stages:
        if st.parallelism is None:
            raise UserError(f"{name} on {sized}: {st.fit}")
    return stages


def cluster_needs(config: CompressConfig, teacher_config, gpu) -> dict[str, int]:
    """backend ray: the workers each training stage runs on, sized for the cluster's GPU (`gpu`; None on a CPU
    cluster, where each runs nproc CPU workers)."""
    if gpu is None:
        return {"each training stage": config.nproc}
    return {name: st.gpus for name, st in training_stages(config, teacher_config, gpu, f"the cluster's {gpu.name}")}


def check_gpus(config: CompressConfig, teacher_config) -> None:
    """Every training stage gets at most the GPUs this machine has, by the decision the dry run prints: one line
    naming what each stage needs otherwise. Where no GPU is visible a one-process stage runs on the CPU;
    `device: cpu` runs every stage as CPU processes (gloo), and nothing is checked."""
    import torch

    from minitron.cost import REFERENCE_GPU, local_gpu
    from minitron.models import resolve_device

    if config.device == "cpu":
        return
    resolve_device(config.device)  # device=cuda without a GPU: one line
    visible = torch.cuda.device_count()
    gpu = local_gpu(config.device)
    sized = gpu.name if gpu else f"{REFERENCE_GPU}, as this machine has none"
    stages = training_stages(config, teacher_config, gpu or REFERENCE_GPU, sized)
    if any(st.gpus > max(visible, 1) for _, st in stages):
        needs = ", ".join(f"{name} needs {st.gpus} ({st.parallelism.describe()})" for name, st in stages)
        raise UserError(f"this machine has {visible} GPU{'s' * (visible != 1)} but {needs}, sized for {sized}: run "
                        f"on a node with {max(st.gpus for _, st in stages)} GPUs (--dry-run --gpu for other cards), "
                        "lower nproc, or set device: cpu for CPU processes")
