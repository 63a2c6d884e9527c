"""Calibration of the top-label confidence: reliability curve and expected calibration error.

Following Guo et al., *On Calibration of Modern Neural Networks* (ICML 2017): the confidence
of sample ``i`` is ``conf_i = max_c p_{i, c}`` and it is correct when
``argmax_c p_{i, c} = y_i``. Samples are put in ``M`` equal-width bins over ``[0, 1]``
(bin ``m`` holds ``conf`` in ``((m - 1) / M, m / M]``, the first bin also holds 0).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from skin_lesion_classifier.evaluation.metrics import check_labels, check_probabilities


def reliability_curve(y_true, y_prob, n_bins: int = 15) -> pd.DataFrame:
    """Per-bin calibration table: ``bin_lower, bin_upper, count, confidence, accuracy, gap``.

    ``confidence_m = mean_{i in B_m} conf_i``, ``accuracy_m = mean_{i in B_m} 1[yhat_i =
    y_i]``, ``gap_m = accuracy_m - confidence_m``; empty bins have ``count = 0`` and NaN
    means.
    """
    if int(n_bins) < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    n_bins = int(n_bins)
    p = check_probabilities(y_prob, n_classes=np.asarray(y_prob).shape[-1])
    y = check_labels(y_true, p.shape[1])
    if y.size != p.shape[0]:
        raise ValueError(f"y_true has {y.size} rows but y_prob has {p.shape[0]}")
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # right-closed bins; conf = 0 falls in the first bin
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    sum_conf = np.bincount(idx, weights=conf, minlength=n_bins)
    sum_acc = np.bincount(idx, weights=correct, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.where(count > 0, sum_conf / np.maximum(count, 1), np.nan)
        mean_acc = np.where(count > 0, sum_acc / np.maximum(count, 1), np.nan)
    return pd.DataFrame(
        {
            "bin_lower": edges[:-1],
            "bin_upper": edges[1:],
            "count": count.astype(int),
            "confidence": mean_conf,
            "accuracy": mean_acc,
            "gap": mean_acc - mean_conf,
        }
    )


def expected_calibration_error(y_true, y_prob, n_bins: int = 15) -> float:
    """Expected calibration error of the top label:
    ``ECE = sum_m (|B_m| / N) * |accuracy_m - confidence_m|`` over non-empty bins
    (0 = perfectly calibrated, at most 1). NaN for an empty input."""
    curve = reliability_curve(y_true, y_prob, n_bins)
    n = curve["count"].sum()
    if n == 0:
        return float("nan")
    used = curve[curve["count"] > 0]
    return float((used["count"] / n * used["gap"].abs()).sum())


def maximum_calibration_error(y_true, y_prob, n_bins: int = 15) -> float:
    """Maximum calibration error: ``MCE = max_m |accuracy_m - confidence_m|`` over
    non-empty bins."""
    curve = reliability_curve(y_true, y_prob, n_bins)
    used = curve[curve["count"] > 0]
    return float(used["gap"].abs().max()) if len(used) else float("nan")
