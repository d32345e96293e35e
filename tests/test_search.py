"""Architecture search: selection after distillation, failure isolation, Kendall τ-b, enumeration and the CLI."""

from __future__ import annotations

import json
import random

import pytest
from scipy.stats import kendalltau

from minitron.search import CandidateRow, kendall_tau_b, search, search_iterative


class Shape:  # the fields the search table reads; archmath.Shape has the same ones
    def __init__(self, layers, hidden=64, ffn=128, heads=4, kv_heads=2, head_dim=16):
        self.layers, self.hidden, self.ffn, self.heads, self.kv_heads, self.head_dim = \
            layers, hidden, ffn, heads, kv_heads, head_dim


def rows(n):
    return [CandidateRow(i, Shape(layers=10 + i), params=1000 + i, kind="mixed") for i in range(n)]


class Recorder:
    """Plain functions standing in for prune / proxy / distillation: each candidate's numbers are given up front,
    so the test knows which one must win."""

    def __init__(self, proxy_kl, final_kl, raise_at=()):
        self.proxy_kl, self.final_kl, self.raise_at = proxy_kl, final_kl, set(raise_at)
        self.distilled, self.events, self.seeds = [], [], []

    def make_candidate(self, teacher, scores, row):
        return {"index": row.index}

    def proxy(self, student):
        if ("proxy", student["index"]) in self.raise_at:
            raise RuntimeError(f"shape {student['index']} does not fit")
        return self.proxy_kl[student["index"]]

    def short_distill(self, teacher, student, data, *, tokens, seed, out_dir, callback):
        i = student["index"]
        self.distilled.append(i)
        self.seeds.append((tokens, seed))
        if ("distill", i) in self.raise_at:
            raise RuntimeError("out of memory")
        for step in (10, 20):  # a falling loss curve ending at the final KL
            callback({"step": step, "val_kl": self.final_kl[i] + (20 - step) / 10, "val_ce": 1.0})
        return {"trained": i}, {"val_kl": self.final_kl[i], "val_ce": 2.0}

    def run(self, n, top_k, **kw):
        return search("teacher", "scores", "data", target_params=1000, top_k=top_k, tokens_per_candidate=4096,
                      seed=7, rows=rows(n), make_candidate=self.make_candidate, proxy=self.proxy,
                      short_distill=self.short_distill, on_candidate=self.events.append, **kw)


def test_selection_uses_loss_after_distillation_not_proxy():
    # proxy order: 0 < 1 < 2 < 3 < 4; after distillation candidate 2 (proxy rank 3) is best; 4 is never distilled
    rec = Recorder(proxy_kl=[1.0, 2.0, 3.0, 4.0, 5.0], final_kl=[0.9, 0.8, 0.3, 0.5, 0.0])
    result = rec.run(5, top_k=4)
    assert sorted(rec.distilled) == [0, 1, 2, 3]
    assert rec.seeds == [(4096, 7)] * 4  # same budget and seed for every candidate
    assert result.winner.index == 2 and result.model == {"trained": 2}
    assert [r.final_rank for r in result.table] == [4, 3, 1, 2, None]
    assert [r.proxy_rank for r in result.table] == [1, 2, 3, 4, 5]
    assert [r.status for r in result.table] == ["distilled"] * 4 + ["proxied"]
    # proxy ranks 1,2,3,4 vs final ranks 4,3,1,2: C=1 (pair 2,3), D=5 → τ = -4/6
    assert result.kendall_tau == pytest.approx(-4 / 6)
    assert result.table[2].curve == [(10, 1.3), (20, 0.3)]


