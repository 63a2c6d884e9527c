"""Start DDP training workers on this machine from inside a running process.

:func:`launch_training` is what the Kedro training node calls when
``training.train.distributed: {nproc_per_node: N}`` is set: it starts ``N`` worker
processes with PyTorch's elastic launcher API (``torch.distributed.launcher.api``, the
library behind ``torchrun``) on :func:`run_worker`, waits, and returns rank 0's
:class:`~skin_lesion_classifier.training.engine.TrainResult`. The workers run the engine
only, never the Kedro session (kedro-org/kedro#2049).

The images reach the workers as a file, not as a pickle: a memory-mapped image cache is
reopened by its file name, any other array is written once to a temporary ``.npy``.
A worker that raises ends the run: the launcher stops the other workers and
:func:`launch_training` raises :class:`WorkerFailed` naming the rank and its error.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import tempfile
import time
import traceback
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from skin_lesion_classifier.training.config import TrainConfig

logger = logging.getLogger(__name__)


class WorkerFailed(RuntimeError):
    """A training worker raised; the message names its rank and error."""


@dataclass(frozen=True)
class ArrayFile:
    """Where a worker finds an ``(N, H, W, 3)`` uint8 array: a ``.npy`` or raw memmap."""

    path: str
    offset: int
    shape: tuple[int, ...]
    dtype: str

    def open(self) -> np.ndarray:
        return np.memmap(
            self.path, mode="r", dtype=self.dtype, shape=self.shape, offset=self.offset
        )


def array_file(images: np.ndarray, scratch: Path) -> ArrayFile:
    """An :class:`ArrayFile` of ``images``: its own file when memory-mapped, else a copy
    saved in ``scratch``."""
    if (
        isinstance(images, np.memmap)
        and images.filename
        and isinstance(images.base, mmap.mmap)  # the whole mapping, not a view of it
        and images.flags.c_contiguous
    ):
        return ArrayFile(
            str(images.filename), images.offset, images.shape, str(images.dtype)
        )
    path = scratch / "images.npy"
    np.save(path, np.ascontiguousarray(images))
    mm = np.load(path, mmap_mode="r")
    return ArrayFile(str(path), mm.offset, mm.shape, str(mm.dtype))


def resolve_nproc(nproc_per_node: int | str) -> int:
    """``auto``: one process per CUDA device (1 without CUDA); else the number asked."""
    if nproc_per_node == "auto":
        return max(1, torch.cuda.device_count())
    return int(nproc_per_node)


@dataclass
class WorkerJob:
    """Everything a worker needs (picklable)."""

    images: ArrayFile
    train_rows: np.ndarray
    train_labels: np.ndarray
    val_rows: np.ndarray
    val_labels: np.ndarray
    config: dict[str, Any]
    checkpoint_dir: str | None
    classes: list[str]
    on_epoch_end: Any = None  # a picklable callable, e.g. for tests
    error_dir: str | None = None  # where a failing rank leaves rank<R>.json


def run_worker(job: WorkerJob) -> dict[str, Any] | None:
    """One DDP worker: join the group, train, return rank 0's result (others: None)."""
    from skin_lesion_classifier.training.distributed import init_from_env
    from skin_lesion_classifier.training.engine import train_model

    cfg = TrainConfig.from_dict(job.config)
    ctx, device = init_from_env(cfg.device)
    if ctx.is_main:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ctx.world_size))
    try:
        images = job.images.open()
        result = train_model(
            np.ascontiguousarray(images[job.train_rows]),
            job.train_labels,
            np.ascontiguousarray(images[job.val_rows]),
            job.val_labels,
            cfg,
            checkpoint_dir=job.checkpoint_dir,
            device=device,
            classes=job.classes,
            on_epoch_end=job.on_epoch_end,
            dist_context=ctx,
        )
    except Exception as exc:
        _record_failure(job.error_dir, ctx.rank, exc)
        raise
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if not ctx.is_main:
        return None
    return {
        "checkpoint": result.checkpoint,
        "history": result.history.to_dict(orient="records"),
        "best_epoch": result.best_epoch,
        "best_metrics": result.best_metrics,
        "stopped_early": result.stopped_early,
    }


def launch_training(
    images: np.ndarray,
    train_rows: Sequence[int],
    train_labels: Sequence[int],
    val_rows: Sequence[int],
    val_labels: Sequence[int],
    config: TrainConfig,
    checkpoint_dir: str | os.PathLike | None,
    classes: Sequence[str],
    on_epoch_end=None,
):
    """Train with ``config.distributed.nproc_per_node`` DDP workers on this machine;
    ``images[train_rows]`` / ``images[val_rows]`` are the two splits. Returns rank 0's
    :class:`~skin_lesion_classifier.training.engine.TrainResult`."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from skin_lesion_classifier.models.checkpoint import load_model
    from skin_lesion_classifier.training.engine import HISTORY_COLUMNS, TrainResult

    nproc = resolve_nproc(config.distributed["nproc_per_node"])
    launch = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"train-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        monitor_interval=0.5,
        start_method="spawn",
    )
    logger.info("Starting %d DDP training workers", nproc)
    with tempfile.TemporaryDirectory(prefix="ddp-") as scratch:
        job = WorkerJob(
            array_file(images, Path(scratch)),
            np.asarray(train_rows, dtype=np.int64),
            np.asarray(train_labels, dtype=np.int64),
            np.asarray(val_rows, dtype=np.int64),
            np.asarray(val_labels, dtype=np.int64),
            config.to_dict(),
            None if checkpoint_dir is None else str(checkpoint_dir),
            list(classes),
            on_epoch_end,
            scratch,
        )
        try:
            out = elastic_launch(launch, run_worker)(job)
        except ChildFailedError as err:
            raise WorkerFailed(_failure_message(Path(scratch), err)) from None
    res = out[0]
    model, _ = load_model(res["checkpoint"])
    hist = pd.DataFrame(res["history"], columns=list(HISTORY_COLUMNS))
    return TrainResult(
        model,
        res["checkpoint"],
        hist,
        res["best_epoch"],
        res["best_metrics"],
        res["stopped_early"],
    )


#: What a rank reports when another rank died under it (not the cause).
_PEER_GONE = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "DistBackendError",
    "NCCL communicator was aborted",
)


def _record_failure(error_dir: str | None, rank: int, exc: BaseException) -> None:
    """Leave ``rank<R>.json`` (time, error, trace) for the launcher to report."""
    if error_dir is None:
        return
    record = {
        "time": time.time(),
        "error": f"{type(exc).__name__}: {exc}",
        "trace": traceback.format_exc(),
    }
    (Path(error_dir) / f"rank{rank}.json").write_text(json.dumps(record))


def _failure_message(error_dir: Path, err) -> str:
    """``training rank R failed: <error>`` for the rank that failed first; a rank that
    only lost its peers is not the culprit."""
    records = {
        int(f.stem[4:]): json.loads(f.read_text()) for f in error_dir.glob("rank*.json")
    }
    if not records:  # died without raising (killed, out of memory)
        rank, failure = min(err.failures.items())
        return f"training rank {rank} failed: exit code {failure.exitcode}"

    def order(item):
        rank, rec = item
        return (any(m in rec["error"] for m in _PEER_GONE), rec["time"], rank)

    rank, rec = min(records.items(), key=order)
    return f"training rank {rank} failed: {rec['error']}\n{rec['trace']}"


__all__ = [
    "ArrayFile",
    "WorkerFailed",
    "WorkerJob",
    "array_file",
    "launch_training",
    "resolve_nproc",
    "run_worker",
]
