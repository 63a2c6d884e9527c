"""The epoch loop, in parts that can be read one at a time.

Both trainers run on it: the image classifier (:mod:`~skin_lesion_classifier.training.engine`)
and the second-stage fusion heads (:mod:`~skin_lesion_classifier.training.fusion`).

* :class:`Stepper`: one optimisation step (autocast forward, scaled backward, gradient
  accumulation, clipping, optimiser, per-step LR schedule, EMA). Under DDP the forward
  module is the ``DistributedDataParallel`` wrapper, which all-reduces the gradients.
* :func:`run_epoch`: feeds one epoch's batches through the stepper.
* :func:`validation_scores`: loss, balanced accuracy and macro AUC of validation
  probabilities (:mod:`skin_lesion_classifier.evaluation.metrics`).
* :func:`fit`: the epochs, with the history row of each, the monitored metric, early
  stopping, the time budget and the callbacks that write checkpoints. Every rank takes the
  same decisions: losses are summed over ranks, validation is gathered, and the stop
  decision is rank 0's.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from skin_lesion_classifier.evaluation.metrics import (
    balanced_accuracy,
    log_loss,
    macro_roc_auc,
)
from skin_lesion_classifier.training.distributed import (
    DistContext,
    all_sum,
    broadcast_flag,
)

logger = logging.getLogger(__name__)

#: A batch: ``(inputs, labels, loss_scale)``; ``inputs`` is what the forward takes.
Batch = tuple[Any, torch.Tensor, float]


@dataclass
class Stepper:
    """What one optimisation step needs."""

    forward: Callable[[Any], torch.Tensor]  # inputs -> logits (DDP wrapper under DDP)
    trainable: nn.Module  # the plain module being optimised (clipping, EMA)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    per_epoch_scheduler: bool  # stepped with the monitored value after each epoch
    criterion: nn.Module
    scaler: torch.amp.GradScaler
    ema: Any  # timm ModelEmaV3 or None
    device: torch.device
    amp_dtype: torch.dtype | None
    grad_accum_steps: int
    grad_clip: float | None
    ddp: nn.Module | None = None  # the DDP wrapper, for no_sync between accumulations
    steps_done: int = 0  # optimizer steps so far (the EMA warm-up counts them)

    def loss(self, inputs: Any, y: torch.Tensor, scale: float) -> torch.Tensor:
        """Forward and backward of one micro-batch; returns the unscaled batch loss."""
        with torch.autocast(
            self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None
        ):
            logits = self.forward(inputs)
        loss = self.criterion(logits.float(), y)
        self.scaler.scale(loss * (scale / self.grad_accum_steps)).backward()
        return loss

    def step(self) -> None:
        """Apply the accumulated gradients."""
        if self.grad_clip and self.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.trainable.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if not self.per_epoch_scheduler:
            self.scheduler.step()
        self.steps_done += 1
        if self.ema is not None:
            # the warm-up needs the step: decay_t = min(ema_decay, 1 - (1 + t) ** -2/3),
            # so the average forgets the starting weights within the first epochs
            self.ema.update(self.trainable, step=self.steps_done)


def run_epoch(
    stepper: Stepper, batches: Iterable[Batch], n_micro: int, bar=None
) -> tuple[torch.Tensor, int]:
    """One epoch of this rank's batches; returns (summed sample loss, samples seen)."""
    stepper.optimizer.zero_grad(set_to_none=True)
    loss_sum, seen = torch.zeros((), device=stepper.device), 0
    for k, (inputs, y, scale) in enumerate(batches):
        last_micro = (k + 1) % stepper.grad_accum_steps == 0 or (k + 1) == n_micro
        if stepper.ddp is not None and not last_micro:
            with stepper.ddp.no_sync():
                loss = stepper.loss(inputs, y, scale)
        else:
            loss = stepper.loss(inputs, y, scale)
        if last_micro:
            stepper.step()
        # summed on the device: no host sync per step (that would stall a GPU)
        loss_sum = loss_sum + loss.detach().float() * len(y)
        seen += len(y)
        if bar is not None:
            bar.update(len(y))
            if k % 50 == 0:
                bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", refresh=False)
    return loss_sum, seen


