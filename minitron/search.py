"""Architecture search by successive halving: every candidate shape gets a short distillation, the best 1/η of them
get η times more, and so on until the last few have had the longest retraining; the best of the last round wins.

    shapes within the budget ─► round 1: n candidates × b tokens ─► best n/η ─► round 2: × ηb ─► ... ─► winner
    (archmath; an even sample        (each: prune, distil, validation            (validation LM loss
     of it when larger than n, or     LM loss or KL to the teacher)               or KL, the same
     the best n by the optional                                                   in every round)
     zero-shot proxy; depth blocks
     chosen by a window sweep)

Why retrain before ranking (arXiv 2407.14679 §4): rankings taken right after pruning reorder early in retraining,
so P1 retrains every candidate (~400 steps) and ranks by validation LM loss. Successive halving spends that budget
where it matters: cheap rounds sort out the clearly bad shapes, the close ones get the long retraining. Kendall τ
of each round against the previous one (round 1: against the proxy, when it ran) measures how much the order still
moves, P1's rank-stability finding at every budget.

The budget is one number (`budget_tokens`, the whole search) fixed before any work: `halving_schedule` splits it into
rounds of n_r candidates × b_r tokens with b_r = b_1 η^(r-1) in whole optimizer steps, every round costing about
the same; the search trains exactly those tokens (a candidate that trains any other amount fails) and never more.

Survivors restart from the pruned weights in every round; they do not continue from their previous round. Each score
is then the validation loss after one complete lightweight retraining at that round's budget, with its own warmup and
cosine decay to min_lr: the protocol P1 ranks by, so scores within a round are comparable and τ between rounds
compares one protocol at budgets η apart. Continuing would carry a schedule already decayed to min_lr into the next
round (re-warming it perturbs the ranking we measure) and ship 16 bytes per parameter of optimizer state through the
checkpoint store between rounds (128 GB for one 8B candidate). The price is tokens: with R rounds restarting costs
about R·n·b_1 where continuing would cost n·b_1·(1 + (R-1)(1 - 1/η)), 5 against 3 units for 32 candidates at η = 2.

The steps are public so the orchestration layer can spread them (a Prefect task per candidate and round):
`enumerate_rows` → `sample_rows` or `proxy_filter` → `choose_depth_blocks` → per round `distill_candidate` for each
candidate, then `close_round` → `finish`. `search` runs them all in this process. The expensive operations are
callables so the orchestration layer (and the tests) can swap them:
  make_candidate(teacher, scores, row) -> student          default: prune the teacher to the row's shape and block
  proxy(student) -> float                                   default: `ValidationKL` on a fixed small batch
  short_distill(teacher, student, data, *, tokens, seed, out_dir, callback) -> (student, metrics with "val_kl",
                                                                              "val_ce" and "tokens")
  block_score(model, layers) -> (value, tiebreak)           default: `BlockLoss` (validation LM loss)
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

from minitron.archmath import shape_spec
from minitron.errors import UserError

Event = dict  # {"event": ..., **CandidateRow.to_dict(), ...}
METRICS = ("val_loss", "val_kl")  # ranking: validation LM loss of the student (P1) or its KL to the teacher


# ----------------------------------------------------------------------------------------------------------------
# the table


@dataclass
class CandidateRow:
    """One candidate's line in the search table, filled in as the search proceeds."""

    index: int  # position in the enumeration order (stable id: names, folders, tie-breaks: width before depth)
    shape: object  # archmath.Shape
    params: int  # exact parameter count of the pruned model
    kind: str  # "width", "depth" or "mixed" (see archmath.Candidate)
    drop: tuple[int, int] | None = None  # contiguous 0-indexed block of layers removed (depth, mixed)
    # candidate (still in the search) → eliminated | failed | finalist | winner; or "not sampled" / "filtered"
    status: str = "candidate"
    proxy_kl: float | None = None  # zero-shot proxy: validation KL of the pruned, untrained model (if it ran)
    rounds: list[dict] = field(default_factory=list)  # one per round finished: round, tokens, val_loss, val_kl,
    # rank (in that round), seconds, curve [[step, val_loss, val_kl], ...]
    error: str | None = None  # "<where>: <exception>" for failed candidates
    failed_round: int | None = None  # the round a failed candidate failed in (0: before round 1)
    model_uri: str | None = None  # where its trained model was published (the flow publishes the last round's)

    @property
    def name(self) -> str:
        block = f"-drop{self.drop[0]}_{self.drop[1]}" if self.drop else ""
        return f"c{self.index:03d}-{shape_spec(vars(self.shape))}{block}"

    def score(self, metric: str, number: int | None = None) -> float | None:
        """The row's `metric` after round `number` (default: the last round it finished)."""
        if not self.rounds or (number is not None and len(self.rounds) < number):
            return None
        return self.rounds[(number or len(self.rounds)) - 1][metric]

    def identity(self) -> dict:
        """What a candidate's training depends on (the rest of the row is its results): the cache key."""
        d = self.to_dict()
        return {k: d[k] for k in ("index", "name", "shape", "params", "kind", "drop")}

    @classmethod
    def from_dict(cls, d: dict) -> CandidateRow:
        """The row back from `to_dict` (a Prefect task receives candidates as JSON, not objects)."""
        from minitron.archmath import Shape

        return cls(d["index"], Shape(**d["shape"]), d["params"], d["kind"], tuple(d["drop"]) if d.get("drop") else None,
                   d.get("status", "candidate"), d.get("proxy_kl"), [dict(r) for r in d.get("rounds", [])],
                   d.get("error"), d.get("failed_round"), d.get("model_uri"))

    def to_dict(self) -> dict:
        s = self.shape
        return {"index": self.index, "name": self.name,
                "shape": {"layers": s.layers, "hidden": s.hidden, "ffn": s.ffn, "heads": s.heads,
                          "kv_heads": s.kv_heads, "head_dim": s.head_dim},
                "params": self.params, "kind": self.kind, "drop": list(self.drop) if self.drop else None,
                "status": self.status, "proxy_kl": self.proxy_kl, "rounds": self.rounds, "error": self.error,
                "failed_round": self.failed_round, "model_uri": self.model_uri}


