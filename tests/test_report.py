"""Formatting for people: significant digits, shape labels, the candidate table with its winner, the τ line."""

from __future__ import annotations

import pytest

from minitron.archmath import SHAPE_SPEC
from minitron.report import WINNER, candidate_table, kendall_line, markdown_table, shape_label, sig


@pytest.mark.parametrize("x, text", [(8.6e-5, "8.60e-05"), (1.19e-4, "1.19e-04"), (0.5, "0.500"), (2.0412, "2.04"),
                                     (61.109001139, "61.1"), (1234.5, "1234"), (123456.0, "1.23e+05"),
                                     (-0.01234, "-0.0123"), (0.0, "0"), (None, "-")])
def test_sig_keeps_three_significant_digits(x, text):
    assert sig(x) == text


def test_sig_tells_close_kls_apart():
    """The issue's two candidates: 4 decimals showed 0.0001 for both."""
    assert f"{8.6e-5:.4f}" == f"{1.19e-4:.4f}" and sig(8.6e-5) != sig(1.19e-4)


def test_shape_label_is_a_target_shapes_step():
    shape = {"layers": 24, "hidden": 576, "ffn": 1536, "heads": 9, "kv_heads": 3, "head_dim": 64}
    assert shape_label(shape) == "L24-H576-F1536-A9-KV3"
    assert SHAPE_SPEC.fullmatch(shape_label(shape))  # copy it into target_shapes
    assert shape_label(shape, [15, 30]) == "L24-H576-F1536-A9-KV3 drop 16-31"


def _rounds(*losses):
    return [{"round": i + 1, "tokens": 1024 << i, "val_loss": v, "val_kl": v / 10} for i, v in enumerate(losses)]


ROWS = [
    {"index": 4, "shape": {"layers": 4, "hidden": 64, "ffn": 128, "heads": 4, "kv_heads": 2}, "drop": None,
     "kind": "width", "params": 94_660, "rounds": _rounds(2.5, 1.19e-4), "status": "finalist", "error": None},
    {"index": 7, "shape": {"layers": 3, "hidden": 64, "ffn": 256, "heads": 4, "kv_heads": 2}, "drop": [1, 1],
     "kind": "mixed", "params": 99_000, "rounds": _rounds(2.4, 8.6e-5), "status": "winner", "error": None},
    {"index": 9, "shape": {"layers": 4, "hidden": 48, "ffn": 128, "heads": 4, "kv_heads": 2}, "drop": None,
     "kind": "width", "params": 90_000, "rounds": _rounds(3.1), "status": "eliminated", "error": None},
    {"index": 11, "shape": {"layers": 4, "hidden": 40, "ffn": 128, "heads": 4, "kv_heads": 2}, "drop": None,
     "kind": "width", "params": 85_000, "rounds": [], "status": "failed", "error": "round 1: RuntimeError: oom"},
    {"index": 12, "shape": {"layers": 4, "hidden": 40, "ffn": 112, "heads": 4, "kv_heads": 2}, "drop": None,
     "kind": "width", "params": 84_000, "rounds": [], "status": "not sampled", "error": None},
]


def test_candidate_table_marks_the_winner():
    table = candidate_table(ROWS, winner_index=7)
    assert [r["status"] for r in table] == [WINNER, "finalist", "eliminated", "failed: round 1: RuntimeError: oom"]
    assert table[0] == {"candidate": "L3-H64-F256-A4-KV2 drop 2-2", "kind": "mixed", "params": "99.00K",
                        "rounds": 2, "val_loss after its last round": "8.60e-05", "status": WINNER}
    assert table[3]["val_loss after its last round"] == "-"
    lines = markdown_table(table).splitlines()
    assert lines[0] == "| candidate | kind | params | rounds | val_loss after its last round | status |"
    assert len(lines) == 6 and "★ winner" in lines[2]
    proxied = candidate_table([{**r, "proxy_kl": 0.5} for r in ROWS], winner_index=7)
    assert proxied[0]["proxy KL"] == "0.500"


def test_kendall_line_says_what_tau_means():
    rounds = [{"round": 1, "kendall_tau": None, "tau_against": None},
              {"round": 2, "kendall_tau": -1.0, "tau_against": "round 1"},
              {"round": 3, "kendall_tau": 1 / 3, "tau_against": "round 2"}]
    assert kendall_line(rounds) == ("Kendall τ: round 2 vs round 1 −1.00, round 3 vs round 2 +0.33 (+1: the order "
                                    "of the round before held after more retraining, −1: it reversed, 0: "
                                    "unrelated).")
    assert "n/a" in kendall_line(rounds[:1])
