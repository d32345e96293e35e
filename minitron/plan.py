"""Dry-run planner: what a compression run costs, from its config alone (no weights, no data, in seconds).

For every stage `minitron run` would execute (teacher correction → per pruning step: importance, search, distillation
→ evaluation) the plan lists the input and output shapes, exact parameter counts (total and without the embedding and
lm_head matrices, the papers' "non-embedding"), the tokens processed, the FLOPs and GPU-hours at a stated model-FLOPs
utilisation, and the peak GPU memory, component by component, with whether it fits one GPU or needs FSDP across N.

Memory model of a training stage (what minitron/distill keeps alive; T = tokens per micro-batch, d = hidden size,
V = vocabulary, N = parameters):
  - student: fp32 master weights 4N, gradients 4N, AdamW moments 8N (fused AdamW: no temporaries), bf16 autocast
    copies of every matrix 2N (autocast caches the cast weights from forward until backward ends);
  - activations saved for backward, per decoder layer and token (Llama-style block, SDPA with native GQA, measured
    with saved-tensor hooks, see tests/test_plan.py):
        bf16 autocast: 16d (both norms' fp32 input and normalised state) + 2d x (3 + n_in) (bf16 casts of the norm
                       outputs for q/k/v and gate/up) + 4q + 4kv (q, k, v, attention output) + 4h (log-sum-exp)
                       + 2f x (4 if gated MLP else 2)
        fp32:          24d + 8q + 8kv + 4h + 4f x (4 if gated else 2)
    (q = heads x head_dim, kv = kv_heads x head_dim, h = heads, f = MLP size, n_in = 2 gated / 1 plain MLP);
  - fused lm_head + KL loss (minitron/distill/loss.py): gradients of the last hidden state (4Td) and of lm_head (4Vd)
    are computed in forward and kept for backward; per chunk of c tokens ~K x c x V x 4 bytes of fp32 logit-sized
    temporaries, a compute-dtype copy of lm_head and the [V, d] product of the lm_head gradient update;
  - teacher: frozen, in the compute dtype (bf16: 2 bytes/parameter, replicated on every GPU), and its last hidden
    state (2Td in bf16).
  Peak = resident (weights, moments, teacher; gradients too when grad_accum > 1) + the larger of the start of
  backward (activations + autocast copies + loss) and the end of backward (all gradients + autocast copies).
FSDP across S GPUs shards the student's weights, gradients and moments (the engine's FSDP2 shards each decoder layer
and the root); each GPU still holds the gathered root parameters (embeddings, lm_head) during a step, two gathered
layers (current + prefetch), its own activations and the whole bf16 teacher.
Forward-only stages (importance, evaluation) hold bf16 weights, one layer's transient working set and, where they
score the LM loss, fp32 logits of one micro-batch.

FLOPs per token (PaLM convention, the one MFU is quoted in): training 6 x N_matmul + 12 x layers x q x seq_len,
forward 2 x N_matmul + 4 x layers x q x seq_len, where N_matmul excludes the embedding lookup (an untied embedding
matrix does no matmul). GPU-hours = FLOPs / (MFU x peak bf16 dense FLOP/s) / 3600, summed over all GPUs.
"""

from __future__ import annotations

import copy
import glob
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from minitron.archmath import Shape, count_shape, shape_of
from minitron.config import CompressConfig, format_count, optimizer_steps
from minitron.errors import UserError
from minitron.families import family_of

GiB = 1024**3


@dataclass(frozen=True)
class GPU:
    name: str
    memory: int  # bytes, as nvidia-smi reports the card's total
    bf16_flops: float  # peak dense bf16 tensor-core FLOP/s (no sparsity)


GPUS = {g.name: g for g in (
    GPU("h100-80gb", 81559 * 2**20, 989e12),  # H100 SXM
    GPU("h200-141gb", 143771 * 2**20, 989e12),
    GPU("a100-80gb", 81920 * 2**20, 312e12),
    GPU("a100-40gb", 40960 * 2**20, 312e12),
    GPU("l40s-48gb", 46068 * 2**20, 362e12),
    GPU("rtx4090-24gb", 24564 * 2**20, 165e12),  # bf16 with fp32 accumulate, as PyTorch runs it
)}
USABLE = 0.9  # of a GPU's memory the plan lets a stage use: CUDA context, NCCL buffers, allocator fragmentation
DEFAULT_MFU = 0.40  # when no benchmark result is found; a typical figure for single-node bf16 training
BENCH_GLOB = "bench/results/distill_throughput-*.json"
FSDP_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
DEFAULT_CHUNK = 4096  # tokens per chunk of the fused loss, if the distill engine is not importable
LOSS_TEMPS = 8  # fp32 [chunk, vocab] blocks alive at once inside the fused loss (measured in tests/test_plan.py)


