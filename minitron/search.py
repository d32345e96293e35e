"""Architecture search: enumerate pruned shapes under a parameter budget, rank them all by a cheap proxy, give the
best few the same short distillation, keep the one with the lowest validation KL.

Minitron (arXiv 2407.14679, §4) found that rankings taken right after pruning re-order early in retraining, so the
proxy (validation KL to the teacher of the pruned, untrained model) only picks which candidates are worth training;
the decision is taken after a short distillation (~400 steps in the paper). `kendall_tau` between the two rankings
measures how much the short distillation changed the order.

`search` runs three steps that are public for a caller that spreads the work (a Prefect task per candidate):
`proxy_candidates` (all), `distill_candidate` (one, mapped over the top k), `select` (winner, τ). The expensive
operations are callables so the orchestration layer (and the tests) can swap them:
  make_candidate(teacher, scores, candidate) -> student      default: prune the teacher to the candidate's shape
  proxy(student) -> float                                    default: `ValidationKL` on a fixed small batch
  short_distill(teacher, student, data, *, tokens, seed, out_dir, callback) -> (student, metrics with "val_kl")
Every step reports to `on_candidate(event)`, a dict with "event" in {"proxy", "progress", "distilled", "failed"}
plus the candidate's fields, so a caller can log each candidate as its own (MLflow) run while the search goes on.
"""

from __future__ import annotations

import json
import math
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from minitron.errors import UserError

Event = dict  # {"event": ..., "index": ..., **CandidateRow.to_dict()}


@dataclass
class CandidateRow:
    """One candidate's line in the search table, filled in as the search proceeds."""

    index: int  # position in the enumeration (stable id: directory names, MLflow run names)
    shape: object  # archmath.Shape
    params: int  # exact parameter count of the pruned model
    kind: str  # "width", "depth", "depth-block" or "mixed" (see archmath.Candidate)
    drop: tuple[int, int] | None = None  # contiguous 0-indexed layer block removed ("depth-block")
    proxy_kl: float | None = None  # validation KL of the pruned, untrained student
    final_kl: float | None = None  # validation KL after the short distillation
    status: str = "enumerated"  # enumerated → proxied (not selected) | distilled | failed
    error: str | None = None  # "<stage>: <exception>" for failed candidates
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, val_kl) during the short distillation
    metrics: dict = field(default_factory=dict)  # final metrics of the short distillation (val_kl, val_ce, ...)
    proxy_rank: int | None = None  # 1 = lowest proxy KL among candidates that were scored
    final_rank: int | None = None  # 1 = lowest final KL among distilled candidates

    @property
    def name(self) -> str:
        s = self.shape
        block = f"-drop{self.drop[0]}_{self.drop[1]}" if self.drop else ""
        return f"c{self.index:03d}-L{s.layers}-h{s.hidden}-f{s.ffn}-q{s.heads}-kv{s.kv_heads}{block}"

    @classmethod
    def from_dict(cls, d: dict) -> CandidateRow:
        """The row back from `to_dict` (a Prefect task receives candidates as JSON, not objects)."""
        from minitron.archmath import Shape

        return cls(d["index"], Shape(**d["shape"]), d["params"], d["kind"], tuple(d["drop"]) if d["drop"] else None,
                   d["proxy_kl"], d["final_kl"], d["status"], d["error"], [tuple(p) for p in d["curve"]],
                   dict(d["metrics"]), d["proxy_rank"], d["final_rank"])

    def to_dict(self) -> dict:
        s = self.shape
        return {"index": self.index, "name": self.name,
                "shape": {"layers": s.layers, "hidden": s.hidden, "ffn": s.ffn, "heads": s.heads,
                          "kv_heads": s.kv_heads, "head_dim": s.head_dim},
                "params": self.params, "kind": self.kind, "drop": list(self.drop) if self.drop else None,
                "proxy_kl": self.proxy_kl, "final_kl": self.final_kl, "status": self.status, "error": self.error,
                "proxy_rank": self.proxy_rank, "final_rank": self.final_rank,
                "curve": [list(p) for p in self.curve], "metrics": self.metrics}


