"""Exact structured pruning: full-shape prunes are permutations (same logits), pruned models count, save, reload and
generate; bad shapes and foreign scores fail before any work."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FAMILIES, build_tiny_model

from minitron.archmath import Shape, count_shape, shape_of
from minitron.cli import main
from minitron.errors import UserError
from minitron.importance import compute_importance
from minitron.prune import prune, save_pruned

IDS = torch.randint(0, 256, (4, 20), generator=torch.Generator().manual_seed(2))
VARIANTS = [(f, t) for f in FAMILIES for t in (True, False)]


def shuffled_scores(model, seed=0):
    """Real scores with every tensor replaced by a random order: a non-trivial permutation on every axis."""
    s = compute_importance(model, IDS[:2], batch_size=2, val_blocks=IDS[:1])
    g = torch.Generator().manual_seed(seed)
    for k in ("heads", "kv_groups", "neurons", "hidden", "layer_bi", "layer_loss"):
        setattr(s, k, torch.rand(getattr(s, k).shape, generator=g))
    return s


@pytest.mark.parametrize("family,tied", VARIANTS)
def test_full_shape_prune_is_exact(family, tied):
    model = build_tiny_model(family, tie_word_embeddings=tied)
    s = shuffled_scores(model)
    pruned = prune(model, s, shape_of(model.config))
    assert not torch.equal(pruned.model.embed_tokens.weight, model.model.embed_tokens.weight)  # really permuted
    with torch.no_grad():
        assert (pruned(IDS).logits - model(IDS).logits).abs().max() < 1e-5


@pytest.mark.parametrize("family,tied", VARIANTS)
def test_pruned_model_counts_saves_reloads_and_generates(family, tied, tmp_path, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    overrides = dict(tie_word_embeddings=tied)
    if family == "qwen2":  # per-layer attention types must follow the kept layers
        overrides.update(use_sliding_window=True, sliding_window=8, max_window_layers=2, layer_types=None)
    model = build_tiny_model(family, **overrides)
    shape = Shape(layers=2, hidden=40, ffn=72, heads=2, kv_heads=1, head_dim=16)  # hidden/heads != head_dim
    pruned = prune(model, shuffled_scores(model), shape)
    assert sum(p.numel() for p in pruned.parameters()) == count_shape(model.config, shape)
    assert [layer.self_attn.layer_idx for layer in pruned.model.layers] == [0, 1]
    out = save_pruned(pruned, tiny_tokenizer, tmp_path / "pruned")
    back = AutoModelForCausalLM.from_pretrained(out).eval()
    assert shape_of(back.config) == shape
    with torch.no_grad():
        torch.testing.assert_close(back(IDS).logits, pruned(IDS).logits, rtol=0, atol=1e-6)
    prompt = IDS[:1, :6]
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=256)
    cached = back.generate(prompt, use_cache=True, **kw)
    assert torch.equal(cached, back.generate(prompt, use_cache=False, **kw)) and cached.shape[1] == 14


def test_drop_block_and_layer_ranking():
    model = build_tiny_model("llama")
    s = shuffled_scores(model)
    full = shape_of(model.config)
    block = prune(model, s, Shape(2, **{k: v for k, v in vars(full).items() if k != "layers"}), drop_layers=(1, 2))
    ref = prune(model, s, full)
    for new, old in ((0, 0), (1, 3)):
        for (n, a), b in zip(block.model.layers[new].named_parameters(), ref.model.layers[old].parameters(),
                             strict=True):
            assert torch.equal(a, b), n
    s.layer_loss = torch.tensor([0.5, 0.1, 0.9, 0.2])  # keep the two largest: layers 0 and 2
    by_loss = prune(model, s, Shape(2, 64, 128, 4, 2, 16))
    assert torch.equal(by_loss.model.layers[1].mlp.down_proj.weight.flatten().sort().values,
                       model.model.layers[2].mlp.down_proj.weight.flatten().sort().values)


def test_bad_shapes_and_foreign_scores():
    model = build_tiny_model("llama")
    s = shuffled_scores(model)
    with pytest.raises(UserError, match="multiple of the KV groups"):
        prune(model, s, Shape(4, 64, 128, 3, 2, 16))
    with pytest.raises(UserError, match="cannot grow attention"):
        prune(model, s, Shape(4, 64, 128, 6, 2, 16))
    with pytest.raises(UserError, match="hidden must be between"):
        prune(model, s, Shape(4, 96, 128, 4, 2, 16))
    with pytest.raises(UserError, match="leaves 3 layers"):
        prune(model, s, Shape(2, 64, 128, 4, 2, 16), drop_layers=(1, 1))
    with pytest.raises(UserError, match="scores were computed on another model"):
        prune(build_tiny_model("mistral"), s, Shape(4, 64, 128, 4, 2, 16))


def test_cli_importance_then_prune(tiny_model_dir, text_corpus, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    scores = tmp_path / "s.safetensors"
    assert main(["importance", str(tiny_model_dir), "--data", str(text_corpus), "--samples", "8", "--seq-len", "32",
                 "--val-samples", "2", "--batch-size", "4", "--out", str(scores)]) == 0
    out = tmp_path / "pruned"
    assert main(["prune", str(tiny_model_dir), "--scores", str(scores), "--drop-layers", "2-3", "--hidden", "48",
                 "--ffn", "64", "--heads-per-group", "1", "--out", str(out)]) == 0
    back = AutoModelForCausalLM.from_pretrained(out)
    assert shape_of(back.config) == Shape(2, 48, 64, 2, 2, 16)
    capsys.readouterr()
    # errors come before any weights are read: a config-only folder of another shape, a shape that cannot be
    config_only = tmp_path / "other"
    config_only.mkdir()
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    (config_only / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 96}))
    assert main(["prune", str(config_only), "--scores", str(scores), "--out", str(tmp_path / "x")]) == 2
    assert "scores were computed on another model" in capsys.readouterr().err
    assert main(["prune", str(tiny_model_dir), "--scores", str(scores), "--kv-groups", "3",
                 "--out", str(tmp_path / "x")]) == 2
    assert "cannot grow attention" in capsys.readouterr().err
    (config_only / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    assert main(["candidates", str(config_only), "--target-params", "10K"]) == 2
    assert "unsupported architecture" in capsys.readouterr().err


def test_llama_hidden_must_divide_by_heads():
    model = build_tiny_model("llama")
    with pytest.raises(UserError, match="multiple of the query heads"):
        prune(model, shuffled_scores(model), Shape(4, 42, 128, 4, 2, 16))  # LlamaConfig rejects 42 / 4 heads
