"""External validation: any trained model or ensemble on a labelled external set (a folder
of images + an ISIC-format one-hot ground-truth CSV), with the evaluation's metrics, plots
and a report section. Images without labels and labels without images are listed in
``external_issues``, never dropped silently."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from skin_lesion_classifier.constants import CLASSES
from skin_lesion_classifier.data.metadata_features import metadata_inputs
from skin_lesion_classifier.device import detect_device
from skin_lesion_classifier.evaluation.decision import DecisionRule
from skin_lesion_classifier.evaluation.evaluate import (
    evaluate_split,
    predictions_frame,
    probabilities_of,
)
from skin_lesion_classifier.evaluation.external import issue_summary
from skin_lesion_classifier.inference.predictor import (
    TorchPredictor,
    images_for,
    read_decision_file,
)
from skin_lesion_classifier.reporting import plots
from skin_lesion_classifier.reporting.format import (
    figure_png,
    fmt,
    fmt_ci,
    markdown_to_html,
    png_data_uri,
    to_jsonable,
)
from skin_lesion_classifier.reporting.sections import headline_rows

logger = logging.getLogger(__name__)

SPLIT = "external"
#: figure key -> caption
FIGURES = {
    "per_class": "Per-class precision, recall, F1 and specificity on the external set",
    "confusion_matrix": "Confusion matrix on the external set",
    "roc_curves": "One-vs-rest ROC curves on the external set",
    "melanoma_roc": "Melanoma-vs-rest ROC on the external set",
    "reliability": "Reliability diagram on the external set",
}


def read_external(
    external_set: Mapping[str, Any],
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """Matched rows, the issues frame and the source names of the ``external_set``
    catalog entry (see :func:`evaluation.external.read_external_set`)."""
    rows, issues = external_set["rows"], external_set["issues"]
    summary = issue_summary(issues, len(rows))
    logger.info("external set: %s", summary)
    if len(issues):
        logger.warning(
            "external set: %d file(s)/row(s) not used, listed in external_issues: %s",
            len(issues),
            {k: v for k, v in summary.items() if k != "used"},
        )
    return rows, issues, dict(external_set["source"])


def predict_external(
    rows: pd.DataFrame, checkpoint: Mapping[str, Any], params: Mapping[str, Any]
) -> pd.DataFrame:
    """Class probabilities of every matched image (the ``predictions`` contract) from the
    ``external_checkpoint`` catalog entry: a single model or an ensemble checkpoint; a
    model fusing metadata gets the external metadata (unknown where the set has none)."""
    predictor = TorchPredictor.from_checkpoint(
        checkpoint,
        device=detect_device(params["device"]),
        batch_size=int(params["batch_size"]),
        tta=params["tta"],
    )
    images = images_for(rows, rows["image_id"], predictor.input_size)
    prob = predictor.predict(images, metadata_inputs(predictor.meta, rows))
    return predictions_frame(rows, prob)


def _decision_rule(params: Mapping[str, Any], meta: Mapping[str, Any]) -> DecisionRule:
    """The rule chosen on the model's own validation split: ``params["decision_rule"]``
    (a decision_rule.json), else ``meta["decision"]``, else the arg-max."""
    src = params["decision_rule"]
    if src:
        return DecisionRule.from_dict(read_decision_file(src))
    if meta.get("decision"):
        return DecisionRule.from_dict(meta["decision"])
    return DecisionRule("argmax", np.ones(len(CLASSES)))


def evaluate_external(
    predictions: pd.DataFrame,
    issues: pd.DataFrame,
    source: Mapping[str, Any],
    checkpoint: Mapping[str, Any],
    params: Mapping[str, Any],
) -> tuple[dict[str, Any], dict[str, dict[str, float]]]:
    """Every figure of the external set under the arg-max and the model's validated rule
    (nothing is chosen on the external set), with lesion-bootstrap intervals, plus the
    headline as MLflow metrics."""
    meta = checkpoint["meta"]
    rule = _decision_rule(params, meta)
    boot = params["bootstrap"]
    split = evaluate_split(
        predictions["label"].to_numpy(),
        probabilities_of(predictions),
        predictions["lesion_id"].to_numpy(),
        rule,
        n_bins=int(params["calibration_bins"]),
        n_boot=int(boot["n_boot"]),
        seed=int(boot["seed"]),
        level=float(boot["level"]),
        sensitivity_targets=tuple(params["sensitivity_targets"]),
    )
    metrics = to_jsonable(
        {
            "model": {
                "arch": meta["arch"],
                "input_size": meta["input_size"],
                "uses_metadata": bool(meta.get("uses_metadata")),
                "ensemble": meta.get("ensemble", {}).get("members"),
            },
            "source": dict(source),
            "decision_rule": rule.to_dict(),
            "bootstrap_settings": {
                "n_boot": int(boot["n_boot"]),
                "seed": int(boot["seed"]),
                "level": float(boot["level"]),
            },
            "issues": issue_summary(issues, len(predictions)),
            "class_counts": predictions["dx"]
            .value_counts()
            .reindex(CLASSES, fill_value=0)
            .to_dict(),
            "splits": {SPLIT: split},
        }
    )
    metrics["headline"] = to_jsonable(headline_rows(metrics, SPLIT))
    logged: dict[str, dict[str, float]] = {}
    for r in metrics["headline"]:
        if r["estimate"] is None:
            continue
        key = f"external_{r['metric']}_{r['rule']}".replace(" ", "_").replace(
            "%", "pct"
        )
        key = "".join(c for c in key if c.isalnum() or c in "_-.")
        logged[key] = {"value": float(r["estimate"]), "step": 0}
    for kind, n in metrics["issues"].items():
        logged[f"external_n_{kind}"] = {"value": float(n), "step": 0}
    return metrics, logged


def _num(v: Any) -> float:
    return float("nan") if v is None else float(v)


def plot_external(
    predictions: pd.DataFrame, metrics: Mapping[str, Any], params: Mapping[str, Any]
):
    """The evaluation's figures on the external set: per-class bars, confusion matrix,
    ROC curves, melanoma ROC, reliability. Returns the five figures then their PNG bytes
    (a dict, for the HTML report)."""
    s = metrics["splits"][SPLIT]
    rule = metrics["decision_rule"]["rule"]
    y = predictions["label"].to_numpy()
    p = probabilities_of(predictions)
    table = pd.DataFrame(s["chosen"]["per_class"])
    for c in ("precision", "recall", "f1", "specificity"):
        table[c] = table[c].map(_num)
    mel = s["melanoma"]
    points = {
        "arg-max": (
            _num(mel["argmax"]["sensitivity"]),
            _num(mel["argmax"]["specificity"]),
        )
    }
    if "threshold" in mel:
        points["val threshold"] = (
            _num(mel["threshold"]["sensitivity"]),
            _num(mel["threshold"]["specificity"]),
        )
    curve = pd.DataFrame(s["calibration"]["curve"])
    figs = {
        "per_class": plots.per_class_bars(
            table, f"Per-class performance, external ({rule})"
        ),
        "confusion_matrix": plots.confusion_matrices(
            np.asarray(s["chosen"]["confusion_matrix"]),
            CLASSES,
            f"Confusion matrix, external ({rule})",
        ),
        "roc_curves": plots.roc_curves(y, p, CLASSES, "ROC curves, external"),
        "melanoma_roc": plots.melanoma_roc(
            y, p, points, title="Melanoma vs rest, external"
        ),
        "reliability": plots.reliability_diagram(
            curve, _num(s["calibration"]["ece"]), "Reliability, external"
        ),
    }
    dpi = int(params["dpi"])
    pngs = {k: figure_png(f, dpi) for k, f in figs.items()}
    return (*figs.values(), pngs)


def report_section(
    metrics: Mapping[str, Any], issues: pd.DataFrame, figures: Mapping[str, str]
) -> str:
    """The external-validation report section (Markdown): source, headline with
    intervals, per-class table, every unused file or row, figures."""
    src = metrics["source"]
    model = metrics["model"]
    iss = metrics["issues"]
    lines = [
        "## External validation",
        "",
        f"Model `{model['arch']}` on `{src['image_dir']}` with "
        f"ground truth `{src['labels_csv']}`: **{iss['used']} images used**. Decision rule "
        f"**{metrics['decision_rule']['rule']}**, chosen on the model's own validation split; "
        "nothing is chosen on the external set.",
        "",
    ]
    if model.get("uses_metadata"):
        lines += [
            "The model fuses patient metadata: "
            + (
                f"taken from `{src['metadata_csv']}`."
                if src.get("metadata_csv")
                else "no metadata CSV was given, so every image is encoded as age, sex "
                "and site unknown."
            ),
            "",
        ]
    counts = metrics.get("class_counts", {})
    lines += [
        "Images per class: "
        + ", ".join(f"{c} {counts.get(c, 0)}" for c in CLASSES)
        + ".",
        "",
        "| metric | rule | estimate [95% CI] |",
        "|---|---|---|",
    ]
    lines += [
        f"| {r['metric']} | {r['rule']} | {fmt_ci(r)} |" for r in metrics["headline"]
    ]
    lines += ["", "### Per class (chosen rule)", ""]
    lines += [
        "| class | support | precision | recall | F1 | specificity | AUC |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in metrics["splits"][SPLIT]["chosen"]["per_class"]:
        lines.append(
            f"| {r['class']} | {r['support']} | {fmt(r['precision'])} | {fmt(r['recall'])} | "
            f"{fmt(r['f1'])} | {fmt(r['specificity'])} | {fmt(r.get('auc'))} |"
        )
    lines += ["", "### Files and rows not used", ""]
    if issues.empty:
        lines.append("None: every image has a label row and every label row an image.")
    else:
        summary = ", ".join(f"{k} {v}" for k, v in iss.items() if k != "used")
        lines += [
            f"{len(issues)} listed ({summary}):",
            "",
            "| image | issue | detail |",
            "|---|---|---|",
        ]
        for r in issues.itertuples(index=False):
            detail = str(r.detail).replace("|", "\\|")
            lines.append(f"| {r.image_id or '-'} | {r.issue} | {detail} |")
    lines.append("")
    for key, ref in figures.items():
        lines += [f"![{FIGURES[key]}]({ref})", "", f"*{FIGURES[key]}.*", ""]
    return "\n".join(lines)


def build_external_report(
    metrics: Mapping[str, Any],
    issues: pd.DataFrame,
    pngs: Mapping[str, bytes],
    params: Mapping[str, Any],
) -> tuple[str, str]:
    """The external-validation report as Markdown (figures as files beside it) and as a
    self-contained HTML page."""
    title = "Skin-lesion classifier: external validation"
    folder = str(params["figure_dir"]).rstrip("/")
    md = f"# {title}\n\n" + report_section(
        metrics, issues, {k: f"{folder}/external_{k}.png" for k in pngs}
    )
    inline = f"# {title}\n\n" + report_section(
        metrics, issues, {k: png_data_uri(v) for k, v in pngs.items()}
    )
    return md, markdown_to_html(inline, title)