# ----------------------------------------------------------------------------------------------------------------
# the budget


@dataclass(frozen=True)
class Round:
    candidates: int  # trained in this round (fewer when some failed before it)
    tokens: int  # per candidate: a whole number of optimizer steps


@dataclass(frozen=True)
class HalvingSchedule:
    budget: int  # the setting: tokens for the whole search
    tokens_per_step: int
    eta: int
    rounds: tuple[Round, ...]

    @property
    def total(self) -> int:
        """Tokens the search trains when no candidate fails: at most `budget`, the rest is rounding to steps."""
        return sum(r.candidates * r.tokens for r in self.rounds)

    def describe(self) -> str:
        from minitron.config import format_count

        counts = " → ".join(str(r.candidates) for r in self.rounds)
        sizes = " → ".join(format_count(r.tokens) for r in self.rounds)
        return (f"successive halving (eta {self.eta}): {counts} candidates, {sizes} tokens each: {self.total:,} "
                f"tokens of the search's {self.budget:,}-token budget")

    def to_dict(self) -> dict:
        return {"budget": self.budget, "tokens_per_step": self.tokens_per_step, "eta": self.eta,
                "total": self.total, "rounds": [asdict(r) for r in self.rounds]}

    @classmethod
    def from_dict(cls, d: dict) -> HalvingSchedule:
        return cls(d["budget"], d["tokens_per_step"], d["eta"], tuple(Round(**r) for r in d["rounds"]))


def halving_schedule(candidates: int, budget_tokens: int, tokens_per_step: int, eta: int = 2) -> HalvingSchedule:
    """Rounds of n_1 = `candidates`, n_{r+1} = ceil(n_r / eta) until a round holds at most eta (the next cut would
    leave the winner alone: training it further decides nothing). Candidate budgets b_r = s · eta^(r-1) steps, with
    s the largest whole number of steps that keeps sum(n_r · b_r) within `budget_tokens`."""
    if candidates < 1:
        raise UserError("the search has no candidate to train")
    if eta < 2:
        raise UserError(f"search_eta must be at least 2, not {eta}")
    counts = [candidates]
    while counts[-1] > eta:
        counts.append(math.ceil(counts[-1] / eta))
    units = sum(n * eta ** r for r, n in enumerate(counts))  # round-1 budgets the whole search costs
    steps = budget_tokens // (units * tokens_per_step)
    if steps < 1:
        raise UserError(f"search_tokens = {budget_tokens:,} is below the smallest successive-halving schedule for "
                        f"{candidates} candidates ({' → '.join(map(str, counts))}, one optimizer step of "
                        f"{tokens_per_step:,} tokens each in round 1: {units * tokens_per_step:,} tokens): raise "
                        "search_tokens or lower search_max_candidates")
    return HalvingSchedule(budget_tokens, tokens_per_step, eta,
                           tuple(Round(n, steps * eta ** r * tokens_per_step) for r, n in enumerate(counts)))


