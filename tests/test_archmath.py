"""Exact parameter counts, pruned configs and candidate enumeration, checked against sum(numel) of built models."""

from __future__ import annotations

import json

import pytest
from conftest import FAMILIES, tiny_config

from cli.main import main
from minitron.archmath import (
    SearchSpace,
    Shape,
    config_for_shape,
    count_params,
    count_shape,
    dim_multiple,
    enumerate_candidates,
    shape_of,
)
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


# The seed systems' published shapes, from their Hugging Face config.json files (architecture fields; head_dim 128,
# 8 KV groups throughout), each with the teacher it was pruned from and its size as the papers round it:
#   Minitron-8B-Base  https://huggingface.co/nvidia/Minitron-8B-Base/blob/main/config.json: hidden 4096, MLP 16384,
#                     48 heads, 32 layers (arXiv 2407.14679, pruned from Nemotron-4 15B; 8.3B)
#   Minitron-4B-Base  https://huggingface.co/nvidia/Minitron-4B-Base/blob/main/config.json: hidden 3072, MLP 9216,
#                     24 heads, 32 layers (the model card's prose says 32 heads; the weights' config says 24; 4.2B)
#   Llama-3.1-Minitron-4B-Width-Base  https://huggingface.co/nvidia/Llama-3.1-Minitron-4B-Width-Base (config.json):
#                     hidden 3072, MLP 9216, 32 heads, 32 layers (arXiv 2408.11796, from Llama-3.1-8B; 4.5B)
#   Mistral-NeMo-Minitron-8B-Base  https://huggingface.co/nvidia/Mistral-NeMo-Minitron-8B-Base (model card and
#                     config.json): hidden 4096, MLP 11520, 32 heads, 40 layers (arXiv 2408.11796, from Mistral NeMo
#                     12B; 8.4B)
# Exact counts: tests/test_model_configs.py counts the same shapes on built meta models.
PUBLISHED = [
    ("minitron-8b", "nemotron-4-15b", Shape(32, 4096, 16384, 48, 8, 128), 8_271_699_968, "8.3B"),
    ("minitron-4b", "nemotron-4-15b", Shape(32, 3072, 9216, 24, 8, 128), 4_190_509_056, "4.2B"),
    ("llama-3.1-minitron-4b-width", "llama-3.1-8b", Shape(32, 3072, 9216, 32, 8, 128), 4_512_746_496, "4.5B"),
    ("mn-minitron-8b", "mistral-nemo-12b", Shape(40, 4096, 11520, 32, 8, 128), 8_414_105_600, "8.4B"),
]


@pytest.mark.parametrize("name,teacher,shape,params,budget", PUBLISHED, ids=[p[0] for p in PUBLISHED])
def test_published_shapes_are_in_the_default_space(name, teacher, shape, params, budget, capsys):
    """With every default (space, tolerance 5%, all axes), `minitron candidates` for the teacher at the published
    size lists the published shape with its exact count, and the space is a few hundred shapes, not thousands."""
    from minitron.config import parse_count

    config = load_config(teacher)
    found = enumerate_candidates(config, parse_count(budget), 0.05)
    match = [c for c in found if c.shape == shape]
    assert match and match[0].params == params == count_shape(config, shape) and match[0].kind == "width"
    assert len(found) < 3000
    assert main(["candidates", teacher, "--target-params", budget, "--limit", "0"]) == 0
    out = capsys.readouterr().out
    assert f"{len(found)} candidates" in out
    assert ["width", str(shape.layers), str(shape.hidden), str(shape.ffn), str(shape.heads), "8", "128",
            f"{params:,}"] in [line.split()[:8] for line in out.splitlines()]


