"""Splitting nodes: lesion-aware stratified train/val/test split and optional K folds."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd

from skin_lesion_classifier.data.splitting import (
    group_kfold,
    split_report,
    stratified_group_split,
)

logger = logging.getLogger(__name__)

SPLIT_COLUMNS = ["image_id", "lesion_id", "group_id", "dx", "label", "split", "fold"]


def assign_splits(image_index: pd.DataFrame, params: dict[str, Any]) -> pd.DataFrame:
    """Train/val/test per image, groups never crossing; ``fold`` over train+val when
    ``n_folds >= 2`` (test rows get -1)."""
    sizes = {
        "train": params["train_size"],
        "val": params["val_size"],
        "test": params["test_size"],
    }
    out = image_index[["image_id", "lesion_id", "group_id", "dx", "label"]].copy()
    out["split"] = stratified_group_split(
        out["dx"], out["group_id"], sizes, seed=params["seed"]
    )
    out["fold"] = -1
    n_folds = int(params["n_folds"])
    if n_folds >= 2:
        dev = out["split"] != "test"
        out.loc[dev, "fold"] = group_kfold(
            out.loc[dev, "dx"], out.loc[dev, "group_id"], n_folds, params["seed"]
        )
    out["fold"] = out["fold"].astype(np.int64)
    return out[SPLIT_COLUMNS]


def summarize_splits(
    split_assignment: pd.DataFrame,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Images per class and split (CSV) and split sizes for MLflow."""
    table = split_report(split_assignment)
    counts = split_assignment["split"].value_counts()
    metrics = {
        f"{s}_images": {"value": float(counts.get(s, 0)), "step": 0}
        for s in ("train", "val", "test")
    }
    metrics["groups"] = {
        "value": float(split_assignment["group_id"].nunique()),
        "step": 0,
    }
    logger.info("split sizes: %s", counts.to_dict())
    return table.reset_index(), metrics
