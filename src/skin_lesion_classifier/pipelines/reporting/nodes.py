"""Nodes of the reporting pipeline: figures (saved as PNG and logged to MLflow through the
catalog) and the per-run Markdown + self-contained HTML report.

Each plot node returns the figure (for its ``MatplotlibWriter`` dataset) and its PNG bytes
(kept in memory for the HTML report, since a writer dataset cannot be read back).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from skin_lesion_classifier.constants import CLASSES
from skin_lesion_classifier.evaluation.evaluate import probabilities_of
from skin_lesion_classifier.reporting import plots
from skin_lesion_classifier.reporting.format import (
    figure_png,
    markdown_to_html,
    png_data_uri,
)
from skin_lesion_classifier.reporting.report import build_markdown, data_summary
from skin_lesion_classifier.reporting.sections import FIGURE_CAPTIONS

logger = logging.getLogger(__name__)


def _num(v: Any) -> float:
    """JSON ``null`` (an undefined figure) back to NaN."""
    return float("nan") if v is None else float(v)


def _with_png(fig: Figure, params: Mapping[str, Any]) -> tuple[Figure, bytes]:
    return fig, figure_png(fig, dpi=int(params["dpi"]))


def plot_training_curves(history: pd.DataFrame, params: Mapping[str, Any]):
    """Loss, validation balanced accuracy and AUC, learning rate per epoch."""
    return _with_png(plots.training_curves(history), params)


def plot_per_class(metrics: Mapping[str, Any], params: Mapping[str, Any]):
    """Per-class precision / recall / F1 / specificity on test (chosen rule)."""
    table = pd.DataFrame(metrics["splits"]["test"]["chosen"]["per_class"])
    for c in ("precision", "recall", "f1", "specificity"):
        table[c] = table[c].map(_num)
    rule = metrics["decision_rule"]["rule"]
    return _with_png(
        plots.per_class_bars(table, f"Per-class performance on test ({rule})"), params
    )


def plot_confusion_matrix(metrics: Mapping[str, Any], params: Mapping[str, Any]):
    """Test confusion matrix (chosen rule), counts and normalised."""
    cm = np.asarray(metrics["splits"]["test"]["chosen"]["confusion_matrix"])
    rule = metrics["decision_rule"]["rule"]
    return _with_png(
        plots.confusion_matrices(cm, CLASSES, f"Confusion matrix, test ({rule})"),
        params,
    )


def plot_roc_curves(test_predictions: pd.DataFrame, params: Mapping[str, Any]):
    """One-vs-rest ROC curves per class on test."""
    return _with_png(
        plots.roc_curves(
            test_predictions["label"].to_numpy(),
            probabilities_of(test_predictions),
            CLASSES,
            "ROC curves, test",
        ),
        params,
    )


def plot_melanoma_roc(
    test_predictions: pd.DataFrame,
    metrics: Mapping[str, Any],
    params: Mapping[str, Any],
):
    """Melanoma-vs-rest ROC on test with the arg-max, chosen-rule, validation-threshold and
    fixed-sensitivity operating points."""
    mel = metrics["splits"]["test"]["melanoma"]
    rule = metrics["decision_rule"]["rule"]
    points = {
        "arg-max": (
            _num(mel["argmax"]["sensitivity"]),
            _num(mel["argmax"]["specificity"]),
        )
    }
    if rule != "argmax" and "rule" in mel:
        points[f"{rule} rule"] = (
            _num(mel["rule"]["sensitivity"]),
            _num(mel["rule"]["specificity"]),
        )
    if "threshold" in mel:
        points[f"val threshold {_num(mel['threshold']['value']):.3f}"] = (
            _num(mel["threshold"]["sensitivity"]),
            _num(mel["threshold"]["specificity"]),
        )
    for key, e in mel["specificity_at_sensitivity"].items():
        points[f"test ROC at {float(key):.0%} sens"] = (
            _num(e["sensitivity"]),
            _num(e["specificity"]),
        )
    fig = plots.melanoma_roc(
        test_predictions["label"].to_numpy(),
        probabilities_of(test_predictions),
        points,
        title="Melanoma vs rest, test",
    )
    return _with_png(fig, params)


def plot_reliability(metrics: Mapping[str, Any], params: Mapping[str, Any]):
    """Reliability diagram of the test top-label confidence."""
    cal = metrics["splits"]["test"]["calibration"]
    curve = pd.DataFrame(cal["curve"])
    for c in ("confidence", "accuracy", "gap"):
        curve[c] = curve[c].map(_num)
    return _with_png(
        plots.reliability_diagram(curve, _num(cal["ece"]), "Reliability, test"), params
    )


def plot_class_imbalance(metrics: Mapping[str, Any], params: Mapping[str, Any]):
    """Test F1 per class against its training-set size, with the fit's R-squared."""
    counts = [metrics["train_class_counts"][c] for c in CLASSES]
    f1 = [_num(r["f1"]) for r in metrics["splits"]["test"]["chosen"]["per_class"]]
    fit = {k: _num(v) for k, v in metrics["class_imbalance"].items()}
    return _with_png(plots.class_imbalance(counts, f1, fit, CLASSES), params)


def _mlflow_run(params: Mapping[str, Any]) -> dict[str, Any] | None:
    """The active MLflow run (kedro-mlflow opens one per ``kedro run``), or ``None``."""
    try:
        import mlflow
    except ImportError:  # pragma: no cover - mlflow is a project dependency
        return None
    run = mlflow.active_run()
    if run is None:
        return None
    uri = mlflow.get_tracking_uri()
    base = str(params["mlflow_ui_url"] or "").rstrip("/")
    if uri.startswith("http"):
        base = uri.rstrip("/")
    url = (
        f"{base}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
        if base
        else None
    )
    return {
        "run_id": run.info.run_id,
        "experiment_id": run.info.experiment_id,
        "tracking_uri": uri,
        "url": url,
    }


def build_report(
    metrics: Mapping[str, Any],
    split_assignment: pd.DataFrame,
    evaluation_params: Mapping[str, Any],
    params: Mapping[str, Any],
    **figures_png: bytes,
) -> tuple[str, str]:
    """The report as Markdown (figures referenced as the PNG files beside it) and as one
    self-contained HTML page (figures embedded)."""
    unknown = set(figures_png) - set(FIGURE_CAPTIONS)
    if unknown:
        raise ValueError(f"unknown report figures {sorted(unknown)}")
    summary = data_summary(split_assignment)
    config = {
        "evaluation": dict(evaluation_params),
        "model": metrics.get("model", {}),
        "train_class_counts": metrics.get("train_class_counts", {}),
    }
    run = _mlflow_run(params)
    title = str(params["title"])
    folder = str(params["figure_dir"]).rstrip("/")
    md = build_markdown(
        metrics,
        summary,
        config,
        {k: f"{folder}/{k}.png" for k in figures_png},
        run,
        title,
    )
    md_inline = build_markdown(
        metrics,
        summary,
        config,
        {k: png_data_uri(v) for k, v in figures_png.items()},
        run,
        title,
    )
    logger.info(
        "report built with %d figures (mlflow run %s)",
        len(figures_png),
        run["run_id"] if run else None,
    )
    return md, markdown_to_html(md_inline, title)
