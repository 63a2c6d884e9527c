"""Multi-class classification metrics, as plain functions in the style of scikit-learn.

Every function takes ``y_true`` (``(n,)`` integer labels, indices into
:data:`~skin_lesion_classifier.constants.CLASSES`) and either ``y_pred`` (``(n,)`` integer
decisions) or ``y_prob`` (``(n, K)`` class probabilities, rows summing to 1). Notation in
the docstrings: for class ``c``, ``TP_c``, ``FP_c``, ``FN_c``, ``TN_c`` are the one-vs-rest
counts of the confusion matrix ``C`` (rows = truth, columns = decision), ``n_c = TP_c + FN_c``
is the support and ``K`` the number of classes.

The balanced accuracy and AUC follow the ISIC 2018 challenge (task 3): balanced accuracy is
the mean per-class recall of the arg-max decision ("balanced multi-class accuracy"), and the
AUC of a class is the one-vs-rest ROC AUC of its probability column. A class absent from
``y_true`` has no recall and no AUC: it is reported as NaN and left out of the means (the
result says how many classes the mean is over).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
from sklearn import metrics as skm

from skin_lesion_classifier.constants import CLASSES

#: Probabilities may deviate from summing to 1 by this much before they are rejected.
PROB_SUM_TOLERANCE = 1e-3


def check_labels(
    y_true, n_classes: int = len(CLASSES), name: str = "y_true"
) -> np.ndarray:
    """``y_true`` as a 1-D int array; raise ``ValueError`` naming the culprit otherwise."""
    y = np.asarray(y_true)
    if y.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {y.shape}")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        if not np.all(np.isfinite(y.astype(float))) or np.any(y != np.round(y)):
            bad = np.flatnonzero(~np.isfinite(y.astype(float)) | (y != np.round(y)))[:5]
            raise ValueError(
                f"{name} must hold integer class indices; bad rows {bad.tolist()}"
            )
    y = y.astype(np.int64)
    out_of_range = np.flatnonzero((y < 0) | (y >= n_classes))
    if out_of_range.size:
        raise ValueError(
            f"{name} has labels outside 0..{n_classes - 1} at rows "
            f"{out_of_range[:5].tolist()} (values {y[out_of_range[:5]].tolist()})"
        )
    return y


def check_probabilities(
    y_prob, n_rows: int | None = None, n_classes: int = len(CLASSES)
) -> np.ndarray:
    """``y_prob`` as a float ``(n, K)`` array of finite, non-negative rows summing to 1."""
    p = np.asarray(y_prob, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != n_classes:
        raise ValueError(f"y_prob must have shape (n, {n_classes}), got {p.shape}")
    if n_rows is not None and p.shape[0] != n_rows:
        raise ValueError(f"y_prob has {p.shape[0]} rows but y_true has {n_rows}")
    bad = np.flatnonzero(~np.all(np.isfinite(p), axis=1))
    if bad.size:
        raise ValueError(
            f"y_prob has NaN or infinite values in rows {bad[:5].tolist()}"
        )
    bad = np.flatnonzero(np.any(p < 0, axis=1))
    if bad.size:
        raise ValueError(f"y_prob has negative values in rows {bad[:5].tolist()}")
    bad = np.flatnonzero(np.abs(p.sum(axis=1) - 1.0) > PROB_SUM_TOLERANCE)
    if bad.size:
        raise ValueError(
            f"y_prob rows must sum to 1 (softmax output); rows {bad[:5].tolist()} sum to "
            f"{np.round(p[bad[:5]].sum(axis=1), 4).tolist()}"
        )
    return p


def _check_pair(y_true, y_pred, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    y = check_labels(y_true, n_classes)
    d = check_labels(y_pred, n_classes, name="y_pred")
    if y.shape != d.shape:
        raise ValueError(f"y_true has {y.size} rows but y_pred has {d.size}")
    return y, d


def confusion_matrix(y_true, y_pred, n_classes: int = len(CLASSES)) -> np.ndarray:
    """``(K, K)`` counts ``C[i, j]`` = number of samples of true class ``i`` decided as ``j``.

    Every class gets a row and a column, present or not (``labels = 0..K-1``).
    """
    y, d = _check_pair(y_true, y_pred, n_classes)
    return skm.confusion_matrix(y, d, labels=np.arange(n_classes))


def one_vs_rest_counts(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class ``TP, FP, FN, TN`` from a confusion matrix.

    ``TP_c = C[c, c]``, ``FP_c = sum_i C[i, c] - TP_c``, ``FN_c = sum_j C[c, j] - TP_c``,
    ``TN_c = N - TP_c - FP_c - FN_c``.
    """
    cm = np.asarray(cm, dtype=np.int64)
    tp = np.diag(cm)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    tn = cm.sum() - tp - fp - fn
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn}


