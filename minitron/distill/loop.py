"""The training loop shared by distillation (student vs frozen teacher) and teacher correction (CE on the teacher).

One function, `_train`, runs on one process or under `torchrun` (DDP by default, FSDP2 `fully_shard` of the student
with `parallel="fsdp"`; the frozen bf16 teacher costs 2 bytes/parameter and stays replicated, the student costs ~16
with fp32 master weights, gradients and AdamW state, so the student is what gets sharded). An FSDP student may
arrive on the meta device: every rank then allocates only its shards and rank 0's weights reach them by broadcast
(`_materialise`); a resume reads the checkpoint on rank 0 only, the same way. `minitron.distill.worker` is the
entry point that loads the models like that and runs this loop on each rank.

Precision: student weights and optimizer state are fp32 (master weights); forward/backward run under bf16 autocast
when the compute dtype is bf16 (default on CUDA, opt-in on CPU); the teacher is cast to the compute dtype and runs
under `no_grad`. Logits are never materialised for the whole batch (see `loss.fused_kd_loss`).

Determinism: data order is a function of (seed, epoch) and the global micro-batch index, and a checkpoint holds the
model, optimizer, schedule step, data position and RNG state, so a resumed run repeats the uninterrupted one exactly
on CPU. Checkpoints hold only tensors and plain Python types and are read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from minitron.config import DistillConfig
from minitron.data import TokenData
from minitron.distill.loss import IGNORE, IntermediateLoss, KDLossConfig, fused_kd_loss
from minitron.distill.schedule import lr_at
from minitron.errors import UserError
from minitron.models import resolve_device, resolve_dtype, save_model


@dataclass
class DistillResult:
    out_dir: Path
    steps: int  # optimizer steps taken in total (including those before a resume)
    tokens: int  # training tokens consumed in total
    first_val: dict  # validation before the first step: val_kl (None for correction), val_ce
    last_val: dict  # validation after the last step
    metrics: dict = field(default_factory=dict)  # the last train-metric record
    start_step: int = 0  # the checkpoint's step a resumed run continued from (0: a fresh run)

    @property
    def first_val_kl(self):
        return self.first_val.get("val_kl")

    @property
    def last_val_kl(self):
        return self.last_val.get("val_kl")

    @property
    def val_loss_before(self) -> float:  # teacher correction reports its CE before/after
        return self.first_val["val_ce"]

    @property
    def val_loss_after(self) -> float:
        return self.last_val["val_ce"]


# ----------------------------------------------------------------------------------------------------------------
# checks before any work


def check_compatible(teacher, student, teacher_tokenizer=None, student_tokenizer=None) -> None:
    """Teacher and student must share the vocabulary (the KL compares distributions over the same token ids)."""
    from minitron.data import tokenizer_fingerprint

    vt, vs = _lm_head(teacher).shape[0], _lm_head(student).shape[0]
    if vt != vs:
        raise UserError(f"teacher and student vocabularies differ ({vt} vs {vs} tokens): the student must be "
                        "derived from the teacher (same tokenizer)")
    if teacher_tokenizer is not None and student_tokenizer is not None and (
            tokenizer_fingerprint(teacher_tokenizer) != tokenizer_fingerprint(student_tokenizer)):
        raise UserError("teacher and student tokenizers differ (same vocabulary size, different tokens): "
                        "distil into a student built from this teacher")


def _lm_head(model) -> torch.Tensor:
    head = model.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None:
        raise UserError(f"{type(model).__name__} has no bias-free lm_head: not a supported causal LM")
    return head.weight


def _plan(cfg: DistillConfig, data: TokenData, world: int) -> int:
    """Optimizer steps for the token budget; a UserError for budgets or data too small for one step."""
    steps = cfg.steps(data.seq_len, world)
    if len(data.train) < cfg.batch_size * world:
        raise UserError(f"the training split has {len(data.train)} blocks, fewer than one batch "
                        f"({cfg.batch_size * world}): lower --batch/--seq-len or use a bigger corpus")
    if len(data.val) < world:
        raise UserError("the validation split is empty: raise --val-fraction or use a bigger corpus")
    return steps


# ----------------------------------------------------------------------------------------------------------------
# the objective as one module, so DDP/FSDP see a single forward that owns every trainable parameter


class _Objective(torch.nn.Module):
    """forward(ids, teacher outputs) → (loss, kl, ce) for one micro-batch; holds the student and, for the
    intermediate-state loss, the learned projection."""

    def __init__(self, student, loss_cfg: KDLossConfig, inter: IntermediateLoss | None, inter_weight: float):
        super().__init__()
        self.student, self.inter, self.loss_cfg, self.inter_weight = student, inter, loss_cfg, inter_weight

    def forward(self, ids: torch.Tensor, t_hidden: torch.Tensor | None, t_head: torch.Tensor | None,
                t_states=None):
        out = self.student.get_decoder()(ids, use_cache=False, output_hidden_states=self.inter is not None)
        h = out.last_hidden_state
        labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], IGNORE)], dim=1)
        loss, kl, ce = fused_kd_loss(h.flatten(0, 1), _lm_head(self.student),
                                     None if t_hidden is None else t_hidden.flatten(0, 1), t_head,
                                     labels.flatten(), None, self.loss_cfg)
        if self.inter is not None and self.training:
            inter = self.inter(out.hidden_states, t_states, torch.ones_like(ids))
            # scaled each step to the logit loss's magnitude (arXiv 2407.14679), then by the configured weight
            loss = loss + self.inter_weight * (loss.detach() / inter.detach().clamp(min=1e-8)) * inter
        return loss, kl, ce


def _teacher_forward(teacher, ids: torch.Tensor, states: bool):
    with torch.no_grad():
        out = teacher.get_decoder()(ids, use_cache=False, output_hidden_states=states)
    return out.last_hidden_state, (out.hidden_states if states else None)


# ----------------------------------------------------------------------------------------------------------------
# data order


class _Batches:
    """Global micro-batch g takes rows perm_e[pos * R : (pos + 1) * R] of the epoch's permutation (R = batch x
    world, e = g // batches_per_epoch); rank r takes its slice of those R rows. The same g gives the same global
    batch for any world size, which is what lets 2 ranks match 1 rank at equal global batch."""

    def __init__(self, blocks: torch.Tensor, batch: int, rank: int, world: int, seed: int):
        self.blocks, self.batch, self.rank, self.seed = blocks, batch, rank, seed
        self.rows = batch * world
        self.per_epoch = len(blocks) // self.rows
        self._perm = (-1, None)

    def __call__(self, g: int) -> torch.Tensor:
        epoch, pos = divmod(g, self.per_epoch)
        if self._perm[0] != epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(len(self.blocks), generator=gen))
        start = pos * self.rows + self.rank * self.batch
        return self.blocks[self._perm[1][start:start + self.batch]]


# ----------------------------------------------------------------------------------------------------------------
# checkpoints


def _checkpoints(out_dir: Path) -> list[Path]:
    return sorted((out_dir / "checkpoints").glob("step-*.pt"), key=lambda p: int(p.stem.split("-")[1]))


def _state_dicts(objective, optimizer):
    """Full (unsharded) model and optimizer state dicts, keyed by parameter names, on CPU; works for plain, DDP
    and FSDP2 modules (a collective: every rank must call it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(objective, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _save_checkpoint(out_dir: Path, objective, optimizer, step: int, g: int, run_key: dict, first_val: dict,
                     keep: int, rank: int) -> None:
    model_sd, optim_sd = _state_dicts(objective, optimizer)
    if rank != 0:
        return
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    state = {"model": model_sd, "optimizer": optim_sd, "scheduler": {"step": step}, "data": {"micro_batches": g},
             "rng": rng, "run": run_key, "first_val": first_val}
    folder = out_dir / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".step-{step}.pt.tmp"
    torch.save(state, tmp)
    tmp.rename(folder / f"step-{step}.pt")  # atomic: a crash never leaves a half-written checkpoint
    for old in _checkpoints(out_dir)[:-keep]:
        old.unlink()


def _load_checkpoint(path: Path, objective, optimizer, run_key: dict, rank: int, world: int):
    """Rank 0 reads the checkpoint (memory-mapped); under torchrun the other ranks receive their part of the model
    and optimizer state through a broadcast from rank 0, so no other rank holds the whole state on its CPU."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True) if rank == 0 else {}
    head = [{k: v for k, v in state.items() if k not in ("model", "optimizer")}]
    if world > 1:
        dist.broadcast_object_list(head, src=0)
    head = head[0]
    if head["run"] != run_key:
        changed = sorted(k for k in run_key if head["run"].get(k) != run_key[k])
        raise UserError(f"checkpoint {path} was written by a run with different {', '.join(changed)}: resume with "
                        "the same settings or use a new --out")
    # one call each: set_state_dict would take a rank's empty model dict for "optimizer only" and skip the broadcast
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=world > 1)
    set_model_state_dict(objective, state.get("model", {}), options=options)
    set_optimizer_state_dict(objective, optimizer, state.get("optimizer", {}), options=options)
    torch.set_rng_state(head["rng"]["cpu"])
    if "cuda" in head["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(head["rng"]["cuda"])
    return head["scheduler"]["step"], head["data"]["micro_batches"], head["first_val"]


def _materialise(objective, weights: dict, device: torch.device, rank: int) -> None:
    """Give a trained model built on the meta device (FSDP2: every rank holds only its shard) real parameters: each
    rank allocates its shards on `device`, then rank 0's full `weights` (the others pass {}) arrive through FSDP2's
    broadcast from rank 0, one tensor at a time, cast to the shards' fp32. Non-persistent buffers (rotary
    frequencies) are no weights: each rank rebuilds them from the config. `weights` is emptied as it is used."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    student = objective.student  # fully_shard keeps the module (DDP, which wraps it, never gets a meta model)
    if rank == 0:
        missing = _missing_weights(student, weights)
        if missing:
            raise UserError(f"the weights lack {len(missing)} tensors of the model (e.g. {missing[0]}): not a "
                            "checkpoint of this architecture; use parallel: ddp to load it through transformers")
    objective.to_empty(device=device)
    for module in student.modules():
        if module._non_persistent_buffers_set:
            fresh = type(module)(module.config)  # rotary embeddings: their buffers are a function of the config
            for name in module._non_persistent_buffers_set:
                getattr(module, name).copy_(getattr(fresh, name))
    set_model_state_dict(objective, {f"student.{k}": v for k, v in weights.items()},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=dist.is_initialized(),
                                                  strict=False))
    weights.clear()


def _missing_weights(model, weights: dict) -> list[str]:
    """State-dict keys of `model` absent from `weights`, less tied parameters whose twin is present (lm_head)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    names_of: dict[int, set[str]] = {}
    for name, p in params.items():
        names_of.setdefault(id(p), set()).add(name)
    return [k for k in model.state_dict() if k not in weights and not (
        k in params and names_of[id(params[k])] & weights.keys())]


# ----------------------------------------------------------------------------------------------------------------
# distributed setup


def setup_distributed(device_spec: str) -> tuple[int, int, torch.device, bool]:
    """(rank, world, device, joined). Under torchrun, joins the process group (NCCL on CUDA, gloo on CPU) unless
    the caller already did; `joined` says whether we did, and so must leave it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_spec)
    if world == 1:
        return 0, 1, device, False
    if device.type == "cuda":  # torchrun: the rank's local index; an explicit cuda:N (Ray Train's choice) stays
        device = device if device.index is not None else torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    joined = not dist.is_initialized()
    if joined:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device, joined


def _all_sum(values: list[float], device: torch.device, world: int) -> list[float]:
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _wrap(objective: _Objective, cfg: DistillConfig, device: torch.device, world: int):
    if world == 1:
        return objective
    if cfg.parallel == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        # one group per decoder block, the rest (embeddings, final norm, lm_head) in the root group; fully_shard
        # moves each rank's shard to the mesh device, so the full student never has to fit on one GPU
        mesh = init_device_mesh(device.type, (world,))
        for layer in objective.student.get_decoder().layers:
            fully_shard(layer, mesh=mesh)
        return fully_shard(objective, mesh=mesh)
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None)


