"""The pruning steps of a run config: the shape of each step (explicit, or None where the step searches), the
dropped block of layers, each checked by archmath.check_shape. The dry-run plan and preflight both
read the steps from here."""

from __future__ import annotations

from dataclasses import dataclass

from minitron.archmath import Shape, check_shape
from minitron.config import CompressConfig
from minitron.errors import UserError


@dataclass(frozen=True)
class Step:
    """One pruning step: its parameter target and, for explicit shapes, the shape (and 0-indexed drop block)."""

    target: int
    shape: dict | None = None  # Shape fields; None = architecture search
    drop: tuple[int, int] | None = None


SHAPE_FIELDS = {"layers": "target_layers", "hidden": "target_hidden", "ffn": "target_ffn",
                "kv groups": "target_kv_groups", "query heads": "target_heads_per_group"}


def drop_block(cfg: CompressConfig, layers: int) -> tuple[int, int] | None:
    """`drop_layers` 'A-B' (1-indexed, inclusive) → 0-indexed inclusive (a, b), checked against `layers`."""
    if cfg.drop_layers is None:
        return None
    a, b = (int(x) for x in cfg.drop_layers.split("-"))
    if not 1 <= a <= b <= layers:
        raise UserError(f"drop_layers {cfg.drop_layers} must lie within layers 1-{layers} with start ≤ end")
    if b - a + 1 >= layers:
        raise UserError(f"drop_layers {cfg.drop_layers} would remove every layer")
    return a - 1, b - 1


def step_shapes(cfg: CompressConfig, teacher: Shape) -> list[Shape | None]:
    """The explicit target shape of every pruning step, None where the step searches. Iterative pruning has one
    entry per `target_shapes` item or `target_params` item."""
    targets = cfg.target_params.split(",")
    if cfg.target_shapes is not None:
        specs = cfg.target_shapes.split(",")
        if len(targets) > 1 and len(targets) != len(specs):
            raise UserError(f"target_shapes has {len(specs)} steps but target_params has {len(targets)}: give "
                            "one target per step or a single one")
        single = [f for f in ("target_layers", "target_hidden", "target_ffn", "target_heads_per_group",
                              "target_kv_groups", "drop_layers") if getattr(cfg, f) is not None]
        if single:
            raise UserError(f"{single[0]} and target_shapes both set: use target_shapes alone")
        out, parent = [], teacher
        for i, spec in enumerate(specs, 1):
            shape = Shape.from_spec(spec, parent)
            check_shape(shape, parent, where=f"target_shapes step {i} ({spec.strip()})")
            out.append(shape)
            parent = shape
        return out
    if not cfg.explicit_shape():
        return [None] * len(targets)
    if len(targets) > 1:
        raise UserError("target_layers/target_hidden/... describe one step: use target_shapes for iterative pruning")
    kv = cfg.target_kv_groups or teacher.kv_heads
    per_group = cfg.target_heads_per_group or teacher.heads_per_group
    block = drop_block(cfg, teacher.layers)
    layers = teacher.layers - (block[1] - block[0] + 1) if block else cfg.target_layers or teacher.layers
    if block and cfg.target_layers is not None and cfg.target_layers != layers:
        raise UserError(f"target_layers {cfg.target_layers} disagrees with drop_layers {cfg.drop_layers} "
                        f"({layers} layers left)")
    shape = Shape(layers, cfg.target_hidden or teacher.hidden, cfg.target_ffn or teacher.ffn, per_group * kv, kv,
                  teacher.head_dim)
    check_shape(shape, teacher, where="target shape", fields=SHAPE_FIELDS)
    return [shape]
