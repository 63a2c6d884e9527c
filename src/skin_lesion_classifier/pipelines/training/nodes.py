"""Nodes of the training pipeline: thin wrappers around the training engine."""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd

from skin_lesion_classifier.constants import CLASSES
from skin_lesion_classifier.data.cache import ImageCache
from skin_lesion_classifier.data.metadata_features import with_metadata
from skin_lesion_classifier.device import detect_device
from skin_lesion_classifier.models.checkpoint import load_model, make_checkpoint
from skin_lesion_classifier.models.metadata_prior import (
    attach_metadata_prior,
    choose_alpha,
    fit_metadata_prior,
)
from skin_lesion_classifier.training.config import TrainConfig
from skin_lesion_classifier.training.engine import train_model
from skin_lesion_classifier.training.launch import launch_training

logger = logging.getLogger(__name__)


def _split(split_assignment: pd.DataFrame, name: str) -> pd.DataFrame:
    rows = split_assignment[split_assignment["split"] == name]
    if rows.empty:
        raise ValueError(f"split_assignment has no {name!r} rows")
    return rows


def train_classifier(
    image_cache: ImageCache, split_assignment: pd.DataFrame, params: dict[str, Any]
) -> tuple[dict[str, Any], pd.DataFrame, dict[str, list[dict[str, float]]]]:
    """Train on the ``train`` rows, select on the ``val`` rows (never the test rows).

    Returns the best model's checkpoint dict, the per-epoch history and the same history
    as MLflow metric series (``{name: [{"value", "step"}, ...]}``).
    """
    cfg = TrainConfig.from_dict(params["train"])
    train, val = _split(split_assignment, "train"), _split(split_assignment, "val")
    if cfg.distributed:  # DDP workers started here run the engine, not this session
        result = launch_training(
            image_cache.images,
            image_cache.rows(train["image_id"]),
            train["label"].to_numpy(),
            image_cache.rows(val["image_id"]),
            val["label"].to_numpy(),
            cfg,
            checkpoint_dir=params["checkpoint_dir"],
            classes=CLASSES,
        )
    else:
        result = train_model(
            image_cache.take(train["image_id"]),
            train["label"].to_numpy(),
            image_cache.take(val["image_id"]),
            val["label"].to_numpy(),
            cfg,
            checkpoint_dir=params["checkpoint_dir"],
        )
    return result.checkpoint, result.history, history_to_metrics(result.history)


def add_metadata_prior(
    image_model_checkpoint: dict[str, Any],
    image_cache: ImageCache,
    split_assignment: pd.DataFrame,
    image_index: pd.DataFrame,
    params: dict[str, Any],
) -> dict[str, Any]:
    """The trained image model with the patient's age, sex and site fused in as a
    likelihood ratio (:mod:`skin_lesion_classifier.models.metadata_prior`), or the image
    model unchanged when ``params["metadata_prior"]["enabled"]`` is false or validation
    chooses ``alpha = 0``.

    The prior is fitted on the ``train`` rows' metadata; a list of ``alpha`` values is
    chosen on the ``val`` rows (log loss of the fused probabilities, the image model's
    single-view predictions); the test rows are not read."""
    cfg = params.get("metadata_prior") or {}
    if not cfg.get("enabled", False):
        return image_model_checkpoint
    grid = cfg["alpha"]
    grid = [float(a) for a in (grid if isinstance(grid, list | tuple) else [grid])]
    if not grid or any(a < 0 for a in grid):
        raise ValueError(
            f"metadata_prior.alpha must be >= 0 (or a list of them), got {grid}"
        )
    rows = with_metadata(split_assignment, image_index)
    prior = fit_metadata_prior(
        _split(rows, "train"),
        image_model_checkpoint["meta"]["classes"],
        C=float(cfg["C"]),
        min_site_count=int(cfg["min_site_count"]),
    )
    model, meta = load_model(image_model_checkpoint, "cpu")
    details: dict[str, Any] = {"C": float(cfg["C"]), "alpha_grid": grid}
    if len(grid) == 1:
        alpha = grid[0]
    else:
        from skin_lesion_classifier.inference.predictor import TorchPredictor

        val = _split(rows, "val")
        train_cfg = params["train"]
        predictor = TorchPredictor.from_checkpoint(
            image_model_checkpoint,
            device=detect_device(train_cfg["device"]),
            batch_size=int(train_cfg["eval_batch_size"]),
        )
        p = predictor.predict(image_cache.take(val["image_id"]))
        alpha, losses = choose_alpha(
            prior,
            p,
            prior.encoder.transform(val),
            val["label"].to_numpy(dtype=int),
            grid,
        )
        details["val_log_loss"] = {str(a): v for a, v in losses.items()}
        logger.info(
            "metadata prior: alpha %.2f chosen on validation (log loss %s)",
            alpha,
            ", ".join(f"{a:g}: {v:.4f}" for a, v in losses.items()),
        )
    if alpha == 0:
        return image_model_checkpoint
    fused, new_meta = attach_metadata_prior(model, meta, prior, alpha, details)
    return make_checkpoint(fused, new_meta)