def test_llama_31_8b_at_the_issue_budget(tmp_path, capsys):
    """The case a user reported: Llama-3.1-8B at 4.5B ±2% listed 6,278 shapes and not the released one among the
    first 30. Now the space is about a hundred and the released shape comes first (width first, then closest)."""
    folder = tmp_path / "llama-3.1-8b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA_31_8B))  # config only: no weights anywhere
    config = load_config(str(folder))
    assert count_params(config) == numel(config) == 8_030_261_248
    width_4b = Shape(32, 3072, 9216, 32, 8, 128)
    found = enumerate_candidates(config, 4_500_000_000, 0.02)
    assert found[0].shape == width_4b and found[0].params == numel(config_for_shape(config, width_4b))
    assert all(abs(c.params - 4.5e9) <= 0.02 * 4.5e9 for c in found) and 50 < len(found) < 200
    for c in found[:3]:  # spot-check the vectorised counts against built models
        assert c.params == numel(config_for_shape(config, c.shape))
    # the space's priors: multiples of 256 for a 4.5B student, each width axis keeps ≥ 56% (the target's share),
    # layers ≥ 80%, whole query heads per KV group
    assert all(c.shape.hidden % 256 == 0 and c.shape.ffn % 256 == 0 for c in found)
    assert min(c.shape.hidden for c in found) >= 0.56 * 4096 and min(c.shape.layers for c in found) >= 26
    assert all(c.shape.kv_heads == 8 and c.shape.heads % 8 == 0 and c.shape.heads >= 24 for c in found)
    assert main(["candidates", str(folder), "--target-params", "4.5B", "--tolerance", "0.02", "--limit", "1"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert ["width", "32", "3072", "9216", "32", "8", "128", "4,512,746,496", "+0.28%"] in rows


def test_space_priors_and_their_bounds():
    assert [dim_multiple(n) for n in (135e6, 999_999_999, 1e9, 8e9, 10e9, 70e9)] == [64, 64, 256, 256, 512, 512]
    space = SearchSpace()
    assert space.width_keep(0.8) == pytest.approx(0.6) and space.width_keep(0.27) == pytest.approx(0.27)
    assert space.width_keep(0.1) == 0.25  # never below a quarter in one step: go iteratively
    assert (space.depth_keep("all"), space.depth_keep("depth")) == (pytest.approx(0.8), 0.0)
    assert SearchSpace(max_width_pruning=0.3, max_depth_pruning=0.5).width_keep(0.2) == pytest.approx(0.7)
    # tiny models: the multiple is halved until an axis has 8 sizes (hidden 64 → 8, MLP 128 → 16)
    config = tiny_config("llama")
    assert space.multiples(shape_of(config), 100_000) == (8, 16)
    found = enumerate_candidates(config, int(count_params(config) * 0.8), 0.1)
    assert found and all(c.shape.hidden % 8 == 0 and c.shape.heads % c.shape.kv_heads == 0 for c in found)
    # a depth-only search may drop as many layers as the budget needs (4B-Depth drops half of Llama-3.1-8B)
    depth = enumerate_candidates(load_config("llama-3.1-8b"), 4_540_469_248, 0.01, axes="depth")
    assert [(c.kind, c.shape.layers) for c in depth] == [("depth", 16)]
    with pytest.raises(UserError, match="max_width_pruning 1.2 must be in"):
        enumerate_candidates(config, 100_000, 0.1, space=SearchSpace(max_width_pruning=1.2))


def test_infeasible_budgets_are_one_line_errors():
    config = tiny_config("llama")
    total = count_params(config)
    with pytest.raises(UserError, match="not smaller"):
        enumerate_candidates(config, total, 0.05)
    with pytest.raises(UserError, match="below the smallest candidate"):
        enumerate_candidates(config, total // 50, 0.05)
    with pytest.raises(UserError, match="supported model types are llama, mistral, qwen2, qwen3, nemotron"):
        from transformers import GPT2Config
        count_params(GPT2Config())


def test_candidates_cli_error(tmp_path, capsys):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA_31_8B))
    assert main(["candidates", str(folder), "--target-params", "9B"]) == 2
    assert "not smaller" in capsys.readouterr().err


def test_a_shape_spec_reads_back_as_the_shape():
    """spec() writes what `target_shapes` reads: the round trip is the identity, a part left out keeps the parent's
    value, and a spec in another spelling is refused in one line."""
    parent = Shape(32, 4096, 14336, 32, 8, 128)
    child = Shape(24, 3072, 9216, 24, 8, 128)
    assert child.spec() == str(child) == "L24-H3072-F9216-A24-KV8"
    assert Shape.from_spec(child.spec(), parent) == child
    assert Shape.from_spec("KV4-L16", parent) == Shape(16, 4096, 14336, 32, 4, 128)
    with pytest.raises(UserError, match="cannot read shape 'L24 h3072'"):
        Shape.from_spec("L24 h3072", parent)
