"""Decision rules that turn class probabilities into one class, fitted on validation only.

Every rule is ``decide(p) = argmax_c p_c * w_c`` for a vector of positive class weights
``w`` (scaling a column is the same as moving that class's threshold):

* ``argmax``: ``w_c = 1``.
* ``prior_correction``: ``w_c = pi_target_c / pi_train_c`` where ``pi_train`` is the
  training class balance and ``pi_target`` the balance to decide for (uniform by default,
  the Bayes rule for balanced accuracy). The adjusted probabilities
  ``p'_c = p_c w_c / sum_j p_j w_j`` are what the rule reports.
* ``class_weights`` (per-class thresholds): ``w`` found by coordinate ascent on a log-spaced
  grid to maximise balanced accuracy on the validation split.

:func:`choose_decision_rule` scores each candidate on validation (the fitted rule by
cross-fitting over validation lesions, so its score is not its own training score), keeps
the best, and chooses the melanoma threshold ``p_mel >= t`` for a target sensitivity on the
same split. Nothing here ever sees the test split.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from sklearn.model_selection import GroupKFold

from skin_lesion_classifier.constants import CLASSES, MELANOMA_INDEX
from skin_lesion_classifier.evaluation.clinical import threshold_for_sensitivity
from skin_lesion_classifier.evaluation.metrics import (
    balanced_accuracy,
    check_labels,
    check_probabilities,
)

logger = logging.getLogger(__name__)

RULES = ("argmax", "prior_correction", "class_weights")


@dataclass
class DecisionRule:
    """A fitted decision rule: ``decide(p) = argmax_c p_c * class_weights_c``, plus the
    melanoma flag ``p_mel >= melanoma_threshold`` (on the unadjusted probabilities)."""

    name: str
    class_weights: np.ndarray
    melanoma_threshold: float | None = None
    classes: tuple[str, ...] = CLASSES
    details: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in RULES:
            raise ValueError(
                f"unknown decision rule {self.name!r}; choose from {RULES}"
            )
        w = np.asarray(self.class_weights, dtype=np.float64)
        if (
            w.shape != (len(self.classes),)
            or not np.all(np.isfinite(w))
            or np.any(w <= 0)
        ):
            raise ValueError(
                f"class_weights must be {len(self.classes)} positive finite numbers, got {w}"
            )
        self.class_weights = w

    def adjust(self, y_prob) -> np.ndarray:
        """Re-weighted, renormalised probabilities ``p'_c = p_c w_c / sum_j p_j w_j``."""
        p = (
            check_probabilities(y_prob, n_classes=len(self.classes))
            * self.class_weights
        )
        s = p.sum(axis=1, keepdims=True)
        return np.divide(p, s, out=np.full_like(p, 1.0 / p.shape[1]), where=s > 0)

    def predict(self, y_prob) -> np.ndarray:
        """Class decisions ``argmax_c p_c w_c``."""
        p = check_probabilities(y_prob, n_classes=len(self.classes))
        return np.argmax(p * self.class_weights, axis=1)

    def flag_melanoma(self, y_prob, melanoma_index: int = MELANOMA_INDEX) -> np.ndarray:
        """``p_mel >= melanoma_threshold`` (raises when no threshold was chosen)."""
        if self.melanoma_threshold is None:
            raise ValueError("this decision rule has no melanoma threshold")
        p = check_probabilities(y_prob, n_classes=len(self.classes))
        return p[:, melanoma_index] >= self.melanoma_threshold

    def to_dict(self) -> dict:
        """JSON-ready form (what the ``decision_rule`` catalog entry holds)."""
        return {
            "rule": self.name,
            "classes": list(self.classes),
            "class_weights": {
                c: float(w) for c, w in zip(self.classes, self.class_weights)
            },
            "melanoma_threshold": (
                None
                if self.melanoma_threshold is None
                else float(self.melanoma_threshold)
            ),
            **self.details,
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> DecisionRule:
        """Rebuild from :meth:`to_dict` output; raises naming a missing or bad key."""
        for key in ("rule", "class_weights"):
            if key not in data:
                raise ValueError(f"decision rule is missing the key {key!r}")
        classes = tuple(data.get("classes", CLASSES))
        weights = data["class_weights"]
        if isinstance(weights, Mapping):
            missing = [c for c in classes if c not in weights]
            if missing:
                raise ValueError(f"decision rule class_weights lack classes {missing}")
            weights = [weights[c] for c in classes]
        details = {
            k: v
            for k, v in data.items()
            if k not in ("rule", "classes", "class_weights", "melanoma_threshold")
        }
        return cls(
            name=data["rule"],
            class_weights=np.asarray(weights, dtype=np.float64),
            melanoma_threshold=data.get("melanoma_threshold"),
            classes=classes,
            details=details,
        )


def class_prior(counts, classes: Sequence[str] = CLASSES) -> np.ndarray:
    """Class frequencies ``pi_c = n_c / sum_j n_j`` from counts given as a mapping
    ``{class: n}`` or a sequence in ``classes`` order. Every class needs ``n_c > 0``."""
    if isinstance(counts, Mapping):
        missing = [c for c in classes if c not in counts]
        if missing:
            raise ValueError(f"class counts lack classes {missing}")
        counts = [counts[c] for c in classes]
    n = np.asarray(counts, dtype=np.float64)
    if n.shape != (len(classes),):
        raise ValueError(f"expected {len(classes)} class counts, got {n.shape}")
    zero = [classes[i] for i in np.flatnonzero(~(n > 0))]
    if zero:
        raise ValueError(f"class counts must be positive; zero or invalid for {zero}")
    return n / n.sum()


def prior_correction_weights(train_counts, target_prior="uniform", classes=CLASSES):
    """``w_c = pi_target_c / pi_train_c``; ``target_prior`` is ``"uniform"`` or counts /
    frequencies like ``train_counts``."""
    train = class_prior(train_counts, classes)
    if isinstance(target_prior, str):
        if target_prior != "uniform":
            raise ValueError(
                f"target_prior must be 'uniform' or class counts, got {target_prior!r}"
            )
        target = np.full(len(classes), 1.0 / len(classes))
    else:
        target = class_prior(target_prior, classes)
    return target / train


def _ba_for_predictions(y: np.ndarray, preds: np.ndarray, k: int) -> np.ndarray:
    """Balanced accuracy of each row of ``preds`` ``(G, n)`` against ``y`` (vectorised)."""
    present = np.bincount(y, minlength=k)
    hits = (preds == y[None, :]).astype(np.float64)
    per_class = np.stack([hits[:, y == c].sum(axis=1) for c in range(k)], axis=1)
    mask = present > 0
    return (per_class[:, mask] / present[mask]).mean(axis=1)


def fit_class_weights(
    y_true,
    y_prob,
    grid: Sequence[float] | None = None,
    n_sweeps: int = 3,
    start=None,
) -> np.ndarray:
    """Per-class weights maximising balanced accuracy of ``argmax_c p_c w_c`` on the data
    given (call it with validation data only).

    Coordinate ascent: for each class in turn, try every ``w_c`` in ``start_c * grid``
    (default ``2 ** linspace(-4, 4, 33)``) with the others fixed and keep the best (ties
    keep the current value); repeat ``n_sweeps`` times. Weights are normalised to a
    geometric mean of 1.
    """
    p = check_probabilities(y_prob)
    k = p.shape[1]
    y = check_labels(y_true, k)
    if y.size != p.shape[0]:
        raise ValueError(f"y_true has {y.size} rows but y_prob has {p.shape[0]}")
    grid = np.asarray(grid if grid is not None else 2.0 ** np.linspace(-4, 4, 33))
    w = np.ones(k) if start is None else np.asarray(start, dtype=np.float64).copy()
    if not y.size:
        return w
    best = _ba_for_predictions(y, np.argmax(p * w, axis=1)[None], k)[0]
    for _ in range(int(n_sweeps)):
        improved = False
        for c in range(k):
            others = p * w
            others[:, c] = -np.inf
            best_other = others.max(axis=1)
            arg_other = others.argmax(axis=1)
            cand = w[c] * grid  # (G,)
            take_c = p[None, :, c] * cand[:, None] > best_other[None, :]
            preds = np.where(take_c, c, arg_other[None, :])
            scores = _ba_for_predictions(y, preds, k)
            j = int(np.argmax(scores))
            if scores[j] > best + 1e-12:
                best, w[c], improved = scores[j], cand[j], True
        if not improved:
            break
    return w / np.exp(np.mean(np.log(w)))


def _cross_fitted_ba(
    y: np.ndarray, p: np.ndarray, groups: np.ndarray, n_folds: int, fit_kwargs: dict
) -> float | None:
    """Balanced accuracy of out-of-fold class-weight decisions (folds over ``groups``);
    ``None`` when there are fewer groups than folds."""
    n_groups = len(np.unique(groups))
    if n_folds < 2 or n_groups < n_folds:
        return None
    oof = np.empty_like(y)
    for fit_idx, held_idx in GroupKFold(n_splits=n_folds).split(p, y, groups):
        w = fit_class_weights(y[fit_idx], p[fit_idx], **fit_kwargs)
        oof[held_idx] = np.argmax(p[held_idx] * w, axis=1)
    return balanced_accuracy(y, oof, p.shape[1])


def choose_decision_rule(
    y_val,
    prob_val,
    train_counts,
    groups_val=None,
    *,
    candidates: Sequence[str] = RULES,
    target_prior="uniform",
    melanoma_target_sensitivity: float | None = 0.90,
    n_folds: int = 5,
    min_gain: float = 0.0,
    grid: Sequence[float] | None = None,
    n_sweeps: int = 3,
    classes: Sequence[str] = CLASSES,
) -> DecisionRule:
    """Fit and score each candidate rule on validation and return the best.

    Score = validation balanced accuracy of the rule's decisions. ``argmax`` and
    ``prior_correction`` fit nothing on validation, so they are scored in-sample;
    ``class_weights`` is scored by ``n_folds``-fold cross-fitting grouped by
    ``groups_val`` (lesion ids; fit on the other folds, decide the held-out fold) and then
    refitted on all of validation (in-sample when there are fewer lesions than folds; the
    details say so). Candidates are tried in the order given and a later one must beat
    the best so far by more than ``min_gain`` (simpler rules win ties). The melanoma
    threshold is the highest ``t`` with validation sensitivity of ``p_mel >= t`` at least
    ``melanoma_target_sensitivity`` (``None``: no threshold; also ``None`` when validation
    has no melanoma or only melanomas).
    """
    p = check_probabilities(prob_val, n_classes=len(classes))
    y = check_labels(y_val, len(classes))
    if y.size != p.shape[0]:
        raise ValueError(f"y_val has {y.size} rows but prob_val has {p.shape[0]}")
    if not y.size:
        raise ValueError("cannot choose a decision rule on an empty validation split")
    unknown = [c for c in candidates if c not in RULES]
    if unknown or not candidates:
        raise ValueError(
            f"unknown decision rule candidates {unknown}; choose from {RULES}"
        )
    groups = np.arange(y.size) if groups_val is None else np.asarray(groups_val)
    if groups.shape != y.shape:
        raise ValueError(f"groups_val has {groups.size} rows but y_val has {y.size}")
    k = len(classes)
    fit_kwargs = {"grid": grid, "n_sweeps": n_sweeps}

    scores: dict[str, dict] = {}
    weights: dict[str, np.ndarray] = {}
    for name in candidates:
        if name == "argmax":
            w = np.ones(k)
            scores[name] = {
                "val_balanced_accuracy": balanced_accuracy(y, p.argmax(1), k),
                "scored": "in-sample (nothing fitted on validation)",
            }
        elif name == "prior_correction":
            w = prior_correction_weights(train_counts, target_prior, classes)
            scores[name] = {
                "val_balanced_accuracy": balanced_accuracy(y, np.argmax(p * w, 1), k),
                "scored": "in-sample (weights from the training class balance)",
            }
        else:
            w = fit_class_weights(y, p, **fit_kwargs)
            in_sample = balanced_accuracy(y, np.argmax(p * w, 1), k)
            cross = _cross_fitted_ba(y, p, groups, n_folds, fit_kwargs)
            scores[name] = {
                "val_balanced_accuracy": in_sample if cross is None else cross,
                "val_balanced_accuracy_in_sample": in_sample,
                "scored": (
                    f"{n_folds}-fold cross-fitted over validation lesions"
                    if cross is not None
                    else f"in-sample (fewer than {n_folds} validation lesions: optimistic)"
                ),
            }
        weights[name] = w

    chosen = candidates[0]
    for name in candidates[1:]:
        if (
            scores[name]["val_balanced_accuracy"]
            > scores[chosen]["val_balanced_accuracy"] + min_gain
        ):
            chosen = name

    threshold = None
    threshold_note = "not requested"
    mel = classes.index("mel") if "mel" in classes else MELANOMA_INDEX
    if melanoma_target_sensitivity is not None:
        positive = y == mel
        if positive.any() and not positive.all():
            threshold = threshold_for_sensitivity(
                positive, p[:, mel], float(melanoma_target_sensitivity)
            )
            threshold_note = (
                f"highest p_mel threshold with validation sensitivity >= "
                f"{melanoma_target_sensitivity}"
            )
        else:
            threshold_note = (
                "validation has no melanoma or only melanomas: no threshold"
            )
            logger.warning("melanoma threshold not chosen: %s", threshold_note)

    return DecisionRule(
        name=chosen,
        class_weights=weights[chosen],
        melanoma_threshold=threshold,
        classes=tuple(classes),
        details={
            "chosen_on": "val",
            "selection_metric": "balanced_accuracy",
            "candidates": scores,
            "candidate_weights": {
                n: {c: float(v) for c, v in zip(classes, w)} for n, w in weights.items()
            },
            "melanoma_target_sensitivity": melanoma_target_sensitivity,
            "melanoma_threshold_rule": threshold_note,
            "target_prior": target_prior
            if isinstance(target_prior, str)
            else dict(zip(classes, class_prior(target_prior, classes).tolist())),
        },
    )
