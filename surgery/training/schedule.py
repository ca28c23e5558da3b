"""Learning-rate schedule and weight EMA of :func:`surgery.training.train`.

Provenance (ideas, not code): timm's per-step cosine schedule with linear warm-up down to ``min_lr``,
and its ``ModelEmaV3`` (used when timm has it; :class:`SimpleEma` has the same update rule).
"""

from __future__ import annotations

import math
from copy import deepcopy
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from surgery.training.loop import TrainConfig

__all__ = ["cosine_lr", "warmup_steps_for", "build_scheduler", "SimpleEma", "make_ema"]


def cosine_lr(step: int, *, base_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate used by optimizer step ``step`` (0-based).

    Warm-up: ``base_lr * (step + 1) / warmup_steps`` for ``step < warmup_steps`` (the first step
    already moves, the last warm-up step reaches ``base_lr``). Then half a cosine from ``base_lr``
    to ``min_lr`` over the remaining steps:
    ``min_lr + (base_lr - min_lr) * (1 + cos(pi * t)) / 2`` with
    ``t = (step - warmup_steps) / max(1, total_steps - warmup_steps)``.
    """
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


def warmup_steps_for(config: TrainConfig, steps_per_epoch: int) -> int:
    """Warm-up length in optimizer steps: ``warmup_steps`` if set, else ``warmup_epochs`` worth of steps."""
    total = (config.schedule_epochs or config.epochs) * steps_per_epoch
    steps = config.warmup_steps if config.warmup_steps is not None else round(config.warmup_epochs * steps_per_epoch)
    return min(steps, total)


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step :func:`cosine_lr` as a ``LambdaLR`` (stepped after every optimizer step).

    A run that is one window of a longer schedule (``config.schedule_epochs``, starting at
    ``config.schedule_start_epoch``: a stage of progressive growth) follows that schedule's warm-up
    and cosine from its own place in it, so consecutive windows give one run's learning rates.
    """
    total = (config.schedule_epochs or config.epochs) * steps_per_epoch
    offset = config.schedule_start_epoch * steps_per_epoch
    warm = warmup_steps_for(config, steps_per_epoch)
    base, floor = config.lr, config.min_lr

    def factor(step: int) -> float:
        # LambdaLR multiplies each group's initial lr; all groups start at config.lr.
        return cosine_lr(step + offset, base_lr=base, min_lr=floor, warmup_steps=warm, total_steps=total) / base

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class SimpleEma(nn.Module):
    """Fallback EMA with ModelEmaV3's interface, for a timm without it."""

    def __init__(self, model: nn.Module, decay: float, use_warmup: bool = False):
        super().__init__()
        self.module = deepcopy(model).eval()
        self.decay, self.use_warmup = decay, use_warmup

    def get_decay(self, step: int | None = None) -> float:
        if step is None:
            return self.decay
        if step <= 1:
            return 0.0
        if self.use_warmup:  # timm's warm-up (gamma 1, power 2/3) counted from the first real update
            return min(self.decay, 1.0 - step ** (-2.0 / 3.0))
        return self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int | None = None) -> None:
        decay = self.get_decay(step)
        for ema_v, model_v in zip(self.module.state_dict().values(), model.state_dict().values(), strict=True):
            if ema_v.is_floating_point():
                ema_v.lerp_(model_v.to(ema_v.dtype), 1.0 - decay)
            else:
                ema_v.copy_(model_v)


def make_ema(model: nn.Module, config: TrainConfig) -> nn.Module:
    """timm's ``ModelEmaV3`` of ``model`` with the config's decay and warm-up (:class:`SimpleEma` without it)."""
    try:
        from timm.utils import ModelEmaV3
    except ImportError:  # older timm: our own, same update rule
        return SimpleEma(model, config.ema_decay, config.ema_warmup)
    return ModelEmaV3(model, decay=config.ema_decay, use_warmup=config.ema_warmup)
