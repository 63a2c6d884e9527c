"""Turning uint8 image batches into normalised model input, on any device."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

#: ImageNet statistics, the default when a model's pretrained config says nothing else.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_float_nchw(
    images: np.ndarray | torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device | str = "cpu",
    channels_last: bool = False,
) -> torch.Tensor:
    """Convert a ``(N, H, W, 3)`` uint8 batch to a normalised float32 ``(N, 3, H, W)`` tensor.

    ``x = (pixel / 255 - mean) / std`` per channel, computed on ``device``.
    """
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(
            f"expected a (N, H, W, 3) uint8 batch, got shape {tuple(images.shape)}"
        )
    x = images.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
    x = normalize(x, mean, std)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def normalize(
    x: torch.Tensor, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """Normalise a float ``(N, 3, H, W)`` batch in [0, 1]: ``(x - mean) / std``."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s