def _chunk_tokens() -> int:
    try:
        from minitron.distill.loss import KDLossConfig
    except ImportError:
        return DEFAULT_CHUNK
    return KDLossConfig().chunk_tokens


# ----------------------------------------------------------------------------------------------------------------
# a model as the planner sees it: a config at a shape


@dataclass(frozen=True)
class Model:
    """A model of `config`'s family and vocabulary at `shape`: counted, never built (a pruned shape need not even
    be a valid transformers config, e.g. SmolLM2 at a hidden size that 9 heads do not divide)."""

    config: object  # the teacher's transformers PretrainedConfig: family, vocabulary, tying, biases
    shape: Shape

    @property
    def gated(self) -> bool:
        return family_of(self.config).gated_mlp

    @property
    def vocab(self) -> int:
        return self.config.vocab_size

    @property
    def tied(self) -> bool:
        return bool(getattr(self.config, "tie_word_embeddings", False))

    @property
    def params(self) -> int:
        return count_shape(self.config, self.shape)

    @property
    def embedding_params(self) -> int:
        """Embedding and lm_head matrices (once when tied)."""
        return self.vocab * self.shape.hidden * (1 if self.tied else 2)

    @property
    def non_embedding(self) -> int:
        return self.params - self.embedding_params

    @property
    def matmul_params(self) -> int:
        """Parameters that take part in a matmul per token: all but an untied input embedding."""
        return self.params - (0 if self.tied else self.vocab * self.shape.hidden)

    @property
    def layer_params(self) -> int:
        """One decoder layer (layers are homogeneous)."""
        s = self.shape
        return (self.params - self.embedding_params - self._final_norm()) // s.layers

    def _final_norm(self) -> int:
        return self.shape.hidden * (2 if family_of(self.config).norm_bias else 1)

    @property
    def root_params(self) -> int:
        """What FSDP's root unit holds: embeddings, lm_head and the final norm."""
        return self.embedding_params + self._final_norm()

    @property
    def cast_params(self) -> int:
        """Matrices autocast keeps a bf16 copy of: every linear layer, lm_head included (the fused loss casts it)."""
        s = self.shape
        norms = s.layers * 2 * s.hidden * (2 if family_of(self.config).norm_bias else 1)
        return self.layer_params * s.layers - norms + self.vocab * s.hidden

    def describe(self) -> str:
        return self.shape.spec()


def layer_activation_bytes(m: Model, autocast: bool) -> int:
    """Bytes one decoder layer saves for backward, per token (see the module doc)."""
    s = m.shape
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    mlp_tensors = 4 if m.gated else 2  # gated: gate, up, act(gate), act*up; plain: up, act(up)
    if autocast:
        n_in = 2 if m.gated else 1
        return 16 * s.hidden + 2 * s.hidden * (3 + n_in) + 4 * q + 4 * kv + 4 * s.heads + 2 * s.ffn * mlp_tensors
    return 24 * s.hidden + 8 * q + 8 * kv + 4 * s.heads + 4 * s.ffn * mlp_tensors


def forward_working_bytes(m: Model, elem: int) -> int:
    """Transient bytes per token of one layer's forward without autograd: residual, norm temporaries, q/k/v/out and
    the MLP intermediates (the largest layer's working set; earlier layers' tensors are already freed)."""
    s = m.shape
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    return elem * (2 * s.hidden + 2 * q + 2 * kv) + 8 * s.hidden + elem * s.ffn * (3 if m.gated else 2)


# ----------------------------------------------------------------------------------------------------------------
# memory of the stage kinds


@dataclass
class Memory:
    parts: dict[str, int]  # component → bytes per GPU
    peak: int  # bytes per GPU
    shards: int = 1  # FSDP world size the parts were computed for

    def breakdown(self) -> str:
        return ", ".join(f"{k} {_bytes(v)}" for k, v in self.parts.items() if v)


