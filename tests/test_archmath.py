"""Exact parameter counts, pruned configs and candidate enumeration, checked against sum(numel) of built models."""

from __future__ import annotations

import json

import pytest
from conftest import FAMILIES, tiny_config

from minitron.archmath import (
    Shape,
    config_for_shape,
    count_params,
    count_shape,
    enumerate_candidates,
    shape_of,
)
from minitron.cli import main
from minitron.errors import UserError
from minitron.models import build_meta_model, load_config

LLAMA_31_8B = {  # public architecture values of meta-llama/Llama-3.1-8B
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "hidden_act": "silu",
    "rope_theta": 500000.0, "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                             "original_max_position_embeddings": 8192, "rope_type": "llama3"}}


def numel(config) -> int:
    return sum(p.numel() for p in build_meta_model(config).parameters())


VARIANTS = [(f, dict(tie_word_embeddings=t)) for f in FAMILIES for t in (True, False)] + [
    ("llama", dict(attention_bias=True, mlp_bias=True)), ("qwen3", dict(attention_bias=True)),
    ("nemotron", dict(attention_bias=True, mlp_bias=True)), ("mistral", dict(head_dim=32))]


@pytest.mark.parametrize("family,overrides", VARIANTS)
def test_count_matches_built_model(family, overrides):
    config = tiny_config(family, **overrides)
    assert count_params(config) == numel(config)
    small = config_for_shape(config, Shape(3, 40, 72, 2, 1, shape_of(config).head_dim), kept_layers=[0, 2, 3])
    assert count_shape(config, shape_of(small)) == count_params(small) == numel(small)


def test_per_layer_lists_follow_kept_layers():
    config = tiny_config("qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=2,
                         layer_types=None)
    assert config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    small = config_for_shape(config, Shape(3, 64, 128, 4, 2, 16), kept_layers=[0, 2, 3])
    assert small.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    assert small.max_window_layers == 1 and small.head_dim == 16
    assert type(small).from_dict(small.to_dict()).layer_types == small.layer_types  # transformers accepts it


def test_llama_31_8b_candidates_list_the_published_4b_width(tmp_path, capsys):
    folder = tmp_path / "llama-3.1-8b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA_31_8B))  # config only: no weights anywhere
    config = load_config(str(folder))
    assert count_params(config) == numel(config) == 8_030_261_248
    width_4b = Shape(32, 3072, 9216, 32, 8, 128)  # Llama-3.1-Minitron-4B-Width
    exact = numel(config_for_shape(config, width_4b))
    assert exact == count_shape(config, width_4b) == 4_512_746_496
    found = enumerate_candidates(config, 4_500_000_000, 0.05)
    assert any(c.shape == width_4b and c.params == exact and c.kind == "width" for c in found)
    assert all(abs(c.params - 4.5e9) <= 0.05 * 4.5e9 for c in found)
    for c in found[:3]:  # spot-check the vectorised counts against built models
        assert c.params == numel(config_for_shape(config, c.shape))
    assert main(["candidates", str(folder), "--target-params", "4.5B", "--tolerance", "0.05", "--limit", "0"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert ["width", "32", "3072", "9216", "32", "8", "128", "4,512,746,496", "+0.28%"] in rows


def test_depth_candidates_and_tiny_divisors():
    config = tiny_config("llama")  # hidden 64: the 64-multiple falls back to a smaller power of two
    found = enumerate_candidates(config, int(count_params(config) * 0.8), 0.1)
    assert found and all(c.shape.hidden % 8 == 0 and c.shape.heads % c.shape.kv_heads == 0 for c in found)
    depth = enumerate_candidates(config, int(count_params(config) * 0.85), 0.1, axes="depth")
    assert {c.kind for c in depth} == {"depth", "depth-block"}
    block = next(c for c in depth if c.kind == "depth-block")
    assert block.drop[1] == 2 and block.drop[1] - block.drop[0] + 1 == 4 - block.shape.layers


def test_infeasible_budgets_are_one_line_errors():
    config = tiny_config("llama")
    total = count_params(config)
    with pytest.raises(UserError, match="not smaller"):
        enumerate_candidates(config, total, 0.05)
    with pytest.raises(UserError, match="below the smallest candidate"):
        enumerate_candidates(config, total // 10, 0.05)
    with pytest.raises(UserError, match="supported model types are llama, mistral, qwen2, qwen3, nemotron"):
        from transformers import GPT2Config
        count_params(GPT2Config())


def test_candidates_cli_error(tmp_path, capsys):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA_31_8B))
    assert main(["candidates", str(folder), "--target-params", "9B"]) == 2
    assert "not smaller" in capsys.readouterr().err
