"""PNG plots for reports and MLflow artifacts: the search (Pareto, successive halving, depth blocks) and the
importance scores.

Each `plot_x(..., path) -> path` writes one PNG with matplotlib's Agg backend (no display needed) and closes its
figure, so a long flow that plots per stage does not accumulate memory. matplotlib is imported here only.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: workers and CI have no display

import matplotlib.pyplot as plt  # noqa: E402


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _rows(candidates) -> list[dict]:
    """CandidateRow objects or their dicts (as in candidates.json)."""
    return [c.to_dict() if hasattr(c, "to_dict") else c for c in candidates]


def pareto_front(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """The points no other point beats on both axes (fewer params and lower loss), by increasing params."""
    front, best = [], float("inf")
    for p, loss in sorted(points, key=lambda t: (t[0], t[1])):
        if loss < best:
            front.append((p, loss))
            best = loss
    return front


# label offsets (points) tried around a point, nearest first: 8 directions at growing distance
_OFFSETS = [(dx * r, dy * r) for r in (1, 2, 3, 4) for dx, dy in
            ((6, 5), (6, -11), (-6, 5), (-6, -11), (0, 9), (0, -15), (10, -3), (-10, -3))]


def place_labels(ax, points: list[tuple[float, float]], labels: list[str], fontsize: float = 7) -> list:
    """Annotate points in priority order where the label overlaps no label placed before it, no marked point and
    not the legend, and stays inside the axes, trying positions nearest first (far ones get a leader line). A label with no free spot is
    left out rather than drawn over another. Returns the placed annotations."""
    fig = ax.figure
    fig.tight_layout()  # the final layout first: labels are placed in its pixel coordinates
    fig.canvas.draw()  # a renderer, and the final data → pixel transform
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    marks = [ax.transData.transform(p) for p in points]
    legend = ax.get_legend()
    taken, placed = ([legend.get_window_extent(renderer)] if legend is not None else []), []
    for (x, y), text, own in zip(points, labels, marks, strict=True):
        for dx, dy in _OFFSETS:
            far = abs(dx) + abs(dy) > 20
            ann = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=fontsize,
                              ha="left" if dx >= 0 else "right", va="bottom",
                              arrowprops={"arrowstyle": "-", "color": "0.6", "lw": 0.6} if far else None)
            box = ann.get_window_extent(renderer).expanded(1.05, 1.1)
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            hits_mark = any(box.contains(*m) for m in marks if m is not own)
            if inside and not hits_mark and not any(box.overlaps(t) for t in taken):
                taken.append(box)
                placed.append(ann)
                break
            ann.remove()
    return placed


def _score_rows(rows: list[dict], metric: str, number: int | None) -> list[tuple[dict, float]]:
    """(row, score) of the rows that finished round `number` (None: each row's last round)."""
    out = []
    for r in rows:
        rounds = r.get("rounds") or []
        if rounds and (number is None or len(rounds) >= number):
            out.append((r, rounds[(number or len(rounds)) - 1][metric]))
    return out


def _param_unit(rows: list[dict]) -> tuple[str, float]:
    biggest = max((r["params"] for r in rows), default=1)
    return next((u, s) for u, s in (("B", 1e9), ("M", 1e6), ("K", 1e3), ("", 1)) if biggest >= s)


METRIC_LABELS = {"val_loss": "validation LM loss", "val_kl": "validation KL to the teacher"}


def plot_pareto(candidates, path, metric: str = "val_loss", winner_index: int | None = None, *,
                target: int | None = None, tolerance: float | None = None, title: str | None = None) -> Path:
    """Parameters vs score: every candidate after round 1 (hollow: all at the same budget, so comparable), the
    last round's candidates at its budget (filled, labelled) with their Pareto front, the target ± tolerance band,
    and the winner starred. `winner_index` is the winner's "index" field (its enumeration id)."""
    rows = _rows(candidates)
    unit, scale = _param_unit(rows)
    fig, ax = plt.subplots(figsize=(8, 5))
    if target is not None:
        if tolerance:
            ax.axvspan(target * (1 - tolerance) / scale, target * (1 + tolerance) / scale, color="tab:green",
                       alpha=0.08, label=f"target ± {tolerance:.0%}")
        ax.axvline(target / scale, color="tab:green", lw=0.8, ls="--")
    first = _score_rows(rows, metric, 1)
    ax.scatter([r["params"] / scale for r, _ in first], [v for _, v in first], facecolors="none", edgecolors="0.55",
               s=22, label="round 1 (every candidate)")
    latest = max((len(r.get("rounds") or []) for r in rows), default=0)
    final = [(r, v) for r, v in _score_rows(rows, metric, None) if len(r["rounds"]) == latest] if latest > 1 else []
    if final:
        ax.scatter([r["params"] / scale for r, _ in final], [v for _, v in final], color="tab:blue", s=30,
                   zorder=3, label=f"round {latest} (last)")
    front = pareto_front([(r["params"], v) for r, v in (final or first)])
    if len(front) > 1:
        ax.step([p / scale for p, _ in front], [k for _, k in front], where="post", color="tab:blue", lw=1,
                alpha=0.6, label="Pareto front")
    shown = final or first
    win = [(r, v) for r, v in shown if r["index"] == winner_index]
    for r, v in win:
        ax.scatter([r["params"] / scale], [v], marker="*", s=260, color="tab:red", zorder=4,
                   label=f"winner {r.get('name', r['index'])}")
    failed = sum(r.get("status") == "failed" for r in rows)
    ax.set_xlabel(f"parameters ({unit})" if unit else "parameters")
    ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    ax.set_title(title or f"architecture search: {len(first)} candidates, {len(final)} in the last round"
                 + (f", {failed} failed" if failed else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    # labels where they fit: the winner, the last round, its front, then round 1 from the best down
    on_front = {p for p, _ in front}
    labelled = sorted(final, key=lambda t: (t[0]["index"] != winner_index, t[0]["params"] not in on_front, t[1]))
    labelled += sorted(((r, v) for r, v in first if not final or r["index"] not in {f["index"] for f, _ in final}),
                       key=lambda t: t[1])
    place_labels(ax, [(r["params"] / scale, v) for r, v in labelled], [_short(r) for r, _ in labelled])
    return _save(fig, path)


def _short(row: dict) -> str:
    """A compact shape label: L32 h3072 f9216 q32 (and the removed block)."""
    s = row["shape"]
    drop = row.get("drop")
    return f"L{s['layers']} h{s['hidden']} f{s['ffn']} q{s['heads']}" + (f" drop {drop[0] + 1}-{drop[1] + 1}"
                                                                           if drop else "")


def plot_halving(candidates, path, metric: str = "val_loss", winner_index: int | None = None,
                 title: str | None = None) -> Path:
    """Successive halving: tokens per candidate (log scale) against the score, one line per candidate across the
    rounds it trained in. Candidates cut after a round end in a grey x; the last round's are blue, the winner red;
    failures are counted in the title."""
    rows = _rows(candidates)
    fig, ax = plt.subplots(figsize=(8, 5))
    latest = max((len(r.get("rounds") or []) for r in rows), default=0)
    budgets = sorted({rec["tokens"] for r in rows for rec in r.get("rounds") or []})
    for b in budgets:
        n = sum(any(rec["tokens"] == b for rec in r.get("rounds") or []) for r in rows)
        ax.axvline(b, color="0.85", lw=0.8, zorder=0)
        ax.annotate(f"{n}", (b, 1), xycoords=("data", "axes fraction"), xytext=(2, -10),
                    textcoords="offset points", fontsize=7, color="0.4")
    for r in rows:
        recs = r.get("rounds") or []
        if not recs:
            continue
        x, y = [rec["tokens"] for rec in recs], [rec[metric] for rec in recs]
        if r["index"] == winner_index:
            ax.plot(x, y, color="tab:red", lw=2.2, marker="o", ms=4, zorder=5, label=f"winner {r['name']}")
        elif len(recs) == latest:
            ax.plot(x, y, color="tab:blue", lw=1.4, marker="o", ms=3, zorder=4)
        else:
            ax.plot(x, y, color="0.7", lw=0.7, zorder=2)
            ax.scatter(x[-1:], y[-1:], marker="x", color="0.5", s=14, zorder=3)
    ax.plot([], [], color="0.7", lw=0.7, marker="x", label="eliminated after a round")
    ax.plot([], [], color="tab:blue", lw=1.4, marker="o", ms=3, label="reached the last round")
    if len(budgets) > 1:
        ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens per candidate in the round (numbers: candidates trained)")
    ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    failed = sum(r.get("status") == "failed" for r in rows)
    ax.set_title((title or "successive halving") + (f" ({failed} failed)" if failed else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_depth_blocks(sweeps, path) -> Path:
    """The window sweep: for each block length, the score of the model with the block starting at each layer
    removed (x: first removed layer, 1-indexed), the chosen block marked."""
    sweeps = [s.to_dict() if hasattr(s, "to_dict") else s for s in sweeps]
    fig, ax = plt.subplots(figsize=(8, 4))
    cmap = plt.get_cmap("plasma")
    for i, s in enumerate(sweeps):
        color = cmap(i / max(len(sweeps), 1))
        x = [start + 1 for start in s["starts"]]
        ax.plot(x, s["values"], marker=".", color=color, lw=1.2, label=f"{s['length']} layers")
        best = s["starts"].index(s["best"])
        ax.scatter([x[best]], [s["values"][best]], marker="*", s=160, color=color, edgecolors="k", zorder=4)
    metric = sweeps[0]["metric"] if sweeps else "loss"
    _integer_ticks(ax.xaxis)
    ax.set_xlabel("first layer of the removed block (1-indexed)")
    ax.set_ylabel("validation LM loss (lower is better)" if metric == "loss" else "cloze accuracy (higher is better)")
    ax.set_title("depth blocks: every contiguous position scored, the chosen one starred")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="block")
    return _save(fig, path)


def plot_head_importance(scores, path, kept=None, title: str | None = None) -> Path:
    """Heatmap of query-head importance, layers × heads; `kept` ([layers, heads] bools, `prune.kept_heads`) crosses
    out the heads a pruned shape removes (whole rows for dropped layers)."""
    heads = scores.heads.float().numpy()
    fig, ax = plt.subplots(figsize=(max(5, 0.35 * heads.shape[1] + 2), max(3.5, 0.22 * heads.shape[0] + 1.5)))
    im = ax.imshow(heads, aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(im, ax=ax, label="importance")
    if kept is not None:
        layer, head = (~kept.bool()).nonzero(as_tuple=True)
        ax.scatter(head.numpy(), layer.numpy(), marker="x", s=40, color="tab:red", linewidths=1.5)
    _integer_ticks(ax.xaxis, ax.yaxis)
    ax.set_xlabel("query head")
    ax.set_ylabel("layer")
    ax.set_title(title or ("attention-head importance" + ("\n× = pruned" if kept is not None else "")), fontsize=10)
    return _save(fig, path)


def _integer_ticks(*axes) -> None:
    """Layer and head axes count things: ticks at whole numbers only."""
    from matplotlib.ticker import MaxNLocator

    for axis in axes:
        axis.set_major_locator(MaxNLocator(integer=True))


def plot_layer_importance(scores, path) -> Path:
    """Bars per layer: LM-loss increase when the layer is skipped (if computed) and Block Influence."""
    metrics = [("loss increase when skipped", scores.layer_loss), ("Block Influence", scores.layer_bi)]
    metrics = [(name, t) for name, t in metrics if t is not None]
    fig, axes = plt.subplots(len(metrics), 1, figsize=(8, 2.6 * len(metrics)), squeeze=False)
    for ax, (name, t) in zip(axes[:, 0], metrics, strict=True):
        values = t.float().numpy()
        ax.bar(range(len(values)), values, color="tab:blue")
        ax.set_ylabel(name, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        _integer_ticks(ax.xaxis)
    axes[-1, 0].set_xlabel("layer")
    axes[0, 0].set_title("layer importance")
    return _save(fig, path)


def plot_mlp_importance(scores, path) -> Path:
    """Per layer, MLP neuron scores sorted high → low (the curve's knee shows how much width is cheap to cut)."""
    neurons = scores.neurons.float()
    fig, ax = plt.subplots(figsize=(7, 4))
    cmap = plt.get_cmap("viridis")
    for i, row in enumerate(neurons):
        ax.plot(row.sort(descending=True).values.numpy(), color=cmap(i / max(len(neurons) - 1, 1)), lw=0.8)
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, len(neurons) - 1))
    fig.colorbar(sm, ax=ax, label="layer")
    ax.set_xlabel("neuron rank")
    ax.set_ylabel("importance")
    ax.set_yscale("log" if bool((neurons > 0).all()) else "linear")
    ax.set_title("MLP neuron importance (sorted, per layer)")
    return _save(fig, path)


def plot_hidden_importance(scores, path) -> Path:
    """Hidden (embedding) channel scores sorted high → low."""
    hidden = scores.hidden.float().sort(descending=True).values
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(hidden.numpy(), color="tab:blue")
    ax.set_xlabel("channel rank")
    ax.set_ylabel("importance")
    ax.set_yscale("log" if bool((hidden > 0).all()) else "linear")
    ax.set_title("hidden-channel importance (sorted)")
    ax.grid(alpha=0.3)
    return _save(fig, path)
