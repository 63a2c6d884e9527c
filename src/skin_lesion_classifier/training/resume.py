"""Resumable training state: ``last.pt`` written after every epoch, read by ``resume: true``.

``last.pt`` holds the trainable weights, EMA, optimizer, scheduler, scaler, the history,
the best epoch, and the RNG states of every rank, under a fingerprint of the config and
data: a run killed at any point continues at the next epoch with the same sample sequence.
Only rank 0 writes; every rank reads.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from skin_lesion_classifier.models.checkpoint import atomic_torch_save, unwrap_model
from skin_lesion_classifier.training.config import TrainConfig
from skin_lesion_classifier.training.distributed import DistContext, gather_objects
from skin_lesion_classifier.training.loop import FitState, Stepper

logger = logging.getLogger(__name__)

#: Options that do not change the trained weights (a run may resume after changing them).
NOT_FINGERPRINTED = (
    "epochs",
    "patience",
    "progress",
    "resume",
    "num_workers",
    "max_train_minutes",
    "eval_batch_size",
    "device",
    "min_delta",
    "distributed",
)


def fingerprint(
    cfg: TrainConfig, *arrays: np.ndarray, extra: Sequence[str] = ()
) -> str:
    """Hash of the config parts that change the run and of (a sample of) the data."""
    ignore = set(NOT_FINGERPRINTED) | set(extra)
    d = {k: v for k, v in cfg.to_dict().items() if k not in ignore}
    h = hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode())
    for arr in arrays:
        h.update(str(np.shape(arr)).encode())
        flat = np.asarray(arr).reshape(-1)
        h.update(np.ascontiguousarray(flat[:: max(1, flat.size // 100_000)]).tobytes())
    return h.hexdigest()[:16]


def rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state()[1].tolist(),
        "numpy_pos": int(np.random.get_state()[2]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(
        (
            "MT19937",
            np.asarray(state["numpy"], dtype=np.uint32),
            state["numpy_pos"],
            0,
            0.0,
        )
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_last(
    path: Path | None, key: str, stepper: Stepper, ctx: DistContext
) -> FitState:
    """Restore ``stepper`` and the loop state from ``path`` when it matches ``key``;
    a fresh :class:`FitState` otherwise."""
    state = FitState()
    if path is None or not path.is_file():
        return state
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if saved.get("fingerprint") != key:
        if ctx.is_main:
            logger.warning(
                "%s was written by a different config or data; starting afresh", path
            )
        return state
    stepper.trainable.load_state_dict(saved["trainable"])
    stepper.optimizer.load_state_dict(saved["optimizer"])
    stepper.scheduler.load_state_dict(saved["scheduler"])
    stepper.scaler.load_state_dict(saved["scaler"])
    if stepper.ema is not None and saved.get("ema") is not None:
        stepper.ema.module.load_state_dict(saved["ema"])
    state.history = list(saved["history"])
    state.best_epoch, state.bad_epochs = saved["best_epoch"], saved["bad_epochs"]
    state.start_epoch = int(saved["epoch"]) + 1
    ranks = saved.get("rng_ranks") or [saved["rng"]]
    if len(ranks) == ctx.world_size:
        set_rng_state(ranks[ctx.rank])
    else:  # resumed with another number of processes: rank 0's state, offset per rank
        set_rng_state(ranks[0])
        if ctx.enabled:
            torch.manual_seed(int(torch.randint(0, 2**31, ())) + ctx.rank)
    if ctx.is_main:
        logger.info("Resuming from %s at epoch %d", path, state.start_epoch)
    return state


def save_last(
    path: Path | None,
    key: str,
    epoch: int,
    stepper: Stepper,
    state: FitState,
    cfg: TrainConfig,
    ctx: DistContext,
) -> None:
    """Write the resumable state (rank 0; every rank contributes its RNG state)."""
    if path is None:
        return
    rngs = gather_objects(rng_state(), ctx)
    if not ctx.is_main:
        return
    best = state.best_row
    atomic_torch_save(
        {
            "fingerprint": key,
            "epoch": epoch,
            "trainable": unwrap_model(stepper.trainable).state_dict(),
            "ema": stepper.ema.module.state_dict() if stepper.ema is not None else None,
            "optimizer": stepper.optimizer.state_dict(),
            "scheduler": stepper.scheduler.state_dict(),
            "scaler": stepper.scaler.state_dict(),
            "history": state.history,
            "best_score": best[cfg.monitor] if best else None,
            "best_epoch": state.best_epoch,
            "bad_epochs": state.bad_epochs,
            "rng": rngs[0],
            "rng_ranks": rngs,
            "config": cfg.to_dict(),
            "world_size": ctx.world_size,
        },
        path,
    )


__all__ = ["fingerprint", "load_last", "rng_state", "save_last", "set_rng_state"]
