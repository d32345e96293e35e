"""Stage 3, architecture search by successive halving (minitron/search.py says why, and how the budget is split):

    search-candidates ──► round 1: distill-candidate × n ──► best n/η ──► round 2: × n/η ──► ... ──► select
    (enumerate the space,  (mapped tasks: one MLflow child run per candidate and round with its shape,  (winner, τ per
     sample it or filter    loss curve and final metrics; GPU work queues on the machine's slots; a     round, charts,
     it by the proxy,       failed candidate is recorded and the round goes on)                         candidate
     depth blocks by a                                                                                   table, the
     window sweep, the                                                                                   summary
     token schedule)                                                                                     section)

An explicit shape in the config (target_* fields) skips the search: `prune_to_shape` prunes to it directly.
"""

from __future__ import annotations

import base64
from pathlib import Path

from prefect import get_run_logger

from minitron.config import CompressConfig, format_count
from tasks.common import (
    RunContext,
    counted,
    fetch,
    load_run_data,
    load_run_model,
    model_spec,
    run_stage,
    stage,
    stage_params,
    stage_task,
    submit_stage,
    training_stage,
)


def _load_scores(ctx: RunContext, scores: dict):
    from minitron.importance import ImportanceScores

    return ImportanceScores.load(fetch(ctx, scores["uri"]) / scores["file"])


def _shape_params(row: dict) -> dict:
    return {**{f"shape_{k}": v for k, v in row["shape"].items()}, "params": row["params"], "kind": row["kind"],
            "drop": row["drop"]}


def _block_score(config: CompressConfig, model, tokenizer, data):
    """How the depth-block sweep scores a block: validation LM loss, or the offline cloze task on held-out text."""
    from minitron import search
    from minitron.eval_data import EvalDataConfig

    if config.depth_block_metric == "loss":
        return search.BlockLoss(data.val[: config.val_batches * config.batch_size], config.batch_size)
    items = search.cloze_items(EvalDataConfig(data=config.data, val_fraction=config.val_fraction, seed=config.seed,
                                              hf_config=config.data_config, hf_split=config.data_split,
                                              text_field=config.text_field), config.eval_limit or None)
    return search.BlockCloze(items, tokenizer)


@stage_task("search-candidates")
def plan_candidates(config: CompressConfig, ctx: RunContext, teacher: dict, scores: dict, target: int) -> dict:
    """The space within the budget, round 1's candidates from it (every shape, an even sample, or the best by the
    zero-shot proxy), the block each depth or mixed shape removes, and the token schedule of the rounds."""
    from minitron import plots, search
    from minitron.cost import local_gpu
    from minitron.models import load_config

    params = {**stage_params(config, "tolerance", "axes", "prune_kv_groups", "max_width_pruning",
                             "max_depth_pruning", "memory_cap_gib", "search_max_candidates", "search_proxy",
                             "depth_block_metric", "search_tokens", "search_eta"), "target_params": target}
    with stage(ctx, f"search {format_count(target)}: candidates", params) as s:
        rows = search.rows_for_run(config, load_config(model_spec(ctx, teacher),
                                                       trust_remote_code=config.trust_remote_code), target)
        model = None  # the teacher's weights only where the proxy or the depth-block sweep needs them
        if config.search_proxy:
            model, tokenizer = load_run_model(config, teacher, ctx)
            data = load_run_data(config, tokenizer)
            proxy = search.ValidationKL(model, data.val[: config.proxy_batches * config.batch_size],
                                        config.batch_size)
            selection = search.proxy_filter(model, _load_scores(ctx, scores), rows, proxy,
                                            config.search_max_candidates)
        else:
            selection = search.sample_rows(rows, config.search_max_candidates)
        sweeps = []
        if any(r.status == "candidate" and r.kind != "width" for r in rows):
            if model is None:
                model, tokenizer = load_run_model(config, teacher, ctx)
                data = load_run_data(config, tokenizer)
            sweeps = search.choose_depth_blocks(model, rows, _block_score(config, model, tokenizer, data))
            s.run.log_dict([w.to_dict() for w in sweeps], "depth_blocks.json")
            s.run.log_artifact(plots.plot_depth_blocks(sweeps, s.work / "depth_blocks.png"))
        entering = [r for r in rows if r.status == "candidate"]
        ranks = search.candidate_ranks(config, counted(model_spec(ctx, teacher)), [r.shape for r in entering],
                                       local_gpu(config.device))  # as each candidate's stage decides
        schedule = search.schedule_for(config, len(entering), ranks=ranks)
        s.run.log_metrics({"space": len(rows), "candidates": len(entering), "search_budget_tokens": schedule.budget,
                           "search_scheduled_tokens": schedule.total, "rounds": len(schedule.rounds)})
        s.run.log_dict({"selection": selection, "schedule": schedule.to_dict(),
                        "candidates": [r.to_dict() for r in rows]}, "space.json")
        get_run_logger().info("search %s: %d shapes in the space; round 1: %s; %s", format_count(target), len(rows),
                              selection, schedule.describe())
        return {"rows": [r.to_dict() for r in rows], "selection": selection, "schedule": schedule.to_dict(),
                "sweeps": [w.to_dict() for w in sweeps]}


def _train_candidate(config: CompressConfig, ctx: RunContext, teacher: dict, scores: dict, candidate, *,
                     tokens: int, number: int, s, train):
    """The one call that trains a candidate for a round: prune the teacher afresh to the candidate's shape and block,
    save it to a local folder and run the training stages' one launch path (`train`) on it for exactly `tokens`;
    the round's record lands in `candidate.rounds`. The trained model's folder, or None when it failed (the error is
    in `candidate.error`)."""
    from minitron import search

    model, tokenizer = load_run_model(config, teacher, ctx)

    def short_distill(teacher_model, pruned, data, *, tokens, seed, out_dir, callback):
        from minitron.models import save_model

        folder = save_model(pruned, tokenizer, s.work / "pruned")
        for saved in (teacher_model, pruned):  # the worker loads its own copies: free these before it does
            saved.to("meta")
        result = train("distill", model=str(folder), teacher=model_spec(ctx, teacher), out=out_dir,
                       callback=callback, tokens=tokens, seed=seed)
        return result.pop("folder"), result

    return search.distill_candidate(
        model, _load_scores(ctx, scores), load_run_data(config, tokenizer), candidate, tokens=tokens,
        seed=config.seed, number=number, short_distill=short_distill, out_dir=s.work / "run",
        on_event=lambda e: s.on_metrics(e["metrics_point"]) if e["event"] == "progress" else None)


@stage_task("distill-candidate")
def distill_candidate(config: CompressConfig, ctx: RunContext, teacher: dict, scores: dict, row: dict, tokens: int,
                      number: int, publish: bool) -> dict:
    """One candidate's round: the same short distillation for every candidate of the round (data order, seed and
    budget). The last round publishes its models: the winner's is the final distillation's start."""
    from minitron.report import shape_label
    from minitron.search import CandidateRow

    candidate = CandidateRow.from_dict(row)
    teacher_spec = model_spec(ctx, teacher)  # the run named shape-first, as its Prefect task run and the tables
    with training_stage(ctx, config, f"candidate {shape_label(row['shape'], row['drop'])} r{number}",
                        {**_shape_params(row), "round": number, "tokens": tokens}, budget="search_tokens",
                        total_tokens=tokens, trained=counted(teacher_spec, row["shape"]),
                        teacher=counted(teacher_spec)) as (s, train):
        folder = _train_candidate(config, ctx, teacher, scores, candidate, tokens=tokens, number=number, s=s,
                                  train=train)
        if folder is None:  # the child run ends FAILED; the flow records it and the round goes on without it
            raise RuntimeError(candidate.error)
        record = candidate.rounds[-1]
        s.run.log_metrics({"final_val_loss": record["val_loss"], "final_val_kl": record["val_kl"]})
        return {"record": record, "model_uri": s.publish(folder) if publish else None, "mlflow_run_id": s.run.run_id}


