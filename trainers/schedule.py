"""Learning-rate schedules as pure functions of the iteration, so resuming needs only the counter."""

from __future__ import annotations

import math

from trainers.config import TrainConfig


def steps_per_epoch(n: int, cfg: TrainConfig) -> int:
    if cfg.drop_last and n >= cfg.batch_size:
        return n // cfg.batch_size
    return math.ceil(n / cfg.batch_size)


def lr_at(cfg: TrainConfig, iteration: int, steps: int) -> float:
    """Learning rate at a global iteration, given `steps` iterations per epoch."""
    epoch_float = iteration / steps
    total = cfg.epochs * steps
    if cfg.schedule == "step":
        passed = sum(1 for m in cfg.milestone_epochs() if int(epoch_float) >= m)
        return cfg.lr * (0.1**passed)
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * iteration / total))
    warm = cfg.warmup_epochs * steps
    if iteration < warm:
        return cfg.lr * (iteration + 1) / warm
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (iteration - warm) / max(1, total - warm)))
