"""Confidence intervals by bootstrap over lesions, not images.

HAM10000 has several images of many lesions; images of one lesion are not independent, so
the resampling unit is the lesion. A replicate draws ``G`` lesion ids with replacement from
the ``G`` lesions of the split, and every image of a drawn lesion comes along once per
draw. That is the same as giving image ``i`` the integer weight ``w_i`` = number of times
its lesion was drawn, which lets every figure be computed for all replicates at once from
a ``(B, n)`` weight matrix (:func:`lesion_bootstrap_weights`, :func:`weighted_metrics`)
instead of materialising ``B`` resampled data sets. The interval is the percentile
interval ``[q_{(1-level)/2}, q_{(1+level)/2}]`` of the replicate values (Efron & Tibshirani
1993, ch. 13); replicates where a figure is undefined (e.g. no melanoma drawn) are left out
and counted in ``n_valid``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

from skin_lesion_classifier.constants import MELANOMA_INDEX
from skin_lesion_classifier.evaluation.metrics import check_labels, check_probabilities

#: Replicates processed together (bounds memory at ``CHUNK * n`` floats).
CHUNK = 128


def lesion_bootstrap_weights(
    groups, n_boot: int, rng: np.random.Generator | int = 0
) -> np.ndarray:
    """``(n_boot, n)`` integer weights: ``W[b, i]`` = times the lesion of image ``i`` was
    drawn in replicate ``b`` (each replicate draws as many lesions as there are, with
    replacement). Images of one lesion always share a weight."""
    rng = (
        np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    )
    groups = np.asarray(groups)
    if groups.ndim != 1:
        raise ValueError(f"groups must be 1-D lesion ids, got shape {groups.shape}")
    if groups.size == 0:
        raise ValueError("cannot bootstrap an empty split")
    if any(
        g is None or (isinstance(g, float) and np.isnan(g)) for g in groups.tolist()
    ):
        raise ValueError("groups (lesion ids) contain missing values")
    _, codes = np.unique(groups, return_inverse=True)
    n_groups = int(codes.max()) + 1
    draws = rng.integers(0, n_groups, size=(int(n_boot), n_groups))
    offsets = (np.arange(int(n_boot)) * n_groups)[:, None]
    counts = np.bincount((draws + offsets).ravel(), minlength=int(n_boot) * n_groups)
    return counts.reshape(int(n_boot), n_groups)[:, codes]


def _weighted_auc(positive: np.ndarray, score: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted ROC AUC (Mann-Whitney with ties counted 1/2) for each row of ``w``:
    ``AUC = sum_{i pos, j neg} w_i w_j (1[s_i > s_j] + 0.5 * 1[s_i = s_j]) /
    (sum_pos w_i * sum_neg w_j)``; NaN where a row has no positive or no negative weight."""
    order = np.argsort(score, kind="mergesort")
    s = score[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    ws = w[:, order]
    pos = ws * positive[order]
    neg = ws * ~positive[order]
    p_u = np.add.reduceat(pos, starts, axis=1)
    n_u = np.add.reduceat(neg, starts, axis=1)
    below = np.cumsum(n_u, axis=1) - n_u
    num = (p_u * (below + 0.5 * n_u)).sum(axis=1)
    den = p_u.sum(axis=1) * n_u.sum(axis=1)
    return np.divide(num, den, out=np.full(den.shape, np.nan), where=den > 0)


def _weighted_spec_at_sens(
    positive: np.ndarray, score: np.ndarray, w: np.ndarray, target: float
) -> np.ndarray:
    """Specificity at the highest threshold with sensitivity >= ``target``, per row of
    ``w`` (the weighted version of :func:`clinical.specificity_at_sensitivity`)."""
    order = np.argsort(score, kind="mergesort")
    s = score[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    ws = w[:, order]
    p_u = np.add.reduceat(ws * positive[order], starts, axis=1)
    n_u = np.add.reduceat(ws * ~positive[order], starts, axis=1)
    p_tot, n_tot = p_u.sum(axis=1), n_u.sum(axis=1)
    # flagged at threshold u (score >= u): the tail from u upwards
    p_tail = p_tot[:, None] - (np.cumsum(p_u, axis=1) - p_u)
    n_tail = n_tot[:, None] - (np.cumsum(n_u, axis=1) - n_u)
    ok = p_tail >= float(target) * p_tot[:, None] - 1e-9
    j = ok.sum(axis=1) - 1  # ok is a prefix: the highest threshold reaching the target
    spec = 1.0 - n_tail[np.arange(len(j)), np.maximum(j, 0)] / np.where(
        n_tot > 0, n_tot, 1
    )
    return np.where((p_tot > 0) & (n_tot > 0), spec, np.nan)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.full(np.shape(den), np.nan), where=den > 0)


def weighted_metrics(
    y_true,
    y_prob,
    weights,
    *,
    y_pred=None,
    melanoma_threshold: float | None = None,
    sensitivity_targets: Sequence[float] = (0.90, 0.95),
    melanoma_index: int = MELANOMA_INDEX,
) -> dict[str, np.ndarray]:
    """Headline figures for each row of a ``(B, n)`` weight matrix (integer weights = a
    resample). With ``weights = ones`` they are the figures of the data itself.

    ``balanced_accuracy`` (mean over classes with weight of per-class weighted recall),
    ``macro_auc`` (mean of defined one-vs-rest AUCs), ``mel_auc``, and for melanoma vs rest
    at the arg-max (``*_argmax``) and at ``p_mel >= melanoma_threshold`` (``*_threshold``):
    ``sensitivity``, ``specificity``, ``nne = (TP + FP) / TP``; and
    ``mel_specificity_at_sensitivity_<t>`` for each target.
    """
    p = check_probabilities(y_prob, n_classes=np.asarray(y_prob).shape[-1])
    k = p.shape[1]
    y = check_labels(y_true, k)
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    if w.shape[1] != y.size or p.shape[0] != y.size:
        raise ValueError(
            f"y_true ({y.size}), y_prob ({p.shape[0]}) and weights ({w.shape[1]} columns) "
            "must have the same number of rows"
        )
    d = p.argmax(axis=1) if y_pred is None else check_labels(y_pred, k, "y_pred")
    onehot = np.eye(k, dtype=np.float64)[y]  # (n, K)
    class_w = w @ onehot  # (B, K)
    hit_w = w @ (onehot * (d == y)[:, None])
    recall = _ratio(hit_w, class_w)
    out: dict[str, np.ndarray] = {}
    with warnings.catch_warnings():  # all-NaN rows (no class drawn) stay NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        out["balanced_accuracy"] = (
            np.nanmean(np.where(class_w > 0, recall, np.nan), axis=1)
            if recall.size
            else np.array([])
        )
    aucs = np.stack([_weighted_auc(y == c, p[:, c], w) for c in range(k)], axis=1)
    all_nan = np.all(np.isnan(aucs), axis=1)
    out["macro_auc"] = np.where(
        all_nan, np.nan, np.nanmean(np.where(all_nan[:, None], 0.0, aucs), axis=1)
    )
    positive = y == melanoma_index
    out["mel_auc"] = aucs[:, melanoma_index]

    def _op(flagged: np.ndarray, tag: str) -> None:
        tp = w @ (positive & flagged)
        fp = w @ (~positive & flagged)
        fn = w @ (positive & ~flagged)
        tn = w @ (~positive & ~flagged)
        out[f"mel_sensitivity_{tag}"] = _ratio(tp, tp + fn)
        out[f"mel_specificity_{tag}"] = _ratio(tn, tn + fp)
        out[f"mel_nne_{tag}"] = _ratio(tp + fp, tp)

    _op(d == melanoma_index, "argmax")
    if melanoma_threshold is not None:
        _op(p[:, melanoma_index] >= float(melanoma_threshold), "threshold")
    for t in sensitivity_targets:
        out[f"mel_specificity_at_sensitivity_{t:.2f}"] = _weighted_spec_at_sens(
            positive, p[:, melanoma_index], w, t
        )
    return out