def search_architecture(config: CompressConfig, ctx: RunContext, teacher: dict, scores: dict, target: int) -> dict:
    """The space, then successive halving round by round (mapped tasks), then the winner. Runs inside the flow."""
    from minitron.search import CandidateRow, HalvingSchedule, close_round

    log = get_run_logger()
    plan = run_stage(plan_candidates, config, ctx, teacher, scores, target)
    rows = [CandidateRow.from_dict(r) for r in plan["rows"]]
    schedule = HalvingSchedule.from_dict(plan["schedule"])
    rounds = []
    for number, rnd in enumerate(schedule.rounds, 1):
        alive = [r for r in rows if r.status == "candidate"]
        # submitted one by one, each through stage_options: a cached candidate is verified before it is trusted
        futures = [submit_stage(distill_candidate, config, ctx, teacher, scores, r.identity(), rnd.tokens, number,
                                number == len(schedule.rounds)) for r in alive]
        for row, future in zip(alive, futures, strict=True):
            future.wait()
            state = future.state
            if state.is_completed():
                result = state.result()
                row.rounds.append(result["record"])
                row.model_uri = result["model_uri"] or row.model_uri
            else:  # its MLflow child run is FAILED too; the search goes on without it
                log.warning("candidate %s failed in round %d: %s", row.name, number, state.message)
                row.status, row.error, row.failed_round = "failed", f"round {number}: {state.message}", number
        rounds.append(close_round(rows, schedule, number, config.search_metric))
        r = rounds[-1]
        log.info("search %s round %d/%d: %d trained on %s tokens each, %d failed, %d kept; best %s (%s %.4f); "
                 "Kendall tau vs %s: %s", format_count(target), number, len(schedule.rounds), r["trained"],
                 format_count(rnd.tokens), r["failed"], r["kept"], r["best"], config.search_metric,
                 float("nan") if r["best_score"] is None else r["best_score"], r["tau_against"],
                 _fmt(r["kendall_tau"], ".2f"))
    winner = run_stage(select_architecture, config, ctx, target, [r.to_dict() for r in rows], rounds,
                       {k: plan[k] for k in ("selection", "schedule", "sweeps")})
    if winner["uri"] is None:  # every candidate of the last round failed: the best of an earlier one, pruned afresh
        drop = tuple(winner["drop"]) if winner["drop"] else None
        winner = {**winner, "uri": run_stage(prune_to_shape, config, ctx, teacher, scores, winner["shape"], drop)["uri"]}
    return winner


@stage_task("select-architecture")
def select_architecture(config: CompressConfig, ctx: RunContext, target: int, rows: list[dict], rounds: list[dict],
                        plan: dict) -> dict:
    """Winner = best of the latest round finished; charts, the candidate table and the summary section."""
    from prefect.artifacts import create_table_artifact

    from minitron import plots
    from minitron.report import candidate_table, kendall_line, shape_label
    from minitron.search import BlockSweep, CandidateRow, HalvingSchedule, SearchResult, finish

    table = [CandidateRow.from_dict(r) for r in rows]
    winner = finish(table, config.search_metric)
    if winner is None:
        raise RuntimeError(f"every candidate for {format_count(target)} failed: see the candidate runs in MLflow")
    result = SearchResult(table, winner, rounds, HalvingSchedule.from_dict(plan["schedule"]), target,
                          config.search_metric, plan["selection"], [BlockSweep.from_dict(w) for w in plan["sweeps"]])
    metric = config.search_metric
    with stage(ctx, f"search {format_count(target)}: select", {"target_params": target, "metric": metric},
               compute=False) as s:
        for r in rounds:
            s.run.log_metrics({k: r[k] for k in ("kendall_tau", "best_score", "trained", "failed", "tokens")
                               if r[k] is not None}, step=r["round"])
        s.run.log_metrics({"search_tokens_trained": result.tokens_trained, "space": len(table)})
        s.run.set_tags({"winner": winner.name, "winner_uri": winner.model_uri or ""})
        s.run.log_dict(result.to_dict(), "candidates.json")
        charts = {
            "halving": plots.plot_halving(table, s.work / "halving.png", metric, winner.index,
                                          title=f"successive halving for {format_count(target)}"),
            "pareto": plots.plot_pareto(table, s.work / "pareto.png", metric, winner.index, target=target,
                                        tolerance=config.tolerance,
                                        title=f"search for {format_count(target)}: parameters vs {metric}")}
        if result.sweeps:
            charts["depth blocks"] = plots.plot_depth_blocks(result.sweeps, s.work / "depth_blocks.png")
        for path in charts.values():
            s.run.log_artifact(path)
        create_table_artifact(candidate_table([r.to_dict() for r in table], winner.index, metric),
                              key=f"search-{target}", description=f"Candidates for {format_count(target)}, the "
                              f"longest-trained first: winner {shape_label(winner.to_dict()['shape'], winner.drop)}. "
                              f"{kendall_line(rounds)}")
    tau = rounds[-1]["kendall_tau"] if rounds else None
    get_run_logger().info("search %s: winner %s (%s %.4f after %d rounds), %s tokens trained of %s",
                          format_count(target), winner.name, metric, winner.score(metric), len(winner.rounds),
                          format_count(result.tokens_trained), format_count(result.schedule.budget))
    first = winner.rounds[-1]["curve"][0] if winner.rounds[-1]["curve"] else None
    return {"uri": winner.model_uri, "params": winner.params, "shape": winner.to_dict()["shape"],
            "drop": list(winner.drop) if winner.drop else None, "name": winner.name,
            "pruned_kl": first[2] if first else None, "kendall_tau": tau, "table": [r.to_dict() for r in table],
            "search_summary": summary_section(result, charts)}


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


