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

The module registers itself with the model factory as the ``"default"`` (alias
``"concat"``) fusion builder, so ``create_model(arch, metadata_dim=D)`` builds a
:class:`MetadataFusionModel`, called as ``model(images, metadata)``; ``load_model`` rebuilds
one from ``meta["model_kwargs"]`` (``metadata_dim``, ``fusion_kwargs``).

:func:`train_fusion_head` is a second training stage that needs nothing from the training
loop: it starts from a trained image-only checkpoint, freezes its backbone, computes the
pooled features once, and trains the heads on ``(features, metadata)``; the same call with
``use_metadata=False`` trains the image head alone with the same recipe, which is the
like-for-like image-only control.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from skin_lesion_classifier.models.checkpoint import make_checkpoint
from skin_lesion_classifier.models.factory import register_fusion

logger = logging.getLogger(__name__)


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


# ------------------------------------------------------------------ second-stage training
@dataclass
class FusionHeadConfig:
    """Knobs of :func:`train_fusion_head` (``parameters_ensemble.yml`` ``fusion:``)."""

    hidden: list[int] = field(default_factory=lambda: [64, 64])
    dropout: float = 0.2
    metadata_dropout: float = 0.1
    min_site_count: int = 10
    train_image_head: bool = True
    epochs: int = 40
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-2
    label_smoothing: float = 0.1
    class_weight_power: float = 0.0
    sampler_power: float = 0.5
    feature_views: int = 2
    augment: dict[str, Any] = field(default_factory=dict)
    patience: int = 10
    seed: int = 42
    eval_batch_size: int = 256

    @classmethod
    def from_dict(cls, params: Mapping[str, Any] | None) -> FusionHeadConfig:
        params = dict(params or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(
                f"unknown fusion option(s) {unknown}; known: {sorted(known)}"
            )
        cfg = cls(**params)
        if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.feature_views < 1:
            raise ValueError("fusion epochs, batch_size and feature_views must be >= 1")
        return cfg


@dataclass
class FusionResult:
    """What :func:`train_fusion_head` returns."""

    model: nn.Module  # eval mode, CPU
    checkpoint: dict[str, Any] | None  # contract checkpoint (None for the control)
    history: pd.DataFrame
    best_epoch: int
    val_proba: np.ndarray


def fusion_features(
    base_model: nn.Module,
    base_meta: Mapping[str, Any],
    train_images: np.ndarray,
    val_images: np.ndarray,
    config: FusionHeadConfig | Mapping[str, Any] | None = None,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen pooled features of the image model: ``(feature_views, N_train, F)`` for the
    training images (view 0 plain, the others augmented with ``config.augment``) and
    ``(N_val, F)`` for validation (the training engine's ``extract_features``)."""
    from skin_lesion_classifier.data.augment import AugmentConfig
    from skin_lesion_classifier.training.engine import extract_features

    cfg = (
        config
        if isinstance(config, FusionHeadConfig)
        else FusionHeadConfig.from_dict(config)
    )
    device = torch.device(device)
    model = base_model.to(device).eval()
    kw = {
        "mean": base_meta["mean"],
        "std": base_meta["std"],
        "device": device,
        "batch_size": cfg.eval_batch_size,
    }
    views = [extract_features(model, train_images, **kw)]
    aug = AugmentConfig.from_dict(cfg.augment)
    for _ in range(1, cfg.feature_views):
        views.append(extract_features(model, train_images, augment=aug, **kw))
    return torch.stack(views), extract_features(model, val_images, **kw)


def train_fusion_head(
    base_model: nn.Module,
    base_meta: Mapping[str, Any],
    train_images: np.ndarray | None,
    train_rows: pd.DataFrame,
    val_images: np.ndarray | None,
    val_rows: pd.DataFrame,
    config: FusionHeadConfig | Mapping[str, Any] | None = None,
    device: torch.device | str = "cpu",
    use_metadata: bool = True,
    features: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> FusionResult:
    """Train the fused heads of a trained image-only model on frozen features.

    ``*_images``: uint8 ``(N, H, W, 3)`` at ``base_meta["input_size"]``; ``*_rows``: the
    same images' ``label`` and ``age, sex, localization``. The metadata encoder is fitted
    on ``train_rows`` only. Train features are ``feature_views`` views (the first plain,
    the others augmented); the heads are trained with class-balanced sampling
    (``sampler_power``), label-smoothed cross-entropy and AdamW with a cosine schedule;
    the epoch with the best validation balanced accuracy (ties: lower validation loss)
    is kept. ``use_metadata=False`` trains only the image head with the same recipe (the
    image-only control; its ``checkpoint`` is ``None``). ``features`` = ``(train views
    (V, N, F), val (N, F))`` from :func:`fusion_features` skips the feature extraction
    (e.g. to train the fusion and its control on the same features).
    """
    from skin_lesion_classifier.data.metadata_features import MetadataEncoder
    from skin_lesion_classifier.training.engine import (
        classification_scores,
        seed_everything,
    )
    from skin_lesion_classifier.training.losses import build_loss
    from skin_lesion_classifier.training.sampler import epoch_indices

    cfg = (
        config
        if isinstance(config, FusionHeadConfig)
        else FusionHeadConfig.from_dict(config)
    )
    device = torch.device(device)
    seed_everything(cfg.seed)
    y_train = train_rows["label"].to_numpy(dtype=np.int64).copy()
    y_val = val_rows["label"].to_numpy(dtype=np.int64)
    if features is None and (
        len(train_images) != len(y_train) or len(val_images) != len(y_val)
    ):
        raise ValueError("images and rows differ in length")
    encoder = MetadataEncoder.fit(train_rows, min_site_count=cfg.min_site_count)
    fused, meta = fusion_from_image_model(
        base_model,
        base_meta,
        encoder.dim,
        {
            "hidden": list(cfg.hidden),
            "dropout": cfg.dropout,
            "metadata_dropout": cfg.metadata_dropout,
        },
    )
    meta["metadata_encoder"] = encoder.to_dict()
    fused.to(device)
    if features is None:
        features = fusion_features(
            base_model, base_meta, train_images, val_images, cfg, device
        )
    train_feats, val_feats = (f.to(device) for f in features)
    if train_feats.shape[1] != len(y_train) or len(val_feats) != len(y_val):
        raise ValueError("precomputed features do not match the train / val rows")
    m_train = torch.as_tensor(encoder.transform(train_rows), device=device)
    m_val = torch.as_tensor(encoder.transform(val_rows), device=device)

    for p in fused.parameters():
        p.requires_grad_(False)
    trainable: list[nn.Module] = []
    if use_metadata:
        trainable += [fused.metadata_mlp, fused.metadata_head]
    if cfg.train_image_head or not use_metadata:
        trainable.append(fused.image_head_module())
    params = [p for mod in trainable for p in mod.parameters()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(
        [
            {
                "params": [p for p in params if p.ndim > 1],
                "weight_decay": cfg.weight_decay,
            },
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
        ],
        lr=cfg.lr,
    )
    steps = max(1, math.ceil(len(y_train) / cfg.batch_size)) * cfg.epochs
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    counts = np.bincount(y_train, minlength=len(meta["classes"]))
    criterion = build_loss("ce", counts, cfg.class_weight_power, cfg.label_smoothing)
    zeros_val = torch.zeros_like(m_val)
    y_dev = torch.as_tensor(y_train, device=device)

    def logits(feats: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        if use_metadata:
            return fused.forward_from_features(feats, m)
        return fused.image_head_module()(feats)

    def predict_val() -> np.ndarray:
        fused.eval()
        with torch.no_grad():
            out = [
                torch.softmax(
                    logits(
                        val_feats[s : s + cfg.eval_batch_size],
                        (m_val if use_metadata else zeros_val)[
                            s : s + cfg.eval_batch_size
                        ],
                    ).float(),
                    dim=1,
                )
                for s in range(0, len(y_val), cfg.eval_batch_size)
            ]
        return torch.cat(out).cpu().numpy()

    history, best, best_key, best_epoch, bad = [], None, None, 0, 0
    gen = torch.Generator()
    for epoch in range(1, cfg.epochs + 1):
        gen.manual_seed(cfg.seed * 1000 + epoch)
        idx_all = epoch_indices(y_train, cfg.sampler_power, len(y_train), gen)
        fused.eval()  # the frozen backbone's BatchNorm stays in eval mode
        for mod in trainable:
            mod.train()
        total, seen = 0.0, 0
        for s in range(0, len(idx_all), cfg.batch_size):
            idx = idx_all[s : s + cfg.batch_size].to(device)
            if len(idx) < 2:
                continue  # BatchNorm needs two samples
            view = torch.randint(0, train_feats.shape[0], (len(idx),), generator=gen)
            loss = criterion(
                logits(train_feats[view.to(device), idx], m_train[idx]).float(),
                y_dev[idx],
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
        proba = predict_val()
        scores = classification_scores(y_val, proba)
        history.append(
            {
                "epoch": epoch,
                "train_loss": total / max(seen, 1),
                "val_loss": scores["loss"],
                "val_balanced_accuracy": scores["balanced_accuracy"],
                "val_macro_auc": scores["macro_auc"],
                "lr": float(optimizer.param_groups[0]["lr"]),
            }
        )
        key = (scores["balanced_accuracy"], -scores["loss"])
        if best_key is None or key > best_key:
            best_key, best_epoch, bad = key, epoch, 0
            best = (copy.deepcopy(fused.state_dict()), proba)
        else:
            bad += 1
            if bad >= cfg.patience:
                break
    fused.load_state_dict(best[0])
    fused.eval().cpu()
    hist = pd.DataFrame(history)
    logger.info(
        "fusion head (%s): best epoch %d, val BA %.4f",
        "image + metadata" if use_metadata else "image only",
        best_epoch,
        best_key[0],
    )
    ckpt = None
    if use_metadata:
        meta["fusion"] = {
            "config": asdict(cfg),
            "best_epoch": int(best_epoch),
            "base_metrics": dict(base_meta.get("metrics") or {}),
        }
        meta["metrics"] = {
            k: float(v)
            for k, v in hist.loc[hist.epoch == best_epoch].iloc[0].items()
            if k.startswith("val_")
        }
        ckpt = make_checkpoint(fused, meta)
    return FusionResult(fused, ckpt, hist, int(best_epoch), best[1])


@torch.no_grad()
def proba_from_features(
    model: MetadataFusionModel,
    features: torch.Tensor,
    metadata: np.ndarray | None,
    batch_size: int = 1024,
) -> np.ndarray:
    """Class probabilities from precomputed image features: the fused model when
    ``metadata`` is given, its image head alone when it is ``None`` (the image-only
    control of :func:`train_fusion_head`)."""
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