def _bytes(n: float) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def training_memory(student: Model, teacher: Model | None, tokens: int, *, grad_accum: int = 1,
                    autocast: bool = True, chunk: int | None = None, shards: int = 1,
                    checkpointing: bool = False) -> Memory:
    """Peak bytes per GPU of one optimizer step of distillation (teacher given) or LM training (teacher None) with
    `tokens` tokens per micro-batch, the student sharded over `shards` GPUs (FSDP)."""
    chunk = min(chunk or _chunk_tokens(), tokens)
    s, n = student.shape, student.params
    d, v = s.hidden, student.vocab
    act_elem = 2 if autocast else 4
    per_layer = layer_activation_bytes(student, autocast)
    if checkpointing:  # keep each layer's fp32 input; recompute one layer at a time in backward
        acts = tokens * (s.layers * 4 * d + per_layer)
    else:
        acts = tokens * s.layers * per_layer
    acts += tokens * 8 * d  # final norm: fp32 input and normalised state
    casts = 2 * student.cast_params if autocast else 0
    # fused loss: d(hidden) and d(lm_head) live from forward to backward; transient peak is the larger of the
    # forward's chunk temporaries (+ lm_head cast, + the [V, d] gradient-update product) and backward's scaled copies
    kept = 4 * tokens * d + 4 * v * d
    fwd_tmp = LOSS_TEMPS * 4 * chunk * v + (act_elem * v * d if autocast else 0) + (act_elem + 4) * v * d
    bwd_tmp = 4 * tokens * d + 4 * v * d
    loss = kept + max(fwd_tmp, bwd_tmp)
    parts = {
        "teacher": act_elem * teacher.params if teacher else 0,  # cast to the compute dtype
        "weights": 4 * n // shards,
        "adamw": 8 * n // shards,
        "grads": 4 * n // shards,
        "fsdp-gathered": 4 * (student.root_params + 2 * student.layer_params) if shards > 1 else 0,
        "autocast": casts,
        "activations": acts,
        "loss": loss,
        "teacher-hidden": act_elem * tokens * teacher.shape.hidden if teacher else 0,
    }
    resident = parts["teacher"] + parts["weights"] + parts["adamw"] + parts["fsdp-gathered"] + \
        parts["teacher-hidden"]
    if grad_accum > 1:  # gradients accumulate across micro-batches, so they are alive during every backward
        peak = resident + parts["grads"] + casts + acts + loss
    else:  # gradients appear as activations are freed: the peak is at either end of backward
        peak = resident + casts + max(acts + loss, parts["grads"] + 4 * v * d)
    return Memory(parts, peak, shards)


def forward_memory(m: Model, tokens: int, *, logits: bool) -> Memory:
    """Peak bytes of a bf16 forward without gradients over `tokens` tokens (importance scoring, evaluation)."""
    parts = {"weights": 2 * m.params, "working-set": tokens * forward_working_bytes(m, 2),
             "logits": tokens * m.vocab * (2 + 4 + 4) if logits else 0}  # bf16 logits, fp32 log-softmax, grad-free
    return Memory(parts, sum(parts.values()))


def train_flops(m: Model, tokens: int, seq_len: int) -> float:
    s = m.shape
    return tokens * (6 * m.matmul_params + 12 * s.layers * s.heads * s.head_dim * seq_len)


def forward_flops(m: Model, tokens: int, seq_len: int) -> float:
    s = m.shape
    return tokens * (2 * m.matmul_params + 4 * s.layers * s.heads * s.head_dim * seq_len)


# ----------------------------------------------------------------------------------------------------------------
# shapes of the pruning steps


def check_shape(shape: Shape, parent: Shape, where: str) -> None:
    """A pruned shape must be a sub-shape of its parent with whole query-head groups; one-line error otherwise."""
    for name, got, full in (("layers", shape.layers, parent.layers), ("hidden", shape.hidden, parent.hidden),
                            ("ffn", shape.ffn, parent.ffn), ("query heads", shape.heads, parent.heads),
                            ("kv groups", shape.kv_heads, parent.kv_heads)):
        if not 1 <= got <= full:
            raise UserError(f"{where}: {name} {got} must be between 1 and the parent model's {full} (pruning "
                            "only removes)")
    if shape.heads % shape.kv_heads:
        raise UserError(f"{where}: {shape.heads} query heads are not a multiple of {shape.kv_heads} KV groups "
                        "(every group keeps the same number of query heads)")
    if parent.kv_heads % shape.kv_heads:
        raise UserError(f"{where}: {shape.kv_heads} KV groups do not divide the parent's {parent.kv_heads}")