def bootstrap_confidence_intervals(
    y_true,
    y_prob,
    groups,
    *,
    y_pred=None,
    melanoma_threshold: float | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    sensitivity_targets: Sequence[float] = (0.90, 0.95),
) -> dict[str, dict[str, float]]:
    """Point estimate and lesion-bootstrap percentile interval of each figure of
    :func:`weighted_metrics`: ``{name: {estimate, low, high, level, n_boot, n_valid}}``.

    ``groups`` are the lesion ids of the rows; ``seed`` makes the interval reproducible.
    """
    if not 0.0 < float(level) < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if int(n_boot) < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    y = check_labels(y_true, np.asarray(y_prob).shape[-1])
    groups = np.asarray(groups)
    if groups.shape != y.shape:
        raise ValueError(f"groups has {groups.size} rows but y_true has {y.size}")
    kwargs = {
        "y_pred": y_pred,
        "melanoma_threshold": melanoma_threshold,
        "sensitivity_targets": sensitivity_targets,
    }
    point = weighted_metrics(y, y_prob, np.ones((1, y.size)), **kwargs)
    rng = np.random.default_rng(seed)
    reps: dict[str, list[np.ndarray]] = {k: [] for k in point}
    for start in range(0, int(n_boot), CHUNK):
        b = min(CHUNK, int(n_boot) - start)
        w = lesion_bootstrap_weights(groups, b, rng)
        for name, values in weighted_metrics(y, y_prob, w, **kwargs).items():
            reps[name].append(values)
    lo_q, hi_q = 100 * (1 - float(level)) / 2, 100 * (1 + float(level)) / 2
    out: dict[str, dict[str, float]] = {}
    for name, est in point.items():
        values = np.concatenate(reps[name])
        valid = values[np.isfinite(values)]
        out[name] = {
            "estimate": float(est[0]),
            "low": float(np.percentile(valid, lo_q)) if valid.size else float("nan"),
            "high": float(np.percentile(valid, hi_q)) if valid.size else float("nan"),
            "level": float(level),
            "n_boot": int(n_boot),
            "n_valid": int(valid.size),
        }
    return out