@dataclass
class SearchResult:
    table: list[CandidateRow]  # every enumerated candidate (proxied, distilled or failed)
    winner: CandidateRow | None  # lowest final KL among distilled candidates; None if all failed
    kendall_tau: float | None  # τ-b between proxy and final rankings of the distilled candidates
    target_params: int
    model: torch.nn.Module | None = None  # the winner's distilled student (not serialised)

    def to_dict(self) -> dict:
        return {"target_params": self.target_params,
                "winner": self.winner.to_dict() if self.winner else None,
                "kendall_tau": self.kendall_tau,
                "candidates": [r.to_dict() for r in self.table]}


# ----------------------------------------------------------------------------------------------------------------
# ranking statistics


def kendall_tau_b(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's τ-b (ties corrected, as scipy.stats.kendalltau): (C - D) / sqrt((n0 - n1)(n0 - n2)), with n0 the
    pairs, n1/n2 the pairs tied in x/y. NaN when either side is constant or fewer than two points (scipy's choice).
    O(n²): the search ranks a handful of candidates."""
    if len(x) != len(y):
        raise ValueError("x and y must have the same length")
    n = len(x)
    concordant = discordant = ties_x = ties_y = 0
    for i in range(n):
        for j in range(i + 1, n):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0:
                ties_x += 1
            if dy == 0:
                ties_y += 1
            if dx * dy > 0:
                concordant += 1
            elif dx * dy < 0:
                discordant += 1
    pairs = n * (n - 1) // 2
    denom = math.sqrt((pairs - ties_x) * (pairs - ties_y))
    return (concordant - discordant) / denom if denom > 0 else float("nan")


def _ranks(rows: list[CandidateRow], key: str) -> None:
    """Set `<key>_rank` (1 = lowest value) on the rows that have a value; ties keep enumeration order."""
    scored = sorted((r for r in rows if getattr(r, f"{key}_kl") is not None),
                    key=lambda r: (getattr(r, f"{key}_kl"), r.index))
    for rank, r in enumerate(scored, 1):
        setattr(r, f"{key}_rank", rank)


# ----------------------------------------------------------------------------------------------------------------
# default steps (real modules, imported lazily so this file imports without them)


def prune_candidate(teacher, scores, candidate, layer_metric: str = "loss"):
    """The default `make_candidate`: the teacher pruned to the candidate's shape (weights copied, teacher intact).
    Depth shapes without a block drop the lowest-ranked layers by `layer_metric` ("loss" or "bi")."""
    from minitron.prune import prune

    return prune(teacher, scores, candidate.shape, drop_layers=candidate.drop, layer_metric=layer_metric)


def _final_hidden(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Final (normed) hidden states [B, T, D]: the lm_head is applied chunk-wise by the loss, never here."""
    return model.get_decoder()(input_ids=input_ids).last_hidden_state


class ValidationKL:
    """The proxy: mean per-token KL(teacher ‖ student) on fixed validation blocks. The teacher's final hidden states
    are computed once (KB per token, unlike its logits), so each candidate costs one student forward."""

    def __init__(self, teacher, blocks: torch.Tensor, batch_size: int):
        from minitron.distill.loss import IGNORE

        self.device = next(teacher.parameters()).device
        self.batches = [b.to(self.device) for b in blocks.split(batch_size)]
        self.labels = [torch.cat([b[:, 1:], torch.full_like(b[:, :1], IGNORE)], 1).reshape(-1)
                       for b in self.batches]
        self.teacher_head = teacher.get_output_embeddings().weight
        with torch.no_grad():
            self.teacher_states = [_final_hidden(teacher, b).flatten(0, 1) for b in self.batches]

    @torch.no_grad()
    def __call__(self, student) -> float:
        from minitron.distill.loss import fused_kd_loss

        head = student.get_output_embeddings().weight
        total, tokens = 0.0, 0
        for ids, labels, ht in zip(self.batches, self.labels, self.teacher_states, strict=True):
            hs = _final_hidden(student, ids).flatten(0, 1)
            _, kl, _ = fused_kd_loss(hs, head, ht, self.teacher_head, labels)
            total += float(kl) * hs.shape[0]
            tokens += hs.shape[0]
        return total / tokens


class ShortDistill:
    """The default `short_distill`: `minitron.distill.distill` with one DistillConfig for every candidate (only the
    token budget and seed are set per call, and they are the same for all), so data order and schedule match.

    distill casts the teacher to its compute dtype in place: load the teacher in that dtype (as the CLI does) so
    every candidate is pruned from the same weights."""

    def __init__(self, config=None, tokenizer=None, **overrides):
        from minitron.distill import DistillConfig

        # tokens and seed are set per call; `overrides` (batch_size=, lr=, ...) apply when no config is given
        self.config = config or DistillConfig(tokens=0, **overrides)
        self.tokenizer = tokenizer  # saved with each distilled candidate, so its folder is a usable model

    def __call__(self, teacher, student, data, *, tokens: int, seed: int, out_dir: Path | None,
                 callback: Callable[[dict], None]):
        import tempfile

        from minitron.distill import distill

        cfg = replace(self.config, tokens=tokens, seed=seed)
        with tempfile.TemporaryDirectory(prefix="minitron-search-") as tmp:
            result = distill(teacher, student, data, cfg, out_dir=out_dir or tmp, tokenizer=self.tokenizer,
                             callback=callback)
        return student.eval(), {"val_kl": result.last_val_kl, "val_ce": result.last_val["val_ce"],
                         "val_kl_before": result.first_val_kl, "steps": result.steps, "tokens": result.tokens,
                         "tokens_per_s": result.metrics.get("tokens_per_s")}


# ----------------------------------------------------------------------------------------------------------------
# the search


def enumerate_rows(config, target_params: int, tolerance: float, *, axes: str = "all",
                   prune_kv_groups: bool = False, max_candidates: int | None = None,
                   max_memory_bytes: int | None = None, context: int = 2048) -> list[CandidateRow]:
    """The candidates within budget (archmath's enumeration: width, depth, mixed and contiguous-block depth shapes),
    without those whose inference memory (bf16 weights + KV cache of one `context`-token sequence) exceeds
    `max_memory_bytes`, optionally thinned to `max_candidates` spread evenly over each kind."""
    from minitron.archmath import SearchSpace, enumerate_candidates, inference_bytes

    cands = enumerate_candidates(config, target_params, tolerance, axes=axes,
                                 space=SearchSpace(prune_kv_groups=prune_kv_groups))
    if max_memory_bytes is not None:
        fits = [c for c in cands if inference_bytes(c.shape, c.params, context) <= max_memory_bytes]
        if cands and not fits:
            least = min(inference_bytes(c.shape, c.params, context) for c in cands)
            raise UserError(f"no shape within the budget fits the memory cap of {max_memory_bytes / 2**30:.2f} GiB "
                            f"(the smallest needs {least / 2**30:.2f} GiB with a {context}-token KV cache): raise "
                            "the cap or lower the target")
        cands = fits
    if max_candidates is not None and len(cands) > max_candidates:
        cands = _spread(cands, max_candidates)
    return [CandidateRow(i, c.shape, c.params, c.kind, c.drop) for i, c in enumerate(cands)]


def _spread(cands: list, n: int) -> list:
    """`n` candidates taken round-robin over kinds and evenly spaced within each kind (ordered by shape), so a cap
    keeps the rare kinds (width-only, depth-block) and the extremes of each axis."""
    by_kind: dict[str, list] = {}
    for c in sorted(cands, key=lambda c: (c.kind, c.shape.layers, c.shape.hidden, c.shape.ffn, c.shape.heads,
                                          c.shape.kv_heads)):
        by_kind.setdefault(c.kind, []).append(c)
    quota = dict.fromkeys(by_kind, 0)
    while sum(quota.values()) < n:
        for kind, group in by_kind.items():
            if quota[kind] < len(group) and sum(quota.values()) < n:
                quota[kind] += 1
    out = []
    for kind, group in by_kind.items():
        k = quota[kind]
        out += [group[round(i * (len(group) - 1) / max(k - 1, 1))] for i in range(k)]
    return sorted(out, key=cands.index)  # back to enumeration order (closest to the target first)


def _event(on_event, event: str, row: CandidateRow, **extra) -> None:
    if on_event is not None:
        on_event({"event": event, **row.to_dict(), **extra})


def _fail(on_event, row: CandidateRow, stage: str, err: Exception) -> None:
    row.status, row.error = "failed", f"{stage}: {type(err).__name__}: {err}"
    _event(on_event, "failed", row, traceback=traceback.format_exc())


def proxy_candidates(teacher, scores, rows: list[CandidateRow], proxy: Callable, *,
                     make_candidate: Callable = prune_candidate, on_event=None) -> list[CandidateRow]:
    """Step 1: prune and score every candidate untrained; returns the scored rows, best proxy first."""
    for row in rows:
        try:
            student = make_candidate(teacher, scores, row)
            row.proxy_kl = _finite(proxy(student), "proxy KL")
            row.status = "proxied"
        except Exception as err:  # one broken shape must not end the search
            _fail(on_event, row, "proxy", err)
            continue
        finally:
            student = None  # free the pruned copy before the next one
        _event(on_event, "proxy", row)
    _ranks(rows, "proxy")
    return sorted((r for r in rows if r.proxy_rank is not None), key=lambda r: r.proxy_rank)


def distill_candidate(teacher, scores, data, row: CandidateRow, *, tokens: int, seed: int,
                      make_candidate: Callable = prune_candidate, short_distill: Callable | None = None,
                      out_dir: str | Path | None = None, on_event=None):
    """Step 2 for one candidate (the unit a Prefect task maps over): prune, distil with the shared budget and seed,
    record the loss curve and final metrics in `row`. Returns the student, or None if the candidate failed."""
    short_distill = short_distill or ShortDistill()
    torch.manual_seed(seed)
    try:
        student = make_candidate(teacher, scores, row)

        def callback(m: dict) -> None:
            if m.get("val_kl") is not None:
                row.curve.append((int(m.get("step", len(row.curve))), float(m["val_kl"])))
            _event(on_event, "progress", row, metrics_point=m)

        t0 = time.perf_counter()
        student, metrics = short_distill(teacher, student, data, tokens=tokens, seed=seed,
                                         out_dir=Path(out_dir) if out_dir is not None else None, callback=callback)
        row.metrics = {**metrics, "seconds": round(time.perf_counter() - t0, 3)}
        row.final_kl = _finite(metrics["val_kl"], "validation KL after distillation")
        row.status = "distilled"
    except Exception as err:
        _fail(on_event, row, "distill", err)
        return None
    _event(on_event, "distilled", row)
    return student


def select(rows: list[CandidateRow], target_params: int, model=None) -> SearchResult:
    """Step 3: final ranks, the winner (lowest KL after distillation) and Kendall τ-b between the proxy and final
    rankings of the distilled candidates (None below two, or when one side is constant)."""
    _ranks(rows, "final")
    done = [r for r in rows if r.status == "distilled"]
    winner = min(done, key=lambda r: r.final_rank) if done else None
    tau = kendall_tau_b([r.proxy_kl for r in done], [r.final_kl for r in done]) if len(done) >= 2 else None
    return SearchResult(rows, winner, None if tau is None or math.isnan(tau) else tau, target_params, model)


def search(teacher, scores, data, *, target_params: int, tolerance: float = 0.05, top_k: int = 4,
           tokens_per_candidate: int, axes: str = "all", prune_kv_groups: bool = False, proxy_batches: int = 2,
           batch_size: int = 8, max_candidates: int | None = None, max_memory_bytes: int | None = None,
           seed: int = 0,
           make_candidate: Callable = prune_candidate, proxy: Callable | None = None,
           short_distill: Callable | None = None, on_candidate: Callable[[Event], None] | None = None,
           out_dir: str | Path | None = None, rows: list[CandidateRow] | None = None) -> SearchResult:
    """Enumerate → proxy every candidate → short-distil the top `top_k` → winner = lowest validation KL.

    `rows` replaces the enumeration (tests, or a caller that enumerated itself). With `out_dir`, `candidates.json`
    there is rewritten after every candidate, so a crash keeps the finished ones, and each distillation writes
    under `out_dir/<candidate name>/`."""
    if top_k < 1:
        raise UserError(f"top_k must be at least 1, not {top_k}")
    if tokens_per_candidate < 1:
        raise UserError("tokens_per_candidate must be positive")
    out = Path(out_dir) if out_dir is not None else None
    if rows is not None:  # fresh rows: the caller's (maybe reused for another step) stay untouched
        rows = [CandidateRow(r.index, r.shape, r.params, r.kind, r.drop) for r in rows]
    else:
        rows = enumerate_rows(teacher.config, target_params, tolerance, axes=axes, prune_kv_groups=prune_kv_groups,
                              max_candidates=max_candidates, max_memory_bytes=max_memory_bytes,
                              context=data.seq_len)
    if proxy is None:
        if len(data.val) == 0:
            raise UserError("the corpus has no validation blocks: lower --seq-len or raise --val-fraction")
        proxy = ValidationKL(teacher, data.val[: proxy_batches * batch_size], batch_size)
    short_distill = short_distill or ShortDistill(batch_size=batch_size)

    def on_event(e: Event) -> None:
        if on_candidate is not None:
            on_candidate(e)
        if out is not None and e["event"] != "progress":
            _write_json(out / "candidates.json", SearchResult(rows, None, None, target_params).to_dict())

    ranked = proxy_candidates(teacher, scores, rows, proxy, make_candidate=make_candidate, on_event=on_event)
    best_model, best_kl = None, math.inf  # only the best student stays in memory
    for row in ranked[:top_k]:
        student = distill_candidate(teacher, scores, data, row, tokens=tokens_per_candidate, seed=seed,
                                    make_candidate=make_candidate, short_distill=short_distill,
                                    out_dir=out / row.name if out is not None else None, on_event=on_event)
        if student is not None and row.final_kl < best_kl:
            best_model, best_kl = student, row.final_kl
        student = None
    result = select(rows, target_params, best_model)
    if out is not None:
        _write_json(out / "candidates.json", result.to_dict())
    return result


def search_iterative(teacher, scores, data, *, targets: Sequence[int], score: Callable, out_dir: str | Path | None = None,
                     **kwargs) -> list[SearchResult]:
    """Several targets in order (15B → 8B → 4B): each step's winner is the next step's teacher, re-scored by
    `score(model) -> ImportanceScores` (importance depends on the weights, so the old scores do not carry over).
    Steps write under `out_dir/step<i>-<target>/`. Stops at a step whose candidates all failed."""
    if list(targets) != sorted(targets, reverse=True):
        raise UserError(f"iterative targets must shrink step by step, got {list(targets)}")
    results = []
    for i, target in enumerate(targets, 1):
        if i > 1:
            scores = score(teacher)
        step_dir = Path(out_dir) / f"step{i}-{target}" if out_dir is not None else None
        result = search(teacher, scores, data, target_params=target, out_dir=step_dir, **kwargs)
        results.append(result)
        if result.model is None:
            break
        teacher = result.model
    return results


def _finite(value, what: str) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{what} is {value}")
    return value


def _write_json(path: Path, obj: dict) -> None:
    """Write-then-rename, so a reader (or a crash) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_jsonable))
    tmp.replace(path)


def _jsonable(obj):
    if isinstance(obj, torch.Tensor):
        return obj.item() if obj.numel() == 1 else obj.tolist()
    if hasattr(obj, "__dataclass_fields__"):
        return asdict(obj)
    return str(obj)
