"""The data feeders of the training loop: one epoch's batches for this rank.

Each feeder takes the epoch's sample indices (the same on every rank, drawn by
:func:`~skin_lesion_classifier.training.sampler.epoch_indices`) and yields this rank's
``(inputs, labels, loss_scale)`` batches (:data:`~skin_lesion_classifier.training.loop.Batch`):

* :class:`DeviceFeeder`: the whole uint8 cache on the device, augmented there per batch;
* :class:`LoaderFeeder`: per-sample torchvision v2 transforms through a ``DataLoader``
  whose sampler is this rank's share of the epoch's weighted sample;
* :class:`FeatureFeeder`: precomputed pooled features (frozen backbone), one random
  feature view per sample, with optional extra inputs (the encoded metadata).

Global batches of ``batch_size`` are cut into one contiguous slice per rank. The loss scale
``len(slice) * world / len(global batch)`` makes the DDP mean of the rank losses the mean
over the global batch, also for an uneven last batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from skin_lesion_classifier.data.augment import (
    AugmentConfig,
    augment_batch,
    torchvision_transform,
)
from skin_lesion_classifier.data.transforms import normalize
from skin_lesion_classifier.training.distributed import DistContext, rank_shard
from skin_lesion_classifier.training.loop import Batch


class _UInt8Dataset(torch.utils.data.Dataset):
    def __init__(self, images: np.ndarray, labels: np.ndarray, transform) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        x = torch.from_numpy(np.ascontiguousarray(self.images[i])).permute(2, 0, 1)
        return self.transform(x), int(self.labels[i])


def global_batches(
    epoch_idx: torch.Tensor, batch_size: int, ctx: DistContext, min_size: int = 1
) -> Iterator[tuple[torch.Tensor, float]]:
    """This rank's slice of each global batch and its loss scale. Global batches of fewer
    than ``max(min_size, world_size)`` samples are skipped on every rank."""
    for s in range(0, len(epoch_idx), batch_size):
        batch = epoch_idx[s : s + batch_size]
        if len(batch) < max(min_size, ctx.world_size):
            continue
        if not ctx.enabled:
            yield batch, 1.0
            continue
        mine = torch.tensor_split(batch, ctx.world_size)[ctx.rank]
        yield mine, len(mine) * ctx.world_size / len(batch)


def count_batches(n: int, batch_size: int, ctx: DistContext, min_size: int = 1) -> int:
    full, rest = divmod(n, batch_size)
    return full + (rest >= max(min_size, ctx.world_size))


class DeviceFeeder:
    """Batches gathered from the uint8 cache held on the device, augmented on the device."""

    def __init__(self, images, labels, aug: AugmentConfig, mean, std, cfg, device, ctx):
        self.images = torch.from_numpy(np.ascontiguousarray(images)).to(device)
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(device)
        self.aug, self.mean, self.std = aug, mean, std
        self.batch_size, self.channels_last = cfg.batch_size, cfg.channels_last
        self.device, self.ctx = device, ctx

    def __call__(self, epoch_idx: torch.Tensor) -> tuple[Iterator[Batch], int]:
        n = count_batches(len(epoch_idx), self.batch_size, self.ctx)
        return self._batches(epoch_idx), n

    def _batches(self, epoch_idx: torch.Tensor) -> Iterator[Batch]:
        for mine, scale in global_batches(epoch_idx, self.batch_size, self.ctx):
            idx = mine.to(self.device)
            x = normalize(
                augment_batch(self.images[idx], self.aug), self.mean, self.std
            )
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.labels[idx], scale


class LoaderFeeder:
    """Per-sample torchvision transforms in ``DataLoader`` workers; the sampler is this
    rank's share of the epoch's weighted sample (a distributed weighted sampler)."""

    def __init__(self, images, labels, aug, input_size, mean, std, cfg, device, ctx):
        self.dataset = _UInt8Dataset(
            images, labels, torchvision_transform(aug, input_size, mean, std)
        )
        self.batch_size, self.channels_last = cfg.batch_size, cfg.channels_last
        self.num_workers, self.device, self.ctx = cfg.num_workers, device, ctx

    def __call__(self, epoch_idx: torch.Tensor) -> tuple[Iterator[Batch], int]:
        n = count_batches(len(epoch_idx), self.batch_size, self.ctx)
        return self._batches(epoch_idx), n

    def _batches(self, epoch_idx: torch.Tensor) -> Iterator[Batch]:
        world = self.ctx.world_size
        shard = rank_shard(epoch_idx, self.batch_size, self.ctx)
        sizes = [
            len(b) for b in torch.split(epoch_idx, self.batch_size) if len(b) >= world
        ]
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_size=self.batch_size // world,
            sampler=shard.tolist(),
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
        )
        for (xb, yb), global_size in zip(loader, sizes, strict=True):
            x = xb.to(self.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield (
                x,
                yb.to(self.device, non_blocking=True),
                len(yb) * world / global_size,
            )


class FeatureFeeder:
    """Batches of precomputed features ``(views, N, D)``: each sample gets one random view
    (drawn from ``generator`` when given, else the global RNG on the device); ``extra``
    ``(N, E)`` makes the inputs ``(features, extra)``, each batch of it passed through
    ``extra_transform`` when given (e.g. training-time masking of metadata fields)."""

    def __init__(
        self,
        features: torch.Tensor,
        labels: Sequence[int],
        batch_size: int,
        device: torch.device,
        ctx: DistContext,
        extra: torch.Tensor | None = None,
        extra_transform=None,
        generator: torch.Generator | None = None,
        min_batch: int = 1,
    ):
        self.features, self.extra, self.generator = features, extra, generator
        self.extra_transform = extra_transform
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64), device=device)
        self.batch_size, self.device, self.ctx = batch_size, device, ctx
        self.min_batch = min_batch

    def __call__(self, epoch_idx: torch.Tensor) -> tuple[Iterator[Batch], int]:
        n = count_batches(len(epoch_idx), self.batch_size, self.ctx, self.min_batch)
        return self._batches(epoch_idx), n

    def _batches(self, epoch_idx: torch.Tensor) -> Iterator[Batch]:
        views = self.features.shape[0]
        for mine, scale in global_batches(
            epoch_idx, self.batch_size, self.ctx, self.min_batch
        ):
            idx = mine.to(self.device)
            if self.generator is not None:
                view = torch.randint(0, views, (len(idx),), generator=self.generator)
                view = view.to(self.device)
            else:
                view = torch.randint(0, views, (len(idx),), device=self.device)
            feats = self.features[view, idx]
            if self.extra is None:
                inputs = feats
            else:
                extra = self.extra[idx]
                if self.extra_transform is not None:
                    extra = self.extra_transform(extra)
                inputs = (feats, extra)
            yield inputs, self.labels[idx], scale


__all__ = [
    "DeviceFeeder",
    "FeatureFeeder",
    "LoaderFeeder",
    "count_batches",
    "global_batches",
]
