"""Melanoma-versus-rest clinical figures.

A lesion is *positive* when its true class is melanoma and *flagged* when the rule in use
calls it melanoma: either the multi-class decision (``y_pred == mel``) or the melanoma
score passing a threshold (``p_mel >= t``). With ``TP, FP, FN, TN`` the counts of
flagged/not flagged against positive/negative:

* sensitivity ``= TP / (TP + FN)``, specificity ``= TN / (TN + FP)``;
* number needed to excise ``NNE = (TP + FP) / TP``: lesions a dermatologist would cut out
  per melanoma found when every flagged lesion is excised (1 is perfect; NaN when no
  melanoma is found);
* specificity at a sensitivity ``s``: the specificity of the highest threshold whose
  sensitivity is at least ``s``, read off the ROC curve of the split itself (a descriptive
  property of the curve, not a decision rule: the threshold is not carried to another split).

The threshold that *is* carried over is chosen on validation with
:func:`threshold_for_sensitivity` and applied unchanged on test.
"""

from __future__ import annotations

import numpy as np
from sklearn import metrics as skm

from skin_lesion_classifier.constants import MELANOMA_INDEX
from skin_lesion_classifier.evaluation.metrics import check_labels, check_probabilities


def binary_counts(positive, flagged) -> dict[str, int]:
    """``TP, FP, FN, TN`` of boolean arrays ``positive`` (truth) and ``flagged`` (decision)."""
    positive = np.asarray(positive, dtype=bool)
    flagged = np.asarray(flagged, dtype=bool)
    if positive.shape != flagged.shape:
        raise ValueError(
            f"positive has shape {positive.shape} but flagged {flagged.shape}"
        )
    return {
        "tp": int(np.sum(positive & flagged)),
        "fp": int(np.sum(~positive & flagged)),
        "fn": int(np.sum(positive & ~flagged)),
        "tn": int(np.sum(~positive & ~flagged)),
    }


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den > 0 else float("nan")


def operating_point(positive, flagged) -> dict[str, float]:
    """Sensitivity ``TP/(TP+FN)``, specificity ``TN/(TN+FP)``, PPV ``TP/(TP+FP)``,
    ``NNE = (TP+FP)/TP`` and the counts, for one binary decision."""
    c = binary_counts(positive, flagged)
    return {
        "sensitivity": _ratio(c["tp"], c["tp"] + c["fn"]),
        "specificity": _ratio(c["tn"], c["tn"] + c["fp"]),
        "ppv": _ratio(c["tp"], c["tp"] + c["fp"]),
        "nne": _ratio(c["tp"] + c["fp"], c["tp"]),
        **c,
    }


def number_needed_to_excise(positive, flagged) -> float:
    """``NNE = (TP + FP) / TP`` = 1 / PPV; NaN when no melanoma is flagged (``TP = 0``)."""
    c = binary_counts(positive, flagged)
    return _ratio(c["tp"] + c["fp"], c["tp"])


def roc_curve(positive, score) -> dict[str, np.ndarray]:
    """ROC curve of a binary score (``sklearn.metrics.roc_curve``, all thresholds kept):
    ``fpr``, ``tpr`` (= sensitivity) and ``thresholds`` in decreasing order; a sample is
    flagged at threshold ``t`` when ``score >= t``."""
    positive = np.asarray(positive, dtype=bool)
    score = np.asarray(score, dtype=np.float64)
    if positive.all() or not positive.any():
        raise ValueError(
            "the ROC curve needs both melanoma and non-melanoma samples; got "
            f"{int(positive.sum())} positives out of {positive.size}"
        )
    fpr, tpr, thr = skm.roc_curve(positive, score, drop_intermediate=False)
    return {"fpr": fpr, "tpr": tpr, "thresholds": thr}


def threshold_for_sensitivity(positive, score, target: float) -> float:
    """The highest threshold ``t`` with ``sensitivity(score >= t) >= target``.

    Among the ROC curve's thresholds (decreasing), the first whose ``tpr >= target``.
    Choose it on validation and apply it unchanged elsewhere.
    """
    if not 0.0 < float(target) <= 1.0:
        raise ValueError(f"target sensitivity must be in (0, 1], got {target}")
    curve = roc_curve(positive, score)
    i = int(np.argmax(curve["tpr"] >= float(target) - 1e-12))
    t = float(curve["thresholds"][i])
    # sklearn puts +inf first; it flags nothing, so it can only satisfy target 0
    return min(t, 1.0) if np.isfinite(t) else 1.0


def specificity_at_sensitivity(positive, score, target: float) -> dict[str, float]:
    """The ROC curve's best specificity subject to ``sensitivity >= target``:
    ``max {1 - fpr_k : tpr_k >= target}`` (fpr is non-decreasing along the curve, so the
    first point reaching the target), with the sensitivity and threshold of that point."""
    curve = roc_curve(positive, score)
    i = int(np.argmax(curve["tpr"] >= float(target) - 1e-12))
    return {
        "target_sensitivity": float(target),
        "sensitivity": float(curve["tpr"][i]),
        "specificity": float(1.0 - curve["fpr"][i]),
        "threshold": float(curve["thresholds"][i]),
    }


def melanoma_metrics(
    y_true,
    y_prob,
    y_pred=None,
    *,
    threshold: float | None = None,
    sensitivity_targets=(0.90, 0.95),
    melanoma_index: int = MELANOMA_INDEX,
) -> dict:
    """Melanoma-vs-rest figures of one split as a JSON-ready dict.

    ``argmax``: the operating point of the multi-class decision (``y_pred``, default the
    arg-max of ``y_prob``) flagging melanoma; ``threshold``: the operating point of
    ``p_mel >= threshold`` (a threshold chosen elsewhere, on validation); ``auc``: the ROC
    AUC of ``p_mel``; ``specificity_at_sensitivity``: one entry per target (see
    :func:`specificity_at_sensitivity`). Curve-based figures are NaN when the split lacks
    melanomas or non-melanomas.
    """
    p = check_probabilities(y_prob, n_classes=np.asarray(y_prob).shape[-1])
    y = check_labels(y_true, p.shape[1])
    if y.size != p.shape[0]:
        raise ValueError(f"y_true has {y.size} rows but y_prob has {p.shape[0]}")
    d = (
        p.argmax(axis=1)
        if y_pred is None
        else check_labels(y_pred, p.shape[1], "y_pred")
    )
    positive = y == melanoma_index
    score = p[:, melanoma_index]
    both = bool(positive.any() and not positive.all())
    out: dict = {
        "n": int(y.size),
        "n_melanoma": int(positive.sum()),
        "auc": float(skm.roc_auc_score(positive, score)) if both else float("nan"),
        "argmax": operating_point(positive, d == melanoma_index),
    }
    if threshold is not None:
        out["threshold"] = {
            "value": float(threshold),
            **operating_point(positive, score >= float(threshold)),
        }
    out["specificity_at_sensitivity"] = {
        f"{t:.2f}": (
            specificity_at_sensitivity(positive, score, t)
            if both
            else {
                "target_sensitivity": float(t),
                "sensitivity": float("nan"),
                "specificity": float("nan"),
                "threshold": float("nan"),
            }
        )
        for t in sensitivity_targets
    }
    return out
