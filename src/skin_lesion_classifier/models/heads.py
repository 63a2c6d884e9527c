"""Classifier heads over timm backbones.

:class:`MultiScaleModel` concatenates globally pooled features of a few intermediate stages
with the backbone's final pooled features and classifies them with a small MLP. Mid-level
texture and colour features help on dermoscopy, and they are cheap to compute once with a
frozen backbone (the quick CPU ``train_mode: frozen_features``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class MultiScaleModel(nn.Module):
    """``backbone`` (timm, built with ``num_classes=0``) + pooled multi-stage features + MLP.

    ``stages`` index ``backbone.feature_info`` (as in timm's ``forward_intermediates``);
    ``pool="avgstd"`` adds the per-channel standard deviation of each stage to its mean;
    ``hidden=0`` gives a linear head. ``forward(x) = head(features(x))``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        stages: Sequence[int] = (2, 3),
        hidden: int = 512,
        dropout: float = 0.3,
        pool: str = "avg",
    ) -> None:
        super().__init__()
        if not hasattr(backbone, "forward_intermediates"):
            raise ValueError(
                f"{type(backbone).__name__} has no forward_intermediates; multi-scale head "
                "needs a timm model that exposes its stages"
            )
        info = backbone.feature_info
        n = len(info)
        self.stages = [int(s) if int(s) >= 0 else n + int(s) for s in stages]
        bad = [s for s in self.stages if not 0 <= s < n]
        if bad:
            raise ValueError(
                f"head stages {list(stages)} out of range: the backbone has {n} stages"
            )
        if pool not in ("avg", "avgstd"):
            raise ValueError(f"pool must be 'avg' or 'avgstd', got {pool!r}")
        self.pool = pool
        self.backbone = backbone
        per_stage = 2 if pool == "avgstd" else 1
        in_dim = per_stage * sum(int(info[s]["num_chs"]) for s in self.stages)
        in_dim += int(backbone.num_features)
        self.num_features = in_dim
        layers: list[nn.Module] = [nn.BatchNorm1d(in_dim), nn.Dropout(dropout)]
        if hidden and hidden > 0:
            layers += [nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout)]
            layers.append(nn.Linear(hidden, num_classes))
        else:
            layers.append(nn.Linear(in_dim, num_classes))
        self.head = nn.Sequential(*layers)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenated pooled features ``(N, num_features)``."""
        if self.stages:
            final, inter = self.backbone.forward_intermediates(
                x, indices=self.stages, intermediates_only=False
            )
            pooled = []
            for feat in inter:
                f32 = feat.float()
                pooled.append(f32.mean(dim=(2, 3)))
                if self.pool == "avgstd":  # colour/texture spread within the picture
                    pooled.append(f32.std(dim=(2, 3)))
        else:
            final, pooled = self.backbone.forward_features(x), []
        pooled.append(self.backbone.forward_head(final, pre_logits=True).float())
        return torch.cat(pooled, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def get_classifier(self) -> nn.Module:
        return self.head[-1]


#: head name -> builder(backbone, num_classes, **head_kwargs)
HEADS = {"multiscale": MultiScaleModel}
