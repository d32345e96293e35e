"""Plots: the Pareto front by hand, labels that never overlap, and PNGs that decode and show what they claim (winner
star, target band, panels)."""

from __future__ import annotations

from types import SimpleNamespace

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch

from minitron.plots import (
    pareto_front,
    place_labels,
    plot_depth_blocks,
    plot_halving,
    plot_head_importance,
    plot_hidden_importance,
    plot_layer_importance,
    plot_mlp_importance,
    plot_pareto,
)

RED = np.array([0xD6, 0x27, 0x28]) / 255  # tab:red, the winner's star


def red_pixels(path) -> int:
    img = mpimg.imread(path)[..., :3]
    return int((np.abs(img - RED).max(-1) < 0.03).sum())


def test_pareto_front_by_hand():
    points = [(10, 0.5), (12, 0.7), (12, 0.4), (15, 0.45), (20, 0.1), (8, 0.9)]
    assert pareto_front(points) == [(8, 0.9), (10, 0.5), (12, 0.4), (20, 0.1)]


def _row(index, params, losses, status, drop=None):
    return {"index": index, "name": f"c{index}", "params": params, "status": status, "drop": drop,
            "shape": {"layers": 30, "hidden": 384, "ffn": 1024 + index, "heads": 6, "kv_heads": 3},
            "rounds": [{"round": r, "tokens": 1024 * 2 ** r, "val_loss": v, "val_kl": v / 2}
                       for r, v in enumerate(losses)]}


CANDIDATES = [
    _row(0, 70_000_000, [2.0, 1.6, 1.2], "finalist"),
    _row(1, 72_000_000, [1.8, 1.5, 1.1], "winner", drop=(20, 24)),
    _row(2, 74_000_000, [2.4, 1.9], "eliminated"),
    _row(3, 71_000_000, [2.9], "eliminated"),
    _row(4, 73_000_000, [], "failed"),
]


def test_pareto_plot_marks_the_winner_and_the_target_band(tmp_path):
    with_winner = plot_pareto(CANDIDATES, tmp_path / "w.png", "val_loss", winner_index=1, target=72_000_000,
                              tolerance=0.05)
    without = plot_pareto(CANDIDATES, tmp_path / "n.png", "val_loss")
    assert red_pixels(with_winner) > 100 and red_pixels(without) == 0
    img = mpimg.imread(with_winner)[..., :3]
    band = np.array([0xEB, 0xF5, 0xEB]) / 255  # tab:green at 8% over white: the target ± tolerance band
    assert (np.abs(img - band).max(-1) < 0.02).sum() > 10_000  # without a target: only stray anti-aliasing
    assert (np.abs(mpimg.imread(without)[..., :3] - band).max(-1) < 0.02).sum() < 1_000


def test_labels_never_overlap_and_stay_inside(tmp_path):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    points = [(1.0 + 0.01 * (i % 3), 1.0 + 0.01 * (i // 3)) for i in range(12)]  # a crowded cluster
    points += [(3.0, 2.0), (1.5, 3.0)]
    ax.scatter(*zip(*points, strict=True))
    ax.set_xlim(0, 4)
    ax.set_ylim(0, 4)
    placed = place_labels(ax, points, [f"label number {i}" for i in range(len(points))])
    renderer = fig.canvas.get_renderer()
    boxes = [a.get_window_extent(renderer) for a in placed]
    frame = ax.get_window_extent(renderer)
    assert 3 <= len(placed) < len(points)  # the cluster cannot hold 12 labels: some are left out, none overlap
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    assert all(frame.x0 <= b.x0 and b.x1 <= frame.x1 and frame.y0 <= b.y0 and b.y1 <= frame.y1 for b in boxes)
    assert {a.get_text() for a in placed} >= {"label number 12", "label number 13"}  # the lone points get theirs
    plt.close(fig)


def test_halving_and_depth_block_charts(tmp_path):
    halving = plot_halving(CANDIDATES, tmp_path / "h.png", "val_loss", winner_index=1)
    assert red_pixels(halving) > 100 and red_pixels(plot_halving(CANDIDATES, tmp_path / "n.png")) == 0
    sweeps = [{"length": 2, "metric": "loss", "starts": [0, 1, 2, 3], "values": [3.0, 2.5, 2.2, 2.8],
               "tiebreak": [0] * 4, "best": 2}]
    img = mpimg.imread(plot_depth_blocks(sweeps, tmp_path / "d.png"))
    assert img.shape[0] > 100 and img[..., :3].std() > 0.01


@pytest.fixture
def scores():
    g = torch.Generator().manual_seed(0)
    return SimpleNamespace(heads=torch.rand(4, 6, generator=g), neurons=torch.rand(4, 32, generator=g) + 0.01,
                           hidden=torch.rand(16, generator=g) + 0.01, layer_bi=torch.rand(4, generator=g),
                           layer_loss=torch.rand(4, generator=g))


def test_importance_plots_write_pngs(tmp_path, scores):
    for fn in (plot_head_importance, plot_mlp_importance, plot_hidden_importance):
        img = mpimg.imread(fn(scores, tmp_path / f"{fn.__name__}.png"))
        assert img.ndim == 3 and img.shape[0] > 100 and img[..., :3].std() > 0.01  # not a blank canvas
    both = mpimg.imread(plot_layer_importance(scores, tmp_path / "both.png"))
    scores.layer_loss = None  # scores computed without validation blocks: one panel only
    one = mpimg.imread(plot_layer_importance(scores, tmp_path / "one.png"))
    assert both.shape[0] > 1.5 * one.shape[0]


def test_head_heatmap_crosses_out_pruned_heads(tmp_path, scores):
    kept = torch.ones(4, 6, dtype=torch.bool)
    kept[1, :3] = kept[3] = False  # 3 heads of layer 1 and all of layer 3
    marked = plot_head_importance(scores, tmp_path / "marked.png", kept=kept)
    plain = plot_head_importance(scores, tmp_path / "plain.png")
    assert red_pixels(marked) > 100 and red_pixels(plain) == 0  # viridis has no red: the crosses are the marks


def test_layer_and_head_axes_have_integer_ticks(tmp_path, scores, monkeypatch):
    import minitron.plots as plots

    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig))
    plot_layer_importance(scores, tmp_path / "l.png")
    plot_head_importance(scores, tmp_path / "h.png")
    layer_ax = figures[0].axes[-1]
    head_ax = figures[1].axes[0]
    for ticks in (layer_ax.get_xticks(), head_ax.get_xticks(), head_ax.get_yticks()):
        assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks)