def drop_block(cfg: CompressConfig, layers: int) -> tuple[int, int] | None:
    """`drop_layers` 'A-B' (1-indexed, inclusive) → 0-indexed inclusive (a, b), checked against `layers`."""
    if cfg.drop_layers is None:
        return None
    a, b = (int(x) for x in cfg.drop_layers.split("-"))
    if not 1 <= a <= b <= layers:
        raise UserError(f"drop_layers {cfg.drop_layers} must lie within layers 1-{layers} with start ≤ end")
    if b - a + 1 >= layers:
        raise UserError(f"drop_layers {cfg.drop_layers} would remove every layer")
    return a - 1, b - 1


def step_shapes(cfg: CompressConfig, teacher: Shape) -> list[Shape | None]:
    """The explicit target shape of every pruning step, None where the step searches. Iterative pruning has one
    entry per `target_shapes` item or `target_params` item."""
    targets = cfg.target_params.split(",")
    if cfg.target_shapes is not None:
        specs = cfg.target_shapes.split(",")
        if len(targets) > 1 and len(targets) != len(specs):
            raise UserError(f"target_shapes has {len(specs)} steps but target_params has {len(targets)}: give "
                            "one target per step or a single one")
        single = [f for f in ("target_layers", "target_hidden", "target_ffn", "target_heads_per_group",
                              "target_kv_groups", "drop_layers") if getattr(cfg, f) is not None]
        if single:
            raise UserError(f"{single[0]} and target_shapes both set: use target_shapes alone")
        out, parent = [], teacher
        for i, spec in enumerate(specs, 1):
            shape = Shape.from_spec(spec, parent)
            check_shape(shape, parent, f"target_shapes step {i} ({spec.strip()})")
            out.append(shape)
            parent = shape
        return out
    if not cfg.explicit_shape():
        return [None] * len(targets)
    if len(targets) > 1:
        raise UserError("target_layers/target_hidden/... describe one step: use target_shapes for iterative pruning")
    kv = cfg.target_kv_groups or teacher.kv_heads
    per_group = cfg.target_heads_per_group or teacher.heads_per_group
    block = drop_block(cfg, teacher.layers)
    layers = teacher.layers - (block[1] - block[0] + 1) if block else cfg.target_layers or teacher.layers
    if block and cfg.target_layers is not None and cfg.target_layers != layers:
        raise UserError(f"target_layers {cfg.target_layers} disagrees with drop_layers {cfg.drop_layers} "
                        f"({layers} layers left)")
    shape = Shape(layers, cfg.target_hidden or teacher.hidden, cfg.target_ffn or teacher.ffn, per_group * kv, kv,
                  teacher.head_dim)
    check_shape(shape, teacher, "target shape")
    return [shape]


# ----------------------------------------------------------------------------------------------------------------
# the plan


@dataclass
class Stage:
    name: str
    kind: str  # "train" | "forward" | "search" | "skip"
    model_in: Model
    model_out: Model
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
class Plan:
    name: str
    teacher: Model
    gpu: GPU
    mfu: float
    mfu_source: str
    stages: list[Stage] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    nodes: int | None = None  # --nodes: also plan every stage on this many nodes (backend: ray)
    gpus_per_node: int = 8
    max_data_parallel: int = 1  # GPUs one training job can split its global batch over (one micro-batch each)

    @property
    def student(self) -> Model:
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


def on_nodes(plan: Plan, st: Stage) -> tuple[int, float | None]:
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


def nodes_summary(plan: Plan) -> list[str]:
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


def measured_mfu(root: str | Path = ".") -> tuple[float, str] | None:
    """The MFU our own distillation benchmark measured (bench/results/distill_throughput-<device>.json: a top-level
    "mfu", or the best "mfu" among its "rows"), newest file first."""
    files = sorted(glob.glob(str(Path(root) / BENCH_GLOB)), key=lambda p: Path(p).stat().st_mtime, reverse=True)
    for path in files:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            continue
        values = [data.get("mfu")] + [r.get("mfu") for r in data.get("rows", []) if isinstance(r, dict)]
        values = [float(x) for x in values if isinstance(x, int | float) and 0 < x <= 1]
        if values:
            return max(values), f"measured by our benchmark ({path})"
    return None


