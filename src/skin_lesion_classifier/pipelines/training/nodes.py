"""Nodes of the training pipeline: thin wrappers around the training engine."""

from __future__ import annotations

from typing import Any

import pandas as pd

from skin_lesion_classifier.constants import CLASSES
from skin_lesion_classifier.data.cache import ImageCache
from skin_lesion_classifier.training.config import TrainConfig
from skin_lesion_classifier.training.engine import train_model
from skin_lesion_classifier.training.launch import launch_training


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
