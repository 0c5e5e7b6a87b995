"""The learning-rate schedule, counted in optimizer updates: one function the optimizer's scheduler calls.

A training step makes `algorithm.updates_per_step` optimizer updates, so a run makes `trainer.steps *
updates_per_step` of them; `optim.warmup_steps` is in training steps and covers `warmup_steps * updates_per_step`
updates. Counting both in updates keeps a cosine ending at the last update of the last step, whatever the number
of updates a step makes.
"""

from __future__ import annotations

import math


def lr_factor(update: int, total_updates: int, warmup_updates: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at optimizer update `update` (0-based) of `total_updates`."""
    if warmup_updates and update < warmup_updates:
        return (update + 1) / warmup_updates
    if schedule == "cosine":
        span = max(1, total_updates - warmup_updates)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (update - warmup_updates) / span)))
    if schedule == "constant":
        return 1.0
    raise ValueError(f"optim.schedule: unknown schedule {schedule!r}; use constant or cosine")


def schedule_for(cfg) -> tuple[int, int, str]:
    """(total updates, warm-up updates, schedule name) of a job config."""
    per_step = cfg.algorithm.updates_per_step
    return cfg.trainer.steps * per_step, cfg.optim.warmup_steps * per_step, cfg.optim.schedule
