"""Stage 3, architecture search (arXiv 2407.14679 §4): rankings taken right after pruning are unreliable, so the
best few candidates by a cheap proxy each get the same short distillation, and the lowest loss after it wins.

    rank-candidates ──► distill-candidate × top_k (mapped; GPU work queues on the machine's slot) ──► select
    (prune every shape,    (one MLflow child run each: shape params, loss curve,      (Kendall τ proxy vs final,
     proxy = val KL)        final metrics; a failure is logged and skipped)            Pareto plot, tables)

An explicit shape in the config (target_* fields) skips the search: `prune_to_shape` prunes to it directly.
"""

from __future__ import annotations

from functools import partial

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


def memory_cap(config: CompressConfig) -> int | None:
    return int(config.memory_cap_gib * 2**30) if config.memory_cap_gib else None


def _make_candidate(config: CompressConfig):
    from minitron.search import prune_candidate

    return partial(prune_candidate, layer_metric=config.layer_metric)


@stage_task("rank-candidates")
def rank_candidates(config: CompressConfig, ctx: RunContext, teacher: dict, scores: dict, target: int) -> list[dict]:
    """Enumerate the shapes within the budget, prune each, score it by the proxy; rows by proxy rank."""
    from minitron.search import ValidationKL, enumerate_rows, proxy_candidates

    params = {**stage_params(config, "tolerance", "axes", "prune_kv_groups", "proxy_batches",
                             "search_max_candidates", "memory_cap_gib"), "target_params": target}
    with stage(ctx, f"search {format_count(target)}: proxy", params) as s:
        model, tokenizer = load_run_model(config, teacher, ctx)
        data = load_run_data(config, tokenizer)
        rows = enumerate_rows(model.config, target, config.tolerance, axes=config.axes,
                              prune_kv_groups=config.prune_kv_groups, max_candidates=config.search_max_candidates,
                              max_memory_bytes=memory_cap(config), context=config.seq_len)
        proxy = ValidationKL(model, data.val[: config.proxy_batches * config.batch_size], config.batch_size)
        ranked = proxy_candidates(model, _load_scores(ctx, scores), rows, proxy,
                                  make_candidate=_make_candidate(config))
        table = [r.to_dict() for r in ranked] + [r.to_dict() for r in rows if r.status == "failed"]
        s.run.log_metrics({"candidates": len(rows), "proxied": len(ranked)})
        s.run.log_dict(table, "candidates-proxy.json")
        return table


@stage_task("distill-candidate")
def distill_candidate(config: CompressConfig, ctx: RunContext, teacher: dict, scores: dict, row: dict) -> dict:
    """The same short distillation for every candidate (same data order, seed and budget)."""
    from minitron import search

    candidate = search.CandidateRow.from_dict(row)
    teacher_spec = model_spec(ctx, teacher)
    with training_stage(ctx, config, f"candidate {candidate.name}", {**_shape_params(row), "proxy_kl":
                        row["proxy_kl"]}, budget="search_tokens", trained=counted(teacher_spec, row["shape"]),
                        teacher=counted(teacher_spec)) as (s, train):
        model, tokenizer = load_run_model(config, teacher, ctx)

        def short_distill(teacher_model, pruned, data, *, tokens, seed, out_dir, callback):
            """The training call of every training stage, on the pruned candidate saved to a local folder."""
            from minitron.models import save_model

            folder = save_model(pruned, tokenizer, s.work / "pruned")
            for saved in (teacher_model, pruned):  # the worker loads its own copies: free these before it does
                saved.to("meta")
            result = train("distill", model=str(folder), teacher=teacher_spec, out=out_dir, callback=callback,
                           tokens=tokens, seed=seed)
            return result.pop("folder"), result

        folder = search.distill_candidate(
            model, _load_scores(ctx, scores), load_run_data(config, tokenizer), candidate,
            tokens=config.tokens("search_tokens"), seed=config.seed, make_candidate=_make_candidate(config),
            short_distill=short_distill, out_dir=s.work / "run",
            on_event=lambda e: s.on_metrics(e["metrics_point"]) if e["event"] == "progress" else None)
        if folder is None:  # the child run ends FAILED; the flow logs it and goes on without this candidate
            raise RuntimeError(candidate.error)
        s.run.log_metrics({"final_kl": candidate.final_kl, "proxy_kl": candidate.proxy_kl})
        return {**candidate.to_dict(), "uri": s.publish(folder), "mlflow_run_id": s.run.run_id}


