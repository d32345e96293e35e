"""Structured pruning to a target shape: copy the most important slices of every tensor into a new, smaller model.

Units are kept in importance order on every axis (also on axes that keep their size), so a full-shape prune is a
pure permutation and must reproduce the logits exactly: that is the test that every slice is consistent.
GQA stays valid: KV groups are ranked by their group score, and every kept group keeps the same number of its own
best query heads. head_dim is never pruned (Qwen3's per-head q/k norms are copied as they are).

Two options, off by default, for ablations (both need the optional statistics of the importance pass):
  rescale_norms   a norm divides by the RMS of the channels that remain; kept channels carry more energy than
                  average, so after hidden pruning every norm output would shrink. Every kept hidden norm's scale is
                  multiplied by rms_kept / rms_full ~ sqrt(mean over kept channels of E[(x_c / rms_full)^2]).
  compensate_mlp  FLAP-style: a removed MLP neuron j adds its mean activation mean_j * W_down[:, j] as a constant,
                  folded into a down_proj bias (families whose config can switch MLP biases on).
"""

from __future__ import annotations

import torch

from minitron.archmath import Shape, check_shape, config_for_shape, shape_of
from minitron.errors import UserError
from minitron.families import FAMILIES, LAYER_NORMS, family_of
from minitron.importance import ImportanceScores


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, most important first (stable: ties keep index order)."""
    return torch.sort(scores, descending=True, stable=True).indices[:k]


def kept_layers(scores: ImportanceScores, n_layers: int, n_keep: int, drop_layers=None,
                layer_metric: str = "loss") -> list[int]:
    if drop_layers is not None:
        return [i for i in range(n_layers) if not drop_layers[0] <= i <= drop_layers[1]]
    if n_keep == n_layers:
        return list(range(n_layers))
    return sorted(_top(scores.layer_ranking(layer_metric), n_keep).tolist())


def _attention_rows(scores: ImportanceScores, layer: int, full: Shape, shape: Shape):
    """(query-head indices, KV-group indices) to keep, in importance order, query heads grouped by their group."""
    groups = _top(scores.kv_groups[layer], shape.kv_heads)
    per = full.heads_per_group
    q_heads = []
    for g in groups.tolist():
        own = torch.arange(g * per, (g + 1) * per)
        q_heads += own[_top(scores.heads[layer, own], shape.heads_per_group)].tolist()
    return torch.tensor(q_heads), groups


def kept_heads(scores: ImportanceScores, shape: Shape, drop_layers: tuple[int, int] | None = None,
               layer_metric: str = "loss") -> torch.Tensor:
    """[layers, query heads] of the scored model, True where `prune` to `shape` keeps the head (a dropped layer
    keeps none): the same choice as `prune`, for plots and reports."""
    n_layers, n_heads = scores.heads.shape
    full = Shape(n_layers, len(scores.hidden), scores.neurons.shape[1], n_heads, scores.kv_groups.shape[1], 0)
    kept = torch.zeros(n_layers, n_heads, dtype=torch.bool)
    for layer in kept_layers(scores, n_layers, shape.layers, drop_layers, layer_metric):
        kept[layer, _attention_rows(scores, layer, full, shape)[0]] = True
    return kept


def _rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Weight rows of the given heads (head h owns rows h*head_dim ... (h+1)*head_dim - 1)."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


def check_options(config, scores: ImportanceScores, *, rescale_norms: bool = False,
                  compensate_mlp: bool = False) -> None:
    """Raise a UserError when an option cannot be applied to this model or these scores."""
    if rescale_norms:
        scores.require("hidden_energy", "rescale_norms")
    if compensate_mlp:
        scores.require("neuron_mean", "compensate_mlp")
        if not isinstance(family_of(config).mlp_bias, str):
            can = [f.model_type for f in FAMILIES.values() if isinstance(f.mlp_bias, str)]
            raise UserError(f"compensate_mlp needs an MLP bias, which {config.model_type} configs cannot hold: "
                            f"only {', '.join(can)} support it")


def norm_factor(scores: ImportanceScores, hid: torch.Tensor) -> float:
    """rms_kept / rms_full for the kept hidden channels `hid` (1 when all are kept)."""
    e = scores.hidden_energy.double()
    return float((e[hid].mean() / e.mean()).sqrt())


def _removed_neurons_bias(down: torch.Tensor, mean: torch.Tensor, kept: torch.Tensor, hid: torch.Tensor):
    """sum over removed neurons j of mean_j * W_down[hid, j]: the removed neurons' average contribution."""
    removed = torch.ones(len(mean), dtype=torch.bool)
    removed[kept] = False
    return down[hid][:, removed].float() @ mean[removed].to(down.device)


