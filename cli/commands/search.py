"""`minitron search MODEL --scores S --data D --target-params 70M --budget-tokens 2M --out DIR`: successive halving
over the pruned shapes within the budget (minitron/search.py): round 1 distils every candidate briefly, each round
keeps the best 1/eta and trains them eta times longer, the best of the last round wins.

DIR receives `candidates.json` (rewritten after every candidate: rounds, scores, curves, failures, the schedule),
one folder per candidate and round (metrics.jsonl), `winner/` (the winner as a model folder), `halving.png`,
`pareto.png` and, for depth or mixed shapes, `depth_blocks.png`. One target per call: iterative pruning (8B,4B)
needs each step's winner fully distilled before it teaches the next, which is what `minitron run` does.
"""

from __future__ import annotations

from cli.commands.common import (
    add_config_args,
    add_data_args,
    add_model_args,
    add_space_args,
    load_data_from_args,
    print_table,
    space_from_args,
)


def register(sub) -> None:
    p = sub.add_parser("search", help="architecture search: successive halving over the pruned shapes, keep the "
                                      "winner",
                       description="Enumerate the pruned shapes within a parameter budget (width, depth with data-"
                                   "chosen blocks, mixed), distil every candidate briefly, keep the best 1/eta and "
                                   "train them eta times longer, round after round, within one token budget.")
    p.add_argument("model", help="teacher: model folder, .gguf, hub id or alias")
    p.add_argument("--scores", required=True, help="importance scores of MODEL (from `minitron importance`)")
    add_data_args(p)
    p.add_argument("--target-params", required=True, help="student size: 70M, or 55%% of the teacher")
    add_space_args(p)
    p.add_argument("--memory-cap-gib", type=float, default=None,
                   help="only shapes whose bf16 weights + KV cache of one --seq-len sequence fit in this many GiB")
    p.add_argument("--budget-tokens", required=True,
                   help="token budget of the whole search (every round and candidate), e.g. 2M")
    # the search's own fields of the run config (--search-eta ...), under their shorter older spellings too
    add_config_args(p, "search_max_candidates", "search_eta", "search_metric", "search_proxy",
                    aliases={"search_max_candidates": "--max-candidates", "search_eta": "--eta",
                             "search_metric": "--metric", "search_proxy": "--proxy"})
    p.add_argument("--cloze-items", type=int, default=200, help="cloze items for --depth-block-metric cloze")
    # the candidates' short distillations and scoring: the run config's fields, names and defaults
    add_config_args(p, "proxy_batches", "depth_block_metric", "seq_len", "batch_size", "lr", "min_lr", "eval_every",
                    "val_batches")
    p.add_argument("--out", required=True, help="output folder (must not hold a previous search)")
    add_model_args(p)
    p.set_defaults(func=run)


def _target(spec: str, teacher_params: int) -> int:
    from minitron.config import parse_count
    from minitron.errors import UserError

    if "," in spec:
        raise UserError(f"--target-params {spec}: one target per search. Iterative pruning distils each step's "
                        "winner fully before it teaches the next step: run `minitron run --config <preset> --set "
                        f"target_params={spec}` (the flow), or search each step by hand on a distilled student")
    target = int(teacher_params * float(spec[:-1]) / 100) if spec.strip().endswith("%") else parse_count(spec)
    if target >= teacher_params:
        raise UserError(f"--target-params {spec}: the target must be below the teacher's {teacher_params:,} "
                        "parameters")
    return target


