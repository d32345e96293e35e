"""Dry-run planner: what a compression run costs, from its config alone (no weights, no data, in seconds).

For every stage `minitron run` would execute (teacher correction → per pruning step: importance, search, distillation
→ evaluation) the plan lists the input and output shapes, exact parameter counts (total and without the embedding and
lm_head matrices, the papers' "non-embedding"), the tokens processed, the FLOPs and GPU-hours at a stated model-FLOPs
utilisation, and the peak GPU memory, component by component, with whether it fits one GPU or needs FSDP across N.

The costs themselves (memory, FLOPs, the parallelism a stage needs on a GPU) live in minitron/cost.py, the
shapes of the pruning steps in minitron/steps.py.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from pathlib import Path

from minitron.archmath import Shape, shape_of
from minitron.config import CompressConfig, format_count, optimizer_steps
from minitron.cost import (
    DEFAULT_MFU,
    GPU,
    GPUS,
    REFERENCE_GPU,
    USABLE,
    GiB,
    Memory,
    Parallelism,
    ShapeCost,
    fmt_bytes,
    forward_flops,
    forward_memory,
    measured_mfu,
    train_flops,
    train_parallelism,
)
from minitron.errors import UserError
from minitron.steps import drop_block, step_shapes

# ----------------------------------------------------------------------------------------------------------------
# the plan


@dataclass
class PlanStage:
    name: str
    kind: str  # "train" | "forward" | "search" | "skip"
    model_in: ShapeCost
    model_out: ShapeCost
    tokens: int | None  # tokens processed (None: not known before the run, e.g. lm-eval)
    flops: float | None
    memory: Memory | None
    fit: str = ""
    gpus: int = 1  # GPUs the stage runs on: max(nproc, FSDP world size it needs); 0 = does not fit
    gpu_hours: float | None = None
    note: str = ""
    parallelism: Parallelism | None = None  # training stages: the decision the run executes (None: does not fit)
    jobs: int = 1  # independent trainings in the stage (the search's candidates), each on `gpus` GPUs


@dataclass
class RunPlan:
    name: str
    teacher: ShapeCost
    gpu: GPU
    mfu: float
    mfu_source: str
    stages: list[PlanStage] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    nodes: int | None = None  # --nodes: also plan every stage on this many nodes (backend: ray)
    gpus_per_node: int = 8
    max_data_parallel: int = 1  # GPUs one training job can split its global batch over (one micro-batch each)

    @property
    def student(self) -> ShapeCost:
        return self.stages[-1].model_out if self.stages else self.teacher

    @property
    def gpu_hours(self) -> float:
        return sum(s.gpu_hours or 0.0 for s in self.stages)

    def to_dict(self) -> dict:
        return {
            "name": self.name, "gpu": self.gpu.name, "mfu": self.mfu, "mfu_source": self.mfu_source,
            "teacher": {"shape": self.teacher.describe(), "params": self.teacher.params},
            "student": {"shape": self.student.describe(), "params": self.student.params,
                        "non_embedding": self.student.non_embedding},
            "gpu_hours": self.gpu_hours,
            "stages": [{"name": s.name, "in": s.model_in.describe(), "out": s.model_out.describe(),
                        "params_out": s.model_out.params, "non_embedding_out": s.model_out.non_embedding,
                        "tokens": s.tokens, "flops": s.flops, "gpus": s.gpus,
                        "peak_bytes": s.memory.peak if s.memory else None,
                        "memory": s.memory.parts if s.memory else None, "fit": s.fit, "gpu_hours": s.gpu_hours,
                        "parallelism": s.parallelism.describe() if s.parallelism else None,
                        "note": s.note} for s in self.stages],
            "notes": self.notes,
            **({"nodes": self.nodes, "gpus_per_node": self.gpus_per_node,
                "nodes_wall_hours": sum(on_nodes(self, s)[1] or 0.0 for s in self.stages),
                "nodes_stages": [dict(zip(("gpus", "wall_hours"), on_nodes(self, s), strict=True))
                                 for s in self.stages]} if self.nodes else {}),
        }


def on_nodes(plan: RunPlan, st: PlanStage) -> tuple[int, float | None]:
    """(GPUs, wall-hours) of a stage on plan.nodes nodes (backend: ray). A training job runs data-parallel over every
    GPU it can use: all of them, up to one micro-batch per GPU of the config's global batch, and never fewer than
    the stage needs; the search's candidates run side by side, each on at least the GPUs one needs, in waves when
    there are more candidates than fit; forward stages keep their GPU. The one-node MFU is assumed to hold across
    nodes (data parallelism over an InfiniBand-class network): measure yours with bench/ before you budget on it."""
    if not st.gpu_hours or not st.gpus:
        return 0, None
    total = (plan.nodes or 1) * plan.gpus_per_node
    if st.kind != "train":
        return st.gpus, st.gpu_hours / st.gpus
    if total < st.gpus:
        return 0, None
    side_by_side = min(st.jobs, total // st.gpus)
    per_job = max(st.gpus, min(total // side_by_side, plan.max_data_parallel))
    waves = -(-st.jobs // side_by_side)
    return side_by_side * per_job, waves * st.gpu_hours / st.jobs / per_job


def nodes_summary(plan: RunPlan) -> list[str]:
    """The --nodes lines under the table: total wall-hours there, and training stages whose global batch does not
    split evenly over the GPUs they would use."""
    total = plan.nodes * plan.gpus_per_node
    lines = [f"on {plan.nodes} node{'s' * (plan.nodes > 1)} x {plan.gpus_per_node} {plan.gpu.name} ({total} GPUs, "
             "backend: ray): "
             f"{_hours(sum(on_nodes(plan, st)[1] or 0.0 for st in plan.stages))} wall-hours (evaluation not "
             "included); assumes the one-node MFU holds across nodes"]
    missing = [st.name for st in plan.stages if st.gpu_hours and not on_nodes(plan, st)[1]]
    if missing:
        lines[0] += f"; not counting {', '.join(missing)} (no fit on these GPUs)"
    for st in plan.stages:
        gpus, hours = on_nodes(plan, st)
        per_job = gpus // min(st.jobs, max(gpus, 1))
        if hours and st.kind == "train" and plan.max_data_parallel % per_job:
            lines.append(f"  {st.name}: the global batch of {plan.max_data_parallel} micro-batches does not split "
                         f"evenly over {per_job} GPUs: set grad_accum so grad_accum x {per_job} GPUs is the global "
                         "batch you want")
    return lines


def _fit_forward(mem: Memory, gpu: GPU) -> str:
    usable = USABLE * gpu.memory
    if mem.peak <= usable:
        return f"fits 1 GPU ({fmt_bytes(mem.peak)} of {fmt_bytes(usable)})"
    return f"does not fit 1 GPU ({fmt_bytes(mem.peak)}): shard the model or lower batch_size"


def _at(config, shape: Shape):
    """`config` resized to `shape` for the candidate grid of a later iterative step (a copy; shape fields only)."""
    out = copy.copy(config)
    for key, value in (("num_hidden_layers", shape.layers), ("hidden_size", shape.hidden),
                       ("intermediate_size", shape.ffn), ("num_attention_heads", shape.heads),
                       ("num_key_value_heads", shape.kv_heads), ("head_dim", shape.head_dim)):
        object.__setattr__(out, key, value)
    return out


def make_plan(cfg: CompressConfig, gpu: str | GPU = REFERENCE_GPU, mfu: float | None = None, root: str | Path = ".",
              teacher_config=None, nodes: int | None = None, gpus_per_node: int = 8) -> RunPlan:
    """The plan of `cfg` on `gpu` (a name of the table or a GPU; and on `nodes` nodes of `gpus_per_node` GPUs).
    `teacher_config`: the teacher's config when the caller has read it already (preflight)."""
    from minitron.models import load_config

    if isinstance(gpu, str) and gpu not in GPUS:
        raise UserError(f"unknown GPU '{gpu}': use one of {', '.join(GPUS)}")
    g = GPUS[gpu] if isinstance(gpu, str) else gpu
    if mfu is not None:
        if not 0 < mfu <= 1:
            raise UserError(f"mfu {mfu} must be in (0, 1]")
        source = "given on the command line"
    else:
        found = measured_mfu(root)
        mfu, source = found if found else (DEFAULT_MFU, "default: no bench/results/distill_throughput-*.json")
    config = teacher_config or load_config(cfg.teacher, trust_remote_code=cfg.trust_remote_code)
    teacher = ShapeCost(config, shape_of(config))
    shapes = step_shapes(cfg, teacher.shape)
    targets = cfg.targets(teacher.params)
    if len(targets) == 1 and len(shapes) > 1:
        targets = [None] * (len(shapes) - 1) + targets
    for name, value in (("--nodes", nodes), ("--gpus-per-node", gpus_per_node)):
        if value is not None and value < 1:
            raise UserError(f"{name} {value} must be at least 1")
    plan = RunPlan(name=cfg.name, teacher=teacher, gpu=g, mfu=mfu, mfu_source=source, nodes=nodes,
                   gpus_per_node=gpus_per_node, max_data_parallel=cfg.grad_accum * cfg.nproc)
    seq = cfg.seq_len
    micro = cfg.batch_size * seq

    def hours(flops: float) -> float:
        return flops / (mfu * g.bf16_flops) / 3600

    def train_stage(name: str, student: ShapeCost, teacher_m: ShapeCost | None, tokens: int, parent: ShapeCost,
                    note: str = "") -> PlanStage:
        chosen, mem, fit = train_parallelism(cfg, student, teacher_m, g)
        flops = train_flops(student, tokens, seq) + (forward_flops(teacher_m, tokens, seq) if teacher_m else 0)
        gpus = chosen.gpus if chosen else 0
        optimizer_steps(tokens, batch_size=cfg.batch_size, seq_len=seq, grad_accum=cfg.grad_accum,
                        world=max(gpus, cfg.nproc), budget=f"{name}: budget")
        return PlanStage(name=name, kind="train", model_in=parent, model_out=student, tokens=tokens, flops=flops,
                         memory=mem, fit=fit, gpus=gpus, gpu_hours=hours(flops), note=note, parallelism=chosen)

    if cfg.correct_teacher:
        tokens = cfg.tokens("correction_tokens")
        plan.stages.append(train_stage("1 teacher correction", teacher, None, tokens, teacher,
                                       "LM fine-tune of the teacher (CE), the student's teacher afterwards"))
    parent = teacher
    for i, (shape, target) in enumerate(zip(shapes, targets, strict=True), 1):
        step = f"step {i}/{len(shapes)}: " if len(shapes) > 1 else ""
        calib = cfg.calib_samples * (cfg.calib_seq_len or seq)
        imp_tokens = calib + (parent.shape.layers * cfg.val_batches * micro if cfg.axes != "width" else 0)
        mem = forward_memory(parent, cfg.batch_size * (cfg.calib_seq_len or seq), logits=cfg.axes != "width")
        flops = forward_flops(parent, imp_tokens, seq)
        plan.stages.append(PlanStage(
            name=f"2 {step}importance", kind="forward", model_in=parent, model_out=parent, tokens=imp_tokens,
            flops=flops, memory=mem, fit=_fit_forward(mem, g), gpu_hours=hours(flops),
            note=f"{cfg.calib_samples} calibration sequences"
                 + (" + layer ranking (one pass per skipped layer)" if cfg.axes != "width" else "")))
        if shape is None:
            from minitron.search import candidate_ranks, rows_for_run, sample_rows, schedule_for

            rows = rows_for_run(cfg, _at(config, parent.shape), target)
            space = len(rows)
            selection = (f"the best {min(space, cfg.search_max_candidates)} of {space} by zero-shot proxy KL"
                         if cfg.search_proxy else sample_rows(rows, cfg.search_max_candidates))
            entering = [r for r in rows if r.status == "candidate"] if not cfg.search_proxy else rows
            best = ShapeCost(config, rows[0].shape)  # shown: the first in the search's order, until the search decides
            big = ShapeCost(config, max(entering, key=lambda r: r.params).shape)  # costs are bounded by the biggest
            schedule = schedule_for(cfg, min(space, cfg.search_max_candidates),  # whole steps on every candidate's
                                    ranks=candidate_ranks(cfg, parent, [r.shape for r in entering], g))  # ranks
            # one candidate of round 1 (the biggest) sizes the GPUs; the stage's totals are the whole schedule's
            one = train_stage(f"3 {step}search", big, parent, schedule.rounds[0].tokens, parent)
            proxy = space * cfg.proxy_batches * micro if cfg.search_proxy else 0
            lengths = {parent.shape.layers - r.shape.layers for r in entering if r.kind != "width"}
            sweep = sum(parent.shape.layers - k + 1 for k in lengths) * cfg.val_batches * micro
            flops = sum(r.candidates * (train_flops(big, r.tokens, seq) + forward_flops(parent, r.tokens, seq))
                        for r in schedule.rounds) + forward_flops(parent, proxy + sweep, seq)
            last = schedule.rounds[-1]
            note = (f"{space} candidates within {cfg.tolerance:.0%} of {format_count(target)}; round 1: "
                       f"{selection}; "
                       f"{schedule.describe()} (search_tokens = {cfg.search_tokens}; the rest rounds down to "
                       f"whole steps); the last round trains {format_count(last.tokens)} tokens per candidate "
                       f"({last.tokens // schedule.tokens_per_step} steps; P1's lightweight retraining: ~400 steps)"
                       + (f"; proxy KL on {space} shapes" if proxy else "")
                       + (f"; depth blocks: {sum(parent.shape.layers - k + 1 for k in lengths)} window positions"
                          if lengths else "") + "; shown: the first candidate in the search's order")
            # side by side on several nodes: round 1's candidates; later rounds hold fewer, longer trainings that
            # cost about as much in all, so a round parallelises about like the first (whole GPUs per job)
            plan.stages.append(replace(one, model_out=best, tokens=schedule.total + proxy + sweep, flops=flops,
                                       gpu_hours=hours(flops), note=note, jobs=schedule.rounds[0].candidates))
            student = best
        else:
            block = drop_block(cfg, parent.shape.layers) if cfg.target_shapes is None else None
            student = ShapeCost(config, shape)
            plan.stages.append(PlanStage(
                name=f"3 {step}prune", kind="skip", model_in=parent, model_out=student, tokens=None, flops=None,
                memory=None, note="explicit shape: no search" + (f", drop layers {cfg.drop_layers}" if block else "")))
            if target is not None and abs(student.params - target) > cfg.tolerance * target:
                plan.notes.append(f"step {i}: explicit shape has {format_count(student.params)} parameters, "
                                  f"{(student.params - target) / target:+.1%} from target_params "
                                  f"{format_count(target)}")
        tokens = cfg.tokens("distill_tokens")
        plan.stages.append(train_stage(f"4 {step}distillation", student, parent, tokens, student,
                                       f"logit KL (tau {cfg.kd_temperature:g}"
                                       + (f", top-{cfg.kd_top_k}" if cfg.kd_top_k else "")
                                       + (f", CE x{cfg.ce_weight:g}" if cfg.ce_weight else "") + ") from "
                                       + (("the corrected teacher" if cfg.correct_teacher else "the teacher") if parent is teacher
                                          else "the previous step's student")))
        parent = student
    if cfg.evaluate:
        mem = forward_memory(teacher, micro, logits=True)
        plan.stages.append(PlanStage(
            name="5 evaluation", kind="forward", model_in=teacher, model_out=parent, tokens=None, flops=None,
            memory=mem, fit=_fit_forward(mem, g),
            note=f"lm-eval preset '{cfg.eval_preset}' on teacher, pruned and final students; tokens depend on the tasks"))
    return plan


