"""Architecture math: exact parameter counts, pruned configs and the candidate shapes under a parameter budget.

Everything here works from a config alone (no weights), so planning an 8B → 4B compression runs on a laptop.
The count is one formula over numpy-broadcastable integers: `count_params` applies it to a config, and
`enumerate_candidates` applies it to a whole grid of shapes at once (an 8B search space in milliseconds).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

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

    def spec(self) -> str:
        """The shape as the config's `target_shapes` writes it: "L24-H576-F1536-A9-KV3" (layers, hidden, MLP,
        query heads, KV groups; head_dim is never pruned). What every table, label and log line prints."""
        return shape_spec(self.__dict__)

    __str__ = spec

    @classmethod
    def from_spec(cls, spec: str, parent: Shape) -> Shape:
        """`spec` (parts in any order, each optional: the parent's value otherwise) as a Shape with the parent's
        head_dim; a UserError names a spec SHAPE_SPEC does not read."""
        if not SHAPE_SPEC.fullmatch(spec.strip()):
            raise UserError(f"cannot read shape '{spec.strip()}': use dash-separated parts L<layers>, H<hidden>, "
                            "F<ffn>, A<query heads>, KV<kv groups>, e.g. L32-H3072-F9216-A24-KV8")
        values = {name: getattr(parent, name) for name in SPEC_CODES.values()}
        for part in spec.strip().split("-"):
            code, num = re.fullmatch(r"(KV|L|H|F|A)(\d+)", part).groups()
            values[SPEC_CODES[code]] = int(num)
        return cls(**values, head_dim=parent.head_dim)


# The letter codes of a shape spec, in the order spec() writes them, and the form one pruning step's spec takes.
SPEC_CODES = {"L": "layers", "H": "hidden", "F": "ffn", "A": "heads", "KV": "kv_heads"}
SHAPE_SPEC = re.compile(r"(?:(?:L|H|F|A|KV)\d+)(?:-(?:L|H|F|A|KV)\d+)*")


def shape_spec(values: dict) -> str:
    """Shape.spec() of a shape's fields as a dict (a candidate row's or a manifest's `shape`)."""
    return "-".join(f"{code}{values[name]}" for code, name in SPEC_CODES.items())


def check_shape(shape: Shape, parent: Shape, *, config=None, drop: tuple[int, int] | None = None, where: str = "",
                fields: dict[str, str] | None = None) -> None:
    """The one check of a pruned shape, a UserError of one line otherwise: `shape` is a sub-shape of `parent` (no
    axis grown, head_dim kept) with whole query-head groups; with `drop` (a 0-indexed inclusive block), the block
    lies in the parent and leaves `shape.layers`; with the family's `config`, its own rules (hidden a multiple of the
    heads). `where` prefixes the message; `fields` names the config field behind each part, so it says what to change.
    KV groups are checked before query heads: the query heads are derived from them (heads per group x groups)."""
    at = f"{where}: " if where else ""
    if drop is not None:  # first: the layer count below is derived from the block
        a, b = drop
        if not 0 <= a <= b < parent.layers:
            raise UserError(f"{at}drop block {a + 1}-{b + 1} is outside layers 1-{parent.layers}")
        if parent.layers - (b - a + 1) != shape.layers:
            raise UserError(f"{at}dropping layers {a + 1}-{b + 1} leaves {parent.layers - (b - a + 1)} layers, "
                            f"not {shape.layers}")
    if shape.head_dim != parent.head_dim:
        raise UserError(f"{at}head_dim is never pruned: keep {parent.head_dim}, not {shape.head_dim}")
    for name, got, full in (("layers", shape.layers, parent.layers), ("hidden", shape.hidden, parent.hidden),
                            ("ffn", shape.ffn, parent.ffn), ("kv groups", shape.kv_heads, parent.kv_heads),
                            ("query heads", shape.heads, parent.heads)):
        if not 1 <= got <= full:
            grow = "cannot grow attention: " if name in ("kv groups", "query heads") and got > full else ""
            fix = f": change {fields[name]}" if fields and name in fields else ""
            raise UserError(f"{at}{grow}{name} {got} must be between 1 and the parent model's {full} (pruning "
                            f"only removes){fix}")
    if shape.heads % shape.kv_heads:
        raise UserError(f"{at}{shape.heads} query heads are not a multiple of {shape.kv_heads} KV groups (query heads "
                        "must be a multiple of the KV groups: every group keeps the same number)")
    if parent.kv_heads % shape.kv_heads:
        raise UserError(f"{at}{shape.kv_heads} KV groups do not divide the parent's {parent.kv_heads}")
    if shape.heads_per_group > parent.heads_per_group:
        raise UserError(f"{at}cannot grow attention: the parent has {parent.kv_heads} KV groups of "
                        f"{parent.heads_per_group} query heads, asked for {shape.kv_heads} of {shape.heads_per_group}")
    if config is not None and family_of(config).hidden_per_head and shape.hidden % shape.heads:
        raise UserError(f"{at}{config.model_type} configs need the hidden size ({shape.hidden}) to be a multiple of "
                        f"the query heads ({shape.heads}): pick a hidden size divisible by {shape.heads}")


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
    kind: str  # "width" (all layers kept), "depth" (width kept, layers dropped) or "mixed" (both); which layers a
    # depth or mixed shape drops is decided by data later (minitron.search.choose_depth_blocks)


# Defaults of the space (SearchSpace fields left at None take these). Model-Optimizer's Minitron search prunes at most
# 40% of each width axis and 20% of the layers; a strong compression (the target below 60% of the teacher) may cut a
# width axis down to the target's own share of the teacher, so that Minitron-4B (15B → 27%: MLP 24576 → 9216) is in
# the space, but never below a quarter in one step (stronger compressions go iteratively, 15B → 8B → 4B, as the
# papers do). A depth-only search (axes="depth") may drop as many layers as the budget needs (4B-Depth drops half).
MAX_WIDTH_PRUNING = 0.4
MIN_WIDTH_KEEP = 0.25
MAX_DEPTH_PRUNING = 0.2
# Hidden and MLP sizes come in multiples that keep matmuls on full tensor-core tiles and shard evenly under tensor
# parallelism; the size is the student's, because the student is what gets deployed: (below, multiple), first match.
DIM_MULTIPLES = ((1e9, 64), (10e9, 256), (float("inf"), 512))
MIN_CHOICES = 8  # a multiple is halved until the axis has at least this many sizes (tiny models: hidden 64 → 8)


@dataclass(frozen=True)
class SearchSpace:
    """The candidate grid: which sizes each axis may take. Fields left at None follow the student's size and the
    compression ratio (see MAX_WIDTH_PRUNING, MAX_DEPTH_PRUNING and DIM_MULTIPLES above)."""

    max_width_pruning: float | None = None  # fraction of hidden, MLP and query heads per KV group that may go
    max_depth_pruning: float | None = None  # fraction of the layers that may go
    hidden_multiple: int | None = None  # hidden sizes are multiples of this
    ffn_multiple: int | None = None  # MLP sizes are multiples of this
    prune_kv_groups: bool = False  # also try fewer KV groups (divisors of the model's count); the papers keep them

    def width_keep(self, ratio: float) -> float:
        """Smallest kept fraction of a width axis for a target of `ratio` x the teacher's parameters."""
        if self.max_width_pruning is not None:
            return 1 - self.max_width_pruning
        return max(MIN_WIDTH_KEEP, min(1 - MAX_WIDTH_PRUNING, ratio))

    def multiples(self, full: Shape, target_params: int) -> tuple[int, int]:
        """(hidden, MLP) multiples for a student of `target_params` pruned from `full`."""
        wanted = dim_multiple(target_params)
        return _multiple(full.hidden, self.hidden_multiple or wanted), _multiple(full.ffn, self.ffn_multiple or wanted)

    def depth_keep(self, axes: str) -> float:
        if self.max_depth_pruning is not None:
            return 1 - self.max_depth_pruning
        return 0.0 if axes == "depth" else 1 - MAX_DEPTH_PRUNING


def dim_multiple(student_params: int) -> int:
    """The hidden/MLP multiple for a student of this size: 64 below 1B parameters, 256 up to 10B, 512 above."""
    return next(m for below, m in DIM_MULTIPLES if student_params < below)


def _multiple(size: int, wanted: int) -> int:
    """`wanted`, halved until it divides `size` and leaves at least MIN_CHOICES sizes."""
    m = wanted
    while m > 1 and (size % m or size // m < MIN_CHOICES):
        m //= 2
    return max(m, 1)


def _axis(full: int, keep: float, multiple: int) -> np.ndarray:
    """Sizes full, full - multiple, ... down to `keep` x full (at least one multiple)."""
    lo = max(multiple, math.ceil(full * keep / multiple - 1e-9) * multiple)
    return np.arange(lo, full + 1, multiple, dtype=np.int64)


def enumerate_candidates(config, target_params: int, tolerance: float = 0.05, *, axes: str = "all",
                         space: SearchSpace | None = None) -> list[Candidate]:
    """Every homogeneous shape of the space within `tolerance` (relative) of `target_params`, none left out.

    axes: "width" (keep all layers), "depth" (keep the width) or "all" (width, depth and mixed).
    Query heads are pruned per KV group (every kept group keeps the same number of its query heads), so GQA stays
    valid. Order (documented, it is the tie-break everywhere): more layers first, since at equal size width pruning
    beats depth pruning (arXiv 2407.14679 §4, 2408.11796 Table 4); then closest to the target; then wider."""
    space = space or SearchSpace()
    if axes not in ("all", "width", "depth"):
        raise UserError(f"axes must be all, width or depth, not '{axes}'")
    if not 0 <= tolerance < 1:
        raise UserError(f"tolerance {tolerance} must be in [0, 1)")
    for name in ("max_width_pruning", "max_depth_pruning"):
        value = getattr(space, name)
        if value is not None and not 0 <= value < 1:
            raise UserError(f"{name} {value} must be in [0, 1)")
    full = shape_of(config)
    total = count_params(config)
    if target_params >= total:
        raise UserError(f"target {target_params:,} parameters is not smaller than the model ({total:,})")
    hm, fm = space.multiples(full, target_params)
    keep_w, keep_d = space.width_keep(target_params / total), space.depth_keep(axes)
    width = axes in ("all", "width")
    layers = _axis(full.layers, keep_d, 1) if axes != "width" else np.array([full.layers])
    hidden = _axis(full.hidden, keep_w, hm) if width else np.array([full.hidden])
    ffn = _axis(full.ffn, keep_w, fm) if width else np.array([full.ffn])
    groups = [g for g in range(1, full.kv_heads + 1) if full.kv_heads % g == 0] if space.prune_kv_groups \
        else [full.kv_heads]
    # (heads, kv) pairs with the same number of query heads in every kept group
    per_min = max(1, math.ceil(full.heads_per_group * keep_w - 1e-9))
    head_options = sorted({(per * g, g) for g in groups for per in range(per_min, full.heads_per_group + 1)}
                          | {(full.heads, full.kv_heads)})
    if not width:
        head_options = [(full.heads, full.kv_heads)]
    heads = np.array([h for h, _ in head_options])
    kvs = np.array([g for _, g in head_options])
    L, H, F, Q = np.meshgrid(layers, hidden, ffn, np.arange(len(heads)), indexing="ij")
    params = _count(config, L, H, F, heads[Q], kvs[Q], full.head_dim)
    lo, hi = target_params * (1 - tolerance), target_params * (1 + tolerance)
    ok = (params >= lo) & (params <= hi) & (params < total)  # the teacher itself is no candidate
    if family_of(config).hidden_per_head:
        ok &= H % heads[Q] == 0
    if not ok.any():
        smallest = int(params.min())
        if smallest > hi:
            raise UserError(f"budget {target_params:,} is below the smallest candidate ({smallest:,} parameters, "
                            f"keeping ≥{keep_d:.0%} of the layers and ≥{keep_w:.0%} of each width): raise "
                            "--target-params or --tolerance, or allow more pruning (max_width_pruning, "
                            "max_depth_pruning)")
        raise UserError(f"no {axes} candidate within {tolerance:.1%} of {target_params:,} parameters: "
                        "raise --tolerance or allow more axes")
    out = []
    for idx in zip(*np.nonzero(ok), strict=True):
        shape = Shape(int(L[idx]), int(H[idx]), int(F[idx]), int(heads[Q[idx]]), int(kvs[Q[idx]]), full.head_dim)
        is_width = (shape.hidden, shape.ffn, shape.heads, shape.kv_heads) != \
            (full.hidden, full.ffn, full.heads, full.kv_heads)
        is_depth = shape.layers < full.layers
        out.append(Candidate(shape, int(params[idx]), "mixed" if is_width and is_depth else
                             "depth" if is_depth else "width"))
    out.sort(key=lambda c: (-c.shape.layers, abs(c.params - target_params), -c.shape.hidden, -c.shape.ffn,
                            -c.shape.heads, -c.shape.kv_heads))
    return out
