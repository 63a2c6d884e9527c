"""Learning-rate schedules, stepped once per optimizer step (``plateau``: once per epoch)."""

from __future__ import annotations

import math

import torch

SCHEDULERS = ("cosine_warmup", "cosine_restarts", "plateau", "constant")


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    name: str,
    total_steps: int,
    steps_per_epoch: int,
    warmup_epochs: float = 1.0,
    min_lr_ratio: float = 0.01,
    restart_epochs: int = 5,
    restart_mult: int = 1,
    plateau_factor: float = 0.5,
    plateau_patience: int = 2,
):
    """Build a scheduler.

    * ``cosine_warmup``: linear warm-up over ``warmup_epochs`` then cosine decay to
      ``min_lr_ratio * lr`` at ``total_steps``:
      ``f(t) = r + (1 - r) (1 + cos(pi (t - w) / (T - w))) / 2``.
    * ``cosine_restarts``: ``CosineAnnealingWarmRestarts`` with a first period of
      ``restart_epochs`` epochs, multiplied by ``restart_mult`` after each restart.
    * ``plateau``: ``ReduceLROnPlateau`` on the monitored validation metric (max mode).
    * ``constant``: no change.
    """
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose from {SCHEDULERS}")
    if name == "cosine_warmup":
        warm = max(0, round(warmup_epochs * steps_per_epoch))
        total = max(total_steps, warm + 1)

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            t = min(1.0, (step - warm) / max(1, total - warm))
            return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    if name == "cosine_restarts":
        base = optimizer.param_groups[0]["lr"]
        return torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
            optimizer,
            T_0=max(1, restart_epochs * steps_per_epoch),
            T_mult=int(restart_mult),
            eta_min=base * min_lr_ratio,
        )
    if name == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=plateau_factor, patience=plateau_patience
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def steps_per_epoch_scheduler(name: str) -> bool:
    """Whether the scheduler is stepped per epoch with the metric (``plateau``)."""
    return name == "plateau"
