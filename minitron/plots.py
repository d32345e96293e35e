"""PNG plots for reports and MLflow artifacts: the search's Pareto plot and the importance scores.

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


def plot_pareto(candidates, path, winner_index: int | None = None, title: str | None = None) -> Path:
    """Parameters vs validation KL: the proxy KL of every scored candidate (hollow), the KL after the short
    distillation of the top k (filled, joined to their proxy point), the Pareto front of the distilled ones, and
    the winner marked. `winner_index` is the winner's "index" field (its enumeration id), not a list position."""
    rows = _rows(candidates)
    biggest = max((r["params"] for r in rows), default=1)
    unit, scale = next((u, s) for u, s in (("B", 1e9), ("M", 1e6), ("K", 1e3), ("", 1)) if biggest >= s)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    proxied = [r for r in rows if r.get("proxy_kl") is not None]
    done = [r for r in rows if r.get("final_kl") is not None and r.get("status") == "distilled"]
    ax.scatter([r["params"] / scale for r in proxied], [r["proxy_kl"] for r in proxied], facecolors="none",
               edgecolors="0.55", s=22, label="proxy (pruned, untrained)")
    for r in done:
        ax.plot([r["params"] / scale] * 2, [r["proxy_kl"], r["final_kl"]], color="0.8", lw=0.8, zorder=1)
    ax.scatter([r["params"] / scale for r in done], [r["final_kl"] for r in done], color="tab:blue", s=30,
               zorder=3, label="after short distillation")
    front = pareto_front([(r["params"], r["final_kl"]) for r in done])
    if len(front) > 1:
        ax.step([p / scale for p, _ in front], [k for _, k in front], where="post", color="tab:blue", lw=1,
                alpha=0.6, label="Pareto front")
    for r in done:
        if r["index"] == winner_index:
            ax.scatter([r["params"] / scale], [r["final_kl"]], marker="*", s=260, color="tab:red", zorder=4,
                       label=f"winner {r.get('name', r['index'])}")
    failed = sum(r.get("status") == "failed" for r in rows)
    ax.set_xlabel(f"parameters ({unit})" if unit else "parameters")
    ax.set_ylabel("validation KL to teacher")
    if proxied and min(r["proxy_kl"] for r in proxied) > 0:
        ax.set_yscale("log")  # proxy KLs sit an order of magnitude above the distilled ones
    ax.set_title(title or f"architecture search: {len(proxied)} scored, {len(done)} distilled"
                 + (f", {failed} failed" if failed else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
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