def run(args) -> int:
    import time
    from pathlib import Path

    from minitron.archmath import count_params
    from minitron.config import format_count, parse_count
    from minitron.errors import UserError
    from minitron.importance import ImportanceScores
    from minitron.models import load_config, resolve_device, resolve_dtype
    from minitron.search import enumerate_rows, halving_schedule

    # --- every check before the teacher is loaded --------------------------------------------------------------
    for flag in ("seq_len", "batch_size", "proxy_batches", "eval_every", "val_batches", "search_max_candidates",
                 "cloze_items"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1")
    out = Path(args.out)
    if (out / "candidates.json").exists() or (out / "winner").exists():
        raise UserError(f"'{out}' already holds a search: choose a new --out (finished work is never overwritten)")
    budget = parse_count(args.budget_tokens)
    config = load_config(args.model, trust_remote_code=args.trust_remote_code)
    target = _target(args.target_params, count_params(config))
    cap = int(args.memory_cap_gib * 2**30) if args.memory_cap_gib else None
    rows = enumerate_rows(config, target, args.tolerance, axes=args.axes, space=space_from_args(args),
                          max_memory_bytes=cap, context=args.seq_len)
    schedule = halving_schedule(min(len(rows), args.search_max_candidates), budget, args.batch_size * args.seq_len,
                                args.search_eta)
    print(f"{len(rows)} shapes within {args.tolerance:.0%} of {format_count(target)}; {schedule.describe()}")
    if not Path(args.scores).is_file():
        raise UserError(f"scores file '{args.scores}' does not exist: run `minitron importance` first")
    scores = ImportanceScores.load(args.scores)
    scores.check_matches(config)

    # --- the search ----------------------------------------------------------------------------------------------
    from minitron import plots
    from minitron.distill import DistillConfig
    from minitron.models import load_model, save_model
    from minitron.search import BlockCloze, ShortDistill, cloze_items, search

    # the teacher in the compute dtype: distillation runs it there, so every candidate is pruned from these weights
    device = resolve_device(args.device)
    teacher, tokenizer = load_model(args.model, dtype=resolve_dtype(args.dtype, device), device=device,
                                    allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code)
    data = load_data_from_args(args, tokenizer, args.seq_len)
    block_score = None
    if args.depth_block_metric == "cloze":
        from minitron.eval_data import EvalDataConfig

        block_score = BlockCloze(cloze_items(EvalDataConfig(
            data=args.data, val_fraction=args.val_fraction, seed=args.seed, hf_config=args.data_config,
            hf_split=args.data_split, text_field=args.text_field), args.cloze_items), tokenizer)
    distill_cfg = DistillConfig(tokens=budget, batch_size=args.batch_size, lr=args.lr, min_lr=args.min_lr,
                                eval_every=args.eval_every, val_batches=args.val_batches, seed=args.seed,
                                device=args.device, dtype=args.dtype, progress=False)
    start = time.perf_counter()
    result = search(teacher, scores, data, target_params=target, budget_tokens=budget, eta=args.search_eta,
                    max_candidates=args.search_max_candidates, metric=args.search_metric, proxy=args.search_proxy,
                    proxy_batches=args.proxy_batches, batch_size=args.batch_size, block_score=block_score,
                    block_batches=args.val_batches, seed=args.seed, short_distill=ShortDistill(distill_cfg, tokenizer),
                    on_candidate=_print_event, out_dir=out, rows=rows)
    seconds = time.perf_counter() - start

    # --- results -------------------------------------------------------------------------------------------------
    metric = args.search_metric
    print(f"\ntarget {format_count(target)} -> {out}; round 1: {result.selection}")
    print_table([{"round": r["round"], "trained": r["trained"], "tokens_each": format_count(r["tokens_per_candidate"]),
                  "failed": r["failed"], "kept": r["kept"], "best": r["best"] or "",
                  "kendall_tau": "" if r["kendall_tau"] is None else f"{r['kendall_tau']:+.3f}",
                  "tau_vs": r["tau_against"]} for r in result.rounds])
    print(f"tokens trained: {result.tokens_trained:,} of the {budget:,}-token budget")
    plots.plot_halving(result.table, out / "halving.png", metric, result.winner.index if result.winner else None)
    plots.plot_pareto(result.table, out / "pareto.png", metric, result.winner.index if result.winner else None,
                      target=target, tolerance=args.tolerance,
                      title=f"search for {format_count(target)} parameters")
    if result.sweeps:
        plots.plot_depth_blocks(result.sweeps, out / "depth_blocks.png")
        for s in result.sweeps:
            print(f"depth block of {s.length}: layers {s.block[0] + 1}-{s.block[1] + 1} (by {s.metric} over "
                  f"{len(s.starts)} positions)")
    if result.winner is None:
        raise UserError(f"every candidate failed (errors in {out / 'candidates.json'})")
    save_model(result.model, tokenizer, out / "winner")
    w = result.winner
    print(f"winner {w.name} ({w.params:,} params, {metric} {w.score(metric):.4f} after {len(w.rounds)} rounds) -> "
          f"{out / 'winner'}")
    print(f"search took {seconds:.0f} s")
    return 0


def _print_event(e: dict) -> None:
    """One line per finished step of a candidate, so a long CPU search shows it is alive."""
    if e["event"] == "proxy":
        print(f"proxy  {e['name']:<40} {e['params']:>13,}  KL {e['proxy_kl']:.4f}", flush=True)
    elif e["event"] == "progress" and e["metrics_point"].get("val_ce") is not None:
        m = e["metrics_point"]
        print(f"  round {e['round']} {e['name']} step {m['step']} val loss {m['val_ce']:.4f} KL {m['val_kl']:.4f}",
              flush=True)
    elif e["event"] == "trained":
        r = e["rounds"][-1]
        print(f"round {e['round']} {e['name']}: val loss {r['val_loss']:.4f}, KL {r['val_kl']:.4f} "
              f"({r['tokens']:,} tokens)", flush=True)
    elif e["event"] == "failed":
        print(f"FAILED {e['name']}: {e['error']}", flush=True)
