"""What a person reads about a run: numbers to a few significant digits, candidate shapes as labels, and the
candidate and evaluation tables (for Prefect table artifacts, the markdown summary and the MLflow copies).

KL values of distilled candidates differ in the 3rd significant digit and sit near 1e-4 on small models, so fixed
decimals ("0.0001" for both 8.6e-5 and 1.19e-4) cannot tell the winner apart; `sig` keeps significant digits.
"""

from __future__ import annotations

import math

from minitron.config import format_count

WINNER = "★ winner"  # the candidate table's mark, in the table artifact and the summary alike


def sig(x: float | None, digits: int = 3) -> str:
    """x to `digits` significant digits: 0.500, 61.1, 8.60e-05 (scientific below 1e-3 and from 1e5); None → "-"."""
    if x is None:
        return "-"
    if x == 0 or not math.isfinite(x):
        return f"{x:g}"
    magnitude = math.floor(math.log10(abs(x)))
    if -3 <= magnitude < 5:
        return f"{x:.{max(digits - 1 - magnitude, 0)}f}"
    return f"{x:.{digits - 1}e}"


def shape_label(shape: dict, drop: list | tuple | None = None) -> str:
    """A candidate shape as the config's `target_shapes` writes it, e.g. "L24-H576-F1536-A9-KV3" (layers, hidden,
    MLP, query heads, KV groups), plus the dropped block ("drop 16-31", 1-indexed) for depth-block candidates: copy
    it into `target_shapes` to prune to exactly this shape."""
    label = f"L{shape['layers']}-H{shape['hidden']}-F{shape['ffn']}-A{shape['heads']}-KV{shape['kv_heads']}"
    return label + (f" drop {drop[0] + 1}-{drop[1] + 1}" if drop else "")


def markdown_table(rows: list[dict]) -> str:
    """A markdown table with the first row's keys as the header (cells are str()-ed)."""
    if not rows:
        return "(none)"
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows])


def candidate_table(rows: list[dict], winner_index: int | None) -> list[dict]:
    """The search's candidates (rows as in candidates.json), best proxy first, the winner marked."""
    return [{"candidate": shape_label(r["shape"], r.get("drop")), "kind": r["kind"],
             "params": format_count(r["params"]), "proxy KL": sig(r.get("proxy_kl")),
             "KL after short distillation": sig(r.get("final_kl")),
             "status": WINNER if r["index"] == winner_index else r["status"]} for r in rows]


def kendall_line(tau: float | None) -> str:
    """One line on Kendall τ between the proxy ranking and the ranking after the short distillation."""
    if tau is None:
        return "Kendall τ: n/a (fewer than two candidates finished the short distillation)."
    return (f"Kendall τ = {tau:+.2f}".replace("-", "−") + " between the proxy ranking and the ranking after short distillation "
            "(+1: the proxy ranking held after retraining, −1: it reversed, 0: unrelated).")


def evaluation_tables(rows: list[dict], models: list[str], teacher: str) -> tuple[list[dict], list[dict]]:
    """`minitron.evaluate.comparison_table` rows as two narrow tables: the models' values (4 significant digits,
    parameters as 72.6M), and each other model's value as a % of the teacher's."""
    absolute, relative = [], []
    for row in rows:
        is_count = row["task"] == "params"
        better = "↓ lower" if row["better"] == "lower" else "↑ higher"
        absolute.append({"task": row["task"], "metric": row["metric"], "better": better,
                         **{m: "-" if row.get(m) is None else format_count(int(row[m])) if is_count
                            else sig(row[m], 4) for m in models}})
        relative.append({"task": row["task"], "metric": row["metric"], "better": better,
                         **{f"{m} % of {teacher}": "-" if row.get(f"{m} %") is None else f"{row[f'{m} %']:.1f}"
                            for m in models if m != teacher}})
    return absolute, relative
