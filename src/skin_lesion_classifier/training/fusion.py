"""Second-stage training of the metadata-fusion heads (:mod:`models.fusion`).

:func:`train_fusion_head` runs on the same epoch loop as the image classifier
(:mod:`~skin_lesion_classifier.training.loop`): it starts from a
trained image-only checkpoint, freezes its backbone, computes the pooled features once
(:func:`fusion_features`), and trains the heads on ``(features, metadata)``; the same call
with ``use_metadata=False`` trains the image head alone with the same recipe, which is the
like-for-like image-only control.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from skin_lesion_classifier.config_defaults import check_keys
from skin_lesion_classifier.data.augment import AugmentConfig
from skin_lesion_classifier.data.metadata_features import MetadataEncoder
from skin_lesion_classifier.models.checkpoint import make_checkpoint
from skin_lesion_classifier.models.fusion import fusion_from_image_model
from skin_lesion_classifier.training.distributed import SINGLE
from skin_lesion_classifier.training.engine import extract_features, seed_everything
from skin_lesion_classifier.training.feeders import FeatureFeeder
from skin_lesion_classifier.training.loop import (
    FitSpec,
    FitState,
    Stepper,
    fit,
    validation_scores,
)
from skin_lesion_classifier.training.losses import build_loss
from skin_lesion_classifier.training.sampler import epoch_indices

logger = logging.getLogger(__name__)


@dataclass
class FusionHeadConfig:
    """Knobs of :func:`train_fusion_head`; their defaults are ``ensemble.fusion`` in
    ``conf/base/parameters_ensemble.yml``."""

    hidden: list[int]
    dropout: float
    metadata_dropout: float
    field_dropout: float
    min_site_count: int
    train_image_head: bool
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    label_smoothing: float
    class_weight_power: float
    sampler_power: float
    feature_views: int
    augment: dict[str, Any]
    patience: int
    seed: int
    eval_batch_size: int

    @classmethod
    def from_dict(cls, params: Mapping[str, Any] | None) -> FusionHeadConfig:
        """Build from ``ensemble.fusion``; unknown or missing keys raise ``ValueError``."""
        params = dict(params or {})
        check_keys(cls, params, "fusion")
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
    fused, meta = _fused_model(base_model, base_meta, encoder, cfg, device)
    if features is None:
        features = fusion_features(
            base_model, base_meta, train_images, val_images, cfg, device
        )
    train_feats, val_feats = (f.to(device) for f in features)
    if train_feats.shape[1] != len(y_train) or len(val_feats) != len(y_val):
        raise ValueError("precomputed features do not match the train / val rows")
    m_train = torch.as_tensor(encoder.transform(train_rows), device=device)
    m_val = torch.as_tensor(encoder.transform(val_rows), device=device)

    trainable = _select_trainable(fused, use_metadata, cfg.train_image_head)

    def logits(inputs) -> torch.Tensor:
        feats, m = inputs
        if use_metadata:
            return fused.forward_from_features(feats, m)
        return fused.image_head_module()(feats)

    counts = np.bincount(y_train, minlength=len(meta["classes"]))
    stepper = _head_stepper(logits, trainable, counts, cfg, device)
    feed = _head_feed(train_feats, y_train, m_train, encoder, cfg, device)

    def set_train_mode() -> None:
        fused.eval()  # the frozen backbone's BatchNorm stays in eval mode
        trainable.train()

    last, best = {}, {}

    def evaluate() -> dict[str, float]:
        m = m_val if use_metadata else torch.zeros_like(m_val)
        last["proba"] = _predict(logits, fused, val_feats, m, cfg.eval_batch_size)
        return validation_scores(y_val, last["proba"])

    def keep(row: dict[str, float]) -> None:
        best.update(state=copy.deepcopy(fused.state_dict()), proba=last["proba"])

    state = FitState()
    fit(
        stepper,
        feed,
        set_train_mode,
        evaluate,
        FitSpec(
            epochs=cfg.epochs,
            patience=cfg.patience,
            is_better=_ba_then_loss,
            scheduler_metric="val_balanced_accuracy",
            max_train_minutes=None,
            progress_total=None,
            name="fusion head" if use_metadata else "image head",
        ),
        state,
        SINGLE,
        on_improved=keep,
        on_epoch_saved=lambda row, st: None,
        on_epoch_end=None,
    )
    fused.load_state_dict(best["state"])
    return _head_result(fused, meta, base_meta, cfg, state, best["proba"], use_metadata)


def _fused_model(base_model, base_meta, encoder, cfg: FusionHeadConfig, device):
    """The fused model on ``device`` (the image model plus metadata heads) and its
    checkpoint meta, which carries the fitted metadata encoder."""
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
    return fused.to(device), meta


def _head_stepper(
    logits, trainable: nn.Module, counts: np.ndarray, cfg: FusionHeadConfig, device
) -> Stepper:
    """AdamW (no weight decay on biases and norms) with a cosine schedule over all the
    steps, and class-weighted, label-smoothed cross-entropy; no AMP, EMA or clipping."""
    params = [p for p in trainable.parameters()]
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
    n_train = int(counts.sum())
    steps = max(1, math.ceil(n_train / cfg.batch_size)) * cfg.epochs
    return Stepper(
        forward=logits,
        trainable=trainable,
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps),
        per_epoch_scheduler=False,
        criterion=build_loss("ce", counts, cfg.class_weight_power, cfg.label_smoothing),
        scaler=torch.amp.GradScaler("cuda", enabled=False),
        ema=None,
        device=device,
        amp_dtype=None,
        grad_accum_steps=1,
        grad_clip=None,
    )


def _head_feed(train_feats, y_train, m_train, encoder, cfg: FusionHeadConfig, device):
    """``epoch -> batches`` of ``((features, metadata), labels)``: a class-balanced draw
    seeded per epoch, a random feature view per sample and metadata fields masked at
    ``field_dropout``."""
    gen = torch.Generator()
    feeder = FeatureFeeder(
        train_feats,
        y_train,
        cfg.batch_size,
        device,
        SINGLE,
        extra=m_train,
        extra_transform=lambda m: encoder.mask_fields(m, cfg.field_dropout, gen),
        generator=gen,
        min_batch=2,  # BatchNorm needs two samples
    )

    def feed(epoch: int):
        gen.manual_seed(cfg.seed * 1000 + epoch)
        return feeder(epoch_indices(y_train, cfg.sampler_power, len(y_train), gen))

    return feed


def _head_result(
    fused, meta, base_meta, cfg, state: FitState, val_proba, use_metadata: bool
) -> FusionResult:
    """The trained model on the CPU in eval mode, its history and (with metadata) its
    contract checkpoint with the fusion recipe and the best epoch's validation figures."""
    best_epoch = state.best_epoch
    fused.eval().cpu()
    hist = pd.DataFrame(state.history)
    logger.info(
        "fusion head (%s): best epoch %d, val BA %.4f",
        "image + metadata" if use_metadata else "image only",
        best_epoch,
        state.best_row["val_balanced_accuracy"],
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
    return FusionResult(fused, ckpt, hist, int(best_epoch), val_proba)


def _select_trainable(
    fused: nn.Module, use_metadata: bool, train_image_head: bool
) -> nn.ModuleList:
    """Freeze everything, then unfreeze the heads that this stage trains."""
    for p in fused.parameters():
        p.requires_grad_(False)
    trainable: list[nn.Module] = []
    if use_metadata:
        trainable += [fused.metadata_mlp, fused.metadata_head]
    if train_image_head or not use_metadata:
        trainable.append(fused.image_head_module())
    for mod in trainable:
        for p in mod.parameters():
            p.requires_grad_(True)
    return nn.ModuleList(trainable)


def _ba_then_loss(row: dict[str, float], best: dict[str, float] | None) -> bool:
    """Higher validation balanced accuracy; ties broken by lower validation loss."""
    if best is None:
        return True
    key = (row["val_balanced_accuracy"], -row["val_loss"])
    return key > (best["val_balanced_accuracy"], -best["val_loss"])


@torch.no_grad()
def _predict(logits, fused, feats, metadata, batch_size) -> np.ndarray:
    fused.eval()
    out = [
        torch.softmax(
            logits((feats[s : s + batch_size], metadata[s : s + batch_size])).float(),
            dim=1,
        )
        for s in range(0, len(feats), batch_size)
    ]
    return torch.cat(out).cpu().numpy()