def test_failed_candidate_is_recorded_and_search_goes_on(tmp_path):
    # 1 fails in the proxy (so 3 moves into the top 3), 0 fails in distillation; 2 wins among the rest
    rec = Recorder(proxy_kl=[1.0, 0.5, 2.0, 3.0, 9.0], final_kl=[0.1, 0.2, 0.4, 0.6, 0.0],
                   raise_at=[("proxy", 1), ("distill", 0)])
    result = rec.run(5, top_k=3, out_dir=tmp_path)
    assert sorted(rec.distilled) == [0, 2, 3]
    status = {r.index: r.status for r in result.table}
    assert status == {0: "failed", 1: "failed", 2: "distilled", 3: "distilled", 4: "proxied"}
    assert result.table[1].error == "proxy: RuntimeError: shape 1 does not fit"
    assert result.table[0].error == "distill: RuntimeError: out of memory"
    assert result.winner.index == 2
    saved = json.loads((tmp_path / "candidates.json").read_text())
    assert saved["winner"]["index"] == 2 and saved["kendall_tau"] == pytest.approx(1.0)
    assert [c["status"] for c in saved["candidates"]] == ["failed", "failed", "distilled", "distilled", "proxied"]
    assert saved["candidates"][2]["shape"] == {"layers": 12, "hidden": 64, "ffn": 128, "heads": 4, "kv_heads": 2,
                                               "head_dim": 16}
    # events carry what the tracking layer logs: shape, params, proxy score, curve points, final metrics, status
    failed = [e for e in rec.events if e["event"] == "failed"]
    assert [e["index"] for e in failed] == [1, 0] and "RuntimeError" in failed[0]["traceback"]
    points = [e["metrics_point"]["val_kl"] for e in rec.events if e["event"] == "progress" and e["index"] == 3]
    assert points == [pytest.approx(1.6), pytest.approx(0.6)]
    done = next(e for e in rec.events if e["event"] == "distilled" and e["index"] == 3)
    assert done["params"] == 1003 and done["proxy_kl"] == 3.0 and done["metrics"]["val_ce"] == 2.0
    assert done["curve"] == [[10, pytest.approx(1.6)], [20, pytest.approx(0.6)]]


def test_all_candidates_failing_gives_no_winner():
    rec = Recorder(proxy_kl=[1.0, 2.0], final_kl=[0, 0], raise_at=[("distill", 0), ("distill", 1)])
    result = rec.run(2, top_k=2)
    assert result.winner is None and result.model is None and result.kendall_tau is None


def test_non_finite_proxy_is_a_failure():
    rec = Recorder(proxy_kl=[float("nan"), 1.0], final_kl=[0.0, 0.5])
    result = rec.run(2, top_k=2)
    assert result.table[0].status == "failed" and "nan" in result.table[0].error
    assert rec.distilled == [1] and result.winner.index == 1


def test_iterative_search_chains_winners_as_teachers():
    rec = Recorder(proxy_kl=[1.0, 2.0, 3.0], final_kl=[0.5, 0.2, 0.9])
    teachers, scored = [], []

    def make_candidate(teacher, scores, row):
        teachers.append(teacher)
        return {"index": row.index}

    def score(model):
        scored.append(model)
        return f"scores of {model}"

    results = search_iterative("big", "scores", "data", targets=[2000, 1000], score=score, rows=rows(3),
                               top_k=2, tokens_per_candidate=100, make_candidate=make_candidate, proxy=rec.proxy,
                               short_distill=rec.short_distill)
    assert [r.winner.index for r in results] == [1, 1]
    assert scored == [{"trained": 1}]
    assert teachers[0] == "big" and teachers[-1] == {"trained": 1}
    with pytest.raises(Exception, match="shrink"):
        search_iterative("big", "s", "d", targets=[1000, 2000], score=score, tokens_per_candidate=1)


@pytest.mark.parametrize("seed", range(6))
def test_kendall_tau_b_matches_scipy(seed):
    rng = random.Random(seed)
    n = rng.randint(2, 12)
    x = [rng.choice([0.1, 0.2, 0.3, 0.5]) if seed % 2 else rng.random() for _ in range(n)]  # odd seeds: ties
    y = [rng.choice([1, 2, 3]) if seed % 3 == 0 else rng.random() for _ in range(n)]
    expected = kendalltau(x, y).statistic
    got = kendall_tau_b(x, y)
    assert got == pytest.approx(expected, nan_ok=True)


def test_kendall_tau_b_hand_values():
    assert kendall_tau_b([1, 2, 3], [1, 2, 3]) == 1.0
    assert kendall_tau_b([1, 2, 3], [3, 2, 1]) == -1.0
    # pairs: (1,2) C, (1,3) C, (2,3) tied in x → (2 - 0) / sqrt(3 * 2)
    assert kendall_tau_b([1, 2, 2], [1, 2, 3]) == pytest.approx(2 / 6 ** 0.5)


# ----------------------------------------------------------------------------------------------------------------
# with the real modules: enumeration against a brute-force count, the proxy against full logits, the CLI


