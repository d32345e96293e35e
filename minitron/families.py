"""Where each supported family keeps its tensors: one small description shared by importance, pruning and archmath.

Every supported model is a pre-norm decoder: `model.embed_tokens`, `model.layers[i]` with `input_layernorm` →
`self_attn` (q/k/v/o_proj) and `post_attention_layernorm` → `mlp`, then `model.norm` and `lm_head`. The families differ
only in the details this module names: MLP gate, biases, per-head q/k norms and the norm type.
"""

from __future__ import annotations

from dataclasses import dataclass

from minitron.errors import UserError


@dataclass(frozen=True)
class Family:
    model_type: str
    gated_mlp: bool  # MLP = down(act(gate(x)) * up(x)); False: down(act(up(x))) (Nemotron's squared ReLU)
    qk_norm: bool  # per-head RMSNorm on q and k over head_dim (Qwen3); never sliced since head_dim is kept
    norm_bias: bool  # LayerNorm with bias (Nemotron's LayerNorm1P stores weight - 1; slicing does not care)
    qkv_bias: str | bool  # bool, or the config attribute that switches q/k/v biases on
    o_bias: str | bool  # bool, or the config attribute that switches the o_proj bias on
    mlp_bias: str | bool  # bool, or the config attribute that switches MLP biases on
    hidden_per_head: bool = False  # the config class rejects a hidden size that is not a multiple of the heads
    # (LlamaConfig's validator, even with an explicit head_dim)
    norm_weight_offset: float = 0.0  # the norm scales by weight + offset (Nemotron's LayerNorm1P stores w - 1)

    def has(self, config, what: str) -> bool:
        """Is the bias `what` ("qkv_bias", "o_bias", "mlp_bias") present for this config?"""
        flag = getattr(self, what)
        return bool(getattr(config, flag, False)) if isinstance(flag, str) else flag

    def mlp_in(self) -> tuple[str, ...]:
        """MLP projections that read the hidden state (their output rows are MLP neurons)."""
        return ("gate_proj", "up_proj") if self.gated_mlp else ("up_proj",)


FAMILIES = {
    "llama": Family("llama", True, False, False, "attention_bias", "attention_bias", "mlp_bias", True),
    "mistral": Family("mistral", True, False, False, False, False, False),
    "qwen2": Family("qwen2", True, False, False, True, False, False),
    "qwen3": Family("qwen3", True, True, False, "attention_bias", "attention_bias", False),
    "nemotron": Family("nemotron", False, False, True, "attention_bias", "attention_bias", "mlp_bias",
                       norm_weight_offset=1.0),
}

# The norms of a layer that feed a linear layer: their outputs are the hidden channels the importance pass scores.
LAYER_NORMS = ("input_layernorm", "post_attention_layernorm")


def family_of(config) -> Family:
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise UserError(f"unsupported architecture '{model_type}': supported model types are "
                        f"{', '.join(FAMILIES)}")
    return FAMILIES[model_type]


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def kv_heads_of(config) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads
