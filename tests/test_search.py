"""Architecture search: the successive-halving schedule and its exact token accounting, rounds and Kendall τ by
hand, failure isolation, the optional proxy filter and the stated sample, the enumeration against built models, a
planted answer that the real modules must find (a lossless shape and a removable block), and the CLI."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest
import torch
from scipy.stats import kendalltau

from minitron.errors import UserError
from minitron.search import CandidateRow, halving_schedule, kendall_tau_b, sample_rows, search


class Shape:  # the fields the search table reads; archmath.Shape has the same ones
    def __init__(self, layers, hidden=64, ffn=128, heads=4, kv_heads=2, head_dim=16):
        self.layers, self.hidden, self.ffn, self.heads, self.kv_heads, self.head_dim = \
            layers, hidden, ffn, heads, kv_heads, head_dim


def rows(n):
    return [CandidateRow(i, Shape(layers=10 + i), params=1000 + i, kind="width") for i in range(n)]


DATA = SimpleNamespace(seq_len=32, val=torch.zeros(0, 32))  # 4 x 32 = 128 tokens per step below
BASE = 25_000 // (24 * 128) * 128  # 8 → 4 → 2 candidates cost 8 + 4·2 + 2·4 = 24 round-1 budgets: 8 steps each


class Recorder:
    """Plain functions standing in for prune and distillation: candidate i's score after a round of t tokens is
    `scores[t][i]`, so the test knows who must survive each round."""

    def __init__(self, scores, raise_at=(), tokens_off=()):
        self.scores, self.raise_at, self.tokens_off = scores, set(raise_at), set(tokens_off)
        self.calls, self.events = [], []

    def make_candidate(self, teacher, scores, row):
        return {"index": row.index}

    def short_distill(self, teacher, student, data, *, tokens, seed, out_dir, callback):
        i = student["index"]
        self.calls.append((i, tokens, seed))
        if (i, tokens) in self.raise_at:
            raise RuntimeError("out of memory")
        value = self.scores[tokens][i]
        for step in (0, tokens // 128):  # validation before and after: a falling curve ending at the score
            callback({"step": step, "val_ce": value + (1 if step == 0 else 0), "val_kl": value / 10})
        trained = tokens - 128 if (i, tokens) in self.tokens_off else tokens
        return {"trained": i, "tokens": tokens}, {"val_ce": value, "val_kl": value / 10, "tokens": trained}

    def run(self, n, **kw):
        kw = {"budget_tokens": 25_000, "rows": rows(n), **kw}
        return search("teacher", "scores", DATA, target_params=1000, batch_size=4, seed=7,
                      make_candidate=self.make_candidate, short_distill=self.short_distill,
                      on_candidate=self.events.append, **kw)


def test_schedule_by_hand():
    s = halving_schedule(8, 25_000, 128, eta=2)
    assert [(r.candidates, r.tokens) for r in s.rounds] == [(8, 1024), (4, 2048), (2, 4096)]
    assert s.total == 8 * 1024 + 4 * 2048 + 2 * 4096 == 24_576 <= 25_000
    # 32 candidates at the GPU preset's 16 x 1024 tokens per step: 24 steps in round 1, 384 in the last
    gpu = halving_schedule(32, 64_000_000, 16_384)
    assert [r.candidates for r in gpu.rounds] == [32, 16, 8, 4, 2]
    assert [r.tokens // 16_384 for r in gpu.rounds] == [24, 48, 96, 192, 384]
    assert gpu.total == 160 * 24 * 16_384 == 62_914_560
    # eta 3: 10 → ceil(10/3) = 4 → 2 (a round of at most eta is the last); 10 + 4·3 + 2·9 = 40 round-1 budgets
    three = halving_schedule(10, 40 * 100 + 99, 100, eta=3)
    assert [(r.candidates, r.tokens) for r in three.rounds] == [(10, 100), (4, 300), (2, 900)]
    assert halving_schedule(2, 1000, 100).rounds == halving_schedule(2, 1000, 100).rounds[:1]  # one round of 2
    with pytest.raises(UserError, match="below the smallest successive-halving schedule for 8 candidates"):
        halving_schedule(8, 24 * 128 - 1, 128)


def test_round_budgets_are_whole_steps_on_every_candidates_ranks():
    """Llama-3.1-8B on an H100 at nproc 1: a 4.5B student (16 bytes a trained parameter = 72 GB, beside the bf16
    teacher) needs FSDP over 2 GPUs, a 1B one trains in one process. The schedule counts steps of 2 ranks, so both
    train their round's budget exactly; on CPU processes every candidate runs on nproc ranks."""
    from minitron.archmath import Shape, shape_of
    from minitron.config import make_config
    from minitron.cost import GPUS, ShapeCost
    from minitron.models import load_config
    from minitron.search import candidate_ranks, schedule_for

    config = load_config("llama-3.1-8b")
    teacher = ShapeCost(config, shape_of(config))
    shapes = [Shape(32, 3072, 9216, 32, 8, 128), Shape(16, 2048, 4096, 16, 8, 128)]
    cfg = make_config({"teacher": "llama-3.1-8b", "search_tokens": "100M"})
    assert candidate_ranks(cfg, teacher, shapes, GPUS["h100-80gb"]) == 2
    assert candidate_ranks(cfg, teacher, shapes[1:], GPUS["h100-80gb"]) == 1
    assert candidate_ranks(make_config({"teacher": "llama-3.1-8b", "nproc": 3}), teacher, shapes, None) == 3
    step = cfg.batch_size * cfg.grad_accum * cfg.seq_len
    assert all(r.tokens % (2 * step) == 0 for r in schedule_for(cfg, 2, ranks=2).rounds)