def schedule_for(config, candidates: int, ranks: int = 1) -> HalvingSchedule:
    """The schedule of a run config (CompressConfig) for `candidates` candidates in round 1, each trained on `ranks`
    data-parallel ranks (the training stages' parallelism: nproc, or more GPUs where a candidate needs FSDP; a
    common multiple when candidates differ). A step is batch_size x grad_accum x seq_len tokens on every rank, so
    each candidate's budget is whole steps at that world size, and trains exactly."""
    per_step = config.batch_size * config.grad_accum * config.seq_len * ranks
    return halving_schedule(candidates, config.tokens("search_tokens"), per_step, config.search_eta)


def candidate_ranks(config, teacher, shapes, gpu) -> int:
    """The world size `schedule_for` counts steps at: the least common multiple of the ranks each candidate of
    `shapes` trains on, by the decision the dry run prints and each candidate's stage takes
    (`minitron.cost.train_parallelism` against the frozen `teacher`, a `minitron.cost.ShapeCost`, on `gpu`; None: CPU
    processes). So every round's budget is whole optimizer steps for every candidate. A shape that fits no GPU
    counts as nproc: its own stage refuses it (the dry run's check has already refused the biggest)."""
    from minitron.cost import ShapeCost, train_parallelism

    worlds = [train_parallelism(config, ShapeCost(teacher.config, shape), teacher, gpu)[0] for shape in shapes]
    return math.lcm(config.nproc, *(w.gpus for w in worlds if w is not None))


# ----------------------------------------------------------------------------------------------------------------
# ranking statistics


