"""Data-parallel helpers for the training loop: who am I, which samples are mine, gather.

A :class:`DistContext` describes the process group the loop runs in. The single-process
context (``world_size == 1``) makes every helper here a no-op, so the loop has one code
path. Under ``torchrun`` or :mod:`skin_lesion_classifier.training.launch` the environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) says where a worker stands;
:func:`init_from_env` joins the group with ``nccl`` on CUDA and ``gloo`` on the CPU.

Global batch contract: every rank draws the same epoch sample (same seed), then each global
batch of ``B`` indices is cut into ``world_size`` contiguous slices of ``B / world_size``
(:func:`rank_shard`), so ``N`` ranks with batch ``B / N`` see exactly the global batches of
one process with batch ``B``.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    """Rank, world size and the device of this worker (``world_size == 1``: no group)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = DistContext()


def init_from_env(device_preference: str = "auto") -> tuple[DistContext, torch.device]:
    """Join the process group described by ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``.

    Returns the context and this worker's device (``cuda:LOCAL_RANK`` when CUDA is used).
    Without those variables (a plain ``python`` process) returns the single context.
    """
    from skin_lesion_classifier.device import detect_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = detect_device(device_preference)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world <= 1:
        return SINGLE, device
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend,
            timeout=datetime.timedelta(minutes=30),
            device_id=device if device.type == "cuda" else None,
        )
    logger.info("rank %d of %d on %s", rank, world, device)
    return DistContext(rank, world, local_rank), device


def rank_shard(
    epoch_idx: torch.Tensor, global_batch: int, ctx: DistContext
) -> torch.Tensor:
    """This rank's indices of one epoch: its contiguous slice of every global batch.

    ``epoch_idx`` is the whole epoch (identical on every rank). A last global batch of
    fewer than ``world_size`` samples is dropped on every rank (a rank with an empty batch
    would stall the gradient all-reduce).
    """
    if not ctx.enabled:
        return epoch_idx
    if global_batch % ctx.world_size:
        raise ValueError(
            f"batch_size {global_batch} is not divisible by the {ctx.world_size} "
            "processes; the global batch is split evenly across ranks"
        )
    parts = []
    for s in range(0, len(epoch_idx), global_batch):
        batch = epoch_idx[s : s + global_batch]
        if len(batch) < ctx.world_size:
            break
        parts.append(torch.tensor_split(batch, ctx.world_size)[ctx.rank])
    return torch.cat(parts) if parts else epoch_idx[:0]


def shard_bounds(n: int, ctx: DistContext) -> tuple[int, int]:
    """``[start, stop)`` of this rank's contiguous part of ``n`` items (validation)."""
    edges = np.linspace(0, n, ctx.world_size + 1).round().astype(int)
    return int(edges[ctx.rank]), int(edges[ctx.rank + 1])


def gather_rows(part: np.ndarray, ctx: DistContext) -> np.ndarray:
    """Concatenate every rank's ``part`` in rank order (all ranks get the whole)."""
    if not ctx.enabled:
        return part
    parts: list = [None] * ctx.world_size
    dist.all_gather_object(parts, part)
    return np.concatenate(parts)


def all_sum(value: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum of ``value`` over the ranks (the value itself when single)."""
    if ctx.enabled:
        value = value.clone()
        dist.all_reduce(value)
    return value


def broadcast_flag(flag: bool, ctx: DistContext) -> bool:
    """Rank 0's ``flag`` on every rank (one stop decision for all)."""
    if not ctx.enabled:
        return flag
    box = [bool(flag)]
    dist.broadcast_object_list(box, src=0)
    return bool(box[0])


def gather_objects(obj, ctx: DistContext) -> list:
    """Every rank's ``obj`` in rank order."""
    if not ctx.enabled:
        return [obj]
    out: list = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


__all__ = [
    "SINGLE",
    "DistContext",
    "all_sum",
    "barrier",
    "broadcast_flag",
    "gather_objects",
    "gather_rows",
    "init_from_env",
    "rank_shard",
    "shard_bounds",
]