def test_search_trains_exactly_the_scheduled_tokens(tmp_path):
    scores = {1024: [0.8, 0.3, 0.5, 0.9, 0.4, 0.7, 0.6, 0.2], 2048: {7: 0.25, 1: 0.15, 4: 0.35, 2: 0.1},
              4096: {2: 0.05, 1: 0.08}}
    rec = Recorder(scores)
    result = rec.run(8, out_dir=tmp_path)
    assert BASE == 1024 and result.schedule.total == 24_576
    assert sorted((t, i) for i, t, _ in rec.calls) == sorted(
        [(1024, i) for i in range(8)] + [(2048, i) for i in (1, 2, 4, 7)] + [(4096, i) for i in (1, 2)])
    assert {seed for _, _, seed in rec.calls} == {7}  # the same seed (data order) for everyone
    assert result.tokens_trained == sum(t for _, t, _ in rec.calls) == 24_576
    saved = json.loads((tmp_path / "candidates.json").read_text())
    assert saved["schedule"]["total"] == saved["tokens_trained"] == 24_576 and saved["schedule"]["budget"] == 25_000
    # a candidate that trains any other amount than its round's budget fails: the budget is exact
    off = Recorder(scores, tokens_off=[(3, 1024)]).run(8)
    assert off.table[3].status == "failed" and "trained 896 tokens where the schedule gave 1,024" in off.table[3].error


def test_rounds_keep_the_best_and_kendall_tau_by_hand():
    scores = {1024: [0.8, 0.3, 0.5, 0.9, 0.4, 0.7, 0.6, 0.2], 2048: {7: 0.25, 1: 0.15, 4: 0.35, 2: 0.1},
              4096: {2: 0.05, 1: 0.08}}
    result = Recorder(scores).run(8)
    r1, r2, r3 = result.rounds
    assert (r1["trained"], r1["kept"], r1["best"]) == (8, 4, result.table[7].name)
    assert r1["kendall_tau"] is None and r1["tau_against"] is None  # no proxy ran
    # round 1 order of the survivors 7, 1, 4, 2 (0.2 < 0.3 < 0.4 < 0.5) against round 2's 0.25, 0.15, 0.35, 0.1:
    # pairs (7,4) and (1,4) concordant, the other four discordant → τ = (2 - 4) / 6
    assert r2["kendall_tau"] == pytest.approx(-1 / 3) and r2["tau_against"] == "round 1"
    assert r3["kendall_tau"] == pytest.approx(1.0) and (r3["trained"], r3["kept"]) == (2, 2)
    assert result.winner.index == 2 and result.model == {"trained": 2, "tokens": 4096}
    status = {r.index: r.status for r in result.table}
    assert status == {0: "eliminated", 1: "finalist", 2: "winner", 3: "eliminated", 4: "eliminated",
                      5: "eliminated", 6: "eliminated", 7: "eliminated"}
    assert [len(r.rounds) for r in result.table] == [1, 3, 3, 1, 2, 1, 1, 2]
    assert [rec["rank"] for rec in result.table[2].rounds] == [4, 1, 1]
    assert result.table[2].rounds[1]["curve"] == [[0, pytest.approx(1.1), pytest.approx(0.01)],
                                                  [16, pytest.approx(0.1), pytest.approx(0.01)]]
    # ties go to the enumeration order (width-only shapes first): candidates 0 and 1 tie, 0 survives
    tied = Recorder({1024: [0.5, 0.5, 0.9], 2048: {0: 0.1, 1: 0.2}}).run(3, budget_tokens=7 * 1024)
    assert [r.status for r in tied.table] == ["winner", "finalist", "eliminated"]


