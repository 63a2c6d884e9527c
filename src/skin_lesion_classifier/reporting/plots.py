"""Evaluation figures as ``matplotlib.figure.Figure`` objects (no pyplot state, no display).

Each function takes the arrays or tables the metrics functions produce and returns one
figure; saving is the caller's business (the reporting pipeline saves them through
``matplotlib.MatplotlibWriter`` catalog entries). scikit-learn's display classes draw the
confusion matrices and ROC curves.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sklearn.metrics import ConfusionMatrixDisplay, RocCurveDisplay

from skin_lesion_classifier.constants import CLASSES, MELANOMA_INDEX
from skin_lesion_classifier.evaluation.metrics import check_labels, check_probabilities

#: Columns of ``training_history`` drawn by :func:`training_curves`, per panel.
HISTORY_PANELS = (
    ("Loss", ("train_loss", "val_loss"), False),
    ("Validation balanced accuracy", ("val_balanced_accuracy",), False),
    ("Validation macro AUC", ("val_macro_auc",), False),
    ("Learning rate", ("lr",), True),
)


def training_curves(history: pd.DataFrame) -> Figure:
    """Four panels against ``epoch``: train/val loss, validation balanced accuracy,
    validation macro AUC and the learning rate (log scale). A panel whose columns are
    missing says so instead of failing; a history without ``epoch`` is an error."""
    if "epoch" not in history.columns:
        raise ValueError(
            f"training history needs an 'epoch' column; got {list(history.columns)}"
        )
    fig = Figure(figsize=(11, 7), layout="constrained")
    axes = fig.subplots(2, 2).ravel()
    for ax, (title, cols, log) in zip(axes, HISTORY_PANELS):
        present = [c for c in cols if c in history.columns]
        for c in present:
            ax.plot(history["epoch"], history[c], marker="o", ms=3, label=c)
        if not present:
            ax.text(
                0.5,
                0.5,
                f"no {', '.join(cols)} in the history",
                ha="center",
                va="center",
                transform=ax.transAxes,
            )
        if log and present and (history[present[0]] > 0).all():
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if len(present) > 1:
            ax.legend()
    fig.suptitle("Training curves")
    return fig


def per_class_bars(
    per_class: pd.DataFrame, title: str = "Per-class performance"
) -> Figure:
    """Grouped bars of precision, recall, F1 and specificity per class (the rows of
    :func:`~skin_lesion_classifier.evaluation.metrics.per_class_table`), support in the
    tick labels."""
    needed = {"class", "support", "precision", "recall", "f1", "specificity"}
    missing = needed - set(per_class.columns)
    if missing:
        raise ValueError(f"per-class table lacks columns {sorted(missing)}")
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(per_class))
    cols = ("precision", "recall", "f1", "specificity")
    width = 0.8 / len(cols)
    for i, c in enumerate(cols):
        ax.bar(
            x + (i - (len(cols) - 1) / 2) * width,
            per_class[c].fillna(0.0),
            width,
            label=c,
        )
    ax.set_xticks(
        x, [f"{c}\n(n={n})" for c, n in zip(per_class["class"], per_class["support"])]
    )
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(ncols=len(cols), loc="lower right")
    ax.set_title(title)
    return fig


def confusion_matrices(
    cm, classes: Sequence[str] = CLASSES, title: str = "Confusion matrix"
) -> Figure:
    """Counts (left) and row-normalised rates (right: each row is the recall profile of a
    true class; rows of absent classes are 0)."""
    cm = np.asarray(cm)
    k = len(classes)
    if cm.shape != (k, k):
        raise ValueError(f"confusion matrix must be {k}x{k}, got {cm.shape}")
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0)
    fig = Figure(figsize=(13, 5.5), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    ConfusionMatrixDisplay(cm, display_labels=list(classes)).plot(
        ax=ax1, cmap="Blues", values_format="d", colorbar=True
    )
    ax1.set_title("counts")
    ConfusionMatrixDisplay(norm, display_labels=list(classes)).plot(
        ax=ax2, cmap="Blues", values_format=".2f", colorbar=True
    )
    ax2.set_title("normalised by true class")
    fig.suptitle(title)
    return fig


def roc_curves(
    y_true, y_prob, classes: Sequence[str] = CLASSES, title: str = "ROC curves"
) -> Figure:
    """One-vs-rest ROC curve of every class with its AUC; a class without positives or
    negatives is listed as skipped."""
    p = check_probabilities(y_prob, n_classes=len(classes))
    y = check_labels(y_true, len(classes))
    fig = Figure(figsize=(7, 6.5), layout="constrained")
    ax = fig.subplots()
    skipped = []
    for c, name in enumerate(classes):
        pos = y == c
        if not pos.any() or pos.all():
            skipped.append(name)
            continue
        RocCurveDisplay.from_predictions(
            pos, p[:, c], ax=ax, name=name, plot_chance_level=(c == 0)
        )
    ax.plot([0, 1], [0, 1], ls=":", c="grey")
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.set_title(
        title + (f" (skipped, no positives: {', '.join(skipped)})" if skipped else "")
    )
    ax.legend(loc="lower right", fontsize=8)
    return fig


def melanoma_roc(
    y_true,
    y_prob,
    operating_points: Mapping[str, tuple[float, float]],
    melanoma_index: int = MELANOMA_INDEX,
    title: str = "Melanoma vs rest",
) -> Figure:
    """The melanoma-vs-rest ROC curve of ``p_mel`` with each named operating point
    ``(sensitivity, specificity)`` marked."""
    p = check_probabilities(y_prob, n_classes=np.asarray(y_prob).shape[-1])
    y = check_labels(y_true, p.shape[1])
    pos = y == melanoma_index
    fig = Figure(figsize=(7, 6.5), layout="constrained")
    ax = fig.subplots()
    if pos.any() and not pos.all():
        RocCurveDisplay.from_predictions(pos, p[:, melanoma_index], ax=ax, name="p_mel")
    else:
        ax.text(
            0.5,
            0.5,
            "no melanoma (or only melanoma) in this split",
            ha="center",
            transform=ax.transAxes,
        )
    markers = "osD^vP*X"
    for i, (name, (sens, spec)) in enumerate(operating_points.items()):
        if np.isfinite(sens) and np.isfinite(spec):
            ax.plot(
                1 - spec,
                sens,
                marker=markers[i % len(markers)],
                ms=9,
                ls="",
                label=f"{name}: sens {sens:.2f}, spec {spec:.2f}",
            )
    ax.plot([0, 1], [0, 1], ls=":", c="grey")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    return fig


def reliability_diagram(
    curve: pd.DataFrame, ece: float, title: str = "Reliability"
) -> Figure:
    """Accuracy against mean confidence per bin (bars, from
    :func:`~skin_lesion_classifier.evaluation.calibration.reliability_curve`) with the
    diagonal of perfect calibration, and the sample count per bin below."""
    fig = Figure(figsize=(6.5, 7), layout="constrained")
    ax, ax_n = fig.subplots(2, 1, height_ratios=(3, 1), sharex=True)
    width = (curve["bin_upper"] - curve["bin_lower"]).to_numpy()
    centers = ((curve["bin_upper"] + curve["bin_lower"]) / 2).to_numpy()
    ax.bar(
        centers,
        curve["accuracy"].fillna(0.0),
        width=width,
        edgecolor="k",
        alpha=0.7,
        label="accuracy",
    )
    ax.plot(
        curve["confidence"],
        curve["accuracy"],
        "o",
        c="C3",
        label="(mean confidence, accuracy)",
    )
    ax.plot([0, 1], [0, 1], ls="--", c="grey", label="perfect calibration")
    ax.set_ylabel("accuracy of the top label")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left")
    ax.set_title(f"{title} (ECE = {ece:.3f})")
    ax_n.bar(centers, curve["count"], width=width, edgecolor="k", color="C7")
    ax_n.set_xlabel("confidence (max probability)")
    ax_n.set_ylabel("images")
    return fig


def class_imbalance(
    train_counts: Sequence[float],
    f1: Sequence[float],
    fit: Mapping[str, float],
    classes: Sequence[str] = CLASSES,
) -> Figure:
    """F1 per class against its training-set size (log scale) with the least-squares line
    ``F1 = a + b * log10(n_train)`` and its R-squared (``fit`` from
    :func:`~skin_lesion_classifier.evaluation.metrics.f1_vs_training_size`)."""
    n = np.asarray(train_counts, dtype=float)
    f = np.asarray(f1, dtype=float)
    fig = Figure(figsize=(7, 5), layout="constrained")
    ax = fig.subplots()
    ax.scatter(n, f, s=40, zorder=3)
    for xi, yi, name in zip(n, f, classes):
        ax.annotate(name, (xi, yi), textcoords="offset points", xytext=(5, 5))
    if np.isfinite(fit.get("slope", np.nan)):
        xs = np.geomspace(max(n.min(), 1.0), max(n.max(), 2.0), 50)
        ax.plot(
            xs,
            fit["intercept"] + fit["slope"] * np.log10(xs),
            "--",
            c="C3",
            label=f"F1 = {fit['intercept']:.2f} + {fit['slope']:.2f} log10(n), "
            f"R² = {fit['r2']:.2f}",
        )
        ax.legend(loc="lower right")
    ax.set_xscale("log")
    ax.set_xlabel("training images of the class")
    ax.set_ylabel("test F1")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title("Class imbalance: F1 against training-set size")
    return fig
