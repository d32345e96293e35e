"""`minitron evaluate MODEL (--tasks a,b | --preset quick) --out results.json`: LM-Eval-Harness benchmarks."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cli.commands.common import add_data_args, add_model_args, print_table


def _limit(text: str) -> int | float:
    value = float(text)
    return int(value) if value >= 1 and value.is_integer() else value


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="benchmark a model with LM-Eval-Harness",
                       description="Run LM-Eval-Harness tasks on a model. The offline tasks corpus_ppl and "
                                   "corpus_cloze are built from the held-out split of --data; standard tasks whose "
                                   "data is unavailable (offline) are skipped with a warning.")
    p.add_argument("model", nargs="?", help="model folder, .gguf, hub id or alias (smollm2-135m)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--tasks", help="comma list of task names, name:N for N shots (e.g. corpus_cloze,arc_easy)")
    which.add_argument("--preset", choices=["paper", "quick", "offline"],
                       help="paper: the Minitron benchmark set and shots; quick: cheap zero-shot set; "
                            "offline: corpus_ppl and corpus_cloze only")
    which.add_argument("--list-tasks", action="store_true", help="list the task names and exit")
    p.add_argument("--limit", type=_limit, default=None, help="items per task (N) or fraction of each (0.1)")
    p.add_argument("--out", type=Path, default=None, help="write results (task → metric → value, params) as JSON")
    p.add_argument("--batch-size", default=None, help="lm-eval batch size (default: auto on GPU, 8 on CPU)")
    p.add_argument("--max-length", type=int, default=None, help="context tokens (default: config's, at most 4096)")
    p.add_argument("--include-path", action="append", default=None,
                   help="folder of extra lm-eval task YAML, e.g. a standard task on local files (repeatable)")
    p.add_argument("--data", default="shakespeare", help="corpus whose held-out split feeds the offline tasks")
    add_data_args(p, flag="")
    add_model_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from minitron.errors import UserError
    from minitron.eval_data import EvalDataConfig
    from minitron.evaluate import PRESETS, evaluate, list_tasks, parse_tasks

    if args.list_tasks:
        for name, shots in PRESETS.items():
            print(f"preset {name}: " + ", ".join(f"{t}:{n}" for t, n in shots.items()))
        print("\n".join(list_tasks(args.include_path)))
        return 0
    if not args.model:
        raise UserError("give a MODEL to evaluate (folder, .gguf, hub id or alias such as smollm2-135m)")
    parse_tasks(args.tasks, args.preset)  # bad arguments fail before any data or model is loaded
    if args.out and not args.out.parent.exists():
        raise UserError(f"output folder '{args.out.parent}' does not exist")
    data = EvalDataConfig(data=args.data, val_fraction=args.val_fraction, seed=args.seed,
                          hf_config=args.data_config, hf_split=args.data_split, text_field=args.text_field)
    batch = args.batch_size
    results = evaluate(args.model, tasks=args.tasks, preset=args.preset, limit=args.limit, device=args.device,
                       dtype=args.dtype, batch_size=int(batch) if batch and batch.isdigit() else batch,
                       max_length=args.max_length, data=data, include_path=args.include_path,
                       load_kwargs={"allow_pickle": args.allow_pickle, "trust_remote_code": args.trust_remote_code})
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    rows = [{"task": task, "metric": metric, "value": f"{value:.4g}"}
            for task, metrics in results.items() if isinstance(metrics, dict)
            for metric, value in metrics.items() if not metric.endswith("_stderr")]
    print_table(rows)
    print(f"parameters: {results['params']:,}" + (f"; skipped: {', '.join(results['skipped'])}"
                                                   if results["skipped"] else ""))
    return 0