def test_failed_candidate_is_recorded_and_search_goes_on(tmp_path):
    # 3 fails in round 1, 1 (a survivor) in round 2; the others carry on and the budget is never exceeded
    scores = {1024: [0.8, 0.3, 0.5, 0.9, 0.4, 0.7, 0.6, 0.2], 2048: {7: 0.25, 4: 0.35, 2: 0.1},
              4096: {2: 0.05, 7: 0.07}}
    rec = Recorder(scores, raise_at=[(3, 1024), (1, 2048)])
    result = rec.run(8, out_dir=tmp_path)
    t = {r.index: r for r in result.table}
    assert (t[3].status, t[3].failed_round, t[3].error) == ("failed", 1, "round 1: RuntimeError: out of memory")
    assert (t[1].status, t[1].failed_round) == ("failed", 2) and len(t[1].rounds) == 1
    assert [(r["trained"], r["failed"], r["kept"]) for r in result.rounds] == [(7, 1, 4), (3, 1, 2), (2, 0, 2)]
    assert result.winner.index == 2
    assert result.tokens_trained == 7 * 1024 + 3 * 2048 + 2 * 4096 < result.schedule.total
    saved = json.loads((tmp_path / "candidates.json").read_text())
    assert saved["winner"]["index"] == 2 and [c["status"] for c in saved["candidates"]][:4] == \
        ["eliminated", "failed", "winner", "failed"]
    failed = [e for e in rec.events if e["event"] == "failed"]
    assert [e["index"] for e in failed] == [3, 1] and "RuntimeError" in failed[0]["traceback"]
    # every candidate of the last round failing leaves the best of the round before, its model included
    last = Recorder(scores, raise_at=[(2, 4096), (7, 4096), (3, 1024), (1, 2048)]).run(8)
    assert last.winner.index == 2 and len(last.winner.rounds) == 2 and last.model == {"trained": 2, "tokens": 2048}
    none = Recorder({1024: [0.1, 0.2]}, raise_at=[(0, 1024), (1, 1024)]).run(2, budget_tokens=1024)
    assert none.winner is None and none.model is None


def test_non_finite_score_is_a_failure():
    result = Recorder({1024: [float("nan"), 1.0]}).run(2, budget_tokens=2048)
    assert result.table[0].status == "failed" and "nan" in result.table[0].error and result.winner.index == 1


def test_proxy_filter_is_optional_and_ranks_round_one_against_it():
    proxy = {0: 3.0, 1: 1.0, 2: 2.0, 3: 9.0, 4: 0.5, 5: 8.0}  # best four by proxy: 4, 1, 2, 0

    def score(student):
        if student["index"] == 5:
            raise RuntimeError("shape 5 does not fit")
        return proxy[student["index"]]

    scores = {2048: [0.4, 0.3, 0.1, 0.0, 0.2, 0.0], 4096: {2: 0.1, 4: 0.2}}
    rec = Recorder(scores)
    result = rec.run(6, max_candidates=4, proxy=score, budget_tokens=8 * 2048)
    t = {r.index: r for r in result.table}
    assert result.selection == "the best 4 of 6 shapes by zero-shot proxy KL"
    assert t[3].status == "filtered" and (t[5].status, t[5].error) == ("failed", "proxy: RuntimeError: shape 5 "
                                                                                  "does not fit")
    assert sorted(i for i, t_, _ in rec.calls if t_ == 2048) == [0, 1, 2, 4]
    # proxy order 4, 1, 2, 0 (0.5 < 1 < 2 < 3) against round 1's 0.2, 0.3, 0.1, 0.4: only the pairs with 2,
    # (4,2) and (1,2), are discordant → τ = (4 - 2) / 6
    assert result.rounds[0]["kendall_tau"] == pytest.approx(1 / 3) and result.rounds[0]["tau_against"] == "proxy"
    # off (the default): no proxy, an even sample when the space is larger than the first round
    plain = Recorder({1024: [0.1] * 6, 2048: {0: 0.1, 5: 0.2}}).run(6, max_candidates=2, budget_tokens=4096)
    assert plain.selection.startswith("an even sample of 2 of the 6") and all(r.proxy_kl is None
                                                                               for r in plain.table)
    assert [r.status for r in plain.table] == ["winner"] + ["not sampled"] * 4 + ["finalist"]