def validation_scores(y_true: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    """``val_loss`` (mean negative log-likelihood), ``val_balanced_accuracy`` (mean
    per-class recall) and ``val_macro_auc`` (mean defined one-vs-rest AUC)."""
    k = proba.shape[1]
    proba = np.asarray(proba, dtype=np.float64)
    proba = proba / proba.sum(axis=1, keepdims=True)
    return {
        "val_loss": log_loss(y_true, proba, k),
        "val_balanced_accuracy": balanced_accuracy(y_true, proba.argmax(1), k),
        "val_macro_auc": macro_roc_auc(y_true, proba, k),
    }


@dataclass
class FitState:
    """The loop's progress; what ``last.pt`` restores."""

    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    bad_epochs: int = 0
    start_epoch: int = 1

    @property
    def best_row(self) -> dict[str, float] | None:
        for row in self.history:
            if row["epoch"] == self.best_epoch:
                return row
        return None


@dataclass
class FitSpec:
    """How long to run and how to pick the best epoch."""

    epochs: int
    patience: int
    is_better: Callable[[dict[str, float], dict[str, float] | None], bool]
    scheduler_metric: str  # the row value a per-epoch (plateau) scheduler steps on
    max_train_minutes: float | None
    progress_total: int | None  # samples per epoch for the progress bar (None: no bar)
    name: str  # for log lines


def monitor_rule(
    monitor: str, mode: str, min_delta: float
) -> Callable[[dict[str, float], dict[str, float] | None], bool]:
    """``is_better`` for one monitored metric: improved by more than ``min_delta``."""

    def is_better(row: dict[str, float], best: dict[str, float] | None) -> bool:
        if best is None:
            return True
        if mode == "max":
            return row[monitor] > best[monitor] + min_delta
        return row[monitor] < best[monitor] - min_delta

    return is_better


def _bar(spec: FitSpec, epoch: int, ctx: DistContext):
    if spec.progress_total is None or not ctx.is_main:
        return None
    from tqdm.auto import tqdm

    return tqdm(
        total=spec.progress_total,
        desc=f"epoch {epoch}/{spec.epochs}",
        unit="img",
        leave=False,
        mininterval=1.0,
    )


def _train_part(
    stepper: Stepper, feed, epoch: int, spec: FitSpec, ctx: DistContext
) -> tuple[float, int, float]:
    """Run one epoch; return (global mean loss, global samples, train seconds)."""
    t0 = time.perf_counter()
    batches, n_micro = feed(epoch)
    bar = _bar(spec, epoch, ctx)
    loss_sum, seen = run_epoch(stepper, batches, n_micro, bar)
    if bar is not None:
        bar.close()
    totals = all_sum(
        torch.stack(
            [
                loss_sum.double(),
                torch.tensor(float(seen), dtype=torch.float64, device=loss_sum.device),
            ]
        ),
        ctx,
    )
    total_loss, total_seen = float(totals[0]), int(round(float(totals[1])))
    if not math.isfinite(total_loss):
        raise FloatingPointError(
            f"training loss became {total_loss} in epoch {epoch}; lower lr or enable "
            "grad_clip"
        )
    if stepper.device.type == "cuda":
        torch.cuda.synchronize(stepper.device)
    return total_loss / max(1, total_seen), total_seen, time.perf_counter() - t0


def fit(
    stepper: Stepper,
    feed: Callable[[int], tuple[Iterable[Batch], int]],
    set_train_mode: Callable[[], None],
    evaluate: Callable[[], dict[str, float]],
    spec: FitSpec,
    state: FitState,
    ctx: DistContext,
    on_improved: Callable[[dict[str, float]], None],
    on_epoch_saved: Callable[[dict[str, float], FitState], None],
    on_epoch_end: Callable[[dict[str, float]], None] | None,
) -> bool:
    """Run epochs ``state.start_epoch .. spec.epochs``; returns whether it stopped early.

    ``feed(epoch)`` gives this rank's batches and their count; ``evaluate()`` the
    validation scores (identical on every rank); ``on_improved(row)`` keeps the best
    weights; ``on_epoch_saved(row, state)`` writes the resumable state, before
    ``on_epoch_end(row)`` so that a callback that stops the run can resume.
    """
    t_start = time.perf_counter()
    for epoch in range(state.start_epoch, spec.epochs + 1):
        t0 = time.perf_counter()
        set_train_mode()
        train_loss, seen, train_seconds = _train_part(stepper, feed, epoch, spec, ctx)
        row = {
            "epoch": epoch,
            "train_loss": train_loss,
            **evaluate(),
            "lr": float(stepper.optimizer.param_groups[-1]["lr"]),
            "images_per_second": seen / max(train_seconds, 1e-9),
            "epoch_seconds": time.perf_counter() - t0,
        }
        state.history.append(row)
        if stepper.per_epoch_scheduler:
            stepper.scheduler.step(row[spec.scheduler_metric])
        improved = spec.is_better(row, state.best_row)
        if improved:
            state.best_epoch, state.bad_epochs = epoch, 0
            on_improved(row)
        else:
            state.bad_epochs += 1
        if ctx.is_main:
            logger.info(
                "%s epoch %d/%d  train_loss %.4f  val_loss %.4f  val_BA %.4f  "
                "val_AUC %.4f  lr %.2e  %.0f img/s%s",
                spec.name,
                epoch,
                spec.epochs,
                row["train_loss"],
                row["val_loss"],
                row["val_balanced_accuracy"],
                row["val_macro_auc"],
                row["lr"],
                row["images_per_second"],
                "  *" if improved else "",
            )
        on_epoch_saved(row, state)
        if on_epoch_end is not None:
            on_epoch_end(dict(row))
        if _should_stop(spec, state, t_start, ctx):
            return True
    return False


def _should_stop(
    spec: FitSpec, state: FitState, t_start: float, ctx: DistContext
) -> bool:
    """Early stopping or a spent time budget; rank 0 decides for every rank."""
    stop = False
    if state.bad_epochs >= spec.patience:
        if ctx.is_main:
            logger.info("Early stop: no improvement for %d epochs", spec.patience)
        stop = True
    elif (
        spec.max_train_minutes
        and (time.perf_counter() - t_start) / 60 > spec.max_train_minutes
    ):
        if ctx.is_main:
            logger.info(
                "Stopping: the %.1f-minute training budget is spent",
                spec.max_train_minutes,
            )
        stop = True
    return broadcast_flag(stop, ctx)


__all__ = [
    "Batch",
    "FitSpec",
    "FitState",
    "Stepper",
    "fit",
    "monitor_rule",
    "run_epoch",
    "validation_scores",
]
