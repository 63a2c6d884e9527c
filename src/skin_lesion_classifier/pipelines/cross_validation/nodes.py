"""Cross-validation nodes: K models over the lesion-grouped folds of the split
assignment, their out-of-fold predictions, per-fold metrics and mean +- sd.

Fold ``k``'s model never sees fold ``k``. With ``inner_validation: true`` (the default) it
also does not *select* on fold ``k``: fold ``(k + 1) mod K`` is its validation split (best
epoch, early stopping) and it trains on the other ``K - 2`` folds, so the out-of-fold
predictions are untouched by every choice. With ``false`` it trains on all other folds and
selects its epoch on fold ``k`` itself (more training data, slightly optimistic OOF
figures). The test split takes no part.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from skin_lesion_classifier.evaluation.cross_validation import (
    check_folds,
    collect_oof,
    fold_metrics,
    mlflow_fold_metrics,
    pooled_oof_metrics,
    report_section,
    summarize_folds,
)
from skin_lesion_classifier.pipelines.ensemble.nodes import predict_member
from skin_lesion_classifier.pipelines.training.nodes import train_classifier
from skin_lesion_classifier.reporting.format import to_jsonable

logger = logging.getLogger(__name__)


def fold_assignment(
    split_assignment: pd.DataFrame, fold: int, inner_validation: bool = True
) -> pd.DataFrame:
    """The split assignment fold ``fold``'s model trains with: ``heldout`` = fold ``fold``,
    ``val`` = the next fold (or fold ``fold`` itself without inner validation), ``train``
    = the rest of train+val; test rows keep ``test``."""
    folds = check_folds(split_assignment)
    if fold not in folds:
        raise ValueError(f"fold {fold} does not exist; folds are {folds}")
    if inner_validation and len(folds) < 3:
        raise ValueError("inner_validation needs at least 3 folds")
    out = split_assignment.copy()
    dev = out["split"] != "test"
    f = out["fold"].to_numpy()
    inner = folds[(folds.index(fold) + 1) % len(folds)]
    if inner_validation:
        new = np.where(f == fold, "heldout", np.where(f == inner, "val", "train"))
    else:
        new = np.where(f == fold, "val", "train")
    out.loc[dev, "split"] = new[dev.to_numpy()]
    return out


def cross_validate(
    image_cache: Any,
    split_assignment: pd.DataFrame,
    image_index: pd.DataFrame,
    training_params: Mapping[str, Any],
    params: Mapping[str, Any],
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train one model per fold (the training pipeline's ``train_classifier`` with
    ``params["train_overrides"]`` on top of ``training.train``) and predict its held-out
    fold. Returns the out-of-fold predictions (``fold`` column) and the per-fold training
    histories (``fold`` column)."""
    folds = check_folds(split_assignment)
    inner = bool(params["inner_validation"])
    base_dir = Path(str(params["checkpoint_dir"]))
    preds, histories = {}, []
    for k in folds:
        assignment = fold_assignment(split_assignment, k, inner)
        train_params = {
            **dict(training_params),
            "checkpoint_dir": str(base_dir / f"fold_{k}"),
            "train": {
                **dict(training_params["train"]),
                **dict(params["train_overrides"]),
            },
        }
        logger.info(
            "cross-validation fold %d/%d: %s",
            k + 1,
            len(folds),
            assignment["split"].value_counts().to_dict(),
        )
        checkpoint, history, _ = train_classifier(image_cache, assignment, train_params)
        held = "heldout" if inner else "val"
        preds[k] = predict_member(
            checkpoint, assignment, image_cache, image_index, params, held
        ).assign(split="oof")
        histories.append(history.assign(fold=k))
    oof = collect_oof(preds, split_assignment)
    return oof, pd.concat(histories, ignore_index=True)


def summarize_cross_validation(
    oof_predictions: pd.DataFrame, params: Mapping[str, Any]
) -> tuple[pd.DataFrame, dict[str, Any], dict[str, Any], str]:
    """Per-fold metrics (CSV), their mean / sd / min / max plus the pooled OOF figures
    (JSON), the same for MLflow, and the report section (Markdown)."""
    per_fold = fold_metrics(oof_predictions)
    summary = summarize_folds(per_fold)
    pooled = pooled_oof_metrics(oof_predictions)
    config = {
        "folds": len(per_fold),
        "inner_validation": bool(params["inner_validation"]),
        "train_overrides": dict(params["train_overrides"]),
    }
    out = to_jsonable(
        {
            "config": config,
            "per_fold": per_fold,
            "summary": summary,
            "pooled_oof": {k: v for k, v in pooled.items() if k != "per_class"},
        }
    )
    for name, s in summary.items():
        logger.info("cross-validation %s: %.4f +- %.4f", name, s["mean"], s["sd"])
    md = report_section(per_fold, summary, pooled, config=config)
    return per_fold, out, mlflow_fold_metrics(per_fold, summary), md
