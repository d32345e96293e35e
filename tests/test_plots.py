"""Plots: the Pareto front by hand, and PNGs that decode and show what they claim (winner star, panels)."""

from __future__ import annotations

from types import SimpleNamespace

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch

from minitron.plots import (
    pareto_front,
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


CANDIDATES = [
    {"index": 0, "name": "a", "params": 70_000_000, "proxy_kl": 2.0, "final_kl": 0.8, "status": "distilled"},
    {"index": 1, "name": "b", "params": 72_000_000, "proxy_kl": 1.5, "final_kl": 0.6, "status": "distilled"},
    {"index": 2, "name": "c", "params": 74_000_000, "proxy_kl": 3.0, "final_kl": None, "status": "proxied"},
    {"index": 3, "name": "d", "params": 71_000_000, "proxy_kl": None, "final_kl": None, "status": "failed"},
]


def test_pareto_plot_marks_the_winner(tmp_path):
    with_winner = plot_pareto(CANDIDATES, tmp_path / "w.png", winner_index=1)
    without = plot_pareto(CANDIDATES, tmp_path / "n.png")
    assert red_pixels(with_winner) > 100 and red_pixels(without) == 0


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