def _fit(make, gpu: GPU, checkpointing: bool = False) -> tuple[Memory, int | None, str]:
    """Smallest FSDP world size whose per-GPU peak fits `gpu` (None: none does); `make(shards, checkpointing)`
    → Memory."""
    usable = USABLE * gpu.memory
    for shards in FSDP_SIZES:
        mem = make(shards, checkpointing)
        if mem.peak <= usable:
            verdict = "fits 1 GPU" if shards == 1 else f"FSDP x{shards}"
            return mem, shards, f"{verdict} ({_bytes(mem.peak)} of {_bytes(usable)})"
    mem = make(FSDP_SIZES[-1], checkpointing)
    fixed = mem.parts["activations"] + mem.parts["loss"] + mem.parts["autocast"] + mem.parts["teacher"]
    hint = "lower batch_size (raise grad_accum) or seq_len"
    for shards in FSDP_SIZES if not checkpointing else ():
        if make(shards, True).peak <= usable:
            hint += f"; activation_checkpointing: true would fit FSDP x{shards}"
            break
    return make(1, checkpointing), None, (f"does not fit: {fixed / GiB:.0f} GiB per GPU cannot be sharded "
                                          f"(activations, loss, teacher): {hint}")


@dataclass(frozen=True)
class Parallelism:
    """How a training stage uses its GPUs: the decision the dry run prints and the run executes."""

    gpus: int  # processes (GPUs); 1 runs in the caller's process
    parallel: str  # "ddp" (replicate the trained model) | "fsdp" (shard it), with more than one process
    checkpointing: bool  # activation checkpointing of the trained model

    def describe(self) -> str:
        how = "1 process" if self.gpus == 1 else f"{self.parallel.upper()} x{self.gpus}"
        return how + (", activation checkpointing" if self.checkpointing else "")


def choose_parallelism(nproc: int, parallel: str, checkpointing: bool,
                       fits: Callable[[int, bool], bool] | None) -> Parallelism | None:
    """A training stage's parallelism from the run's `nproc`, `parallel` and `activation_checkpointing`.
    `fits(shards, checkpointing)` says whether the per-GPU peak fits with the trained model sharded over `shards`
    GPUs; None where no GPU memory applies (CPU processes). None back: nothing fits.

    - ddp: nproc replicas; the stage must fit one GPU.
    - fsdp: sharded over max(nproc, the fewest GPUs it fits on).
    - auto: DDP x nproc when the stage fits one GPU, else FSDP as above. With activation_checkpointing off, auto
      turns it on when that keeps the stage within nproc GPUs where it would not fit them without, or when nothing
      fits without it (then it takes the fewer GPUs)."""
    if fits is None:
        return Parallelism(nproc, "ddp" if parallel == "auto" else parallel, checkpointing)
    if parallel == "ddp":
        return Parallelism(nproc, "ddp", checkpointing) if fits(1, checkpointing) else None
    options = (checkpointing,) if checkpointing or parallel == "fsdp" else (False, True)
    found = [(ck, shards) for ck in options
             for shards in [next((n for n in FSDP_SIZES if fits(n, ck)), None)] if shards is not None]
    if not found:
        return None
    within = [(ck, shards) for ck, shards in found if shards <= nproc]
    ck, shards = within[0] if within else min(found, key=lambda f: (f[1], f[0]))
    return Parallelism(max(nproc, shards), "fsdp" if parallel == "fsdp" or shards > 1 else "ddp", ck)