@stage_task("select-architecture")
def select_architecture(config: CompressConfig, ctx: RunContext, target: int, proxied: list[dict],
                        distilled: list[dict]) -> dict:
    """Winner = lowest validation KL after the short distillation; Kendall τ says how much the proxy misled."""
    from prefect.artifacts import create_table_artifact

    from minitron.plots import plot_pareto
    from minitron.report import candidate_table, kendall_line
    from minitron.search import CandidateRow, select

    done = {r["index"]: r for r in distilled}
    table = [done.get(r["index"], r) for r in proxied]
    result = select([CandidateRow.from_dict(r) for r in table], target)
    if result.winner is None:
        raise RuntimeError(f"every candidate for {format_count(target)} failed: see the candidate runs in MLflow")
    rows = [{**r.to_dict(), "uri": done.get(r.index, {}).get("uri")} for r in result.table]
    winner = next(r for r in rows if r["index"] == result.winner.index)
    tau = result.kendall_tau
    with stage(ctx, f"search {format_count(target)}: select", {"target_params": target}, compute=False) as s:
        s.run.log_metrics({"kendall_tau": tau} if tau is not None else {})
        s.run.set_tags({"winner": winner["name"], "winner_uri": winner["uri"]})
        s.run.log_dict({"target_params": target, "winner": winner["name"], "kendall_tau": tau,
                        "candidates": rows}, "candidates.json")
        plot = plot_pareto(rows, s.work / "pareto.png", winner_index=winner["index"],
                           title=f"search for {format_count(target)}: parameters vs validation KL")
        s.run.log_artifact(plot)
        create_table_artifact(candidate_table(rows, winner["index"]), key=f"search-{target}",
                              description=f"Candidates for {format_count(target)}, best proxy KL first. "
                              f"{kendall_line(tau)}")
    get_run_logger().info("search %s: winner %s (val KL %.4f), Kendall tau %s", format_count(target),
                          winner["name"], winner["final_kl"], tau)
    return {"uri": winner["uri"], "params": winner["params"], "shape": winner["shape"], "drop": winner["drop"],
            "name": winner["name"], "proxy_kl": winner["proxy_kl"], "kendall_tau": tau, "table": rows}


def search_architecture(config: CompressConfig, ctx: RunContext, teacher: dict, scores: dict, target: int) -> dict:
    """Proxy-rank every shape, distil the top k (mapped tasks), keep the winner. Runs inside the flow."""
    proxied = run_stage(rank_candidates, config, ctx, teacher, scores, target)
    top = [r for r in proxied if r["status"] == "proxied"][: config.search_top_k]
    futures = [submit_stage(distill_candidate, config, ctx, teacher, scores, row) for row in top]
    distilled = []
    for row, future in zip(top, futures, strict=True):
        future.wait()
        state = future.state
        if state.is_completed():
            distilled.append(state.result())
        else:  # logged as failed (its MLflow child run is FAILED too); the search goes on without it
            get_run_logger().warning("candidate %s failed: %s", row["name"], state.message)
            distilled.append({**row, "status": "failed", "error": state.message})
    return run_stage(select_architecture, config, ctx, target, proxied, distilled)


@stage_task("prune")
def prune_to_shape(config: CompressConfig, ctx: RunContext, teacher: dict, scores: dict, shape: dict,
                   drop: tuple[int, int] | None) -> dict:
    """An explicit target shape (target_* fields, drop_layers, target_shapes): prune to it, no search."""
    from minitron.archmath import Shape, count_shape
    from minitron.models import save_model
    from minitron.prune import prune

    with stage(ctx, "prune", {**{f"shape_{k}": v for k, v in shape.items()}, "drop": drop}) as s:
        model, tokenizer = load_run_model(config, teacher, ctx)
        student = prune(model, _load_scores(ctx, scores), Shape(**shape), drop_layers=drop,
                        layer_metric=config.layer_metric)
        save_model(student, tokenizer, s.work / "model")
        params = count_shape(model.config, Shape(**shape))
        s.run.log_metrics({"params": params})
        return {"uri": s.publish(s.work / "model"), "params": params, "shape": shape,
                "drop": list(drop) if drop else None, "name": "explicit", "kendall_tau": None, "table": []}
