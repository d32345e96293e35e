"""`minitron search MODEL --scores S --data D --target-params 70M --tokens-per-candidate N --out DIR`: enumerate the
pruned shapes within the budget, rank them all by proxy KL, short-distil the top k, keep the winner.

DIR receives `candidates.json` (rewritten after every candidate), one folder per distilled candidate (its model,
metrics.jsonl), `winner/` (the winner as a model folder) and `pareto.png`. Several comma-separated targets run an
iterative schedule (each winner is re-scored and becomes the next teacher) under DIR/step<i>-<target>/.
"""

from __future__ import annotations

from minitron.commands.common import add_data_args, add_model_args, load_data_from_args, print_table


def register(sub) -> None:
    p = sub.add_parser("search", help="architecture search: proxy-rank pruned shapes, short-distil the best, "
                                      "keep the winner",
                       description="Enumerate pruned shapes within a parameter budget (width, depth, mixed, "
                                   "contiguous depth blocks), rank all by the validation KL of the pruned model, give "
                                   "the top k the same short distillation and keep the lowest KL.")
    p.add_argument("model", help="teacher: model folder, .gguf, hub id or alias")
    p.add_argument("--scores", required=True, help="importance scores of MODEL (from `minitron importance`)")
    add_data_args(p)
    p.add_argument("--target-params", required=True,
                   help="student size: 70M, 55%% of the teacher, or a shrinking comma list (8B,4B) for iterative "
                        "pruning")
    p.add_argument("--tolerance", type=float, default=0.05, help="relative tolerance around the target")
    p.add_argument("--axes", default="all", choices=["all", "width", "depth"], help="which shapes to consider")
    p.add_argument("--prune-kv-groups", action="store_true", help="also allow fewer KV groups")
    p.add_argument("--layer-metric", default="loss", choices=["loss", "bi"],
                   help="layer ranking for depth pruning: LM-loss increase when skipped, or Block Influence")
    p.add_argument("--max-candidates", type=int, default=24,
                   help="proxy-score at most this many shapes, spread over kinds and sizes")
    p.add_argument("--memory-cap-gib", type=float, default=None,
                   help="only shapes whose bf16 weights + KV cache of one --seq-len sequence fit in this many GiB")
    p.add_argument("--proxy-batches", type=int, default=2, help="validation batches for the proxy KL")
    p.add_argument("--top-k", type=int, default=4, help="candidates that get the short distillation")
    p.add_argument("--tokens-per-candidate", required=True, help="short-distillation budget in tokens, e.g. 400K")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step (proxy and distillation)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate of the short distillation")
    p.add_argument("--eval-every", type=int, default=25, help="steps between validations (loss-curve points)")
    p.add_argument("--val-batches", type=int, default=2, help="validation batches per evaluation")
    p.add_argument("--calib-samples", type=int, default=128,
                   help="iterative schedules: calibration sequences to re-score each winner")
    p.add_argument("--out", required=True, help="output folder (must not hold a previous search)")
    add_model_args(p)
    p.set_defaults(func=run)


def _targets(spec: str, teacher_params: int) -> list[int]:
    from minitron.config import parse_count
    from minitron.errors import UserError

    out = []
    for part in spec.split(","):
        part = part.strip()
        if part.endswith("%"):
            out.append(int(teacher_params * float(part[:-1]) / 100))
        else:
            out.append(parse_count(part))
    if out[0] >= teacher_params or out != sorted(out, reverse=True):
        raise UserError(f"--target-params {spec}: targets must be below the teacher's {teacher_params:,} "
                        "parameters and shrink step by step")
    return out


