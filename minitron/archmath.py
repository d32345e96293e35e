"""Architecture math: exact parameter counts, pruned configs and the candidate shapes under a parameter budget.

Everything here works from a config alone (no weights), so planning an 8B → 4B compression runs on a laptop.
The count is one formula over numpy-broadcastable integers: `count_params` applies it to a config, and
`enumerate_candidates` applies it to a whole grid of shapes at once (an 8B search space in milliseconds).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from minitron.errors import UserError
from minitron.families import family_of, head_dim_of, kv_heads_of


@dataclass(frozen=True)
class Shape:
    """The prunable dimensions of a homogeneous decoder (every layer the same)."""

    layers: int
    hidden: int
    ffn: int
    heads: int  # query heads
    kv_heads: int  # KV groups
    head_dim: int  # never pruned (the papers keep it; Qwen3's q/k norms depend on it)

    @property
    def heads_per_group(self) -> int:
        return self.heads // self.kv_heads

    def __str__(self) -> str:
        return (f"L{self.layers} h{self.hidden} ffn{self.ffn} heads{self.heads}/kv{self.kv_heads} "
                f"hd{self.head_dim}")


def shape_of(config) -> Shape:
    family_of(config)
    return Shape(config.num_hidden_layers, config.hidden_size, config.intermediate_size,
                 config.num_attention_heads, kv_heads_of(config), head_dim_of(config))


def _count(config, layers, hidden, ffn, heads, kv_heads, head_dim):
    """Parameters of `config`'s family at the given shape; arguments may be numpy arrays (broadcast)."""
    fam = family_of(config)
    vocab = config.vocab_size
    tied = bool(getattr(config, "tie_word_embeddings", False))
    q, kv = heads * head_dim, kv_heads * head_dim
    attn = hidden * (q + 2 * kv) + q * hidden
    attn = attn + (q + 2 * kv) * fam.has(config, "qkv_bias") + hidden * fam.has(config, "o_bias")
    attn = attn + 2 * head_dim * fam.qk_norm
    n_in = 2 if fam.gated_mlp else 1  # gate+up or up only
    mlp = (n_in + 1) * hidden * ffn + (n_in * ffn + hidden) * fam.has(config, "mlp_bias")
    norm = hidden * (2 if fam.norm_bias else 1)
    per_layer = attn + mlp + 2 * norm
    return vocab * hidden * (1 if tied else 2) + layers * per_layer + norm


def count_params(config) -> int:
    """Exact parameter count (a tied lm_head counts once), equal to sum(p.numel()) of the built model."""
    s = shape_of(config)
    return int(_count(config, s.layers, s.hidden, s.ffn, s.heads, s.kv_heads, s.head_dim))


def count_shape(config, shape: Shape) -> int:
    return int(_count(config, shape.layers, shape.hidden, shape.ffn, shape.heads, shape.kv_heads, shape.head_dim))


def inference_bytes(shape: Shape, params: int, context: int, bytes_per_value: int = 2) -> int:
    """Memory to serve one sequence of `context` tokens: the weights plus the K and V cache of every layer, in
    bf16 by default. Depth pruning shrinks the cache, width pruning of hidden/MLP does not: the cap can tell them apart."""
    return params * bytes_per_value + 2 * shape.layers * shape.kv_heads * shape.head_dim * context * bytes_per_value


def config_for_shape(config, shape: Shape, kept_layers: list[int] | None = None):
    """A new config of the same class at `shape`. `kept_layers` (original indices, default the first
    `shape.layers`) keeps the per-layer lists (layer_types, max_window_layers) consistent with the kept layers."""
    kept = sorted(kept_layers) if kept_layers is not None else list(range(shape.layers))
    if len(kept) != shape.layers:
        raise UserError(f"{len(kept)} kept layers given for a shape with {shape.layers} layers")
    d = config.to_dict()
    d.update(num_hidden_layers=shape.layers, hidden_size=shape.hidden, intermediate_size=shape.ffn,
             num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim)
    if isinstance(d.get("layer_types"), list):
        d["layer_types"] = [d["layer_types"][i] for i in kept]
    if isinstance(d.get("max_window_layers"), int):  # Qwen2/3: layers at index >= max_window_layers slide
        d["max_window_layers"] = sum(1 for i in kept if i < d["max_window_layers"])
    return type(config).from_dict(d)


# ----------------------------------------------------------------------------------------------------------------
# candidate enumeration


@dataclass(frozen=True)
class Candidate:
    shape: Shape
    params: int
    kind: str  # "width" (all layers kept), "depth" (width kept, lowest-ranked layers dropped), "mixed" (both),
    # "depth-block" (the depth shape by dropping one contiguous block, the papers' best depth recipe)
    drop: tuple[int, int] | None = None  # 0-indexed inclusive block for "depth-block"


