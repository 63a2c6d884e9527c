"""Second-stage training of the metadata-fusion heads (:mod:`models.fusion`).

:func:`train_fusion_head` needs nothing from the main training loop: it starts from a
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
from skin_lesion_classifier.training.engine import (
    classification_scores,
    extract_features,
    seed_everything,
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
            m = encoder.mask_fields(m_train[idx], cfg.field_dropout, gen)
            loss = criterion(
                logits(train_feats[view.to(device), idx], m).float(),
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
