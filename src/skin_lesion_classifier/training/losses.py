"""Losses for imbalanced classes: class-weighted, label-smoothed cross-entropy and focal loss."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

LOSSES = ("ce", "focal")


def class_weights(counts: Sequence[int], power: float = 1.0) -> np.ndarray:
    """Class weights ``w_c = (n / (C * n_c)) ** power``, rescaled to mean 1 over classes.

    ``power=0`` gives equal weights, ``power=1`` full inverse frequency. A class with no
    training samples raises ``ValueError`` naming it (its weight would be infinite).
    """
    counts = np.asarray(counts, dtype=np.float64)
    if (counts <= 0).any():
        raise ValueError(
            f"every class needs training samples; counts are {counts.tolist()}"
        )
    w = (counts.sum() / (len(counts) * counts)) ** float(power)
    return w / w.mean()


class FocalLoss(nn.Module):
    """Focal loss (Lin et al. 2017) with optional class weights and label smoothing.

    ``FL_i = w_{y_i} (1 - p_{i,y_i})^gamma CE_i`` where ``CE_i = -sum_c q_{i,c} log p_{i,c}``
    and ``q`` is the (smoothed) one-hot target; the batch loss is ``sum_i FL_i / sum_i w_{y_i}``.
    ``gamma=0`` is (weighted, smoothed) cross-entropy.
    """

    def __init__(
        self,
        gamma: float = 2.0,
        weight: torch.Tensor | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        self.gamma = float(gamma)
        self.label_smoothing = float(label_smoothing)
        self.register_buffer("weight", weight if weight is not None else None)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logp = F.log_softmax(logits.float(), dim=1)
        n_classes = logits.shape[1]
        q = F.one_hot(target, n_classes).float()
        if self.label_smoothing > 0:
            q = q * (1 - self.label_smoothing) + self.label_smoothing / n_classes
        ce = -(q * logp).sum(dim=1)
        pt = logp.gather(1, target[:, None]).squeeze(1).exp()
        loss = (1 - pt).clamp(min=0).pow(self.gamma) * ce
        if self.weight is not None:
            w = self.weight.to(loss.device)[target]
            return (loss * w).sum() / w.sum()
        return loss.mean()


def build_loss(
    name: str = "ce",
    class_counts: Sequence[int] | None = None,
    class_weight_power: float = 0.0,
    label_smoothing: float = 0.0,
    focal_gamma: float = 2.0,
) -> nn.Module:
    """``"ce"`` (``nn.CrossEntropyLoss``) or ``"focal"`` (:class:`FocalLoss`), with class
    weights from :func:`class_weights` when ``class_weight_power > 0``."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose from {LOSSES}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    weight = None
    if class_weight_power:
        if class_counts is None:
            raise ValueError("class-weighted loss needs the training class counts")
        weight = torch.tensor(
            class_weights(class_counts, class_weight_power), dtype=torch.float32
        )
    if name == "focal":
        return FocalLoss(focal_gamma, weight, label_smoothing)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)