@torch.no_grad()
def prune(model, scores: ImportanceScores, shape: Shape, *, drop_layers: tuple[int, int] | None = None,
          layer_metric: str = "loss", rescale_norms: bool = False, compensate_mlp: bool = False):
    """A new model of `shape` holding the kept slices of `model` (same dtype and device). `drop_layers` is a
    0-indexed inclusive block; otherwise the lowest-ranked layers by `layer_metric` ("loss" or "bi") are dropped.
    `rescale_norms` and `compensate_mlp`: see the module docstring."""
    from transformers import AutoModelForCausalLM

    config = model.config
    fam = family_of(config)
    scores.check_matches(config)
    check_shape(shape, shape_of(config), config=config, drop=drop_layers)
    check_options(config, scores, rescale_norms=rescale_norms, compensate_mlp=compensate_mlp)
    full = shape_of(config)
    layers = kept_layers(scores, full.layers, shape.layers, drop_layers, layer_metric)
    hid = _top(scores.hidden, shape.hidden)
    old = model.state_dict()
    p = next(model.parameters())

    new_config = config_for_shape(config, shape, layers)
    if compensate_mlp:
        setattr(new_config, fam.mlp_bias, True)  # the compensation lives in down_proj's bias
    with torch.device(p.device):
        new = AutoModelForCausalLM.from_config(new_config, dtype=p.dtype)
    factor = norm_factor(scores, hid) if rescale_norms else 1.0
    sd = {}
    for name, like in new.state_dict().items():
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            sd[name] = old[name][:, hid]
        elif name.startswith("model.norm."):
            sd[name] = old[name][hid]
        elif name.startswith("model.layers."):
            _, _, idx, rest = name.split(".", 3)
            src = layers[int(idx)]
            key = f"model.layers.{src}.{rest}"
            if key in old:
                sd[name] = _slice_layer(rest, old[key], scores, src, full, shape, hid)
            elif compensate_mlp and rest.startswith("mlp.") and rest.endswith(".bias"):
                sd[name] = torch.zeros_like(like)  # MLP biases the source model did not have
            else:
                raise UserError(f"do not know how to prune parameter '{name}' of {type(model).__name__}")
            if compensate_mlp and rest == "mlp.down_proj.bias":
                kept = _top(scores.neurons[src], shape.ffn)
                comp = _removed_neurons_bias(old[f"model.layers.{src}.mlp.down_proj.weight"],
                                             scores.neuron_mean[src], kept, hid)
                sd[name] = (sd[name].float() + comp).to(like.dtype)
        else:
            raise UserError(f"do not know how to prune parameter '{name}' of {type(model).__name__}")
        if factor != 1.0 and name.endswith(tuple(f"{n}.weight" for n in (*LAYER_NORMS, "model.norm"))):
            # w' = w * rms_kept / rms_full, on the effective scale (weight + offset for Nemotron's LayerNorm1P)
            off = fam.norm_weight_offset
            sd[name] = ((sd[name].float() + off) * factor - off).to(like.dtype)
    new.load_state_dict(sd, strict=True)
    new.eval()
    new.name_or_path = getattr(model, "name_or_path", "")
    return new


def _slice_layer(rest: str, t: torch.Tensor, scores: ImportanceScores, src: int, full: Shape, shape: Shape,
                 hid: torch.Tensor) -> torch.Tensor:
    module, _, kind = rest.rpartition(".")  # e.g. "self_attn.q_proj", "weight"
    leaf = module.rsplit(".", 1)[-1]
    if leaf in ("input_layernorm", "post_attention_layernorm"):
        return t[hid]
    if leaf in ("q_norm", "k_norm"):
        return t.clone()
    if leaf in ("q_proj", "k_proj", "v_proj", "o_proj"):
        q_heads, groups = _attention_rows(scores, src, full, shape)
        rows = _rows(q_heads if leaf in ("q_proj", "o_proj") else groups, full.head_dim)
        if leaf == "o_proj":
            return t[hid][:, rows] if kind == "weight" else t[hid]
        return t[rows][:, hid] if kind == "weight" else t[rows]
    if leaf in ("gate_proj", "up_proj", "down_proj"):
        neurons = _top(scores.neurons[src], shape.ffn)
        if leaf == "down_proj":
            return t[hid][:, neurons] if kind == "weight" else t[hid]
        return t[neurons][:, hid] if kind == "weight" else t[neurons]
    raise UserError(f"do not know how to prune layer parameter '{rest}'")


@torch.no_grad()
def random_init(model, seed: int = 0):
    """A model of `model`'s architecture (any pruned shape: its config) with fresh weights from the family's own
    initialisation, the same for the same seed on any device: the from-scratch baseline that pruning + distillation
    is measured against at equal tokens (arXiv 2407.14679). Same dtype and device; `model` is untouched."""
    import copy

    from transformers import AutoModelForCausalLM

    p = next(model.parameters())
    with torch.random.fork_rng(devices=[]):  # built on the CPU: the caller's RNG streams stay where they were
        torch.manual_seed(seed)
        new = AutoModelForCausalLM.from_config(copy.deepcopy(model.config), dtype=p.dtype)
    new.to(p.device).eval()
    new.name_or_path = getattr(model, "name_or_path", "")
    return new


def save_pruned(model, tokenizer, out) -> None:
    """A folder plain `AutoModelForCausalLM.from_pretrained` reloads (explicit head_dim and per-layer lists)."""
    from minitron.models import save_model

    return save_model(model, tokenizer, out)