# ----------------------------------------------------------------------------------------------------------------
# the loop


def _train(student, teacher, data: TokenData, cfg: DistillConfig, loss_cfg: KDLossConfig, *, out_dir, tokenizer,
           callback: Callable[[dict], None] | None, resume: bool, init_weights: dict | None,
           on_checkpoint: Callable[[Path], None] | None = None) -> DistillResult:
    out_dir = Path(out_dir)
    rank, world, device, joined = setup_distributed(cfg.device)
    try:
        return _run(student, teacher, data, cfg, loss_cfg, out_dir, tokenizer, callback, resume, rank, world, device,
                    init_weights, on_checkpoint)
    finally:
        if joined:
            dist.destroy_process_group()


def _run(student, teacher, data, cfg, loss_cfg, out_dir, tokenizer, callback, resume, rank, world, device,
         init_weights, on_checkpoint=None):
    """The loop itself, on this rank (`_train` joins and leaves the process group around it)."""
    if teacher is not None:
        check_compatible(teacher, student)
    total_steps = _plan(cfg, data, world)
    compute_dtype = resolve_dtype(cfg.dtype, device)
    autocast = torch.autocast(device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32)
    tokens_per_step = cfg.batch_size * data.seq_len * cfg.grad_accum * world
    run_key = {"tokens_per_step": tokens_per_step, "total_steps": total_steps, "seed": cfg.seed, "world": world,
               "lr": cfg.lr, "objective": "kd" if teacher is not None else "ce"}

    torch.manual_seed(cfg.seed)
    sharded = world > 1 and cfg.parallel == "fsdp"
    student.to(dtype=torch.float32, device=None if sharded else device).train()
    if cfg.activation_checkpointing:  # keep only each layer's input; recompute the layer in backward
        kwargs = {"use_reentrant": False}
        if hasattr(student, "activation_checkpointing_enable"):  # transformers 5.23 renamed the switch
            student.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:  # the name older releases (5.17, the GPU image) know
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    inter = None
    if teacher is not None:
        teacher.to(device=device, dtype=compute_dtype).eval().requires_grad_(False)
        if cfg.intermediate_weight > 0:
            sc, tc = student.config, teacher.config
            inter = IntermediateLoss(sc.num_hidden_layers, tc.num_hidden_layers, sc.hidden_size, tc.hidden_size)
            inter.to(device)
    if cfg.compile:
        for model in (student, teacher) if teacher is not None else (student,):
            for layer in model.get_decoder().layers:
                layer.compile()
    objective = _wrap(_Objective(student, loss_cfg, inter, cfg.intermediate_weight), cfg, device, world)
    if init_weights is not None:
        _materialise(objective, init_weights, device, rank)
    t_head = _lm_head(teacher) if teacher is not None else None

    params = [p for p in objective.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    # betas as in the Minitron papers; the fused CUDA kernel updates all parameters in one launch
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    warmup = round(cfg.warmup_frac * total_steps)

    start_step, g, first_val = 0, 0, None
    found = _checkpoints(out_dir)[-1:] if resume else []
    if world > 1:  # rank 0's folder decides: under Ray Train the other ranks may run on nodes that do not hold it
        names = [[p.name for p in found]]
        dist.broadcast_object_list(names, src=0)
        found = [out_dir / "checkpoints" / name for name in names[0]]
    if found:
        start_step, g, first_val = _load_checkpoint(found[-1], objective, optimizer, run_key, rank, world)
    train_batches = _Batches(data.train, cfg.batch_size, rank, world, cfg.seed)
    val_rows = min(cfg.val_batches * cfg.batch_size * world, len(data.val)) // world * world
    val_blocks = data.val[:val_rows][rank::world]

    def validate() -> dict:
        objective.eval()
        sums = [0.0, 0.0, 0.0, 0.0]  # kl * tokens, kl tokens, ce * tokens, ce tokens
        with torch.no_grad(), autocast:
            for a in range(0, len(val_blocks), cfg.batch_size):
                ids = val_blocks[a:a + cfg.batch_size].to(device)
                t_hidden = _teacher_forward(teacher, ids, False)[0] if teacher is not None else None
                _, kl, ce = objective(ids, t_hidden, t_head)
                n_kd, n_ce = ids.numel(), ids.shape[0] * (ids.shape[1] - 1)
                sums = [s + v for s, v in zip(sums, (kl.item() * n_kd, n_kd, ce.item() * n_ce, n_ce), strict=True)]
        objective.train()
        kl_sum, n_kd, ce_sum, n_ce = _all_sum(sums, device, world)
        return {"val_kl": kl_sum / n_kd if teacher is not None else None, "val_ce": ce_sum / n_ce}

    metrics_path = out_dir / "metrics.jsonl"
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        # a fresh run starts a fresh log; a resumed one drops records written after its checkpoint
        kept = [] if not found or not metrics_path.exists() else [
            line for line in metrics_path.read_text().splitlines() if json.loads(line)["step"] <= start_step]
        metrics_path.write_text("".join(line + "\n" for line in kept))

    # a monotonic clock; validation and checkpoints are not training time
    clock = {"start": time.perf_counter(), "paused": 0.0}

    def tokens_per_s(step: int) -> float:
        elapsed = time.perf_counter() - clock["start"] - clock["paused"]
        return (step - start_step) * tokens_per_step / elapsed if step > start_step else 0.0

    def emit(record: dict, validation: bool) -> None:
        if rank != 0:
            return
        if validation:
            with metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if callback is not None:
            callback(record)

    def val_record(step: int) -> dict:
        t0 = time.perf_counter()
        rate = tokens_per_s(step)  # before validating: validation is not training time
        rec = {"step": step, "tokens": step * tokens_per_step, **validate(),
               "lr": lr_at(max(step - 1, 0), total_steps, warmup, cfg.lr, cfg.min_lr), "tokens_per_s": rate}
        emit(rec, True)
        clock["paused"] += time.perf_counter() - t0
        return rec

    if first_val is None:
        first_val = val_record(0)
    last_val, last_train = first_val, {}

    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=start_step, unit="step", mininterval=1.0, dynamic_ncols=True,
               disable=not (cfg.progress and rank == 0))
    loss_acc, since_log = torch.zeros((), device=device), 0
    clock.update(start=time.perf_counter(), paused=0.0)  # the first validation ran before the clock started
    for step in range(start_step, total_steps):
        lr = lr_at(step, total_steps, warmup, cfg.lr, cfg.min_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for micro in range(cfg.grad_accum):
            ids = train_batches(g).to(device, non_blocking=True)
            g += 1
            t_hidden, t_states = (_teacher_forward(teacher, ids, inter is not None) if teacher is not None
                                  else (None, None))
            # DDP all-reduces gradients only on the last micro-batch of a step
            sync = micro == cfg.grad_accum - 1 or world == 1 or cfg.parallel == "fsdp"
            with objective.no_sync() if not sync else nullcontext(), autocast:
                loss, _, _ = objective(ids, t_hidden, t_head, t_states)
                (loss / cfg.grad_accum).backward()
            loss_acc += loss.detach() / cfg.grad_accum
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        since_log += 1
        done = step + 1
        if done % cfg.log_every == 0 or done == total_steps:
            loss_val = _all_sum([loss_acc.item() / since_log], device, world)[0] / world
            last_train = {"step": done, "tokens": done * tokens_per_step, "loss": loss_val, "lr": lr,
                          "tokens_per_s": tokens_per_s(done)}
            emit(last_train, False)
            bar.set_postfix(loss=f"{loss_val:.4f}", tok_s=f"{last_train['tokens_per_s']:,.0f}", refresh=False)
            loss_acc.zero_()
            since_log = 0
        bar.update(1)
        if done % cfg.eval_every == 0 or done == total_steps:
            last_val = val_record(done)
        # the last step is checkpointed too: a run that trained to the end but could not publish resumes as finished
        if done % cfg.checkpoint_every == 0 or done == total_steps:
            t0 = time.perf_counter()
            _save_checkpoint(out_dir, objective, optimizer, done, g, run_key, first_val, cfg.keep_checkpoints, rank)
            if on_checkpoint is not None:  # every rank, once rank 0's file is complete (Ray Train reports it)
                on_checkpoint(out_dir / "checkpoints" / f"step-{done}.pt")
            clock["paused"] += time.perf_counter() - t0
    bar.close()

    if start_step == total_steps and found:  # resumed a finished run: nothing trained, report the stored start
        last_val = val_record(total_steps)
    _save_final(out_dir, objective, student, tokenizer, cfg, rank, world)
    return DistillResult(out_dir=out_dir, steps=total_steps, tokens=total_steps * tokens_per_step,
                         first_val=first_val, last_val=last_val, metrics=last_train, start_step=start_step)


def _save_final(out_dir: Path, objective, student, tokenizer, cfg: DistillConfig, rank: int, world: int):
    """The trained model as a plain Hugging Face folder (safetensors + tokenizer) and the run's settings."""
    if world > 1 and cfg.parallel == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        model_sd = get_model_state_dict(objective, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            prefix = "student."
            student.save_pretrained(out_dir, state_dict={k[len(prefix):]: v for k, v in model_sd.items()
                                                         if k.startswith(prefix)}, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(out_dir)
    elif rank == 0:
        save_model(student, tokenizer, out_dir)
    if rank == 0:
        (out_dir / "distill_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    if world > 1:
        dist.barrier()


# ----------------------------------------------------------------------------------------------------------------
# public entry points


def distill(teacher, student, data: TokenData, cfg: DistillConfig, *, out_dir, tokenizer=None,
            callback: Callable[[dict], None] | None = None, resume: bool = False,
            init_weights: dict | None = None, on_checkpoint: Callable[[Path], None] | None = None) -> DistillResult:
    """Distil `teacher` into `student` (both *ForCausalLM; moved to the run's device, the student trained in
    place) for `cfg.tokens` tokens of `data.train`. Writes the student (with `tokenizer`), `checkpoints/` and
    `metrics.jsonl` to `out_dir`; `callback` receives train and validation metric dicts (rank 0 only). A student
    built on the meta device (FSDP under torchrun) gets its weights from `init_weights`: the full state dict on rank
    0, {} on the others (see `_materialise`). `on_checkpoint(path)` runs on every rank after each checkpoint."""
    loss_cfg = KDLossConfig(temperature=cfg.kd_temperature, top_k=cfg.kd_top_k, kd_weight=1.0,
                            ce_weight=cfg.ce_weight, chunk_tokens=cfg.chunk_tokens)
    return _train(student, teacher, data, cfg, loss_cfg, out_dir=out_dir, tokenizer=tokenizer, callback=callback,
                  resume=resume, init_weights=init_weights, on_checkpoint=on_checkpoint)


def correct_teacher(teacher, data: TokenData, cfg: DistillConfig, *, out_dir, tokenizer=None,
                    callback: Callable[[dict], None] | None = None, resume: bool = False,
                    init_weights: dict | None = None,
                    on_checkpoint: Callable[[Path], None] | None = None) -> DistillResult:
    """Teacher correction (arXiv 2408.11796): the same loop with next-token CE on the teacher itself. The
    result's `val_loss_before` / `val_loss_after` are the teacher's validation CE before and after."""
    loss_cfg = KDLossConfig(kd_weight=0.0, ce_weight=1.0, chunk_tokens=cfg.chunk_tokens)
    return _train(teacher, None, data, cfg, loss_cfg, out_dir=out_dir, tokenizer=tokenizer, callback=callback,
                  resume=resume, init_weights=init_weights, on_checkpoint=on_checkpoint)
