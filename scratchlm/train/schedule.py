"""Learning-rate schedules, as a pure function of the *optimizer* step (never the micro-step).

warmup: linear from lr/warmup to lr over `warmup_steps`, then
  cosine:   half a cosine down to lr * min_lr_ratio at `total_steps`
  wsd:      warmup-stable-decay: flat, then linear decay over the last `decay_fraction`
  constant: flat
Past `total_steps` the rate stays at its final value: it never turns around or goes negative.
"""

from __future__ import annotations

import math


def lr_at(step: int, total_steps: int, lr: float, warmup_steps: int = 0, schedule: str = "cosine",
          min_lr_ratio: float = 0.1, decay_fraction: float = 0.2) -> float:
    if schedule not in ("cosine", "wsd", "constant"):
        raise ValueError(f"unknown schedule {schedule!r}")
    min_lr = lr * min_lr_ratio
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    total_steps = max(total_steps, warmup_steps + 1)
    if schedule == "cosine":
        progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
        return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))
    decay_start = total_steps - int(decay_fraction * total_steps)
    if step < decay_start:
        return lr
    progress = min((step - decay_start) / max(total_steps - decay_start, 1), 1.0)
    return lr - (lr - min_lr) * progress