def test_sample_is_even_over_the_order():
    table = rows(10)
    assert sample_rows(table, 4) == "an even sample of 4 of the 10 shapes (search_max_candidates)"
    assert [r.index for r in table if r.status == "candidate"] == [0, 3, 6, 9]
    whole = rows(3)
    assert sample_rows(whole, 4) == "the whole space (3 shapes)" and all(r.status == "candidate" for r in whole)


@pytest.mark.parametrize("seed", range(6))
def test_kendall_tau_b_matches_scipy(seed):
    rng = random.Random(seed)
    n = rng.randint(2, 12)
    x = [rng.choice([0.1, 0.2, 0.3, 0.5]) if seed % 2 else rng.random() for _ in range(n)]  # odd seeds: ties
    y = [rng.choice([1, 2, 3]) if seed % 3 == 0 else rng.random() for _ in range(n)]
    assert kendall_tau_b(x, y) == pytest.approx(kendalltau(x, y).statistic, nan_ok=True)


def test_kendall_tau_b_hand_values():
    assert kendall_tau_b([1, 2, 3], [1, 2, 3]) == 1.0
    assert kendall_tau_b([1, 2, 3], [3, 2, 1]) == -1.0
    # pairs: (1,2) C, (1,3) C, (2,3) tied in x → (2 - 0) / sqrt(3 * 2)
    assert kendall_tau_b([1, 2, 2], [1, 2, 3]) == pytest.approx(2 / 6 ** 0.5)


# ----------------------------------------------------------------------------------------------------------------
# with the real modules: enumeration against built models, a planted answer, the CLI


