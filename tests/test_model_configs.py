"""Shipped teacher configs: they load offline under their aliases and hub ids, config-only specs work for the
shape-only commands and fail `load_model` in one line, and the published Minitron shapes built from them have the
exact parameter counts (sum of numel on the meta device = hand arithmetic = archmath)."""

from __future__ import annotations

import pytest

from cli.main import main
from minitron.errors import UserError
from minitron.models import build_meta_model, count_parameters, is_config_only, load_config, load_model


def hand_count(vocab, hidden, ffn, layers, heads, kv, head_dim=128, tied=False, gated=True, norm_bias=False):
    """Decoder parameters by hand: attention q/k/v/o, MLP (gate+up+down or up+down), two norms per layer, final
    norm, embedding and (untied) lm_head."""
    q, k = heads * head_dim, kv * head_dim
    attn = hidden * (q + 2 * k) + q * hidden
    mlp = (3 if gated else 2) * hidden * ffn
    norm = hidden * (2 if norm_bias else 1)
    return vocab * hidden * (1 if tied else 2) + layers * (attn + mlp + 2 * norm) + norm


# (alias, published teacher size by hand, the same via the hub ids that read the shipped copy)
TEACHERS = {
    "llama-3.1-8b": hand_count(128256, 4096, 14336, 32, 32, 8),  # 8,030,261,248
    "mistral-nemo-12b": hand_count(131072, 5120, 14336, 40, 32, 8),  # 12,247,782,400
    "nemotron-4-15b": hand_count(256000, 6144, 24576, 32, 48, 8, gated=False, norm_bias=True),  # 15,628,775,424
    "smollm2-135m": hand_count(49152, 576, 1536, 30, 9, 3, head_dim=64, tied=True),  # 134,515,008
}

# The published students: (teacher alias, config edits, exact count). The papers round these to 4.5B, 4.5B, 8.4B,
# 8.3B and 4.2B (Llama-3.1-Minitron 4B-Width / 4B-Depth, MN-Minitron 8B, Minitron 8B / 4B).
PUBLISHED = {
    "llama-3.1-minitron-4b-width": ("llama-3.1-8b", dict(hidden_size=3072, intermediate_size=9216), 4_512_746_496),
    "llama-3.1-minitron-4b-depth": ("llama-3.1-8b", dict(num_hidden_layers=16), 4_540_469_248),
    "mn-minitron-8b": ("mistral-nemo-12b", dict(hidden_size=4096, intermediate_size=11520), 8_414_105_600),
    "minitron-8b": ("nemotron-4-15b", dict(hidden_size=4096, intermediate_size=16384), 8_271_699_968),
    "minitron-4b": ("nemotron-4-15b", dict(hidden_size=3072, intermediate_size=9216, num_attention_heads=24),
                    4_190_509_056),
}


def pruned_config(alias: str, edits: dict):
    config = load_config(alias)
    d = config.to_dict()
    d.update(edits)
    return type(config).from_dict(d)


def test_hand_counts_are_the_published_teacher_sizes():
    assert TEACHERS == {"llama-3.1-8b": 8_030_261_248, "mistral-nemo-12b": 12_247_782_400,
                        "nemotron-4-15b": 15_628_775_424, "smollm2-135m": 134_515_008}


@pytest.mark.parametrize("alias", TEACHERS)
def test_shipped_teacher_counts(alias):
    model = build_meta_model(load_config(alias))
    assert next(model.parameters()).device.type == "meta"
    assert count_parameters(model) == TEACHERS[alias]


@pytest.mark.parametrize("hub_id,alias", [("meta-llama/Llama-3.1-8B", "llama-3.1-8b"),
                                          ("mistralai/Mistral-Nemo-Base-2407", "mistral-nemo-12b"),
                                          ("HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2-135m")])
def test_hub_ids_read_the_shipped_config_offline(hub_id, alias):
    assert load_config(hub_id).to_dict() == load_config(alias).to_dict()


def test_architecture_details_are_kept():
    nemo, nemotron, llama = load_config("mistral-nemo-12b"), load_config("nemotron-4-15b"), load_config("llama-3.1-8b")
    assert nemo.head_dim == 128 != nemo.hidden_size // nemo.num_attention_heads
    assert type(build_meta_model(nemotron)).__name__ == "NemotronForCausalLM"
    assert nemotron.hidden_act == "relu2" and nemotron.rope_parameters["partial_rotary_factor"] == 0.5
    assert llama.rope_parameters["rope_type"] == "llama3" and not llama.tie_word_embeddings
    assert llama.max_position_embeddings == 131072


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_student_counts(name):
    alias, edits, expected = PUBLISHED[name]
    config = pruned_config(alias, edits)
    assert count_parameters(build_meta_model(config)) == expected
    c = load_config(alias)
    heads = edits.get("num_attention_heads", c.num_attention_heads)
    assert hand_count(c.vocab_size, edits.get("hidden_size", c.hidden_size),
                      edits.get("intermediate_size", c.intermediate_size),
                      edits.get("num_hidden_layers", c.num_hidden_layers), heads, c.num_key_value_heads,
                      gated=c.model_type != "nemotron", norm_bias=c.model_type == "nemotron") == expected


@pytest.mark.parametrize("name", PUBLISHED)
def test_archmath_agrees_on_published_students(name):
    archmath = pytest.importorskip("minitron.archmath")
    alias, edits, expected = PUBLISHED[name]
    assert archmath.count_params(pruned_config(alias, edits)) == expected


def test_config_only_specs(tmp_path, tiny_model):
    assert is_config_only("llama-3.1-8b") and not is_config_only("smollm2-135m")
    assert not is_config_only("meta-llama/Llama-3.1-8B")  # a hub id has weights
    tiny_model("llama").config.save_pretrained(tmp_path)
    assert is_config_only(str(tmp_path))
    for spec in ("llama-3.1-8b", str(tmp_path)):
        with pytest.raises(UserError, match="config-only model: weights are needed for this command"):
            load_model(spec)


def test_info_on_a_config_only_alias(capsys):
    assert main(["info", "nemotron-4-15b", "--json"]) == 0
    out = capsys.readouterr().out
    assert '"parameters": 15628775424' in out and '"device": "meta"' in out


def test_weights_command_on_config_only_alias_is_one_line(capsys):
    from cli.commands.common import load_model_from_args

    class Args:
        dtype, device, allow_pickle, trust_remote_code = "auto", "cpu", False, False

    with pytest.raises(UserError) as err:
        load_model_from_args("mistral-nemo-12b", Args)
    assert "\n" not in str(err.value)
