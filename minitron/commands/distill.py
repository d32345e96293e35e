"""`minitron distill --teacher MODEL --student DIR --data DATA --tokens N --out OUT`: knowledge distillation."""

from __future__ import annotations

import argparse

from minitron.commands.common import add_data_args, add_model_args, load_data_from_args


def add_train_args(p: argparse.ArgumentParser) -> None:
    """Budget, optimisation and runtime flags shared by `distill` and `correct-teacher` (DistillConfig fields)."""
    p.add_argument("--tokens", required=True, help="training budget in tokens, e.g. 200K, 10M")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence")
    p.add_argument("--batch", type=int, default=8, help="sequences per micro-batch per process")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate")
    p.add_argument("--min-lr", type=float, default=1e-5, help="final learning rate of the cosine decay")
    p.add_argument("--warmup-frac", type=float, default=0.02, help="fraction of steps in linear warmup")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay")
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient-norm clipping")
    p.add_argument("--eval-every", type=int, default=50, help="validate every N optimizer steps")
    p.add_argument("--val-batches", type=int, default=4, help="validation batches per evaluation")
    p.add_argument("--checkpoint-every", type=int, default=200, help="resumable checkpoint every N steps")
    p.add_argument("--compile", action="store_true", help="torch.compile the decoder blocks (GPU)")
    p.add_argument("--nproc", type=int, default=1, help="processes (GPUs): >1 re-launches under torchrun")
    p.add_argument("--parallel", default="ddp", choices=["ddp", "fsdp"],
                   help="with --nproc > 1: replicate (ddp) or shard (fsdp) the trained model")
    p.add_argument("--out", required=True, help="output folder: model, checkpoints/, metrics.jsonl")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_args(p)
    add_data_args(p)


def register(sub) -> None:
    p = sub.add_parser("distill", help="distil a teacher into a student (logit KL)",
                       description="Train a student against a frozen teacher with forward KL on the logits "
                                   "(optional top-k, CE and intermediate-state terms). Writes the student, "
                                   "checkpoints/ and metrics.jsonl to --out.")
    p.add_argument("--teacher", required=True, help="teacher: folder, .gguf, hub id or alias")
    p.add_argument("--student", required=True, help="student model folder (e.g. a pruned teacher)")
    p.add_argument("--temperature", type=float, default=1.0, help="KL softmax temperature (papers: 1)")
    p.add_argument("--top-k", type=int, default=None, help="KL over the teacher's top-k logits only")
    p.add_argument("--ce-weight", type=float, default=0.0, help="weight of the next-token CE term")
    p.add_argument("--intermediate-weight", type=float, default=0.0,
                   help="weight of the intermediate-state loss (heavy depth pruning; 0 = off)")
    add_train_args(p)
    p.set_defaults(func=run, _parser=p)


def distill_config(args, **extra):
    from minitron.config import parse_count
    from minitron.distill import DistillConfig

    return DistillConfig(
        tokens=parse_count(args.tokens), batch_size=args.batch, grad_accum=args.grad_accum, lr=args.lr,
        min_lr=args.min_lr, warmup_frac=args.warmup_frac, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
        eval_every=args.eval_every, val_batches=args.val_batches, checkpoint_every=args.checkpoint_every,
        seed=args.seed, compile=args.compile, device=args.device, dtype=args.dtype, parallel=args.parallel,
        progress=not args.no_progress, **extra)


def check_budget(cfg, seq_len: int, nproc: int) -> None:
    """The cheap checks, before any model is loaded."""
    from minitron.errors import UserError

    per_step = cfg.batch_size * seq_len * cfg.grad_accum * nproc
    if cfg.tokens < per_step:
        raise UserError(f"token budget {cfg.tokens:,} is smaller than one optimizer step ({cfg.batch_size} x "
                        f"{seq_len} tokens x {cfg.grad_accum} accum x {nproc} processes = {per_step:,}): raise "
                        "--tokens or lower --batch/--seq-len")


def run(args) -> int:
    from minitron.distill.launch import argv_of, run_under_torchrun, under_torchrun

    if args.nproc > 1 and not under_torchrun():
        check_budget(distill_config(args), args.seq_len, args.nproc)
        return run_under_torchrun("distill", argv_of(args._parser, args), args.nproc)

    from minitron.distill import check_compatible, distill
    from minitron.models import load_model

    cfg = distill_config(args, kd_temperature=args.temperature, kd_top_k=args.top_k, ce_weight=args.ce_weight,
                         intermediate_weight=args.intermediate_weight)
    check_budget(cfg, args.seq_len, args.nproc)
    # both load on the CPU in fp32; the loop moves them to this process's device and the teacher to bf16 there
    student, s_tok = load_model(args.student, dtype="fp32", device="cpu", allow_pickle=args.allow_pickle,
                                trust_remote_code=args.trust_remote_code)
    teacher, t_tok = load_model(args.teacher, dtype="fp32", device="cpu", allow_pickle=args.allow_pickle,
                                trust_remote_code=args.trust_remote_code)
    check_compatible(teacher, student, t_tok, s_tok)
    data = load_data_from_args(args, t_tok, args.seq_len)
    result = distill(teacher, student, data, cfg, out_dir=args.out, tokenizer=s_tok, resume=args.resume)
    report(result, args.out)
    return 0


def report(result, out: str) -> None:
    """One summary line, from rank 0 only."""
    import os

    if os.environ.get("RANK", "0") != "0":
        return
    kl = f"val_kl {result.first_val_kl:.4f} -> {result.last_val_kl:.4f}, " if result.first_val_kl is not None else ""
    print(f"{kl}val_ce {result.val_loss_before:.4f} -> {result.val_loss_after:.4f}, {result.steps} steps, "
          f"{result.tokens:,} tokens, {result.metrics.get('tokens_per_s', 0):,.0f} tokens/s -> {out}")
