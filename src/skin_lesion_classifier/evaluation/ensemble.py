"""Ensemble weights and model comparison: weighted averages of members' class
probabilities, weights chosen on validation only.

**Weights.** :func:`fit_weights` picks ``w`` on the probability simplex
(``w_m >= 0``, ``sum_m w_m = 1``) for ``p_ens = sum_m w_m p_m`` from the members'
*validation* probabilities:

* ``objective="log_loss"`` (default) minimises ``-1/n sum_i log(sum_m w_m p_m[i, y_i])``,
  a convex function of ``w``, with SciPy's SLSQP (so the optimum is global);
* ``objective="balanced_accuracy"`` searches a simplex grid of step ``grid_step`` for the
  highest validation balanced accuracy of the arg-max, ties broken by log loss, then by
  closeness to uniform weights.

The ensemble model (:class:`~skin_lesion_classifier.models.ensemble.EnsembleModel`) and
its checkpoint (``models.ensemble_checkpoint.build_ensemble_checkpoint``) live in
``models/``; this module chooses the weights and compares the models on the same images.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy.optimize import minimize

from skin_lesion_classifier.evaluation.evaluate import (
    predictions_frame,
    probabilities_of,
)
from skin_lesion_classifier.evaluation.metrics import (
    balanced_accuracy,
    check_labels,
    check_probabilities,
    log_loss,
)
from skin_lesion_classifier.models.ensemble import check_weights

logger = logging.getLogger(__name__)

OBJECTIVES = ("log_loss", "balanced_accuracy")


# --------------------------------------------------------------------------- weights
def _stack(member_probs: Sequence[np.ndarray]) -> np.ndarray:
    if len(member_probs) < 1:
        raise ValueError("an ensemble needs at least one member")
    k = np.asarray(member_probs[0]).shape[-1]
    arrays = [check_probabilities(p, n_classes=k) for p in member_probs]
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"members' probabilities differ in shape: {sorted(shapes)}")
    return np.stack(arrays)


def average_probabilities(member_probs: Sequence[np.ndarray], weights) -> np.ndarray:
    """``p_ens[i, c] = sum_m w_m p_m[i, c]`` with ``w`` renormalised to sum to one."""
    p = _stack(member_probs)
    w = check_weights(weights, len(p))
    return np.tensordot(w, p, axes=1)


def simplex_grid(n_members: int, step: float) -> np.ndarray:
    """Every weight vector with entries in ``{0, step, 2 step, ..., 1}`` summing to one."""
    k = round(1.0 / float(step))
    if k < 1 or not np.isclose(k * float(step), 1.0):
        raise ValueError(f"grid_step must divide 1 (e.g. 0.1, 0.05), got {step}")
    points = [
        c for c in itertools.product(range(k + 1), repeat=n_members - 1) if sum(c) <= k
    ]
    return np.array([[*c, k - sum(c)] for c in points], dtype=np.float64) / k


def _mixture_log_loss(w: np.ndarray, p_true: np.ndarray) -> float:
    return float(-np.mean(np.log(np.clip(p_true.T @ w, 1e-15, None))))


def fit_weights(
    y_val,
    member_probs: Sequence[np.ndarray],
    objective: str = "log_loss",
    grid_step: float = 0.05,
    names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Ensemble weights chosen on **validation** predictions (see the module docstring).

    Returns ``{"weights", "objective", "names", "val": {"log_loss", "balanced_accuracy"},
    "val_uniform": {...}, "val_members": {name: {...}}}`` so the report can show the
    chosen mixture beside uniform averaging and each member alone.
    """
    if objective not in OBJECTIVES:
        raise ValueError(
            f"unknown ensemble objective {objective!r}; choose from {OBJECTIVES}"
        )
    p = _stack(member_probs)
    m, n, k = p.shape
    y = check_labels(y_val, k)
    if y.size != n:
        raise ValueError(f"y_val has {y.size} rows but the members predicted {n}")
    if n == 0:
        raise ValueError("cannot choose ensemble weights on an empty validation set")
    names = list(names) if names is not None else [f"member_{i}" for i in range(m)]
    if len(names) != m:
        raise ValueError(f"{len(names)} names for {m} members")

    def scores(w: np.ndarray) -> dict[str, float]:
        q = np.tensordot(w, p, axes=1)
        return {
            "log_loss": log_loss(y, q, k),
            "balanced_accuracy": balanced_accuracy(y, q.argmax(axis=1), k),
        }

    uniform = np.full(m, 1.0 / m)
    if m == 1:
        w = uniform
    elif objective == "log_loss":
        p_true = p[:, np.arange(n), y]  # (m, n)
        res = minimize(
            _mixture_log_loss,
            uniform,
            args=(p_true,),
            method="SLSQP",
            bounds=[(0.0, 1.0)] * m,
            constraints=[{"type": "eq", "fun": lambda v: v.sum() - 1.0}],
            options={"ftol": 1e-10, "maxiter": 500},
        )
        w = np.clip(res.x, 0.0, None)
        w = w / w.sum() if w.sum() > 0 else uniform
        if _mixture_log_loss(w, p_true) > _mixture_log_loss(uniform, p_true):
            w = uniform  # never worse than plain averaging on validation
    else:
        grid = simplex_grid(m, grid_step)
        best, best_key = uniform, None
        for cand in grid:
            s = scores(cand)
            key = (
                -s["balanced_accuracy"],
                s["log_loss"],
                float(np.abs(cand - uniform).sum()),
            )
            if best_key is None or key < best_key:
                best, best_key = cand, key
        w = best
    return {
        "weights": [float(v) for v in w],
        "objective": objective,
        "names": names,
        "val": scores(w),
        "val_uniform": scores(uniform),
        "val_members": {names[i]: scores(np.eye(m)[i]) for i in range(m)},
    }


