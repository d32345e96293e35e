"""Stage 3, architecture search (arXiv 2407.14679 §4): rankings taken right after pruning are unreliable, so the
best few candidates by a cheap proxy each get the same short distillation, and the lowest loss after it wins.

    rank-candidates ──► distill-candidate × top_k (mapped; GPU work queues on the machine's slot) ──► select
    (prune every shape,    (one MLflow child run each: shape params, loss curve,      (Kendall τ proxy vs final,
     proxy = val KL)        final metrics; a failure is logged and skipped)            Pareto plot, tables)

An explicit shape in the config (target_* fields) skips the search: `prune_to_shape` prunes to it directly.
"""

from __future__ import annotations

import math

from prefect import get_run_logger, unmapped

from minitron.config import CompressConfig, format_count
from tasks.common import (RunContext, fetch, load_run_data, load_run_model, run_stage, stage, stage_params,
                          stage_task)


def _load_scores(ctx: RunContext, scores: dict):
    from minitron.importance import ImportanceScores

    return ImportanceScores.load(fetch(ctx, scores["uri"]) / scores["file"])


def _shape_params(row: dict) -> dict:
    return {**{f"shape_{k}": v for k, v in row["shape"].items()}, "params": row["params"], "kind": row["kind"],
            "drop": row["drop"]}


@stage_task("rank-candidates")
def rank_candidates(config: CompressConfig, ctx: RunContext, teacher: dict, scores: dict, target: int) -> list[dict]:
    """Enumerate the shapes within the budget, prune each, score it by the proxy; rows sorted by proxy rank."""
    from minitron.search import ValidationKL, _ranks, enumerate_rows, prune_candidate

    params = {**stage_params(config, "tolerance", "axes", "prune_kv_groups", "proxy_batches",
                             "search_max_candidates"), "target_params": target}
    with stage(ctx, f"search {format_count(target)}: proxy", params) as s:
        model, tokenizer = load_run_model(config, teacher, ctx)
        importance = _load_scores(ctx, scores)
        data = load_run_data(config, tokenizer)
        rows = enumerate_rows(model.config, target, config.tolerance, axes=config.axes,
                              prune_kv_groups=config.prune_kv_groups, max_candidates=config.search_max_candidates)
        proxy = ValidationKL(model, data.val[: config.proxy_batches * config.batch_size], config.batch_size)
        for row in rows:
            try:
                row.proxy_kl = proxy(prune_candidate(model, importance, row, config.layer_metric))
                row.status = "proxied"
            except Exception as err:  # a shape that cannot be built is reported, not fatal
                row.status, row.error = "failed", f"proxy: {type(err).__name__}: {err}"
        _ranks(rows, "proxy")
        table = sorted((r.to_dict() for r in rows), key=lambda r: (r["proxy_rank"] is None, r["proxy_rank"]))
        s.run.log_metrics({"candidates": len(rows)})
        s.run.log_dict(table, "candidates-proxy.json")
        return table


@stage_task("distill-candidate")
def distill_candidate(config: CompressConfig, ctx: RunContext, teacher: dict, scores: dict, row: dict) -> dict:
    """The same short distillation for every candidate (same data order, seed and budget)."""
    import torch

    from minitron.archmath import Shape
    from minitron.distill import DistillConfig, distill
    from minitron.models import save_model
    from minitron.prune import prune

    with stage(ctx, f"candidate {row['name']}", {**_shape_params(row), "proxy_kl": row["proxy_kl"]},
               total_tokens=config.tokens("search_tokens")) as s:
        model, tokenizer = load_run_model(config, teacher, ctx)
        drop = tuple(row["drop"]) if row["drop"] else None
        student = prune(model, _load_scores(ctx, scores), Shape(**row["shape"]), drop_layers=drop,
                        layer_metric=config.layer_metric)
        torch.manual_seed(config.seed)
        curve = []

        def on_metrics(record: dict) -> None:
            s.on_metrics(record)
            if "val_kl" in record:
                curve.append((int(record["step"]), float(record["val_kl"])))

        result = distill(model, student, load_run_data(config, tokenizer),
                         DistillConfig.from_run_config(config, "search_tokens", progress=False),
                         out_dir=s.work / "run", tokenizer=tokenizer, callback=on_metrics, resume=True)
        s.run.log_metrics({"final_kl": result.last_val_kl, "proxy_kl": row["proxy_kl"]})
        save_model(student, tokenizer, s.work / "model")
        return {**row, "final_kl": result.last_val_kl, "status": "distilled", "curve": curve,
                "metrics": {"val_kl": result.last_val_kl, "val_ce": result.last_val["val_ce"],
                            "val_kl_before": result.first_val_kl, "steps": result.steps, "tokens": result.tokens},
                "uri": s.publish(s.work / "model"), "mlflow_run_id": s.run.run_id}