def _brute_force(model, target, tol, kv_options):
    """Every shape the search space allows (≥ half of each axis, widths in multiples of 64 where the model's size
    is one), counted by building the pruned model on the meta device: no formula shared with archmath."""
    from minitron.models import build_meta_model

    c = model.config
    L, H, F, Q, KV = c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads, \
        c.num_key_value_heads
    found = set()
    for layers in range(-(-L // 2), L + 1):
        for hidden in range(64, H + 1, 64):
            for ffn in range(64, F + 1, 64):
                for kv in kv_options:
                    for per in range(1, Q // KV + 1):
                        if per * kv * 2 < Q or (layers, hidden, ffn, per * kv, kv) == (L, H, F, Q, KV):
                            continue
                        cfg = c.to_dict() | dict(num_hidden_layers=layers, hidden_size=hidden,
                                                 intermediate_size=ffn, num_attention_heads=per * kv,
                                                 num_key_value_heads=kv)
                        meta = build_meta_model(type(c).from_dict(cfg))
                        params = sum(p.numel() for p in meta.parameters())
                        if target * (1 - tol) <= params <= target * (1 + tol):
                            found.add((layers, hidden, ffn, per * kv, kv, params))
    return found


@pytest.mark.parametrize("target,tol,kv_groups", [(100_000, 0.1, False), (120_000, 0.05, False),
                                                  (110_000, 0.2, True)])
def test_enumeration_is_exactly_the_shapes_within_budget(tiny_model, target, tol, kv_groups):
    pytest.importorskip("minitron.archmath")
    from minitron.search import enumerate_rows

    model = tiny_model("llama")
    got = enumerate_rows(model.config, target, tol, prune_kv_groups=kv_groups)
    shapes = {(r.shape.layers, r.shape.hidden, r.shape.ffn, r.shape.heads, r.shape.kv_heads, r.params)
              for r in got}
    assert shapes == _brute_force(model, target, tol, (1, 2) if kv_groups else (2,))
    # every pure-depth shape also comes as the contiguous block that keeps the last layer
    depth = [r for r in got if r.kind == "depth"]
    blocks = {(r.shape.layers, r.drop) for r in got if r.kind == "depth-block"}
    assert blocks == {(r.shape.layers, (3 - (4 - r.shape.layers), 2)) for r in depth}
    assert len(got) == len(shapes) + len(depth)


def test_enumeration_skips_shapes_the_config_class_rejects(tiny_model):
    """LlamaConfig (not MistralConfig) rejects hidden % heads != 0 even with an explicit head_dim; the two families
    count parameters identically, so Llama's candidates are exactly Mistral's with divisible hidden sizes."""
    pytest.importorskip("minitron.archmath")
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
    from minitron.errors import UserError
    from minitron.search import enumerate_rows

    config = tiny_model("llama").config
    context = 128
    every = enumerate_rows(config, 100_000, 0.1)
    need = {r.index: 2 * (r.params + 2 * r.shape.layers * r.shape.kv_heads * r.shape.head_dim * context)
            for r in every}
    cap = sorted(need.values())[len(need) // 2]  # the median: some shapes fit, some do not
    kept = enumerate_rows(config, 100_000, 0.1, max_memory_bytes=cap, context=context)
    assert {(r.shape, r.drop) for r in kept} == {(r.shape, r.drop) for r in every if need[r.index] <= cap}
    assert 0 < len(kept) < len(every)
    with pytest.raises(UserError, match="memory cap"):
        enumerate_rows(config, 100_000, 0.1, max_memory_bytes=min(need.values()) - 1, context=context)


def _kl_full_logits(teacher, student, blocks):
    """Mean per-token KL(teacher ‖ student) from full logits, the reference for the proxy."""
    import torch.nn.functional as F

    t = F.log_softmax(teacher(blocks).logits.float(), -1)
    s = F.log_softmax(student(blocks).logits.float(), -1)
    return float((t.exp() * (t - s)).sum(-1).mean())


@pytest.fixture
def tiny_search_setup(tmp_path, tiny_model, tiny_tokenizer, text_corpus):
    importance = pytest.importorskip("minitron.importance")
    pytest.importorskip("minitron.distill.loop")
    from minitron.data import load_token_data
    from minitron.models import save_model

    teacher = tiny_model("llama")
    folder = save_model(teacher, tiny_tokenizer, tmp_path / "teacher")
    data = load_token_data(str(text_corpus), tiny_tokenizer, 32, val_fraction=0.2)
    scores = importance.compute_importance(teacher, data.calibration(16), batch_size=8, val_blocks=data.val[:4])
    scores.save(tmp_path / "scores.safetensors")
    return teacher, folder, data, scores, tmp_path / "scores.safetensors"


def test_proxy_is_validation_kl_of_pruned_model(tiny_search_setup):
    import torch

    from minitron.search import ValidationKL, enumerate_rows, prune_candidate

    teacher, _, data, scores, _ = tiny_search_setup
    blocks = data.val[:6]
    proxy = ValidationKL(teacher, blocks, batch_size=4)  # 2 batches, the last one short
    with torch.no_grad():
        for row in enumerate_rows(teacher.config, 100_000, 0.1):
            student = prune_candidate(teacher, scores, row)
            assert proxy(student) == pytest.approx(_kl_full_logits(teacher, student, blocks), rel=1e-4)


def test_cli_search_end_to_end(tiny_search_setup, text_corpus, tmp_path, capsys):
    import torch

    from minitron.cli import main
    from minitron.models import load_model
    from minitron.search import prune_candidate

    teacher, folder, data, scores, scores_path = tiny_search_setup
    out = tmp_path / "search"
    args = ["search", str(folder), "--scores", str(scores_path), "--data", str(text_corpus), "--val-fraction",
            "0.2", "--target-params", "100K", "--tolerance", "0.1", "--top-k", "3", "--tokens-per-candidate",
            "1024", "--seq-len", "32", "--batch-size", "4", "--eval-every", "4", "--out", str(out)]
    assert main(args) == 0
    saved = json.loads((out / "candidates.json").read_text())
    cands = saved["candidates"]
    assert len(cands) == 4 and sorted(c["status"] for c in cands) == ["distilled"] * 3 + ["proxied"]
    assert all(set(c["shape"]) >= {"layers", "hidden", "ffn", "heads", "kv_heads"} for c in cands)
    done = [c for c in cands if c["status"] == "distilled"]
    # the three lowest proxy KLs were distilled, the winner has the lowest KL after distillation
    assert max(c["proxy_kl"] for c in done) <= min(c["proxy_kl"] for c in cands if c["status"] == "proxied")
    winner = min(done, key=lambda c: c["final_kl"])
    assert saved["winner"]["index"] == winner["index"]
    assert saved["kendall_tau"] == pytest.approx(kendalltau([c["proxy_kl"] for c in done],
                                                            [c["final_kl"] for c in done]).statistic, nan_ok=True)
    for c in done:  # 8 steps of 4 x 32 tokens; the curve is validation before, at 4 and at 8
        assert [p[0] for p in c["curve"]] == [0, 4, 8] and c["metrics"]["tokens"] == 1024
        assert c["curve"][-1][1] == pytest.approx(c["final_kl"]) and c["final_kl"] < c["curve"][0][1]
    # the proxy is the KL of the pruned, untrained model on the first proxy_batches x batch_size val blocks
    val = data.val[:8]
    with torch.no_grad():
        for c in cands:
            row = CandidateRow.from_dict(c)
            assert row.to_dict() == c
            assert c["proxy_kl"] == pytest.approx(
                _kl_full_logits(teacher, prune_candidate(teacher, scores, row), val), rel=1e-4)
    # the saved winner is the distilled model: its KL on the validation blocks is the reported final KL
    student, _ = load_model(str(out / "winner"))
    assert student.config.num_hidden_layers == winner["shape"]["layers"]
    assert student.config.intermediate_size == winner["shape"]["ffn"]
    assert sum(p.numel() for p in student.parameters()) == winner["params"]
    with torch.no_grad():
        assert _kl_full_logits(teacher, student, val) == pytest.approx(winner["final_kl"], rel=1e-3)
    assert (out / "pareto.png").stat().st_size > 10_000
    assert "Kendall tau" in capsys.readouterr().out
    # a second run into the same folder is refused before any work; so is a target above the teacher
    assert main(args) == 2
    too_big = [a if a != "100K" else "200K" for a in args[:-1]] + [str(tmp_path / "other")]
    assert main(too_big) == 2 and not (tmp_path / "other").exists()
    assert "already holds a search" in capsys.readouterr().err


def test_cli_iterative_targets_rescore_each_winner(tiny_search_setup, text_corpus, tmp_path):
    from minitron.cli import main
    from minitron.models import load_model

    _, folder, _, _, scores_path = tiny_search_setup
    out = tmp_path / "iter"
    assert main(["search", str(folder), "--scores", str(scores_path), "--data", str(text_corpus), "--val-fraction",
                 "0.2", "--target-params", "130K,100K", "--tolerance", "0.1", "--top-k", "1", "--max-candidates",
                 "2", "--tokens-per-candidate", "256", "--seq-len", "32", "--batch-size", "4", "--calib-samples",
                 "8", "--out", str(out)]) == 0
    first = json.loads((out / "step1-130000" / "candidates.json").read_text())
    second = json.loads((out / "step2-100000" / "candidates.json").read_text())
    # step 2 prunes step 1's winner: its shapes never exceed the winner's
    w = first["winner"]["shape"]
    assert all(c["shape"][k] <= w[k] for c in second["candidates"] for k in ("layers", "hidden", "ffn", "heads"))
    assert all(abs(c["params"] - 100_000) <= 10_000 for c in second["candidates"])
    final, _ = load_model(str(out / "step2-100000" / "winner"))
    assert sum(p.numel() for p in final.parameters()) == second["winner"]["params"]
