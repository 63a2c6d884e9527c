"""Metadata fusion: image features and an embedding of the patient metadata, concatenated
before the classifier head.

::

    images --backbone (timm, num_classes=0)--> f  (num_features)
    meta   --Linear-BN-ReLU-Dropout x len(hidden)--> e  (hidden[-1])
    logits = Linear(Dropout([f, e]))

Registered with the model factory as the ``"default"`` (alias ``"concat"``) fusion
builder, so ``create_model(arch, metadata_dim=D)`` returns a :class:`MetadataFusionModel`
called as ``model(images, meta)``. ``metadata_dropout`` zeroes the whole metadata
embedding of a training sample with that probability, which keeps the image branch useful
on its own when the metadata is uninformative.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from skin_lesion_classifier.models.factory import register_fusion


class MetadataFusionModel(nn.Module):
    """A timm backbone (pooled features) + an MLP metadata embedding + a linear head.

    Args:
        backbone: a timm model built with ``num_classes=0`` (returns ``(N, num_features)``).
        num_classes: classifier outputs.
        metadata_dim: length of the encoded metadata vector
            (:attr:`~skin_lesion_classifier.data.metadata_features.MetadataEncoder.dim`).
        hidden: widths of the metadata MLP layers.
        dropout: dropout on the concatenated features before the head.
        metadata_dropout: probability, in training, of zeroing a sample's metadata embedding.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        metadata_dim: int,
        hidden: Sequence[int] = (64, 64),
        dropout: float = 0.2,
        metadata_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if int(metadata_dim) < 1:
            raise ValueError(f"metadata_dim must be >= 1, got {metadata_dim}")
        num_features = int(getattr(backbone, "num_features", 0))
        if num_features < 1:
            raise ValueError(
                f"backbone {type(backbone).__name__} has no num_features; build it with "
                "timm.create_model(..., num_classes=0)"
            )
        if not 0.0 <= float(metadata_dropout) < 1.0:
            raise ValueError(
                f"metadata_dropout must be in [0, 1), got {metadata_dropout}"
            )
        self.backbone = backbone
        self.metadata_dim = int(metadata_dim)
        self.num_classes = int(num_classes)
        self.metadata_dropout = float(metadata_dropout)
        layers: list[nn.Module] = []
        width = self.metadata_dim
        for h in hidden:
            layers += [
                nn.Linear(width, int(h)),
                nn.BatchNorm1d(int(h)),
                nn.ReLU(inplace=True),
                nn.Dropout(dropout),
            ]
            width = int(h)
        self.metadata_mlp = nn.Sequential(*layers)
        self.embedding_dim = width
        self.head_dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(num_features + width, self.num_classes)

    def forward(
        self, images: torch.Tensor, metadata: torch.Tensor | None = None
    ) -> torch.Tensor:
        if metadata is None:
            raise ValueError(
                "this model fuses patient metadata: call it as model(images, metadata) "
                f"with a (N, {self.metadata_dim}) metadata tensor (unknown values are "
                "encoded by the MetadataEncoder, not left out)"
            )
        if metadata.ndim != 2 or metadata.shape[1] != self.metadata_dim:
            raise ValueError(
                f"metadata must have shape (N, {self.metadata_dim}), got "
                f"{tuple(metadata.shape)}"
            )
        if metadata.shape[0] != images.shape[0]:
            raise ValueError(
                f"{images.shape[0]} images but {metadata.shape[0]} metadata rows"
            )
        features = self.backbone(images)
        embedding = self.metadata_mlp(metadata.to(features.dtype))
        if self.training and self.metadata_dropout > 0:
            keep = (
                torch.rand(embedding.shape[0], 1, device=embedding.device)
                >= self.metadata_dropout
            )
            embedding = embedding * keep.to(embedding.dtype)
        return self.classifier(
            self.head_dropout(torch.cat([features, embedding], dim=1))
        )


@register_fusion("default")
@register_fusion("concat")
def build_concat_fusion(
    backbone: nn.Module,
    num_classes: int,
    metadata_dim: int,
    hidden: Sequence[int] = (64, 64),
    dropout: float = 0.2,
    metadata_dropout: float = 0.0,
) -> MetadataFusionModel:
    """Factory hook: :class:`MetadataFusionModel` around ``backbone``."""
    return MetadataFusionModel(
        backbone,
        num_classes,
        metadata_dim,
        hidden=hidden,
        dropout=dropout,
        metadata_dropout=metadata_dropout,
    )
