"""Report and figure building on predictions with awkward cases: an absent class, a
one-class model, NaN figures that must become JSON ``null``."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from skin_lesion_classifier.constants import CLASSES
from skin_lesion_classifier.evaluation.decision import DecisionRule
from skin_lesion_classifier.evaluation.evaluate import evaluate_split
from skin_lesion_classifier.evaluation.metrics import f1_vs_training_size
from skin_lesion_classifier.reporting import plots
from skin_lesion_classifier.reporting.format import (
    figure_png,
    markdown_to_html,
    to_jsonable,
)
from skin_lesion_classifier.reporting.report import build_markdown, data_summary
from skin_lesion_classifier.reporting.sections import headline_rows


def _one_class_split(n_per_class=4):
    """A model that says 'nv' for everything; no dermatofibroma in the split."""
    y = np.repeat([c for c in range(7) if CLASSES[c] != "df"], n_per_class)
    p = np.full((y.size, 7), 0.05)
    p[:, CLASSES.index("nv")] = 0.7
    return y, p


def test_evaluate_split_of_a_one_class_model_is_json_ready_and_reports_nan_as_null():
    y, p = _one_class_split()
    rule = DecisionRule("argmax", np.ones(7), melanoma_threshold=0.5)
    out = evaluate_split(y, p, np.arange(y.size), rule, n_boot=30)
    assert out["argmax"]["balanced_accuracy"] == pytest.approx(
        1 / 6
    )  # 6 classes present
    assert out["argmax"]["absent_classes"] == ["df"]
    assert math.isnan(out["melanoma"]["argmax"]["nne"])  # no melanoma flagged
    data = to_jsonable(out)
    text = json.dumps(data, allow_nan=False)  # strict JSON: NaN became null
    assert json.loads(text)["melanoma"]["argmax"]["nne"] is None


def test_report_sections_and_html_from_a_metrics_dict(small_split):
    y, p = _one_class_split()
    rule = DecisionRule("argmax", np.ones(7), melanoma_threshold=0.5)
    split = to_jsonable(evaluate_split(y, p, np.arange(y.size), rule, n_boot=30))
    metrics = {
        "model": {"arch": "tiny", "input_size": [48, 64]},
        "decision_rule": {**rule.to_dict(), "candidates": {}},
        "bootstrap_settings": {"n_boot": 30, "seed": 0, "level": 0.95},
        "splits": {"val": split, "test": split},
        "class_imbalance": to_jsonable(f1_vs_training_size([5] * 7, [0.1] * 7)),
    }
    rows = headline_rows(metrics)
    assert rows[0]["metric"] == "balanced accuracy" and rows[0]["rule"] == "argmax"
    md = build_markdown(metrics, data_summary(small_split), {"k": 1}, {}, None)
    assert "not tracked in MLflow" in md and "no F1-against-training-size fit" in md
    assert "Classes absent from this split" in md and "df" in md
    html = markdown_to_html(md)
    assert html.startswith("<!DOCTYPE html>") and "<table>" in html


def test_data_summary_counts_images_and_lesions(small_split):
    s = data_summary(small_split)
    assert s["n_images"] == 56
    assert s["per_split"]["train"]["mel"] == {"images": 4, "lesions": 4}
    assert s["per_split"]["test"]["total"]["images"] == 14
    with pytest.raises(ValueError, match="lesion_id"):
        data_summary(small_split.drop(columns=["lesion_id"]))


def test_figures_render_with_an_absent_class_and_a_short_history():
    y, p = _one_class_split()
    figs = [
        plots.roc_curves(y, p),
        plots.melanoma_roc(y, p, {"arg-max": (0.0, 1.0), "undefined": (math.nan, 0.5)}),
        plots.confusion_matrices(np.eye(7, dtype=int) * 3),
        plots.training_curves(pd.DataFrame({"epoch": [1], "train_loss": [2.0]})),
        plots.class_imbalance(
            [10, 20, 40, 80, 160, 320, 640],
            [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7],
            f1_vs_training_size(
                [10, 20, 40, 80, 160, 320, 640], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]
            ),
        ),
    ]
    for fig in figs:
        assert figure_png(fig)[:4] == b"\x89PNG"
    assert "df" in figs[0].axes[0].get_title()  # the skipped class is named
    with pytest.raises(ValueError, match="epoch"):
        plots.training_curves(pd.DataFrame({"loss": [1.0]}))


def test_f1_against_training_size_fit_by_hand():
    # F1 = 0.1 * log10(n) exactly for n = 10 ... 10^7  ->  slope 0.1, intercept 0, R^2 = 1
    n = [10.0**k for k in range(1, 8)]
    fit = f1_vs_training_size(n, [0.1 * k for k in range(1, 8)])
    assert (fit["slope"], fit["intercept"], fit["r2"]) == pytest.approx((0.1, 0.0, 1.0))


def test_report_sections_come_in_order_and_each_stands_alone(small_split):
    from skin_lesion_classifier.reporting.sections import (
        class_imbalance_section,
        decision_section,
        mlflow_section,
    )

    y, p = _one_class_split()
    rule = DecisionRule(
        "class_weights", np.linspace(0.5, 2.0, 7), melanoma_threshold=0.5
    )
    split = to_jsonable(evaluate_split(y, p, np.arange(y.size), rule, n_boot=20))
    decision = {
        **rule.to_dict(),
        "candidates": {
            "argmax": {"val_balanced_accuracy": 0.5, "scored": "direct"},
            "class_weights": {"val_balanced_accuracy": 0.6, "scored": "cross-fitted"},
        },
    }
    metrics = {
        "model": {"arch": "tiny", "input_size": [48, 64]},
        "decision_rule": decision,
        "bootstrap_settings": {"n_boot": 20, "seed": 0, "level": 0.95},
        "splits": {"val": split, "test": split},
    }
    run = {"run_id": "r1", "experiment_id": "7", "tracking_uri": "sqlite:///m.db"}
    md = build_markdown(
        metrics, data_summary(small_split), {}, {"roc_curves": "r.png"}, run
    )
    assert [line for line in md.splitlines() if line.startswith("## ")] == [
        "## Headline (test split)",
        "## Data",
        "## Configuration",
        "## Decision rules (chosen on validation)",
        "## Metrics: val split",
        "## Metrics: test split",
        "## Clinical: melanoma vs rest (test split)",
        "## Figures",
        "## MLflow",
    ]
    assert "| class_weights rule |" in md and "![One-vs-rest ROC" in md
    rules = "\n".join(decision_section(decision))
    assert "| **class_weights** | 0.600 | cross-fitted |" in rules
    assert class_imbalance_section(None) == []
    assert "- run: `r1`" in mlflow_section(run)
    assert mlflow_section(None)[2].startswith("This run was not tracked")