def _safe_ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def accuracy(y_true, y_pred, n_classes: int = len(CLASSES)) -> float:
    """Fraction of correct decisions: ``sum_c TP_c / N``."""
    y, d = _check_pair(y_true, y_pred, n_classes)
    return float(skm.accuracy_score(y, d)) if y.size else float("nan")


def recall_per_class(y_true, y_pred, n_classes: int = len(CLASSES)) -> np.ndarray:
    """Per-class recall (sensitivity) ``TP_c / (TP_c + FN_c)``; NaN for a class absent
    from ``y_true``."""
    c = one_vs_rest_counts(confusion_matrix(y_true, y_pred, n_classes))
    return _safe_ratio(c["tp"], c["tp"] + c["fn"])


def specificity_per_class(y_true, y_pred, n_classes: int = len(CLASSES)) -> np.ndarray:
    """Per-class specificity ``TN_c / (TN_c + FP_c)``; NaN when every sample is of class
    ``c`` (no negatives)."""
    c = one_vs_rest_counts(confusion_matrix(y_true, y_pred, n_classes))
    return _safe_ratio(c["tn"], c["tn"] + c["fp"])


def balanced_accuracy(y_true, y_pred, n_classes: int = len(CLASSES)) -> float:
    """ISIC balanced multi-class accuracy: the mean per-class recall over the classes
    present in ``y_true``.

    ``BA = (1 / |P|) * sum_{c in P} TP_c / n_c`` with ``P = {c : n_c > 0}``. Equal to
    ``sklearn.metrics.balanced_accuracy_score`` (``adjusted=False``). A model that decides
    one class for everything scores ``1 / |P|``.
    """
    r = recall_per_class(y_true, y_pred, n_classes)
    return float(np.nanmean(r)) if np.any(np.isfinite(r)) else float("nan")


def average_sensitivity(y_true, y_pred, n_classes: int = len(CLASSES)) -> float:
    """Mean per-class sensitivity over present classes (equals :func:`balanced_accuracy`):
    ``(1 / |P|) * sum_{c in P} TP_c / (TP_c + FN_c)``."""
    return balanced_accuracy(y_true, y_pred, n_classes)


def average_specificity(y_true, y_pred, n_classes: int = len(CLASSES)) -> float:
    """Mean per-class specificity over classes that have negatives:
    ``(1 / |Q|) * sum_{c in Q} TN_c / (TN_c + FP_c)``, ``Q = {c : N - n_c > 0}``."""
    s = specificity_per_class(y_true, y_pred, n_classes)
    return float(np.nanmean(s)) if np.any(np.isfinite(s)) else float("nan")


def roc_auc_per_class(y_true, y_prob, n_classes: int = len(CLASSES)) -> np.ndarray:
    """One-vs-rest ROC AUC of each class's probability column.

    ``AUC_c = P(s_i > s_j) + 0.5 * P(s_i = s_j)`` for a random positive ``i`` (true class
    ``c``) and negative ``j``, with ``s = y_prob[:, c]`` (the area under the ROC curve,
    ``sklearn.metrics.roc_auc_score`` on ``y_true == c``). NaN for a class with no positive
    or no negative sample.
    """
    y = check_labels(y_true, n_classes)
    p = check_probabilities(y_prob, y.size, n_classes)
    out = np.full(n_classes, np.nan)
    for c in range(n_classes):
        pos = y == c
        if 0 < pos.sum() < y.size:
            out[c] = skm.roc_auc_score(pos, p[:, c])
    return out


def macro_roc_auc(y_true, y_prob, n_classes: int = len(CLASSES)) -> float:
    """Macro one-vs-rest AUC: ``(1 / |P|) * sum_{c in P} AUC_c`` over the classes whose AUC
    is defined (present and not the only class). Equals
    ``sklearn.metrics.roc_auc_score(y_true, y_prob, multi_class="ovr", average="macro")``
    when every class is present; NaN when no class's AUC is defined."""
    a = roc_auc_per_class(y_true, y_prob, n_classes)
    return float(np.nanmean(a)) if np.any(np.isfinite(a)) else float("nan")


def log_loss(y_true, y_prob, n_classes: int = len(CLASSES)) -> float:
    """Mean negative log-likelihood of the true class:
    ``-(1 / N) * sum_i log(max(p_{i, y_i}, eps))`` with ``eps`` the float64 machine epsilon
    (``sklearn.metrics.log_loss`` with ``labels = 0..K-1``)."""
    y = check_labels(y_true, n_classes)
    p = check_probabilities(y_prob, y.size, n_classes)
    if not y.size:
        return float("nan")
    p = p / p.sum(axis=1, keepdims=True)
    return float(skm.log_loss(y, p, labels=np.arange(n_classes)))