def ensemble_predictions(
    member_predictions: Sequence[pd.DataFrame], weights
) -> pd.DataFrame:
    """A ``predictions`` frame averaging members' frames of the same images.

    Raises when the frames do not list the same images in the same order with the same
    labels (a silent misalignment would average different pictures)."""
    if not member_predictions:
        raise ValueError("no member predictions to average")
    first = member_predictions[0]
    for i, frame in enumerate(member_predictions[1:], start=1):
        if len(frame) != len(first) or not np.array_equal(
            frame["image_id"].to_numpy(), first["image_id"].to_numpy()
        ):
            raise ValueError(
                f"member {i}'s predictions list other images than member 0's "
                f"({len(frame)} vs {len(first)} rows); predict the same split with each"
            )
        if not np.array_equal(frame["label"].to_numpy(), first["label"].to_numpy()):
            raise ValueError(f"member {i}'s labels differ from member 0's")
    p = average_probabilities(
        [probabilities_of(f) for f in member_predictions], weights
    )
    return predictions_frame(first, p)


# --------------------------------------------------------------------------- comparison
#: Figures of :func:`compare_models` (keys of ``bootstrap.weighted_metrics``).
COMPARE_METRICS = ("balanced_accuracy", "macro_auc", "mel_auc")


def compare_models(
    frames: Mapping[str, pd.DataFrame],
    reference: str,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    metrics: Sequence[str] = COMPARE_METRICS,
) -> pd.DataFrame:
    """Each model's figures on the same images with lesion-bootstrap intervals, and its
    difference from ``reference`` with a **paired** interval (both models scored on the
    same resampled lesions in every replicate).

    ``frames`` maps model names to ``predictions`` frames of the same images (any order;
    aligned by ``image_id``). One row per model and metric: ``model, metric, estimate,
    low, high, diff, diff_low, diff_high, n_boot`` (percentile intervals at ``level``).
    """
    from skin_lesion_classifier.evaluation.bootstrap import (
        lesion_bootstrap_weights,
        weighted_metrics,
    )

    if reference not in frames:
        raise ValueError(f"reference model {reference!r} is not among {sorted(frames)}")
    ref = frames[reference].sort_values("image_id").reset_index(drop=True)
    y = ref["label"].to_numpy()
    groups = ref["lesion_id"].to_numpy()
    aligned = {}
    for name, frame in frames.items():
        f = frame.sort_values("image_id").reset_index(drop=True)
        if len(f) != len(ref) or not np.array_equal(
            f["image_id"].to_numpy(), ref["image_id"].to_numpy()
        ):
            raise ValueError(
                f"model {name!r} was scored on other images than {reference!r}"
            )
        aligned[name] = probabilities_of(f)
    w = np.vstack(
        [np.ones((1, len(y))), lesion_bootstrap_weights(groups, n_boot, seed)]
    )
    values = {
        name: weighted_metrics(y, p, w, sensitivity_targets=())
        for name, p in aligned.items()
    }
    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2

    def interval(v: np.ndarray) -> tuple[float, float]:
        v = v[np.isfinite(v)]
        return (
            (float(np.percentile(v, lo)), float(np.percentile(v, hi)))
            if v.size
            else (float("nan"), float("nan"))
        )

    rows = []
    for name in frames:
        for m in metrics:
            v, r = values[name][m], values[reference][m]
            low, high = interval(v[1:])
            dlow, dhigh = interval(v[1:] - r[1:])
            rows.append(
                {
                    "model": name,
                    "metric": m,
                    "estimate": float(v[0]),
                    "low": low,
                    "high": high,
                    "diff": float(v[0] - r[0]),
                    "diff_low": dlow,
                    "diff_high": dhigh,
                    "n_boot": int(n_boot),
                }
            )
    return pd.DataFrame(rows)