@dataclass(frozen=True)
class SearchSpace:
    """Bounds and divisors of the candidate grid (defaults: the papers' hardware-friendly choices)."""

    min_keep_layers: float = 0.5  # keep at least this fraction of each axis
    min_keep_hidden: float = 0.5
    min_keep_ffn: float = 0.5
    min_keep_heads: float = 0.5
    hidden_multiple: int = 64  # tensor-core friendly; lowered automatically for models whose hidden is not one
    ffn_multiple: int = 64
    prune_kv_groups: bool = False  # also try fewer KV groups (divisors of the model's count)


def _multiple(size: int, wanted: int) -> int:
    """`wanted`, or the largest power of two ≤ wanted dividing `size` (tiny models: hidden 64 → multiple 8)."""
    m = wanted
    while m > 1 and size % m:
        m //= 2
    return max(m, 1)


def _axis(full: int, keep: float, multiple: int) -> np.ndarray:
    lo = max(multiple, math.ceil(full * keep / multiple) * multiple)
    return np.arange(lo, full + 1, multiple, dtype=np.int64)


def enumerate_candidates(config, target_params: int, tolerance: float = 0.05, *, axes: str = "all",
                         space: SearchSpace | None = None) -> list[Candidate]:
    """Every homogeneous shape within `tolerance` (relative) of `target_params`, closest first.

    axes: "width" (keep all layers), "depth" (keep the width) or "all" (width, depth and mixed)."""
    space = space or SearchSpace()
    if axes not in ("all", "width", "depth"):
        raise UserError(f"axes must be all, width or depth, not '{axes}'")
    if not 0 <= tolerance < 1:
        raise UserError(f"tolerance {tolerance} must be in [0, 1)")
    full = shape_of(config)
    total = count_params(config)
    if target_params >= total:
        raise UserError(f"target {target_params:,} parameters is not smaller than the model ({total:,})")
    hm, fm = _multiple(full.hidden, space.hidden_multiple), _multiple(full.ffn, space.ffn_multiple)
    width = axes in ("all", "width")
    layers = _axis(full.layers, space.min_keep_layers, 1) if axes != "width" else np.array([full.layers])
    hidden = _axis(full.hidden, space.min_keep_hidden, hm) if width else np.array([full.hidden])
    ffn = _axis(full.ffn, space.min_keep_ffn, fm) if width else np.array([full.ffn])
    groups = [g for g in range(1, full.kv_heads + 1) if full.kv_heads % g == 0] if space.prune_kv_groups \
        else [full.kv_heads]
    # (heads, kv) pairs with the same number of query heads in every kept group
    head_options = sorted({(per * g, g) for g in groups for per in range(1, full.heads_per_group + 1)
                           if per * g >= full.heads * space.min_keep_heads} | {(full.heads, full.kv_heads)})
    if not width:
        head_options = [(full.heads, full.kv_heads)]
    heads = np.array([h for h, _ in head_options])
    kvs = np.array([g for _, g in head_options])
    L, H, F, Q = np.meshgrid(layers, hidden, ffn, np.arange(len(heads)), indexing="ij")
    params = _count(config, L, H, F, heads[Q], kvs[Q], full.head_dim)
    lo, hi = target_params * (1 - tolerance), target_params * (1 + tolerance)
    ok = (params >= lo) & (params <= hi)
    if family_of(config).hidden_per_head:
        ok &= H % heads[Q] == 0
    if not ok.any():
        smallest = int(params.min())
        if smallest > hi:
            raise UserError(f"budget {target_params:,} is below the smallest candidate ({smallest:,} parameters, "
                            f"keeping ≥{space.min_keep_layers:.0%} of layers and ≥{space.min_keep_hidden:.0%} of "
                            "widths): raise --target-params or --tolerance")
        raise UserError(f"no {axes} candidate within {tolerance:.1%} of {target_params:,} parameters: "
                        "raise --tolerance or allow more axes")
    out = []
    for idx in zip(*np.nonzero(ok), strict=True):
        shape = Shape(int(L[idx]), int(H[idx]), int(F[idx]), int(heads[Q[idx]]), int(kvs[Q[idx]]), full.head_dim)
        is_width = (shape.hidden, shape.ffn, shape.heads, shape.kv_heads) != \
            (full.hidden, full.ffn, full.heads, full.kv_heads)
        is_depth = shape.layers < full.layers
        kind = "mixed" if is_width and is_depth else "depth" if is_depth else "width"
        cand = Candidate(shape, int(params[idx]), kind)
        out.append(cand)
        if kind == "depth":  # the contiguous block just before the last layer (Llama-3.1-Minitron 4B-Depth)
            dropped = full.layers - shape.layers
            out.append(replace(cand, kind="depth-block", drop=(full.layers - 1 - dropped, full.layers - 2)))
    out.sort(key=lambda c: (abs(c.params - target_params), c.kind))
    return out
