"""Batched class probabilities from a model and uint8 images, with optional TTA."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from skin_lesion_classifier.data.transforms import to_float_nchw

#: Test-time augmentations: identity, flips and 90-degree rotations (square inputs only
#: for the odd rotations, which change H and W).
TTA_VIEWS = ("identity", "hflip", "vflip", "rot180", "rot90", "rot270")


def _view(x: torch.Tensor, name: str) -> torch.Tensor:
    if name == "identity":
        return x
    if name == "hflip":
        return torch.flip(x, dims=[3])
    if name == "vflip":
        return torch.flip(x, dims=[2])
    if name == "rot180":
        return torch.rot90(x, 2, dims=[2, 3])
    if name == "rot90":
        return torch.rot90(x, 1, dims=[2, 3])
    if name == "rot270":
        return torch.rot90(x, 3, dims=[2, 3])
    raise ValueError(f"unknown TTA view {name!r}; choose from {TTA_VIEWS}")


def resolve_tta(tta: bool | Sequence[str] | None, height: int, width: int) -> list[str]:
    """The list of TTA views to average. ``True`` means every view valid for the shape:
    flips and the 180-degree rotation always, the 90/270-degree rotations only for square
    inputs (a rotated 4:3 picture no longer fits the model's input size)."""
    if not tta:
        return ["identity"]
    if tta is True:
        views = ["identity", "hflip", "vflip", "rot180"]
        if height == width:
            views += ["rot90", "rot270"]
        return views
    views = list(tta)
    for v in views:
        if v not in TTA_VIEWS:
            raise ValueError(f"unknown TTA view {v!r}; choose from {TTA_VIEWS}")
        if v in ("rot90", "rot270") and height != width:
            raise ValueError(
                f"TTA view {v!r} needs a square input, got {height}x{width}"
            )
    return views


@torch.no_grad()
def predict_proba(
    model: torch.nn.Module,
    images: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device | str = "cpu",
    batch_size: int = 64,
    tta: bool | Sequence[str] | None = False,
    extra_inputs: np.ndarray | None = None,
) -> np.ndarray:
    """Softmax probabilities ``(N, C)`` for a ``(N, H, W, 3)`` uint8 array.

    With TTA the softmax outputs of every view are averaged. ``extra_inputs`` (``(N, D)``
    float, e.g. encoded patient metadata) is passed as the model's second argument when given.
    """
    model.eval()
    n, h, w = images.shape[0], images.shape[1], images.shape[2]
    views = resolve_tta(tta, h, w)
    out: list[np.ndarray] = []
    for start in range(0, n, batch_size):
        x = to_float_nchw(images[start : start + batch_size], mean, std, device)
        extra = None
        if extra_inputs is not None:
            extra = torch.as_tensor(
                extra_inputs[start : start + batch_size],
                dtype=torch.float32,
                device=x.device,
            )
        acc = None
        for v in views:
            xv = _view(x, v)
            logits = model(xv) if extra is None else model(xv, extra)
            p = torch.softmax(logits.float(), dim=1)
            acc = p if acc is None else acc + p
        out.append((acc / len(views)).cpu().numpy())
    if not out:
        return np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(out).astype(np.float32)