def train_parallelism(cfg, student: Model, teacher: Model | None, gpu: GPU | None
                      ) -> tuple[Parallelism | None, Memory | None, str]:
    """(decision, per-GPU memory at it, verdict) of a training stage that trains `student` (against `teacher`, or
    alone for teacher correction) on `gpu` (None: CPU processes). `cfg` holds the run's fields (a CompressConfig, or
    the CLI's arguments of the same names). The dry run and every training task of the run call this."""
    def make(shards: int, checkpointing: bool) -> Memory:
        return training_memory(student, teacher, cfg.batch_size * cfg.seq_len, grad_accum=cfg.grad_accum,
                               shards=shards, checkpointing=checkpointing)

    if gpu is None:
        chosen = choose_parallelism(cfg.nproc, cfg.parallel, cfg.activation_checkpointing, None)
        return chosen, None, f"{chosen.describe()} on the CPU"
    usable = USABLE * gpu.memory
    chosen = choose_parallelism(cfg.nproc, cfg.parallel, cfg.activation_checkpointing,
                                lambda shards, ck: make(shards, ck).peak <= usable)
    if chosen is None:
        mem, shards, fit = _fit(make, gpu, cfg.activation_checkpointing)
        if shards is not None:  # only parallel: ddp keeps it from fitting
            fit = (f"does not fit one GPU under parallel: ddp ({_bytes(make(1, cfg.activation_checkpointing).peak)} "
                   f"of {_bytes(usable)}): parallel: fsdp or auto shards it (FSDP x{shards})")
        return None, mem, fit
    mem = make(chosen.gpus if chosen.parallel == "fsdp" else 1, chosen.checkpointing)
    return chosen, mem, f"{chosen.describe()} ({_bytes(mem.peak)} of {_bytes(usable)} per GPU)"


def local_gpu(device: str = "auto") -> GPU | None:
    """The GPU this machine's stages run on, as the planner sees it; None where they run on the CPU. A card of the
    table is its entry, so the run sizes stages exactly as `--dry-run --gpu <that card>` does."""
    import torch

    if device == "cpu" or not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    name = props.name.lower().replace(" ", "")
    for known in GPUS.values():
        if known.name.split("-")[0] in name and abs(props.total_memory - known.memory) < 0.1 * known.memory:
            return known
    return GPU(props.name, props.total_memory, 0.0)


def _fit_forward(mem: Memory, gpu: GPU) -> str:
    usable = USABLE * gpu.memory
    if mem.peak <= usable:
        return f"fits 1 GPU ({_bytes(mem.peak)} of {_bytes(usable)})"
    return f"does not fit 1 GPU ({_bytes(mem.peak)}): shard the model or lower batch_size"


def _at(config, shape: Shape):
    """`config` resized to `shape` for the candidate grid of a later iterative step (a copy; shape fields only)."""
    out = copy.copy(config)
    for key, value in (("num_hidden_layers", shape.layers), ("hidden_size", shape.hidden),
                       ("intermediate_size", shape.ffn), ("num_attention_heads", shape.heads),
                       ("num_key_value_heads", shape.kv_heads), ("head_dim", shape.head_dim)):
        object.__setattr__(out, key, value)
    return out