def kendall_tau_b(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's τ-b (ties corrected, as scipy.stats.kendalltau): (C - D) / sqrt((n0 - n1)(n0 - n2)), with n0 the
    pairs, n1/n2 the pairs tied in x/y. NaN when either side is constant or fewer than two points (scipy's choice).
    O(n²): a round ranks tens of candidates."""
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


def _tau(pairs: list[tuple[float, float]]) -> float | None:
    if len(pairs) < 2:
        return None
    tau = kendall_tau_b([a for a, _ in pairs], [b for _, b in pairs])
    return None if math.isnan(tau) else tau


def close_round(rows: list[CandidateRow], schedule: HalvingSchedule, number: int, metric: str) -> dict:
    """After round `number`: rank the rows that finished it by `metric` (ties: enumeration order, width first), keep
    the best n_{r+1} as candidates and mark the rest eliminated (none after the last round). Returns the round's
    summary, with Kendall τ-b of this round's scores against the previous round's (round 1: the proxy's)."""
    if metric not in METRICS:
        raise UserError(f"search_metric must be one of {', '.join(METRICS)}, not '{metric}'")
    rnd = schedule.rounds[number - 1]
    done = sorted((r for r in rows if r.status == "candidate" and len(r.rounds) >= number),
                  key=lambda r: (r.score(metric, number), r.index))
    for rank, r in enumerate(done, 1):
        r.rounds[number - 1]["rank"] = rank
    last = number == len(schedule.rounds)
    keep = len(done) if last else schedule.rounds[number].candidates
    for r in done[keep:]:
        r.status = "eliminated"
    before = [(r.proxy_kl, r.score(metric, 1)) for r in done if r.proxy_kl is not None] if number == 1 else \
        [(r.score(metric, number - 1), r.score(metric, number)) for r in done]
    failed = sum(r.status == "failed" and r.failed_round == number for r in rows)
    return {"round": number, "tokens_per_candidate": rnd.tokens, "planned": rnd.candidates, "trained": len(done),
            "failed": failed, "kept": min(keep, len(done)), "tokens": rnd.tokens * len(done),
            "best": done[0].name if done else None, "best_score": done[0].score(metric, number) if done else None,
            "kendall_tau": _tau(before),
            "tau_against": f"round {number - 1}" if number > 1 else "proxy" if before else None}


def finish(rows: list[CandidateRow], metric: str) -> CandidateRow | None:
    """The winner: the best score in the latest round any candidate finished (the last round, unless all of its
    candidates failed); the others of that round are finalists. None if no candidate finished round 1."""
    latest = max((len(r.rounds) for r in rows), default=0)
    if latest == 0:
        return None
    field_ = sorted((r for r in rows if len(r.rounds) == latest), key=lambda r: (r.score(metric), r.index))
    for r in field_[1:]:
        if r.status == "candidate":
            r.status = "finalist"
    field_[0].status = "winner"
    return field_[0]


# ----------------------------------------------------------------------------------------------------------------
# the space: enumeration, sample, proxy filter, depth blocks


def enumerate_rows(config, target_params: int, tolerance: float, *, axes: str = "all", space=None,
                   max_memory_bytes: int | None = None, context: int = 2048) -> list[CandidateRow]:
    """Every candidate within budget (archmath's enumeration), without those whose inference memory (bf16 weights +
    KV cache of one `context`-token sequence) exceeds `max_memory_bytes`. Nothing is sampled here."""
    from minitron.archmath import enumerate_candidates, inference_bytes

    cands = enumerate_candidates(config, target_params, tolerance, axes=axes, space=space)
    if max_memory_bytes is not None:
        fits = [c for c in cands if inference_bytes(c.shape, c.params, context) <= max_memory_bytes]
        if cands and not fits:
            least = min(inference_bytes(c.shape, c.params, context) for c in cands)
            raise UserError(f"no shape within the budget fits the memory cap of {max_memory_bytes / 2**30:.2f} GiB "
                            f"(the smallest needs {least / 2**30:.2f} GiB with a {context}-token KV cache): raise "
                            "the cap or lower the target")
        cands = fits
    return [CandidateRow(i, c.shape, c.params, c.kind) for i, c in enumerate(cands)]


def space_for(config):
    """The search space of a run config (CompressConfig): its pruning bounds, the rest the space's defaults."""
    from minitron.archmath import SearchSpace

    return SearchSpace(max_width_pruning=config.max_width_pruning, max_depth_pruning=config.max_depth_pruning,
                       prune_kv_groups=config.prune_kv_groups)


def rows_for_run(config, model_config, target_params: int) -> list[CandidateRow]:
    """`enumerate_rows` with a run config's settings (the flow, its preflight and the dry run share this)."""
    cap = int(config.memory_cap_gib * 2**30) if config.memory_cap_gib else None
    return enumerate_rows(model_config, target_params, config.tolerance, axes=config.axes, space=space_for(config),
                          max_memory_bytes=cap, context=config.seq_len)


def sample_rows(rows: list[CandidateRow], n: int) -> str:
    """The stated sample: every row when there are at most `n`, else `n` evenly spaced over the enumeration order
    (width-only shapes first, then fewer and fewer layers, each group closest to the target first), so the sample
    spans the space from end to end. The others become "not sampled". Returns how round 1 was chosen."""
    if len(rows) <= n:
        return f"the whole space ({len(rows)} shapes)"
    picked = {round(i * (len(rows) - 1) / (n - 1)) for i in range(n)} if n > 1 else {0}
    for i, r in enumerate(rows):
        if i not in picked:
            r.status = "not sampled"
    return f"an even sample of {n} of the {len(rows)} shapes (search_max_candidates)"


def prune_candidate(teacher, scores, candidate, layer_metric: str = "loss"):
    """The default `make_candidate`: the teacher pruned to the candidate's shape (weights copied, teacher intact),
    without the candidate's block of layers."""
    from minitron.prune import prune

    return prune(teacher, scores, candidate.shape, drop_layers=candidate.drop, layer_metric=layer_metric)


def _final_hidden(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Final (normed) hidden states [B, T, D]: the lm_head is applied chunk-wise by the loss, never here."""
    return model.get_decoder()(input_ids=input_ids).last_hidden_state


class ValidationKL:
    """The zero-shot proxy: mean per-token KL(teacher ‖ student) on fixed validation blocks. The teacher's final
    hidden states are computed once (KB per token, unlike its logits), so each candidate costs one student forward."""

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


def proxy_filter(teacher, scores, rows: list[CandidateRow], proxy: Callable, keep: int, *,
                 make_candidate: Callable = prune_candidate, on_event=None) -> str:
    """The optional zero-shot first filter: prune and score every row untrained, keep the best `keep` by proxy KL
    (ties: enumeration order); the others become "filtered" (or "failed" where the proxy failed)."""
    for row in rows:
        student = None
        try:
            student = make_candidate(teacher, scores, row)
            row.proxy_kl = _finite(proxy(student), "proxy KL")
        except Exception as err:  # one broken shape must not end the search
            _fail(on_event, row, "proxy", err, 0)
            continue
        finally:
            student = None  # free the pruned copy before the next one
        _event(on_event, "proxy", row)
    scored = sorted((r for r in rows if r.proxy_kl is not None), key=lambda r: (r.proxy_kl, r.index))
    for r in scored[keep:]:
        r.status = "filtered"
    return f"the best {min(keep, len(scored))} of {len(rows)} shapes by zero-shot proxy KL"


@dataclass
class BlockSweep:
    """Every position of a block of `length` contiguous layers, scored with that block removed."""

    length: int
    metric: str  # "loss": validation LM loss, lower is better; "cloze": offline cloze accuracy, higher is better
    starts: list[int]  # 0-indexed first layer of each block
    values: list[float]
    tiebreak: list[float]  # cloze: mean log-probability of the true ending among the four; loss: zeros
    best: int  # start of the chosen block

    @property
    def block(self) -> tuple[int, int]:
        return self.best, self.best + self.length - 1

    def to_dict(self) -> dict:
        return {**asdict(self), "block": list(self.block)}

    @classmethod
    def from_dict(cls, d: dict) -> BlockSweep:
        return cls(d["length"], d["metric"], list(d["starts"]), list(d["values"]), list(d["tiebreak"]), d["best"])


class _Replay(torch.nn.Module):
    """Stands in for a decoder layer: returns a fixed tensor (its cached output), or its input when there is none."""

    def __init__(self, output: torch.Tensor | None = None):
        super().__init__()
        self.output = output

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states if self.output is None else self.output


class BlockLoss:
    """`block_score` by the validation LM loss of the model with the block skipped (lower is better).

    When the input of every layer on the validation blocks fits in `cache_bytes`, one full pass keeps them, and each
    position then runs only the layers after its block: the layers before it replay their cached outputs, the block
    passes its input through. A sweep costs about half as much; the result is the same as skipping the block."""

    metric, higher_is_better = "loss", False

    def __init__(self, blocks: torch.Tensor, batch_size: int, cache_bytes: int = 2**30):
        if len(blocks) == 0:
            raise UserError("the corpus has no validation blocks to choose depth blocks on: raise val_fraction")
        self.blocks, self.batch_size, self.cache_bytes = blocks, batch_size, cache_bytes
        self._inputs: list[list[torch.Tensor]] | None = None  # per batch, the input of every layer (full model)

    def __call__(self, model, layers: list[int]) -> tuple[float, float]:
        from minitron.importance import lm_loss, skipping

        contiguous = bool(layers) and layers == list(range(layers[0], layers[-1] + 1))
        if contiguous and self._cached(model):
            return self._replayed(model, layers[0], layers[-1] + 1), 0.0
        with skipping(model, layers):
            return lm_loss(model, self.blocks, self.batch_size), 0.0

    def _batches(self):
        return self.blocks.split(self.batch_size)

    @torch.no_grad()
    def _cached(self, model) -> bool:
        from minitron.importance import layer_input

        if self._inputs is not None:
            return True
        p = next(model.parameters())
        decoder = model.model.layers
        if len(decoder) * self.blocks.numel() * model.config.hidden_size * p.element_size() > self.cache_bytes:
            return False
        self._inputs = []
        for ids in self._batches():
            seen: list[torch.Tensor] = []
            keep = seen.append
            hooks = [layer.register_forward_pre_hook(lambda m, a, kw, keep=keep: keep(layer_input(a, kw).clone()),
                                                     with_kwargs=True) for layer in decoder]
            try:
                model.model(input_ids=ids.to(p.device), use_cache=False)
            finally:
                for h in hooks:
                    h.remove()
            self._inputs.append(seen)
        return True

    @torch.no_grad()
    def _replayed(self, model, start: int, end: int) -> float:
        from minitron.importance import lm_loss

        decoder = model.model.layers
        original = list(decoder)
        total = 0.0
        try:
            for ids, inputs in zip(self._batches(), self._inputs, strict=True):
                for j in range(start):  # layer j's output is layer j + 1's input
                    decoder[j] = _Replay(inputs[j + 1])
                for j in range(start, end):
                    decoder[j] = _Replay()
                total += lm_loss(model, ids, len(ids)) * len(ids)
        finally:
            for j, layer in enumerate(original):
                decoder[j] = layer
        return total / len(self.blocks)


class BlockCloze:
    """`block_score` by the offline cloze task (P2 chose blocks by a downstream score, Winogrande): held-out passage
    prefixes with four endings, the true one and three from other documents. Value: accuracy; tie-break: the mean
    log-probability the model gives the true ending among the four (accuracy moves in steps of 1/items)."""

    metric, higher_is_better = "cloze", True

    def __init__(self, items: list[dict], tokenizer):
        if not items:
            raise UserError("the offline cloze task has no items to choose depth blocks on")
        self.items = [(tokenizer(it["context"]).input_ids,
                       [tokenizer(" " + e, add_special_tokens=False).input_ids for e in it["endings"]],
                       it["label"]) for it in items]
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    @torch.no_grad()
    def _choices(self, model, context: list[int], endings: list[list[int]]) -> torch.Tensor:
        """Summed log-probability of each ending after the context (one right-padded batch: causal attention
        never looks at the padding that follows a sequence)."""
        device = next(model.parameters()).device
        width = max(len(context) + len(e) for e in endings)
        ids = torch.full((len(endings), width), self.pad, dtype=torch.long)
        for i, e in enumerate(endings):
            ids[i, :len(context) + len(e)] = torch.tensor(context + e)
        logp = model(input_ids=ids.to(device), use_cache=False).logits.float().log_softmax(-1).cpu()
        out = []
        for i, e in enumerate(endings):
            pos = torch.arange(len(context) - 1, len(context) + len(e) - 1)
            out.append(logp[i, pos, torch.tensor(e)].sum())
        return torch.stack(out)

    def __call__(self, model, layers: list[int]) -> tuple[float, float]:
        from minitron.importance import skipping

        correct, loglik = 0, 0.0
        with skipping(model, layers):
            for context, endings, label in self.items:
                choice = self._choices(model, context, endings)
                correct += int(choice.argmax()) == label
                loglik += float(choice.log_softmax(0)[label])
        return correct / len(self.items), loglik / len(self.items)


def cloze_items(data_config, limit: int | None) -> list[dict]:
    """The offline cloze items of the run's held-out documents (minitron.eval_data), at most `limit`."""
    from minitron.eval_data import cloze_items as make_items
    from minitron.eval_data import held_out_documents

    return make_items(held_out_documents(data_config), data_config)[:limit]


@torch.no_grad()
def sweep_blocks(model, length: int, block_score: Callable) -> BlockSweep:
    """Score every block of `length` contiguous layers (a sliding window) with that block removed. Ties go to the
    earlier block."""
    n = len(model.model.layers)
    if not 1 <= length < n:
        raise UserError(f"a block of {length} layers cannot be removed from {n}")
    starts = list(range(n - length + 1))
    values, ties = zip(*(block_score(model, list(range(s, s + length))) for s in starts), strict=True)
    sign = -1 if getattr(block_score, "higher_is_better", False) else 1
    best = min(starts, key=lambda s: (sign * values[s], sign * ties[s], s))
    return BlockSweep(length, getattr(block_score, "metric", "loss"), starts, [float(v) for v in values],
                      [float(t) for t in ties], best)


def choose_depth_blocks(model, rows: list[CandidateRow], block_score: Callable) -> list[BlockSweep]:
    """For every depth and mixed candidate (still in the search, no block yet): remove the contiguous block of
    L - layers layers that hurts the full-width teacher least. One sweep per block length, shared by every candidate
    that needs it; the block is chosen at full width because width pruning keeps each layer's role."""
    full = len(model.model.layers)
    need = sorted({full - r.shape.layers for r in rows if r.status == "candidate" and r.kind in ("depth", "mixed")
                   and r.drop is None})
    sweeps = {k: sweep_blocks(model, k, block_score) for k in need}
    for r in rows:
        if r.status == "candidate" and r.kind in ("depth", "mixed") and r.drop is None:
            r.drop = sweeps[full - r.shape.layers].block
    return list(sweeps.values())


# ----------------------------------------------------------------------------------------------------------------
# training one candidate


class ShortDistill:
    """The default `short_distill`: `minitron.distill.distill` with one DistillConfig for every candidate (only the
    token budget and seed are set per call, the same for all in a round), so data order and schedule match.

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
                                "val_kl_before": result.first_val_kl, "steps": result.steps,
                                "tokens": result.tokens, "tokens_per_s": result.metrics.get("tokens_per_s")}


def _event(on_event, event: str, row: CandidateRow, **extra) -> None:
    if on_event is not None:
        on_event({"event": event, **row.to_dict(), **extra})


def _fail(on_event, row: CandidateRow, where: str, err: Exception, number: int) -> None:
    row.status, row.error, row.failed_round = "failed", f"{where}: {type(err).__name__}: {err}", number
    _event(on_event, "failed", row, traceback=traceback.format_exc())


def distill_candidate(teacher, scores, data, row: CandidateRow, *, tokens: int, seed: int, number: int,
                      make_candidate: Callable = prune_candidate, short_distill: Callable | None = None,
                      out_dir: str | Path | None = None, on_event=None):
    """Round `number` for one candidate (the unit a Prefect task maps over): prune afresh, distil for exactly
    `tokens` with the round's seed, append the round's record (validation LM loss and KL, curve) to `row.rounds`.
    Returns the student, or None if the candidate failed (recorded in the row)."""
    short_distill = short_distill or ShortDistill()
    torch.manual_seed(seed)
    record = {"round": number, "tokens": tokens, "curve": []}
    try:
        student = make_candidate(teacher, scores, row)

        def callback(m: dict) -> None:
            if m.get("val_ce") is not None:
                record["curve"].append([int(m.get("step", len(record["curve"]))), float(m["val_ce"]),
                                        None if m.get("val_kl") is None else float(m["val_kl"])])
            _event(on_event, "progress", row, round=number, metrics_point=m)

        t0 = time.perf_counter()
        student, metrics = short_distill(teacher, student, data, tokens=tokens, seed=seed,
                                         out_dir=Path(out_dir) if out_dir is not None else None, callback=callback)
        if metrics.get("tokens", tokens) != tokens:  # the budget is exact: a bug, not a rounding, if it is not
            raise RuntimeError(f"trained {metrics['tokens']:,} tokens where the schedule gave {tokens:,}")
        record.update(val_loss=_finite(metrics["val_ce"], "validation loss after distillation"),
                      val_kl=_finite(metrics["val_kl"], "validation KL after distillation"),
                      seconds=round(time.perf_counter() - t0, 3), steps=metrics.get("steps"))
    except Exception as err:
        _fail(on_event, row, f"round {number}", err, number)
        return None
    row.rounds.append(record)
    _event(on_event, "trained", row, round=number)
    return student


# ----------------------------------------------------------------------------------------------------------------
# the whole search in this process


@dataclass
class SearchResult:
    table: list[CandidateRow]  # every enumerated candidate, in enumeration order
    winner: CandidateRow | None  # best of the latest round finished; None if every candidate failed
    rounds: list[dict]  # close_round summaries: trained, failed, kept, tokens, Kendall τ
    schedule: HalvingSchedule
    target_params: int
    metric: str
    selection: str  # how round 1's candidates were chosen from the space
    sweeps: list[BlockSweep] = field(default_factory=list)  # depth-block curves
    model: torch.nn.Module | None = None  # the winner's distilled student (not serialised)

    @property
    def tokens_trained(self) -> int:
        return sum(r["tokens"] for r in self.rounds)

    def to_dict(self) -> dict:
        return {"target_params": self.target_params, "metric": self.metric, "selection": self.selection,
                "space": len(self.table), "schedule": self.schedule.to_dict(), "tokens_trained": self.tokens_trained,
                "winner": self.winner.to_dict() if self.winner else None, "rounds": self.rounds,
                "depth_blocks": [s.to_dict() for s in self.sweeps],
                "candidates": [r.to_dict() for r in self.table]}


def search(teacher, scores, data, *, target_params: int, budget_tokens: int, tolerance: float = 0.05,
           axes: str = "all", space=None, eta: int = 2, max_candidates: int = 32, metric: str = "val_loss",
           proxy: bool | Callable = False, proxy_batches: int = 2, batch_size: int = 8,
           block_score: Callable | None = None, block_batches: int = 2, max_memory_bytes: int | None = None, seed: int = 0,
           make_candidate: Callable = prune_candidate, short_distill: Callable | None = None,
           on_candidate: Callable[[Event], None] | None = None, out_dir: str | Path | None = None,
           rows: list[CandidateRow] | None = None) -> SearchResult:
    """Enumerate → sample (or proxy-filter) → depth blocks → successive halving → winner.

    `rows` replaces the enumeration (tests, or a caller that enumerated itself). `proxy`: True for `ValidationKL`
    on `proxy_batches` validation batches, or a callable. Depth blocks are scored by `block_score` (default: the
    validation LM loss on `block_batches` batches). With `out_dir`, `candidates.json` there is rewritten after every candidate, so a crash keeps the
    finished ones, and each distillation writes under `out_dir/<candidate name>-r<round>/`."""
    if metric not in METRICS:
        raise UserError(f"metric must be one of {', '.join(METRICS)}, not '{metric}'")
    if max_candidates < 1:
        raise UserError(f"max_candidates must be at least 1, not {max_candidates}")
    out = Path(out_dir) if out_dir is not None else None
    if rows is not None:  # fresh rows: the caller's (maybe reused for another run) stay untouched
        rows = [CandidateRow(r.index, r.shape, r.params, r.kind, r.drop) for r in rows]
    else:
        rows = enumerate_rows(teacher.config, target_params, tolerance, axes=axes, space=space,
                              max_memory_bytes=max_memory_bytes, context=data.seq_len)
    schedule = halving_schedule(min(len(rows), max_candidates), budget_tokens, batch_size * data.seq_len, eta)
    short_distill = short_distill or ShortDistill(batch_size=batch_size)
    state = {"rounds": [], "selection": "", "sweeps": []}

    def snapshot(winner=None, model=None) -> SearchResult:
        return SearchResult(rows, winner, state["rounds"], schedule, target_params, metric, state["selection"],
                            state["sweeps"], model)

    def on_event(e: Event) -> None:
        if on_candidate is not None:
            on_candidate(e)
        if out is not None and e["event"] != "progress":
            _write_json(out / "candidates.json", snapshot().to_dict())

    if proxy:
        if proxy is True:
            if len(data.val) == 0:
                raise UserError("the corpus has no validation blocks: lower --seq-len or raise --val-fraction")
            proxy = ValidationKL(teacher, data.val[: proxy_batches * batch_size], batch_size)
        state["selection"] = proxy_filter(teacher, scores, rows, proxy, max_candidates,
                                          make_candidate=make_candidate, on_event=on_event)
    else:
        state["selection"] = sample_rows(rows, max_candidates)
    if any(r.status == "candidate" and r.kind != "width" and r.drop is None for r in rows):
        state["sweeps"] = choose_depth_blocks(
            teacher, rows, block_score or BlockLoss(data.val[: block_batches * batch_size], batch_size))
    best_model = None  # only the best student of the latest round stays in memory
    for number, rnd in enumerate(schedule.rounds, 1):
        round_best, best_score = None, math.inf
        for row in [r for r in rows if r.status == "candidate"]:
            student = distill_candidate(teacher, scores, data, row, tokens=rnd.tokens, seed=seed, number=number,
                                        make_candidate=make_candidate, short_distill=short_distill,
                                        out_dir=out / f"{row.name}-r{number}" if out is not None else None,
                                        on_event=on_event)
            if student is not None and row.score(metric) < best_score:
                round_best, best_score = student, row.score(metric)
            student = None
        if round_best is not None:
            best_model = round_best
        state["rounds"].append(close_round(rows, schedule, number, metric))
        if out is not None:
            _write_json(out / "candidates.json", snapshot().to_dict())
    winner = finish(rows, metric)
    result = snapshot(winner, best_model if winner is not None else None)
    if out is not None:
        _write_json(out / "candidates.json", result.to_dict())
    return result


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
