"""Putting the pieces together: prediction frames, the ISIC submission table and the full
evaluation of one split under the arg-max and the rule chosen on validation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from skin_lesion_classifier.constants import CLASSES, ISIC_COLUMNS, to_isic_order
from skin_lesion_classifier.evaluation import bootstrap, calibration, clinical
from skin_lesion_classifier.evaluation.decision import DecisionRule
from skin_lesion_classifier.evaluation.metrics import (
    check_probabilities,
    classification_metrics,
)

#: Probability columns of a predictions frame, in :data:`CLASSES` order.
PROB_COLUMNS: tuple[str, ...] = tuple(f"prob_{c}" for c in CLASSES)
#: Identifying columns copied from the split assignment into a predictions frame.
ID_COLUMNS: tuple[str, ...] = ("image_id", "lesion_id", "split", "dx", "label")


def split_rows(split_assignment: pd.DataFrame, split: str) -> pd.DataFrame:
    """The rows of ``split`` (``train``/``val``/``test``), re-indexed; an empty split is an error."""
    rows = split_assignment[split_assignment["split"] == split].reset_index(drop=True)
    if rows.empty:
        raise ValueError(f"the split assignment has no {split!r} rows")
    return rows


def predictions_frame(rows: pd.DataFrame, probabilities: np.ndarray) -> pd.DataFrame:
    """The ``predictions`` contract: ``image_id, lesion_id, split, dx, label``, one
    ``prob_<class>`` column per class and ``pred`` / ``pred_dx`` (the arg-max)."""
    missing = [c for c in ID_COLUMNS if c not in rows.columns]
    if missing:
        raise ValueError(f"rows to predict lack columns {missing}")
    p = check_probabilities(probabilities, n_rows=len(rows))
    out = rows.loc[:, list(ID_COLUMNS)].reset_index(drop=True).copy()
    out["label"] = out["label"].astype("int64")
    for i, col in enumerate(PROB_COLUMNS):
        out[col] = p[:, i].astype(np.float32)
    out["pred"] = p.argmax(axis=1).astype("int64")
    out["pred_dx"] = [CLASSES[i] for i in out["pred"]]
    return out


def probabilities_of(predictions: pd.DataFrame) -> np.ndarray:
    """The ``(n, 7)`` float64 probabilities of a predictions frame, renormalised against
    float32 storage rounding."""
    missing = [c for c in PROB_COLUMNS if c not in predictions.columns]
    if missing:
        raise ValueError(f"predictions lack probability columns {missing}")
    p = predictions.loc[:, list(PROB_COLUMNS)].to_numpy(dtype=np.float64)
    return p / p.sum(axis=1, keepdims=True)


def isic_submission(predictions: pd.DataFrame) -> pd.DataFrame:
    """ISIC 2018 task 3 submission table: ``image, MEL, NV, BCC, AKIEC, BKL, DF, VASC``."""
    p = to_isic_order(probabilities_of(predictions))
    out = pd.DataFrame(p, columns=list(ISIC_COLUMNS))
    out.insert(0, "image", predictions["image_id"].astype(str).to_numpy())
    return out


def evaluate_split(
    y_true,
    y_prob,
    groups,
    rule: DecisionRule,
    *,
    n_bins: int = 15,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    sensitivity_targets: Sequence[float] = (0.90, 0.95),
) -> dict[str, Any]:
    """All figures of one split: ``argmax`` and ``chosen`` (multi-class metrics of the
    arg-max and of ``rule``'s decisions; AUC and log loss are of the probabilities either
    way), ``melanoma`` (clinical figures at the arg-max, at ``rule``'s decision and at the
    validation threshold), ``calibration`` and ``bootstrap`` (lesion-bootstrap intervals,
    ``argmax`` and ``chosen``)."""
    p = check_probabilities(y_prob)
    y = np.asarray(y_true)
    argmax = p.argmax(axis=1)
    chosen = rule.predict(p)
    mel = clinical.melanoma_metrics(
        y,
        p,
        argmax,
        threshold=rule.melanoma_threshold,
        sensitivity_targets=sensitivity_targets,
    )
    mel_index = list(rule.classes).index("mel")
    mel["rule"] = clinical.operating_point(y == mel_index, chosen == mel_index)
    curve = calibration.reliability_curve(y, p, n_bins)
    boot_kwargs = {
        "melanoma_threshold": rule.melanoma_threshold,
        "n_boot": n_boot,
        "seed": seed,
        "level": level,
        "sensitivity_targets": sensitivity_targets,
    }
    boot = {
        "argmax": bootstrap.bootstrap_confidence_intervals(y, p, groups, **boot_kwargs)
    }
    if rule.name != "argmax":
        boot["chosen"] = bootstrap.bootstrap_confidence_intervals(
            y, p, groups, y_pred=chosen, **boot_kwargs
        )
    return {
        "argmax": classification_metrics(y, p, argmax),
        "chosen": classification_metrics(y, p, chosen),
        "melanoma": mel,
        "calibration": {
            "ece": calibration.expected_calibration_error(y, p, n_bins),
            "mce": calibration.maximum_calibration_error(y, p, n_bins),
            "n_bins": int(n_bins),
            "curve": curve.to_dict(orient="records"),
        },
        "bootstrap": boot,
    }


def train_counts_from(
    meta: Mapping[str, Any] | None, split_assignment: pd.DataFrame | None
) -> list[int]:
    """Training images per class (CLASSES order): from the checkpoint meta
    ``train_class_counts`` (mapping or list), else counted in the split assignment's
    ``train`` rows."""
    counts = (meta or {}).get("train_class_counts")
    if counts is not None:
        if isinstance(counts, Mapping):
            missing = [c for c in CLASSES if c not in counts]
            if missing:
                raise ValueError(f"meta train_class_counts lack classes {missing}")
            return [int(counts[c]) for c in CLASSES]
        if len(counts) != len(CLASSES):
            raise ValueError(
                f"meta train_class_counts needs {len(CLASSES)} values, got {counts}"
            )
        return [int(v) for v in counts]
    if split_assignment is None:
        raise ValueError(
            "no train_class_counts in the meta and no split assignment given"
        )
    train = split_assignment[split_assignment["split"] == "train"]
    if train.empty:
        raise ValueError(
            "the split assignment has no 'train' rows to count classes from"
        )
    vc = train["dx"].value_counts()
    return [int(vc.get(c, 0)) for c in CLASSES]