def make_plan(cfg: CompressConfig, gpu: str | GPU = "h100-80gb", mfu: float | None = None, root: str | Path = ".",
              teacher_config=None, nodes: int | None = None, gpus_per_node: int = 8) -> Plan:
    """The plan of `cfg` on `gpu` (a name of the table or a GPU; and on `nodes` nodes of `gpus_per_node` GPUs).
    `teacher_config` skips reading the teacher's config (tests)."""
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
    teacher = Model(config, shape_of(config))
    shapes = step_shapes(cfg, teacher.shape)
    targets = cfg.targets(teacher.params)
    if len(targets) == 1 and len(shapes) > 1:
        targets = [None] * (len(shapes) - 1) + targets
    for name, value in (("--nodes", nodes), ("--gpus-per-node", gpus_per_node)):
        if value is not None and value < 1:
            raise UserError(f"{name} {value} must be at least 1")
    plan = Plan(cfg.name, teacher, g, mfu, source, nodes=nodes, gpus_per_node=gpus_per_node,
                max_data_parallel=cfg.grad_accum * cfg.nproc)
    seq = cfg.seq_len
    micro = cfg.batch_size * seq

    def hours(flops: float) -> float:
        return flops / (mfu * g.bf16_flops) / 3600

    def train_stage(name: str, student: Model, teacher_m: Model | None, tokens: int, parent: Model,
                    note: str = "") -> Stage:
        chosen, mem, fit = train_parallelism(cfg, student, teacher_m, g)
        flops = train_flops(student, tokens, seq) + (forward_flops(teacher_m, tokens, seq) if teacher_m else 0)
        gpus = chosen.gpus if chosen else 0
        optimizer_steps(tokens, batch_size=cfg.batch_size, seq_len=seq, grad_accum=cfg.grad_accum,
                        world=max(gpus, cfg.nproc), budget=f"{name}: budget")
        return Stage(name, "train", parent, student, tokens, flops, mem, fit, gpus, hours(flops), note, chosen)

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
        plan.stages.append(Stage(f"2 {step}importance", "forward", parent, parent, imp_tokens, flops, mem,
                                 _fit_forward(mem, g), 1, hours(flops),
                                 f"{cfg.calib_samples} calibration sequences"
                                 + (" + layer ranking (one pass per skipped layer)" if cfg.axes != "width" else "")))
        if shape is None:
            from minitron.search import candidate_ranks, rows_for_run, sample_rows, schedule_for

            rows = rows_for_run(cfg, _at(config, parent.shape), target)
            space = len(rows)
            selection = (f"the best {min(space, cfg.search_max_candidates)} of {space} by zero-shot proxy KL"
                         if cfg.search_proxy else sample_rows(rows, cfg.search_max_candidates))
            entering = [r for r in rows if r.status == "candidate"] if not cfg.search_proxy else rows
            best = Model(config, rows[0].shape)  # shown: the first in the search's order, until the search decides
            big = Model(config, max(entering, key=lambda r: r.params).shape)  # costs are bounded by the biggest
            schedule = schedule_for(cfg, min(space, cfg.search_max_candidates),  # whole steps on every candidate's
                                    ranks=candidate_ranks(cfg, parent, [r.shape for r in entering], g))  # ranks
            st = train_stage(f"3 {step}search", big, parent, schedule.rounds[0].tokens, parent)
            proxy = space * cfg.proxy_batches * micro if cfg.search_proxy else 0
            lengths = {parent.shape.layers - r.shape.layers for r in entering if r.kind != "width"}
            sweep = sum(parent.shape.layers - k + 1 for k in lengths) * cfg.val_batches * micro
            st.tokens = schedule.total + proxy + sweep
            st.flops = sum(r.candidates * (train_flops(big, r.tokens, seq) + forward_flops(parent, r.tokens, seq))
                           for r in schedule.rounds) + forward_flops(parent, proxy + sweep, seq)
            st.gpu_hours = hours(st.flops)
            st.model_out = best
            # side by side on several nodes: round 1's candidates; later rounds hold fewer, longer trainings that
            # cost about as much in all, so a round parallelises about like the first (whole GPUs per job)
            st.jobs = schedule.rounds[0].candidates
            last = schedule.rounds[-1]
            st.note = (f"{space} candidates within {cfg.tolerance:.0%} of {format_count(target)}; round 1: "
                       f"{selection}; "
                       f"{schedule.describe()} (search_tokens = {cfg.search_tokens}; the rest rounds down to "
                       f"whole steps); the last round trains {format_count(last.tokens)} tokens per candidate "
                       f"({last.tokens // schedule.tokens_per_step} steps; P1's lightweight retraining: ~400 steps)"
                       + (f"; proxy KL on {space} shapes" if proxy else "")
                       + (f"; depth blocks: {sum(parent.shape.layers - k + 1 for k in lengths)} window positions"
                          if lengths else "") + "; shown: the first candidate in the search's order")
            plan.stages.append(st)
            student = best
        else:
            block = drop_block(cfg, parent.shape.layers) if cfg.target_shapes is None else None
            student = Model(config, shape)
            plan.stages.append(Stage(f"3 {step}prune", "skip", parent, student, None, None, None, "", 1, None,
                                     "explicit shape: no search" + (f", drop layers {cfg.drop_layers}" if block
                                                                    else "")))
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
        plan.stages.append(Stage("5 evaluation", "forward", teacher, parent, None, None, mem, _fit_forward(mem, g),
                                 1, None, f"lm-eval preset '{cfg.eval_preset}' on teacher, pruned and final "
                                          "students; tokens depend on the tasks"))
    return plan


# ----------------------------------------------------------------------------------------------------------------
# printing


def _hours(h: float | None) -> str:
    if h is None:
        return "-"
    return f"{h:,.0f}" if h >= 100 else f"{h:.3g}"


def format_plan(plan: Plan) -> str:
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
             "peak/GPU": _bytes(st.memory.peak) if st.memory else "-",
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
