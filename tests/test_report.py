"""Formatting for people: significant digits, shape labels, the candidate table with its winner, the τ line."""

from __future__ import annotations

import pytest

from minitron.config import SHAPE_SPEC
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


ROWS = [
    {"index": 4, "shape": {"layers": 4, "hidden": 64, "ffn": 128, "heads": 4, "kv_heads": 2}, "drop": None,
     "kind": "width", "params": 94_660, "proxy_kl": 4.99e-4, "final_kl": 1.19e-4, "status": "distilled"},
    {"index": 7, "shape": {"layers": 3, "hidden": 64, "ffn": 256, "heads": 4, "kv_heads": 2}, "drop": [1, 1],
     "kind": "depth-block", "params": 99_000, "proxy_kl": 6.1e-4, "final_kl": 8.6e-5, "status": "distilled"},
    {"index": 9, "shape": {"layers": 4, "hidden": 48, "ffn": 128, "heads": 4, "kv_heads": 2}, "drop": None,
     "kind": "width", "params": 90_000, "proxy_kl": 9.0e-4, "final_kl": None, "status": "proxied"},
]


def test_candidate_table_marks_the_winner():
    table = candidate_table(ROWS, winner_index=7)
    assert [r["status"] for r in table] == ["distilled", WINNER, "proxied"]
    assert table[1] == {"candidate": "L3-H64-F256-A4-KV2 drop 2-2", "kind": "depth-block", "params": "99.00K",
                        "proxy KL": "6.10e-04", "KL after short distillation": "8.60e-05", "status": WINNER}
    assert table[2]["KL after short distillation"] == "-"
    lines = markdown_table(table).splitlines()
    assert lines[0] == "| candidate | kind | params | proxy KL | KL after short distillation | status |"
    assert len(lines) == 5 and "★ winner" in lines[3]


def test_kendall_line_says_what_tau_means():
    assert kendall_line(-1.0) == ("Kendall τ = −1.00 between the proxy ranking and the ranking after short "
                                  "distillation (+1: the proxy ranking held after retraining, −1: it reversed, 0: "
                                  "unrelated).")
    assert kendall_line(1.0).startswith("Kendall τ = +1.00 ")
    assert "n/a" in kendall_line(None)