def _brute_force(model, target, tol, kv_options):
    """Every shape the default space allows (width axes keep ≥ min(60%, target/teacher), layers ≥ 80%, widths in
    multiples of 8 (hidden) and 16 (MLP) at this size, query heads per KV group), counted by building the pruned
    model on the meta device: no formula shared with archmath."""
    import math

    from minitron.models import build_meta_model

    c = model.config
    L, H, F, Q, KV = c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads, \
        c.num_key_value_heads
    total = sum(p.numel() for p in build_meta_model(c).parameters())
    keep = min(0.6, target / total)
    found = set()
    for layers in range(math.ceil(0.8 * L), L + 1):
        for hidden in range(8, H + 1, 8):
            for ffn in range(16, F + 1, 16):
                for kv in kv_options:
                    for per in range(1, Q // KV + 1):
                        if hidden < keep * H or ffn < keep * F or per < keep * (Q // KV) or \
                                (layers, hidden, ffn, per * kv, kv) == (L, H, F, Q, KV) or hidden % (per * kv):
                            continue
                        cfg = c.to_dict() | dict(num_hidden_layers=layers, hidden_size=hidden,
                                                 intermediate_size=ffn, num_attention_heads=per * kv,
                                                 num_key_value_heads=kv)
                        params = sum(p.numel() for p in build_meta_model(type(c).from_dict(cfg)).parameters())
                        if target * (1 - tol) <= params <= target * (1 + tol):
                            found.add((layers, hidden, ffn, per * kv, kv, params))
    return found


@pytest.mark.parametrize("target,tol,kv_groups", [(100_000, 0.1, False), (140_000, 0.05, False),
                                                  (120_000, 0.1, True)])
def test_enumeration_is_exactly_the_shapes_within_budget(tiny_model, target, tol, kv_groups):
    from minitron.archmath import SearchSpace
    from minitron.search import enumerate_rows

    model = tiny_model("llama")
    got = enumerate_rows(model.config, target, tol, space=SearchSpace(prune_kv_groups=kv_groups))
    shapes = {(r.shape.layers, r.shape.hidden, r.shape.ffn, r.shape.heads, r.shape.kv_heads, r.params)
              for r in got}
    assert shapes == _brute_force(model, target, tol, (1, 2) if kv_groups else (2,)) and len(got) == len(shapes)
    # the documented order: more layers first, then closest to the target
    keys = [(-r.shape.layers, abs(r.params - target)) for r in got]
    assert keys == sorted(keys)
    assert {r.kind for r in got if r.shape.layers < 4} <= {"mixed", "depth"} and all(r.drop is None for r in got)


def test_enumeration_skips_shapes_the_config_class_rejects(tiny_model):
    """LlamaConfig (not MistralConfig) rejects hidden % heads != 0 even with an explicit head_dim; the two families
    count parameters identically, so Llama's candidates are exactly Mistral's with divisible hidden sizes."""
    from minitron.search import enumerate_rows

    wide = dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=3)
    shapes = {}
    for family in ("llama", "mistral"):
        config = tiny_model(family, **wide).config
        shapes[family] = {(r.shape, r.params) for r in enumerate_rows(config, 150_000, 0.3)}
    assert any(s.hidden % s.heads for s, _ in shapes["mistral"])  # the case exists
    assert shapes["llama"] == {(s, p) for s, p in shapes["mistral"] if s.hidden % s.heads == 0}


def test_memory_cap_keeps_exactly_the_shapes_that_fit(tiny_model):
    """Inference memory = bf16 weights + K and V of every layer for one context: 2 bytes x (params +
    2 x layers x kv_heads x head_dim x context). The cap keeps exactly the shapes at or under it."""
    from minitron.archmath import SearchSpace
    from minitron.search import enumerate_rows

    config = tiny_model("llama").config
    context, space = 128, SearchSpace(max_depth_pruning=0.25)
    every = enumerate_rows(config, 100_000, 0.1, space=space)
    need = {r.index: 2 * (r.params + 2 * r.shape.layers * r.shape.kv_heads * r.shape.head_dim * context)
            for r in every}
    cap = sorted(need.values())[len(need) // 2]  # the median: some shapes fit, some do not
    kept = enumerate_rows(config, 100_000, 0.1, space=space, max_memory_bytes=cap, context=context)
    assert {r.shape for r in kept} == {r.shape for r in every if need[r.index] <= cap}
    assert 0 < len(kept) < len(every)
    with pytest.raises(UserError, match="memory cap"):
        enumerate_rows(config, 100_000, 0.1, space=space, max_memory_bytes=min(need.values()) - 1, context=context)


@pytest.fixture(scope="module")
def planted():
    """A tiny teacher with a planted answer: the last quarter of every MLP is dead (gate and up rows zero, so those
    neurons output exactly 0 and score 0) and layer 3 (index 2) is an identity (o_proj and down_proj zero), so the
    shape L3-h64-f96 without layer 3 computes exactly the teacher's function while every other shape in the space
    changes it. The data are the teacher's own samples (a sharpened head makes them informative), so removing any
    other layer raises the validation loss."""
    from conftest import build_tiny_model

    from minitron.data import TokenData
    from minitron.importance import compute_importance

    torch.manual_seed(0)
    teacher = build_tiny_model("llama", tie_word_embeddings=False)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(6)
        for layer in teacher.model.layers:
            layer.mlp.gate_proj.weight[96:] = 0
            layer.mlp.up_proj.weight[96:] = 0
        teacher.model.layers[2].self_attn.o_proj.weight.zero_()
        teacher.model.layers[2].mlp.down_proj.weight.zero_()
        ids = torch.randint(0, 256, (64, 1))
        for _ in range(31):
            logits = teacher(input_ids=ids).logits[:, -1].float()
            ids = torch.cat([ids, torch.multinomial(logits.softmax(-1), 1)], 1)
    data = TokenData(ids[:48], ids[48:], 64, ids.numel(), 32, "teacher samples")
    scores = compute_importance(teacher, data.train[:16], batch_size=8)
    return teacher, data, scores


def test_halving_finds_the_planted_shape_and_the_sweep_its_block(planted):
    from minitron.archmath import SearchSpace, Shape, count_shape
    from minitron.importance import lm_loss
    from minitron.search import BlockLoss, ShortDistill, sweep_blocks

    teacher, data, scores = planted
    answer = Shape(3, 64, 96, 4, 2, 16)
    # the band 0.97 x (1 ± 6%) around the answer holds no other lossless shape (f112 and up are lossless too)
    result = search(teacher, scores, data, target_params=int(0.97 * count_shape(teacher.config, answer)),
                    tolerance=0.06,
                    space=SearchSpace(max_depth_pruning=0.25), budget_tokens=48 * 128, max_candidates=16,
                    metric="val_kl", batch_size=4, block_batches=4,
                    short_distill=ShortDistill(batch_size=4, lr=1e-4, weight_decay=0.0, eval_every=100,
                                               val_batches=4, device="cpu", progress=False))
    assert result.selection == "the whole space (7 shapes)"
    assert [r.candidates for r in result.schedule.rounds] == [7, 4, 2]
    # the window sweep: removing layer 3 leaves the validation loss exactly as it was, every other block raises it
    (sweep,) = result.sweeps
    base = BlockLoss(data.val[:16], 4)(teacher, [])[0]
    assert sweep.length == 1 and sweep.block == (2, 2) and sweep.values[2] == pytest.approx(base, abs=1e-6)
    assert min(v for s, v in zip(sweep.starts, sweep.values, strict=True) if s != 2) > base + 0.05
    assert base == pytest.approx(lm_loss(teacher, data.val[:16], 4))
    hooks_only = BlockLoss(data.val[:16], 4, cache_bytes=0)  # no cached layer inputs: every layer runs again
    assert sweep.values == pytest.approx([hooks_only(teacher, [s])[0] for s in sweep.starts], abs=1e-5)
    pairs = sweep_blocks(teacher, 2, BlockLoss(data.val[:16], 4))
    assert pairs.values == pytest.approx([hooks_only(teacher, [s, s + 1])[0] for s in (0, 1, 2)], abs=1e-5)
    # successive halving keeps the lossless shape through every round and picks it
    winner = result.winner
    assert (winner.shape, winner.drop, winner.status) == (answer, (2, 2), "winner")
    assert len(winner.rounds) == 3 and winner.rounds[0]["curve"][0][2] < 1e-6  # KL right after pruning: 0
    assert [rec["rank"] for rec in winner.rounds] == [1, 1, 1]
    others = [rec["val_kl"] for r in result.table if r is not winner for rec in r.rounds]
    assert winner.rounds[-1]["val_kl"] < 0.5 * min(others)


def test_sweep_by_cloze_scores_the_four_endings(planted):
    from minitron.search import BlockCloze, sweep_blocks

    teacher, data, _ = planted

    class Tok:  # ids as "text": the items are built from the teacher's own samples
        pad_token_id = 0

        def __call__(self, text, add_special_tokens=True):
            return SimpleNamespace(input_ids=[int(t) for t in text.split()])

    seqs = [" ".join(map(str, s.tolist())) for s in data.val]
    items = [{"context": " ".join(s.split()[:20]), "endings": [" ".join(o.split()[20:]) for o in
             (seqs[(i + k) % 16] for k in (0, 1, 2, 3))], "label": 0} for i, s in enumerate(seqs)]
    cloze = BlockCloze(items, Tok())
    context, endings, _ = cloze.items[0]
    got = cloze._choices(teacher, context, endings)
    for e, value in zip(endings, got, strict=True):  # one sequence at a time, no padding
        logp = teacher(input_ids=torch.tensor([context + e])).logits[0].float().log_softmax(-1)
        assert float(value) == pytest.approx(float(sum(logp[len(context) - 1 + j, t] for j, t in enumerate(e))),
                                             abs=1e-4)
    sweep = sweep_blocks(teacher, 1, cloze)  # higher is better: the block whose removal keeps the most accuracy
    assert sweep.metric == "cloze" and sweep.block == (2, 2)
    assert sweep.values[2] == max(sweep.values) and sweep.tiebreak[2] == max(sweep.tiebreak)


def _kl_full_logits(teacher, student, blocks):
    """Mean per-token KL(teacher ‖ student) from full logits, the reference for the proxy and the final KL."""
    import torch.nn.functional as F

    t = F.log_softmax(teacher(blocks).logits.float(), -1)
    s = F.log_softmax(student(blocks).logits.float(), -1)
    return float((t.exp() * (t - s)).sum(-1).mean())


def test_proxy_is_validation_kl_of_pruned_model(planted):
    from minitron.search import ValidationKL, enumerate_rows, prune_candidate

    teacher, data, scores = planted
    blocks = data.val[:6]
    proxy = ValidationKL(teacher, blocks, batch_size=4)  # 2 batches, the last one short
    with torch.no_grad():
        for row in enumerate_rows(teacher.config, 100_000, 0.03)[:4]:
            student = prune_candidate(teacher, scores, row)
            assert proxy(student) == pytest.approx(_kl_full_logits(teacher, student, blocks), rel=1e-4)


@pytest.fixture
def tiny_search_setup(tmp_path, tiny_model, tiny_tokenizer, text_corpus):
    from minitron.data import load_token_data
    from minitron.importance import compute_importance
    from minitron.models import save_model

    teacher = tiny_model("llama")
    folder = save_model(teacher, tiny_tokenizer, tmp_path / "teacher")
    data = load_token_data(str(text_corpus), tiny_tokenizer, 32, val_fraction=0.2)
    scores = compute_importance(teacher, data.calibration(16), batch_size=8, val_blocks=data.val[:4])
    scores.save(tmp_path / "scores.safetensors")
    return teacher, folder, data, scores, tmp_path / "scores.safetensors"


def test_cli_search_end_to_end(tiny_search_setup, text_corpus, tmp_path, capsys):
    from cli.main import main
    from minitron.models import load_model

    teacher, folder, data, scores, scores_path = tiny_search_setup
    out = tmp_path / "search"
    args = ["search", str(folder), "--scores", str(scores_path), "--data", str(text_corpus), "--val-fraction",
            "0.2", "--target-params", "100K", "--tolerance", "0.1", "--max-depth-pruning", "0.25",
            "--max-candidates", "5", "--budget-tokens", "3K", "--depth-block-metric", "cloze", "--cloze-items", "6",
            "--seq-len", "32", "--batch-size", "4", "--eval-every", "2", "--val-batches", "2", "--out", str(out)]
    assert main(args) == 0
    saved = json.loads((out / "candidates.json").read_text())
    # 5 → 3 → 2 candidates; 5 + 3·2 + 2·4 = 19 round-1 budgets of one 128-token step in 3,000 tokens
    assert [r["candidates"] for r in saved["schedule"]["rounds"]] == [5, 3, 2]
    assert saved["tokens_trained"] == saved["schedule"]["total"] == 19 * 128
    cands = saved["candidates"]
    assert len(cands) == saved["space"] and sum(c["status"] != "not sampled" for c in cands) == 5
    (sweep,) = saved["depth_blocks"]
    assert sweep["metric"] == "cloze" and len(sweep["starts"]) == 4
    assert all(c["drop"] == sweep["block"] for c in cands if c["kind"] != "width" and c["status"] != "not sampled")
    winner = saved["winner"]
    last = max(c["rounds"][-1]["val_loss"] for c in cands if len(c["rounds"]) == 3 and c["index"] != winner["index"])
    assert winner["status"] == "winner" and winner["rounds"][-1]["val_loss"] <= last
    for c in cands:  # every round's curve: validation before training, every 2 steps and at the end
        for rec in c["rounds"]:
            assert rec["curve"][0][0] == 0 and rec["curve"][-1][0] == rec["tokens"] // 128 == rec["steps"]
            assert rec["curve"][-1][1] == pytest.approx(rec["val_loss"])
    # the saved winner is the distilled model: its KL on the validation blocks is the reported one
    student, _ = load_model(str(out / "winner"))
    assert sum(p.numel() for p in student.parameters()) == winner["params"]
    with torch.no_grad():
        assert _kl_full_logits(teacher, student, data.val[:8]) == pytest.approx(winner["rounds"][-1]["val_kl"],
                                                                               rel=1e-3)
    for png in ("halving.png", "pareto.png", "depth_blocks.png"):
        assert (out / png).stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "successive halving (eta 2): 5 → 3 → 2 candidates" in printed and "tokens trained: 2,432" in printed
    # a second run into the same folder is refused before any work; so is the multi-target form
    assert main(args) == 2
    iterative = [a if a != "100K" else "130K,100K" for a in args[:-1]] + [str(tmp_path / "other")]
    assert main(iterative) == 2 and not (tmp_path / "other").exists()
    err = capsys.readouterr().err
    assert "already holds a search" in err and "minitron run" in err and err.count("\n") == 2