def history_to_metrics(history: pd.DataFrame) -> dict[str, list[dict[str, float]]]:
    """Per-epoch history -> MLflow metric series, step = epoch."""
    out: dict[str, list[dict[str, float]]] = {}
    for col in history.columns:
        if col == "epoch":
            continue
        out[col] = [
            {"value": float(v), "step": int(e)}
            for e, v in zip(history["epoch"], history[col], strict=True)
            if pd.notna(v)
        ]
    return out


def best_validation_metrics(
    model_checkpoint: dict[str, Any],
) -> dict[str, dict[str, float]]:
    """The best epoch's validation figures, for ``MlflowMetricsDataset`` (prefix ``best_``)."""
    metrics = model_checkpoint["meta"].get("metrics") or {}
    return {f"best_{k}": {"value": float(v), "step": 0} for k, v in metrics.items()}


def make_mlflow_model(
    model_checkpoint: dict[str, Any], params: dict[str, Any]
) -> dict[str, Any]:
    """The ``log_model`` arguments of the pyfunc (MLflow's "models from code": the code
    file, its ``model_config``, the signature for the checkpoint's classes, an input
    example); the catalog's ``PyfuncModelDataset`` logs it with the saved
    ``model_checkpoint`` file as its ``checkpoint`` artifact (see ``conf/base/catalog.yml``)."""
    from skin_lesion_classifier.mlflow_model import log_model_args

    opts = params["mlflow_model"]
    return log_model_args(
        model_checkpoint["meta"]["classes"],
        device=opts["device"],
        batch_size=int(opts["batch_size"]),
        tta=opts["tta"],
    )


def logged_model_uri(mlflow_model) -> str:
    """``models:/<model id>`` of the pyfunc loaded back from the run (MLflow 3), else
    ``runs:/<run id>/<artifact path>``."""
    meta = mlflow_model.metadata
    if getattr(meta, "model_id", None):
        return f"models:/{meta.model_id}"
    return f"runs:/{meta.run_id}/{meta.artifact_path}"


def register_model(
    mlflow_model, model_checkpoint: dict[str, Any], params: dict[str, Any]
) -> dict[str, Any]:
    """Register the run's logged model under ``registry.model_name`` with the best epoch's
    validation figures as tags; move ``registry.champion_alias`` to it only when it beats
    the current champion on ``registry.champion_metric`` (see ``registry.py``)."""
    from skin_lesion_classifier.registry import register_and_promote

    reg = params["registry"]
    meta = model_checkpoint["meta"]
    return register_and_promote(
        logged_model_uri(mlflow_model),
        reg["model_name"],
        metrics=meta.get("metrics") or {},
        metric=reg["champion_metric"],
        alias=reg["champion_alias"],
        extra_tags={
            "arch": str(meta.get("arch")),
            "input_size": str(meta.get("input_size")),
        },
    )