def run(args) -> int:
    import time
    from functools import partial
    from pathlib import Path

    from minitron.archmath import count_params
    from minitron.config import format_count, parse_count
    from minitron.errors import UserError
    from minitron.importance import ImportanceScores
    from minitron.models import load_config, resolve_device, resolve_dtype
    from minitron.search import enumerate_rows, prune_candidate

    # --- every check before the teacher is loaded --------------------------------------------------------------
    for flag in ("top_k", "seq_len", "batch_size", "proxy_batches", "eval_every", "val_batches", "calib_samples",
                 "max_candidates"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1")
    out = Path(args.out)
    if (out / "candidates.json").exists() or (out / "winner").exists():
        raise UserError(f"'{out}' already holds a search: choose a new --out (finished work is never overwritten)")
    tokens = parse_count(args.tokens_per_candidate)
    if tokens < args.batch_size * args.seq_len:
        raise UserError(f"--tokens-per-candidate {tokens:,} is less than one step ({args.batch_size} x "
                        f"{args.seq_len} tokens): raise it or lower --batch-size/--seq-len")
    config = load_config(args.model, trust_remote_code=args.trust_remote_code)
    targets = _targets(args.target_params, count_params(config))
    cap = int(args.memory_cap_gib * 2**30) if args.memory_cap_gib else None
    enumerate_rows(config, targets[0], args.tolerance, axes=args.axes, prune_kv_groups=args.prune_kv_groups,
                   max_memory_bytes=cap, context=args.seq_len)
    if not Path(args.scores).is_file():
        raise UserError(f"scores file '{args.scores}' does not exist: run `minitron importance` first")
    scores = ImportanceScores.load(args.scores)
    scores.check_matches(config)
    if args.layer_metric == "loss" and scores.layer_loss is None:
        raise UserError("the scores have no layer-loss ranking: pass --layer-metric bi or re-score with "
                        "validation blocks")

    # --- the search ----------------------------------------------------------------------------------------------
    from minitron.distill import DistillConfig
    from minitron.models import load_model, save_model
    from minitron.plots import plot_pareto
    from minitron.search import ShortDistill, search, search_iterative

    # the teacher in the compute dtype: distillation runs it there, so every candidate is pruned from these weights
    device = resolve_device(args.device)
    teacher, tokenizer = load_model(args.model, dtype=resolve_dtype(args.dtype, device), device=device,
                                    allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code)
    data = load_data_from_args(args, tokenizer, args.seq_len)
    distill_cfg = DistillConfig(tokens=tokens, batch_size=args.batch_size, lr=args.lr, min_lr=args.lr / 10,
                                eval_every=args.eval_every, val_batches=args.val_batches, seed=args.seed,
                                device=args.device, dtype=args.dtype, progress=False)
    common = dict(tolerance=args.tolerance, top_k=args.top_k, tokens_per_candidate=tokens, axes=args.axes,
                  prune_kv_groups=args.prune_kv_groups, proxy_batches=args.proxy_batches,
                  batch_size=args.batch_size, max_candidates=args.max_candidates, max_memory_bytes=cap,
                  seed=args.seed,
                  make_candidate=partial(prune_candidate, layer_metric=args.layer_metric),
                  short_distill=ShortDistill(distill_cfg, tokenizer), on_candidate=_print_event)
    start = time.perf_counter()
    if len(targets) == 1:
        results = [search(teacher, scores, data, target_params=targets[0], out_dir=out, **common)]
        dirs = [out]
    else:
        from minitron.importance import compute_importance

        def rescore(model):
            calib = data.calibration(args.calib_samples, seed=args.seed)
            val = data.val[:16] if args.layer_metric == "loss" else None
            return compute_importance(model, calib, batch_size=args.batch_size, val_blocks=val)

        results = search_iterative(teacher, scores, data, targets=targets, score=rescore, out_dir=out, **common)
        dirs = [out / f"step{i}-{t}" for i, t in enumerate(targets, 1)]
    seconds = time.perf_counter() - start

    # --- results -------------------------------------------------------------------------------------------------
    for result, folder in zip(results, dirs, strict=False):
        print(f"\ntarget {format_count(result.target_params)} -> {folder}")
        print_table([_table_row(r) for r in result.table if r.status != "proxied" or r.proxy_rank <= 10],
                    ["name", "kind", "params", "proxy_kl", "proxy_rank", "final_kl", "final_rank", "status"])
        plot_pareto(result.table, folder / "pareto.png", result.winner.index if result.winner else None,
                    title=f"search for {format_count(result.target_params)} parameters")
        if result.winner is None:
            raise UserError(f"every candidate failed (errors in {folder / 'candidates.json'})")
        save_model(result.model, tokenizer, folder / "winner")
        tau = "n/a" if result.kendall_tau is None else f"{result.kendall_tau:+.3f}"
        print(f"winner {result.winner.name} ({result.winner.params:,} params, val KL {result.winner.final_kl:.4f})"
              f" -> {folder / 'winner'}; Kendall tau(proxy, final) = {tau}")
    print(f"search took {seconds:.0f} s")
    return 0


def _fmt(x) -> str:
    return "" if x is None else f"{x:.4f}"


def _table_row(r) -> dict:
    return {"name": r.name, "kind": r.kind, "params": f"{r.params:,}", "proxy_kl": _fmt(r.proxy_kl),
            "proxy_rank": r.proxy_rank or "", "final_kl": _fmt(r.final_kl), "final_rank": r.final_rank or "",
            "status": r.status if r.status != "failed" else f"failed: {r.error[:60]}"}


def _print_event(e: dict) -> None:
    """One line per finished step of a candidate, so a long CPU search shows it is alive."""
    if e["event"] == "proxy":
        print(f"proxy  {e['name']:<40} {e['params']:>13,}  KL {e['proxy_kl']:.4f}", flush=True)
    elif e["event"] == "progress" and e["metrics_point"].get("val_kl") is not None:
        m = e["metrics_point"]
        print(f"  distil {e['name']} step {m['step']} val KL {m['val_kl']:.4f}", flush=True)
    elif e["event"] == "distilled":
        print(f"distilled {e['name']}: val KL {e['proxy_kl']:.4f} (proxy) -> {e['final_kl']:.4f}", flush=True)
    elif e["event"] == "failed":
        print(f"FAILED {e['name']}: {e['error']}", flush=True)
