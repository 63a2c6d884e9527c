"""Metadata fusion: image features and an embedding of the patient metadata, combined
before the classifier.

::

    images --backbone--> f                         (pooled image features)
    meta   --[Linear-BN-ReLU-Dropout] x len(hidden)--> e   (metadata embedding)
    logits = image_head(f) + metadata_head(e)

With a plain timm backbone (built with ``num_classes=0``) ``image_head`` is
``Dropout + Linear(num_features, C)``, so ``logits = W_f f + W_e e + b = Linear([f, e])``:
exactly the embedding concatenated with the image features before one linear classifier.
When the backbone brings its own head (the project's ``MultiScaleModel``: ``features()`` +
``head``), that head stays the image head and the metadata embedding adds its linear
contribution to its logits.

The model factory lists :func:`build_concat_fusion` as its ``"default"`` (alias
``"concat"``) fusion builder, so ``create_model(arch, metadata_dim=D)`` builds a
:class:`MetadataFusionModel`, called as ``model(images, metadata)``; ``load_model`` rebuilds
one from ``meta["model_kwargs"]`` (``metadata_dim``, ``fusion_kwargs``).

Training the fused heads on frozen features (``train_fusion_head``) is training code and
lives in ``training/fusion.py``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn


def _has_own_head(backbone: nn.Module) -> bool:
    return hasattr(backbone, "features") and isinstance(
        getattr(backbone, "head", None), nn.Module
    )


class MetadataFusionModel(nn.Module):
    """Image backbone + MLP metadata embedding, fused before the classifier.

    Args:
        backbone: a timm model built with ``num_classes=0`` (``backbone(x)`` returns pooled
            features of size ``backbone.num_features``), or a model with ``features(x)``
            and a ``head`` (its head is kept as the image head).
        num_classes: classifier outputs.
        metadata_dim: length of the encoded metadata vector
            (:attr:`~skin_lesion_classifier.data.metadata_features.MetadataEncoder.dim`).
        hidden: widths of the metadata MLP layers.
        dropout: dropout in the metadata MLP and on the image features.
        metadata_dropout: probability, in training, of zeroing a sample's metadata
            embedding (keeps the image branch useful on its own).
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
        if not 0.0 <= float(metadata_dropout) < 1.0:
            raise ValueError(
                f"metadata_dropout must be in [0, 1), got {metadata_dropout}"
            )
        self.backbone = backbone
        self.metadata_dim = int(metadata_dim)
        self.num_classes = int(num_classes)
        self.metadata_dropout = float(metadata_dropout)
        self.own_head = _has_own_head(backbone)
        if self.own_head:
            self.image_head = None
        else:
            num_features = int(getattr(backbone, "num_features", 0))
            if num_features < 1:
                raise ValueError(
                    f"backbone {type(backbone).__name__} has no num_features; build it "
                    "with timm.create_model(..., num_classes=0)"
                )
            self.image_head = nn.Sequential(
                nn.Dropout(dropout), nn.Linear(num_features, self.num_classes)
            )
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
        self.metadata_head = nn.Linear(width, self.num_classes)

    # the pieces, so a frozen backbone's features can be computed once
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled image features ``(N, F)``."""
        return (
            self.backbone.features(images) if self.own_head else self.backbone(images)
        )

    def image_head_module(self) -> nn.Module:
        """The image classifier (over :meth:`image_features`)."""
        return self.backbone.head if self.own_head else self.image_head

    def _check_metadata(self, metadata: torch.Tensor | None, n: int) -> None:
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
        if metadata.shape[0] != n:
            raise ValueError(f"{n} images but {metadata.shape[0]} metadata rows")

    def forward_from_features(
        self, features: torch.Tensor, metadata: torch.Tensor | None
    ) -> torch.Tensor:
        """Logits from precomputed image features and the metadata vector."""
        self._check_metadata(metadata, features.shape[0])
        embedding = self.metadata_mlp(metadata.to(features.dtype))
        if self.training and self.metadata_dropout > 0:
            keep = (
                torch.rand(embedding.shape[0], 1, device=embedding.device)
                >= self.metadata_dropout
            )
            embedding = embedding * keep.to(embedding.dtype)
        return self.image_head_module()(features) + self.metadata_head(embedding)

    def forward(
        self, images: torch.Tensor, metadata: torch.Tensor | None = None
    ) -> torch.Tensor:
        self._check_metadata(metadata, images.shape[0])
        return self.forward_from_features(self.image_features(images), metadata)


def build_concat_fusion(
    backbone: nn.Module,
    num_classes: int,
    metadata_dim: int,
    hidden: Sequence[int] = (64, 64),
    dropout: float = 0.2,
    metadata_dropout: float = 0.0,
) -> MetadataFusionModel:
    """Fusion builder (``models.factory.FUSION_BUILDERS``): :class:`MetadataFusionModel`
    around ``backbone``."""
    return MetadataFusionModel(
        backbone,
        num_classes,
        metadata_dim,
        hidden=hidden,
        dropout=dropout,
        metadata_dropout=metadata_dropout,
    )


def fusion_from_image_model(
    model: nn.Module,
    meta: Mapping[str, Any],
    metadata_dim: int,
    fusion_kwargs: Mapping[str, Any] | None = None,
) -> tuple[MetadataFusionModel, dict[str, Any]]:
    """A :class:`MetadataFusionModel` around a trained image-only model: same backbone and
    image head (weights copied), a new metadata branch whose output layer starts at zero,
    so at first it predicts exactly what the image model predicts. Returns the model and
    its checkpoint meta (``uses_metadata`` set; add ``metadata_encoder``)."""
    if meta.get("uses_metadata"):
        raise ValueError("the base model already fuses metadata")
    kwargs = dict(fusion_kwargs or {})
    num_classes = len(meta["classes"])
    base = copy.deepcopy(model).cpu()
    if _has_own_head(base):
        fused = MetadataFusionModel(base, num_classes, metadata_dim, **kwargs)
    else:
        clf = base.get_classifier() if hasattr(base, "get_classifier") else None
        if not isinstance(clf, nn.Linear):
            raise ValueError(
                f"cannot fuse metadata into {meta.get('arch')}: its classifier is "
                f"{type(clf).__name__}, not one linear layer"
            )
        weights = copy.deepcopy(clf.state_dict())
        base.reset_classifier(0)
        fused = MetadataFusionModel(base, num_classes, metadata_dim, **kwargs)
        fused.image_head[1].load_state_dict(weights)
    nn.init.zeros_(fused.metadata_head.weight)
    nn.init.zeros_(fused.metadata_head.bias)
    new_meta = copy.deepcopy(dict(meta))
    mk = dict(new_meta.get("model_kwargs") or {})
    mk.update(metadata_dim=int(metadata_dim), fusion="default", fusion_kwargs=kwargs)
    new_meta.update(model_kwargs=mk, uses_metadata=True)
    for key in ("decision", "metrics"):  # belong to the image-only model
        new_meta.pop(key, None)
    return fused, new_meta


@torch.no_grad()
def proba_from_features(
    model: MetadataFusionModel,
    features: torch.Tensor,
    metadata: np.ndarray | None,
    batch_size: int = 1024,
) -> np.ndarray:
    """Class probabilities from precomputed image features: the fused model when
    ``metadata`` is given, its image head alone when it is ``None`` (the image-only
    control of ``training.fusion.train_fusion_head``)."""
    model.eval()
    out = []
    for s in range(0, len(features), batch_size):
        f = features[s : s + batch_size]
        if metadata is None:
            z = model.image_head_module()(f)
        else:
            m = torch.as_tensor(metadata[s : s + batch_size], device=f.device)
            z = model.forward_from_features(f, m)
        out.append(torch.softmax(z.float(), dim=1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.num_classes), np.float32)