SUMMARY_ROWS = 12  # candidates listed in the summary (the longest-trained first); the table artifact has them all


def _image(path: Path, alt: str) -> str:
    """A PNG inlined as a data URI: the Prefect summary is one markdown artifact, with no file store behind it."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(Path(path).read_bytes()).decode()})"


def summary_section(result, charts: dict[str, Path]) -> str:
    """The search's part of the run summary (tasks/export.py places it): rounds, candidates, budget, depth blocks
    and the three charts."""
    from minitron.report import candidate_table, kendall_line, markdown_table, shape_label, sig

    metric, w = result.metric, result.winner
    rounds = [{"round": r["round"], "candidates": r["trained"], "tokens each": format_count(r["tokens_per_candidate"]),
               "failed": r["failed"], "kept": r["kept"], f"best {metric}": sig(r["best_score"]),
               "Kendall τ": "-" if r["kendall_tau"] is None else f"{r['kendall_tau']:+.2f} vs {r['tau_against']}"}
              for r in result.rounds]
    table = candidate_table([r.to_dict() for r in result.table], w.index, metric)
    lines = [f"## Architecture search ({format_count(result.target_params)})", "",
             f"{len(result.table)} shapes in the space; round 1 took {result.selection}. "
             f"{result.schedule.describe()}; {result.tokens_trained:,} trained. Ranked by {metric}.", "",
             markdown_table(rounds), "",
             f"Winner {shape_label(w.to_dict()['shape'], w.drop)}: {w.params:,} parameters, {metric} "
             f"{sig(w.score(metric))} after {len(w.rounds)} rounds. {kendall_line(result.rounds)}", "",
             markdown_table(table[:SUMMARY_ROWS])]
    if len(table) > SUMMARY_ROWS:
        lines.append(f"\n{len(table) - SUMMARY_ROWS} more in the `search-{result.target_params}` table artifact and "
                     "candidates.json (MLflow).")
    lines.append("")
    for sweep in result.sweeps:
        first, last = sweep.block
        lines.append(f"Depth block of {sweep.length}: layers {first + 1}-{last + 1} removed (chosen by {sweep.metric} "
                     f"over {len(sweep.starts)} positions).")
    lines += [""] + [_image(path, name) for name, path in charts.items()]
    return "\n".join(lines)


@stage_task("prune")
def prune_to_shape(config: CompressConfig, ctx: RunContext, teacher: dict, scores: dict, shape: dict,
                   drop: tuple[int, int] | None) -> dict:
    """An explicit target shape (target_* fields, drop_layers, target_shapes): prune to it, no search."""
    with stage(ctx, "prune", {**{f"shape_{k}": v for k, v in shape.items()}, "drop": drop}) as s:
        params = prune_into(config, ctx, teacher, scores, shape, drop, s.work / "model")
        s.run.log_metrics({"params": params})
        return {"uri": s.publish(s.work / "model"), "params": params, "shape": shape,
                "drop": list(drop) if drop else None, "name": "explicit", "kendall_tau": None, "table": []}


def prune_into(config: CompressConfig, ctx: RunContext, teacher: dict, scores: dict, shape: dict,
               drop: tuple[int, int] | None, out: Path) -> int:
    """`teacher` pruned to `shape` with its importance `scores` (the block `drop` removed, or the layers ranked by
    `layer_metric`), saved as a model folder in `out`; returns the pruned parameter count."""
    from minitron.archmath import Shape, count_shape
    from minitron.models import save_model
    from minitron.prune import prune

    model, tokenizer = load_run_model(config, teacher, ctx)
    student = prune(model, _load_scores(ctx, scores), Shape(**shape), drop_layers=drop,
                    layer_metric=config.layer_metric)
    save_model(student, tokenizer, out)
    return count_shape(model.config, Shape(**shape))
