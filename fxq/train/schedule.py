"""Learning-rate schedule: linear warm-up, then step decay (DETR) or cosine decay, as a LambdaLR."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from fxq.errors import InputError
from fxq.train.config import TrainConfig

SCHEDULES = ("step", "cosine")


def lr_factor(step: int, cfg: TrainConfig, steps_per_epoch: int) -> float:
    """Multiplier of the base learning rates for optimizer step ``step`` (0-based)."""
    total = cfg.total_steps(steps_per_epoch)
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else 1.0
    if cfg.schedule == "step":
        drops = sum(step >= epoch * steps_per_epoch for epoch in cfg.lr_drop)
        return warm * cfg.lr_gamma**drops
    span = max(1, total - cfg.warmup_steps)
    progress = min(1.0, max(0.0, (step - cfg.warmup_steps) / span))
    cosine = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return warm * cosine


def build_scheduler(optimizer: Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> LambdaLR:
    """A LambdaLR stepping once per optimizer step with :func:`lr_factor`."""
    if cfg.schedule not in SCHEDULES:
        raise InputError(f"unknown schedule {cfg.schedule!r}; use one of {SCHEDULES}")
    return LambdaLR(optimizer, lambda step: lr_factor(step, cfg, steps_per_epoch))
