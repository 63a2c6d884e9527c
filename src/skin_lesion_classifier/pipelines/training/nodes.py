"""Nodes of the training pipeline: thin wrappers around the training engine."""

from __future__ import annotations

from typing import Any

import pandas as pd

from skin_lesion_classifier.data.cache import ImageCache
from skin_lesion_classifier.training.config import TrainConfig
from skin_lesion_classifier.training.engine import train_model


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
    result = train_model(
        image_cache.take(train["image_id"]),
        train["label"].to_numpy(),
        image_cache.take(val["image_id"]),
        val["label"].to_numpy(),
        cfg,
        checkpoint_dir=params.get("checkpoint_dir"),
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


def make_mlflow_model(model_checkpoint: dict[str, Any], params: dict[str, Any]):
    """The pyfunc wrapper logged as the MLflow model; its ``checkpoint`` artifact is the
    saved ``model_checkpoint`` file (see ``conf/base/catalog.yml``)."""
    from skin_lesion_classifier.mlflow_model import SkinLesionPyfunc

    opts = params.get("mlflow_model", {})
    return SkinLesionPyfunc(
        device=opts.get("device", "auto"),
        batch_size=int(opts.get("batch_size", 64)),
        tta=opts.get("tta", False),
    )