# ----------------------------------------------------------------------------------------------------------------
# printing


def _hours(h: float | None) -> str:
    if h is None:
        return "-"
    return f"{h:,.0f}" if h >= 100 else f"{h:.3g}"


def format_plan(plan: RunPlan) -> str:
    t, s = plan.teacher, plan.student
    lines = [
        f"plan '{plan.name}' on {plan.gpu.name} ({plan.gpu.memory / GiB:.0f} GiB, {plan.gpu.bf16_flops / 1e12:.0f} "
        f"TFLOP/s bf16 dense; a stage may use {USABLE:.0%} of the memory)",
        f"teacher  {t.describe():<28} {t.params:>15,} params ({format_count(t.params)}), "
        f"{t.non_embedding:,} without embeddings",
        f"student  {s.describe():<28} {s.params:>15,} params ({format_count(s.params)}), "
        f"{s.non_embedding:,} without embeddings ({format_count(s.non_embedding)})",
        f"throughput: MFU {plan.mfu:.0%} of peak ({plan.mfu_source})",
        "",
    ]
    rows = [{"stage": st.name, "model": f"{st.model_in.describe()} -> {st.model_out.describe()}"
             if st.model_in is not st.model_out else st.model_in.describe(),
             "params out": format_count(st.model_out.params),
             "non-emb": format_count(st.model_out.non_embedding),
             "tokens": format_count(st.tokens) if st.tokens else "-",
             "peak/GPU": fmt_bytes(st.memory.peak) if st.memory else "-",
             "GPUs": (str(st.gpus) if st.gpus else "no fit") if st.memory else "-",
             "GPU-h": _hours(st.gpu_hours),
             "wall-h": _hours(st.gpu_hours / st.gpus) if st.gpu_hours and st.gpus else "-"} for st in plan.stages]
    if plan.nodes:
        for row, st in zip(rows, plan.stages, strict=True):
            gpus, hours = on_nodes(plan, st)
            row[f"{plan.nodes}-node GPUs"] = (str(gpus) if hours else "-" if not st.gpu_hours else
                                              f"needs {st.gpus}" if st.gpus else "no fit")
            row[f"{plan.nodes}-node wall-h"] = _hours(hours)
    cols = list(rows[0]) if rows else []
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols}
    lines.append("  ".join(c.ljust(widths[c]) for c in cols))
    lines.append("  ".join("-" * widths[c] for c in cols))
    lines += ["  ".join(r[c].ljust(widths[c]) for c in cols) for r in rows]
    lines.append(f"total: {_hours(plan.gpu_hours)} GPU-hours (evaluation not included)")
    if plan.nodes:
        lines += nodes_summary(plan)
    lines.append("")
    for st in plan.stages:
        lines.append(f"{st.name}: {st.note}")
        if st.memory:
            lines.append(f"    {st.fit}; per GPU: {st.memory.breakdown()}")
        if st.flops:
            lines.append(f"    {st.flops:.3g} FLOPs")
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)