@stage_task("select-architecture")
def select_architecture(config: CompressConfig, ctx: RunContext, target: int, proxied: list[dict],
                        distilled: list[dict]) -> dict:
    """Winner = lowest validation KL after the short distillation; Kendall τ says how much the proxy misled."""
    from prefect.artifacts import create_table_artifact

    from minitron.plots import plot_pareto
    from minitron.search import kendall_tau_b

    done = {r["index"]: r for r in distilled}
    table = [done.get(r["index"], r) for r in proxied]
    finished = sorted((r for r in table if r["status"] == "distilled"), key=lambda r: r["final_kl"])
    if not finished:
        raise RuntimeError(f"every candidate for {format_count(target)} failed: see the candidate runs in MLflow")
    for rank, r in enumerate(finished, 1):
        r["final_rank"] = rank
    winner = finished[0]
    tau = kendall_tau_b([r["proxy_kl"] for r in finished], [r["final_kl"] for r in finished]) \
        if len(finished) >= 2 else float("nan")
    tau = None if math.isnan(tau) else tau
    with stage(ctx, f"search {format_count(target)}: select", {"target_params": target}, compute=False) as s:
        s.run.log_metrics({"kendall_tau": tau} if tau is not None else {})
        s.run.set_tags({"winner": winner["name"], "winner_uri": winner["uri"]})
        s.run.log_dict({"target_params": target, "winner": winner["name"], "kendall_tau": tau,
                        "candidates": table}, "candidates.json")
        plot = plot_pareto(table, s.work / "pareto.png", winner_index=table.index(winner),
                           title=f"search for {format_count(target)}: parameters vs validation KL")
        s.run.log_artifact(plot)
        rows = [{"candidate": r["name"], "kind": r["kind"], "params": r["params"],
                 "proxy_kl": _round(r["proxy_kl"]), "final_kl": _round(r.get("final_kl")),
                 "status": r["status"] + (" (winner)" if r is winner else "")} for r in table]
        create_table_artifact(rows, key=f"search-{target}", description=(
            f"Candidates for {format_count(target)}: winner {winner['name']}, Kendall tau (proxy vs distilled) = "
            f"{'n/a' if tau is None else f'{tau:.2f}'}"))
    get_run_logger().info("search %s: winner %s (val KL %.4f), Kendall tau %s", format_count(target),
                          winner["name"], winner["final_kl"], tau)
    return {"uri": winner["uri"], "params": winner["params"], "shape": winner["shape"], "drop": winner["drop"],
            "name": winner["name"], "kendall_tau": tau, "table": table}


def _round(x):
    return None if x is None else round(x, 4)


def search_architecture(config: CompressConfig, ctx: RunContext, teacher: dict, scores: dict, target: int) -> dict:
    """Proxy-rank every shape, distil the top k (mapped tasks), keep the winner. Runs inside the flow."""
    proxied = run_stage(rank_candidates, config, ctx, teacher, scores, target)
    top = [r for r in proxied if r["status"] == "proxied"][: config.search_top_k]
    futures = distill_candidate.with_options(**ctx.task_options).map(unmapped(config), unmapped(ctx), unmapped(teacher), unmapped(scores), top)
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
def prune_to_shape(config: CompressConfig, ctx: RunContext, teacher: dict, scores: dict) -> dict:
    """An explicit target shape (target_* fields, drop_layers): prune to it, no search."""
    from minitron.archmath import count_shape
    from minitron.models import save_model
    from minitron.prune import prune

    with stage(ctx, "prune", stage_params(config, "target_layers", "target_hidden", "target_ffn",
                                          "target_heads_per_group", "target_kv_groups", "drop_layers")) as s:
        model, tokenizer = load_run_model(config, teacher, ctx)
        shape, drop = explicit_shape(config, model.config)
        student = prune(model, _load_scores(ctx, scores), shape, drop_layers=drop, layer_metric=config.layer_metric)
        save_model(student, tokenizer, s.work / "model")
        params = count_shape(model.config, shape)
        s.run.log_metrics({"params": params})
        shape_dict = {k: getattr(shape, k) for k in ("layers", "hidden", "ffn", "heads", "kv_heads", "head_dim")}
        return {"uri": s.publish(s.work / "model"), "params": params, "shape": shape_dict,
                "drop": list(drop) if drop else None, "name": "explicit", "kendall_tau": None, "table": []}


def explicit_shape(config: CompressConfig, model_config):
    """The Shape the target_* fields ask for (axes not given keep the teacher's size) and the 0-indexed block."""
    from minitron.archmath import Shape, shape_of

    full = shape_of(model_config)
    drop = None
    layers = config.target_layers or full.layers
    if config.drop_layers:
        first, last = (int(x) for x in config.drop_layers.split("-"))
        drop = (first - 1, last - 1)
        layers = full.layers - (last - first + 1)
    kv = config.target_kv_groups or full.kv_heads
    per_group = config.target_heads_per_group or full.heads // full.kv_heads
    return Shape(layers=layers, hidden=config.target_hidden or full.hidden, ffn=config.target_ffn or full.ffn,
                 heads=per_group * kv, kv_heads=kv, head_dim=full.head_dim), drop