def per_class_table(
    y_true,
    y_pred,
    y_prob=None,
    classes: Sequence[str] = CLASSES,
) -> pd.DataFrame:
    """One row per class: ``support, precision, recall, f1, specificity`` (and ``auc`` with
    ``y_prob``).

    ``precision_c = TP_c / (TP_c + FP_c)`` (0 when nothing is decided as ``c``, as
    scikit-learn's ``zero_division=0``), ``recall_c = TP_c / n_c`` (NaN when ``n_c = 0``),
    ``F1_c = 2 TP_c / (2 TP_c + FP_c + FN_c)`` (0 when the denominator is 0),
    ``specificity_c = TN_c / (TN_c + FP_c)``.
    """
    k = len(classes)
    y, d = _check_pair(y_true, y_pred, k)
    cm = confusion_matrix(y, d, k)
    c = one_vs_rest_counts(cm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prec, _, f1, support = skm.precision_recall_fscore_support(
            y, d, labels=np.arange(k), zero_division=0
        )
    table = pd.DataFrame(
        {
            "class": list(classes),
            "support": support.astype(int),
            "precision": prec,
            "recall": _safe_ratio(c["tp"], c["tp"] + c["fn"]),
            "f1": f1,
            "specificity": _safe_ratio(c["tn"], c["tn"] + c["fp"]),
            "tp": c["tp"],
            "fp": c["fp"],
            "fn": c["fn"],
            "tn": c["tn"],
        }
    )
    if y_prob is not None:
        table["auc"] = roc_auc_per_class(y, y_prob, k)
    return table


def classification_metrics(
    y_true, y_prob, y_pred=None, classes: Sequence[str] = CLASSES
) -> dict:
    """Every multi-class figure of one split as a JSON-ready dict.

    ``y_pred`` defaults to the arg-max of ``y_prob``. Keys: ``n``, ``accuracy``,
    ``balanced_accuracy``, ``average_sensitivity``, ``average_specificity``,
    ``macro_auc``, ``auc_classes_defined`` (how many classes the macro AUC is over),
    ``absent_classes`` (classes with no sample: their recall/AUC are NaN), ``log_loss``,
    ``per_class`` (list of dicts, see :func:`per_class_table`) and ``confusion_matrix``.
    """
    k = len(classes)
    y = check_labels(y_true, k)
    p = check_probabilities(y_prob, y.size, k)
    d = np.argmax(p, axis=1) if y_pred is None else check_labels(y_pred, k, "y_pred")
    table = per_class_table(y, d, p, classes)
    auc = table["auc"].to_numpy()
    return {
        "n": int(y.size),
        "accuracy": float(skm.accuracy_score(y, d)) if y.size else float("nan"),
        "balanced_accuracy": balanced_accuracy(y, d, k),
        "average_sensitivity": average_sensitivity(y, d, k),
        "average_specificity": average_specificity(y, d, k),
        "macro_auc": float(np.nanmean(auc))
        if np.any(np.isfinite(auc))
        else float("nan"),
        "auc_classes_defined": int(np.isfinite(auc).sum()),
        "absent_classes": [classes[i] for i in range(k) if not np.any(y == i)],
        "log_loss": log_loss(y, p, k),
        "per_class": table.to_dict(orient="records"),
        "confusion_matrix": confusion_matrix(y, d, k).tolist(),
    }


def f1_vs_training_size(train_counts, f1) -> dict[str, float]:
    """Least-squares fit ``F1_c = a + b * log10(n_train_c)`` over classes with a finite
    F1 and ``n_train_c > 0``, and its coefficient of determination
    ``R^2 = 1 - sum_c (F1_c - fit_c)^2 / sum_c (F1_c - mean F1)^2``
    (``sklearn.metrics.r2_score``). NaN when fewer than 3 classes qualify or all
    training sizes are equal."""
    n = np.asarray(train_counts, dtype=np.float64)
    f = np.asarray(f1, dtype=np.float64)
    if n.shape != f.shape:
        raise ValueError(f"train_counts has shape {n.shape} but f1 has {f.shape}")
    ok = np.isfinite(f) & (n > 0)
    nan = {"intercept": float("nan"), "slope": float("nan"), "r2": float("nan")}
    if ok.sum() < 3 or np.ptp(np.log10(n[ok])) == 0:
        return {**nan, "n_classes": int(ok.sum())}
    x = np.log10(n[ok])
    slope, intercept = np.polyfit(x, f[ok], 1)
    r2 = skm.r2_score(f[ok], intercept + slope * x)
    return {
        "intercept": float(intercept),
        "slope": float(slope),
        "r2": float(r2),
        "n_classes": int(ok.sum()),
    }
