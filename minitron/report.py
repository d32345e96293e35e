"""What a person reads about a run: numbers to a few significant digits, candidate shapes as labels, and the
candidate and evaluation tables (for Prefect table artifacts, the markdown summary and the MLflow copies).

KL values of distilled candidates differ in the 3rd significant digit and sit near 1e-4 on small models, so fixed
decimals ("0.0001" for both 8.6e-5 and 1.19e-4) cannot tell the winner apart; `sig` keeps significant digits.
"""

from __future__ import annotations

import math

from minitron.archmath import shape_spec
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
    return shape_spec(shape) + (f" drop {drop[0] + 1}-{drop[1] + 1}" if drop else "")


def markdown_table(rows: list[dict]) -> str:
    """A markdown table with the first row's keys as the header (cells are str()-ed)."""
    if not rows:
        return "(none)"
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows])


def candidate_table(rows: list[dict], winner_index: int | None, metric: str = "val_loss") -> list[dict]:
    """The search's candidates that trained or failed (rows as in candidates.json): the longest-trained first, each
    group best first; the score after the candidate's last round to 3 significant digits, the winner marked."""
    done = sorted((r for r in rows if r.get("rounds") or r.get("status") == "failed"),
                  key=lambda r: (-len(r["rounds"]), r["rounds"][-1][metric] if r["rounds"] else math.inf, r["index"]))
    proxy = any(r.get("proxy_kl") is not None for r in done)
    return [{"candidate": shape_label(r["shape"], r.get("drop")), "kind": r["kind"],
             "params": format_count(r["params"]), **({"proxy KL": sig(r.get("proxy_kl"))} if proxy else {}),
             "rounds": len(r["rounds"]), f"{metric} after its last round": sig(r["rounds"][-1][metric])
             if r["rounds"] else "-",
             "status": WINNER if r["index"] == winner_index else
             f"failed: {r['error'][:80]}" if r["status"] == "failed" else r["status"]} for r in done]


def kendall_line(rounds: list[dict]) -> str:
    """One line on Kendall τ of each round's ranking against the round before (round 1: against the proxy)."""
    taus = [f"round {r['round']} vs {r['tau_against']} " + f"{r['kendall_tau']:+.2f}".replace("-", "−")
            for r in rounds if r["kendall_tau"] is not None]
    if not taus:
        return "Kendall τ: n/a (no round ranked two candidates that the round before had ranked too)."
    return (f"Kendall τ: {', '.join(taus)} (+1: the order of the round before held after more retraining, −1: it "
            "reversed, 0: unrelated).")


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
