"""Warmup-stable-decay (WSD) learning-rate schedule.

The factor multiplies each parameter group's peak LR. Progress is the fraction of
the run done: step / max_steps, or, under a wall-clock budget, whichever of that
and elapsed / budget is further along, so a time-limited run still ends with its
decay. Continuous at both boundaries. Used by nanochat/train/loop.py.
"""

from __future__ import annotations

import math

from nanochat.config import ScheduleConfig


def wsd_factor(step: int, progress: float, cfg: ScheduleConfig) -> float:
    """LR factor for optimizer step `step` (0-based) at run progress in [0, 1]."""
    warm = 1.0 if cfg.warmup_steps == 0 else min(1.0, (step + 1) / cfg.warmup_steps)
    decay_start = 1.0 - cfg.decay_fraction
    p = min(max(progress, 0.0), 1.0)
    if cfg.decay_fraction == 0 or p <= decay_start:
        return warm
    frac = (p - decay_start) / cfg.decay_fraction  # 0 -> 1 over the decay
    if cfg.decay_shape == "linear":
        shape = 1.0 - frac
    elif cfg.decay_shape == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * frac))
    else:  # "1-sqrt"
        shape = 1.0 - math.sqrt(frac)
    return warm * (cfg.final_lr_fraction + (1.0 - cfg.final_lr_fraction) * shape)


def progress(step: int, max_steps: int, elapsed_s: float, budget_s: float) -> float:
    p = step / max_steps
    if budget_s > 0:
        p = max(p, elapsed_s / budget_s)
    return min(p, 1.0)
