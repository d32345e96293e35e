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
