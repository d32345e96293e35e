"""Learning-rate schedule: linear warmup to the peak, then cosine decay to the minimum (the papers' schedule).

A plain function of the optimizer step, so the schedule's whole state is the step number stored in a checkpoint.
"""

from __future__ import annotations

import math


def lr_at(step: int, total_steps: int, warmup_steps: int, lr: float, min_lr: float) -> float:
    """LR for optimizer step `step` (0-indexed) of `total_steps`: warmup reaches `lr` at step warmup_steps - 1,
    then a half cosine from `lr` (at step warmup_steps) towards `min_lr` (reached one step after the last)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))
