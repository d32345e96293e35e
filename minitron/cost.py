"""What a training or forward-only stage costs on a GPU: memory, FLOPs, and the parallelism that makes it fit.

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

import glob
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from minitron.archmath import Shape, count_shape
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
REFERENCE_GPU = "h100-80gb"  # stages are sized for it where no GPU of the table is visible (the dry run's default)
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


@dataclass(frozen=True)
class ShapeCost:
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


def layer_activation_bytes(m: ShapeCost, autocast: bool) -> int:
    """Bytes one decoder layer saves for backward, per token (see the module doc)."""
    s = m.shape
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    mlp_tensors = 4 if m.gated else 2  # gated: gate, up, act(gate), act*up; plain: up, act(up)
    if autocast:
        n_in = 2 if m.gated else 1
        return 16 * s.hidden + 2 * s.hidden * (3 + n_in) + 4 * q + 4 * kv + 4 * s.heads + 2 * s.ffn * mlp_tensors
    return 24 * s.hidden + 8 * q + 8 * kv + 4 * s.heads + 4 * s.ffn * mlp_tensors


def forward_working_bytes(m: ShapeCost, elem: int) -> int:
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
        return ", ".join(f"{k} {fmt_bytes(v)}" for k, v in self.parts.items() if v)


def fmt_bytes(n: float) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def training_memory(student: ShapeCost, teacher: ShapeCost | None, tokens: int, *, grad_accum: int = 1,
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


def forward_memory(m: ShapeCost, tokens: int, *, logits: bool) -> Memory:
    """Peak bytes of a bf16 forward without gradients over `tokens` tokens (importance scoring, evaluation)."""
    parts = {"weights": 2 * m.params, "working-set": tokens * forward_working_bytes(m, 2),
             "logits": tokens * m.vocab * (2 + 4 + 4) if logits else 0}  # bf16 logits, fp32 log-softmax, grad-free
    return Memory(parts, sum(parts.values()))


def train_flops(m: ShapeCost, tokens: int, seq_len: int) -> float:
    s = m.shape
    return tokens * (6 * m.matmul_params + 12 * s.layers * s.heads * s.head_dim * seq_len)


def forward_flops(m: ShapeCost, tokens: int, seq_len: int) -> float:
    s = m.shape
    return tokens * (2 * m.matmul_params + 4 * s.layers * s.heads * s.head_dim * seq_len)


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
            return mem, shards, f"{verdict} ({fmt_bytes(mem.peak)} of {fmt_bytes(usable)})"
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


def train_parallelism(cfg, student: ShapeCost, teacher: ShapeCost | None, gpu: GPU | None
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
            fit = (f"does not fit one GPU under parallel: ddp ({fmt_bytes(make(1, cfg.activation_checkpointing).peak)} "
                   f"of {fmt_bytes(usable)}): parallel: fsdp or auto shards it (FSDP x{shards})")
        return None, mem, fit
    mem = make(chosen.gpus if chosen.parallel == "fsdp" else 1, chosen.checkpointing)
    return chosen, mem, f"{chosen.describe()} ({fmt_bytes(mem.peak)} of {fmt_bytes(usable)} per GPU)"


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
