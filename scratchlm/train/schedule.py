"""Learning-rate schedules, and how a time budget turns into a number of steps.

The schedules are a pure function of the *optimizer* step (never the micro-step):
warmup: linear from lr/warmup to lr over `warmup_steps`, then
  cosine:   half a cosine down to lr * min_lr_ratio at `total_steps`
  wsd:      warmup-stable-decay: flat, then linear decay over the last `decay_fraction`
  constant: flat
Past `total_steps` the rate stays at its final value: it never turns around or goes negative.

Sequence-length warm-up (`seq_length_at`): the first steps train on the same tokens cut into
shorter sequences (context/8, /4, /2, then the full context), each one a stage of a linear ramp.

A schedule needs to know where the run ends. With a time budget nobody knows that at the start,
so `TimeBudget` estimates it from the measured speed and re-estimates as the run goes. Its one
promise: after warm-up the learning rate never rises, whatever the estimates do. A shorter plan
only moves the end of the decay closer. A *longer* plan is allowed only while the rate is flat and
stays flat (warmup-stable-decay or constant, before the decay begins): moving the end of a plateau
changes no rate already used. That is why wsd suits a time budget: the estimate can start careful
and grow as the speed becomes known, where a cosine plan must start short and can only shrink, and
the margin it keeps is training time lost.
"""

from __future__ import annotations

import math
import time
from typing import Callable

SCHEDULES = ("cosine", "wsd", "constant")


def lr_at(step: int, total_steps: int, lr: float, warmup_steps: int = 0, schedule: str = "cosine",
          min_lr_ratio: float = 0.1, decay_fraction: float = 0.2) -> float:
    if schedule not in SCHEDULES:
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


def plateau(step: int, total_steps: int, tc) -> bool:
    """True while the rate at `step` is the flat peak of a wsd/constant schedule and would stay so
    under any longer plan: past warm-up, before the decay of the plan `total_steps`."""
    if tc.schedule not in ("wsd", "constant") or step < tc.warmup_steps:
        return False
    return tc.schedule == "constant" or step < total_steps - int(tc.decay_fraction * total_steps)


def lr_continued(step: int, total_steps: int, tc, anchor: tuple[int, float] | None = None) -> float:
    """The training config's schedule (`tc`: a TrainConfig). A resumed run given a new length
    (`anchor` = (step it resumed at, the rate it had there)) continues from that rate, with the same
    shape, to the new end: no jump up when a finished run is extended, no cliff when it is cut."""
    if anchor is None or step < anchor[0]:
        return lr_at(step, total_steps, tc.lr, tc.warmup_steps, tc.schedule, tc.min_lr_ratio, tc.decay_fraction)
    start, lr0 = anchor
    floor = tc.lr * tc.min_lr_ratio
    ratio = min(floor / lr0, 1.0) if lr0 > 0 else 1.0
    return lr_at(step - start, total_steps - start, lr0, 0, tc.schedule, ratio, tc.decay_fraction)


def train_lengths(context: int, start: int) -> list[int]:
    """The sequence lengths a warm-up from `start` (0 = context/4) uses, shortest first: the context
    halved at most three times, only where it divides exactly (few shapes: few torch.compile graphs)."""
    start = start or context // 4
    return sorted(context >> k for k in range(4) if context % (1 << k) == 0 and context >> k >= start)


def seq_length_at(step: int, warmup_steps: int, context: int, start: int = 0) -> int:
    """The training sequence length at `step`: the longest stage not beyond a linear ramp from the
    shortest length (step 0) to the full context (step `warmup_steps` and after)."""
    lengths = train_lengths(context, start)
    if warmup_steps <= 0 or step >= warmup_steps:
        return context
    ramp = lengths[0] + (context - lengths[0]) * step / warmup_steps
    return max(n for n in lengths if n <= ramp)


class TimeBudget:
    """A wall-clock budget -> the number of steps the LR schedule plans for.

    The first plan comes from the speed over steps 10-20 of this session (the first ten include
    torch.compile and allocator warm-up, which would skew it), with a 10% margin. After each
    evaluation the plan is re-made from the speed since the last plan plus the measured cost of
    evaluating and checkpointing, spread over the steps between evaluations, with a 3% margin.
    Under several processes one rank's budget decides (the trainer broadcasts its plan), so every
    rank computes the same learning rate and stops after the same step.
    """

    def __init__(self, minutes: float, elapsed: float = 0.0, clock: Callable[[], float] = time.time):
        self.limit = minutes * 60
        self.clock = clock
        self.t0 = clock() - elapsed       # elapsed: time already spent by earlier sessions (resume)
        self.steps_here = 0               # steps trained in this session
        self.mark: tuple[float, int] | None = None  # (time, step) the current speed sample began
        self.busy = 0.0                   # seconds spent evaluating/checkpointing since the mark

    def elapsed(self) -> float:
        return self.clock() - self.t0

    def expired(self) -> bool:
        return self.elapsed() >= self.limit

    def add_busy(self, seconds: float) -> None:
        """Time spent outside training steps (evaluation, samples, checkpoints)."""
        self.busy += seconds

    def after_step(self, step: int, plan: int, evaluated: bool = False, eval_every: int = 0,
                   may_grow: bool = False, cap: int = 0) -> int:
        """Call after every training step (`step` = optimizer steps done); returns the plan.
        `may_grow`: the schedule is on a plateau (see `plateau`), so the plan may also get longer,
        up to `cap`; it is then re-made every 25 steps with a small margin."""
        self.steps_here += 1
        now = self.clock()
        if self.steps_here == 10:
            self.mark, self.busy = (now, step), 0.0
        elif self.mark is not None and step > self.mark[1] and (
                self.steps_here == 20 or evaluated or (may_grow and self.steps_here % 25 == 0)):
            steps = step - self.mark[1]
            per_step = (now - self.mark[0] - self.busy) / steps
            if evaluated or self.steps_here == 20:  # the cost of evaluating, spread over the steps between
                self.overhead = self.busy / max(eval_every, steps, 1)
            safety = 0.97 if may_grow or self.steps_here > 20 else 0.9
            plan = self.replan(plan, step, per_step + self.overhead, safety, cap=cap if may_grow else 0)
            self.mark, self.busy = (now, step), 0.0
        return plan

    overhead = 0.0  # seconds per step spent evaluating, checkpointing, sampling (measured at evals)

    def replan(self, plan: int, step: int, seconds_per_step: float, safety: float, cap: int = 0) -> int:
        """The steps that fit in the time left, and at least one more step: capped at the current
        plan (so the LR never rises), or at `cap` when the plan may grow."""
        remaining = self.limit - self.elapsed()
        fit = step + int(remaining / max(seconds_per_step, 1e-9) * safety)
        return max(min(cap or plan, fit), step + 1)
