"""The per-run evaluation report: Markdown with the figures beside it, and one
self-contained HTML file (figures embedded as base64 PNG).

:func:`headline_rows` picks the figures a dermatology researcher reads first (also printed by
``python -m skin_lesion_classifier.show_results``); :func:`build_markdown` writes every
section from the evaluation metrics dict; :func:`markdown_to_html` turns it into HTML.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from skin_lesion_classifier.constants import CLASS_NAMES, CLASSES

#: Figure keys in report order, with their captions.
FIGURE_CAPTIONS: dict[str, str] = {
    "training_curves": "Training curves (loss, validation balanced accuracy and AUC, "
    "learning rate per epoch)",
    "per_class": "Per-class precision, recall, F1 and specificity on test",
    "confusion_matrix": "Confusion matrix on test (counts and normalised by true class)",
    "roc_curves": "One-vs-rest ROC curves per class on test",
    "melanoma_roc": "Melanoma-vs-rest ROC on test with the operating points marked",
    "reliability": "Reliability diagram of the top-label confidence on test",
    "class_imbalance": "Class imbalance: test F1 against training-set size per class",
}


def to_jsonable(value: Any) -> Any:
    """Plain JSON types: numpy scalars/arrays unwrapped, NaN/inf as ``None``, tuples as
    lists, data frames as lists of records."""
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, pd.DataFrame):
        return to_jsonable(value.to_dict(orient="records"))
    if isinstance(value, list | tuple | np.ndarray):
        return [
            to_jsonable(v)
            for v in (value.tolist() if isinstance(value, np.ndarray) else value)
        ]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def figure_png(fig: Figure, dpi: int = 110) -> bytes:
    """PNG bytes of a figure."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def fmt(value: Any, digits: int = 3) -> str:
    """A number for a table: ``n/a`` for missing/NaN, ints as is, floats rounded."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int | np.integer):
        return str(int(value))
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    return "n/a" if not math.isfinite(v) else f"{v:.{digits}f}"


def fmt_ci(ci: Mapping[str, Any] | None, digits: int = 3) -> str:
    """``0.812 [0.790, 0.833]`` from an ``{estimate, low, high}`` dict."""
    if not ci:
        return "n/a"
    est = fmt(ci.get("estimate"), digits)
    if ci.get("low") is None and ci.get("high") is None:
        return est
    return f"{est} [{fmt(ci.get('low'), digits)}, {fmt(ci.get('high'), digits)}]"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def headline_rows(
    metrics: Mapping[str, Any], split: str = "test"
) -> list[dict[str, Any]]:
    """The headline figures of ``split``: ``{metric, rule, estimate, low, high}`` rows.

    ``rule`` says which decision rule produced the figure (``argmax``, the rule chosen on
    validation, ``val threshold`` for the melanoma threshold, ``roc curve`` for figures
    read off the split's own ROC curve, ``probabilities`` for threshold-free figures).
    """
    s = metrics["splits"][split]
    chosen = metrics["decision_rule"]["rule"]
    boot = s.get("bootstrap", {})
    ba = boot.get("argmax", {})
    bc = boot.get("chosen", ba)
    mel = s["melanoma"]

    def row(metric, rule, ci=None, estimate=None):
        ci = dict(ci or {})
        if estimate is not None and "estimate" not in ci:
            ci["estimate"] = estimate
        return {
            "metric": metric,
            "rule": rule,
            "estimate": ci.get("estimate"),
            "low": ci.get("low"),
            "high": ci.get("high"),
        }

    rows = [
        row(
            "balanced accuracy",
            "argmax",
            ba.get("balanced_accuracy"),
            s["argmax"]["balanced_accuracy"],
        ),
    ]
    if chosen != "argmax":
        rows.append(
            row(
                "balanced accuracy",
                chosen,
                bc.get("balanced_accuracy"),
                s["chosen"]["balanced_accuracy"],
            )
        )
    rows += [
        row("accuracy", "argmax", estimate=s["argmax"]["accuracy"]),
        row(
            "macro AUC", "probabilities", ba.get("macro_auc"), s["argmax"]["macro_auc"]
        ),
        row("melanoma AUC", "probabilities", ba.get("mel_auc"), mel["auc"]),
        row(
            "melanoma sensitivity",
            "argmax",
            ba.get("mel_sensitivity_argmax"),
            mel["argmax"]["sensitivity"],
        ),
        row(
            "melanoma specificity",
            "argmax",
            ba.get("mel_specificity_argmax"),
            mel["argmax"]["specificity"],
        ),
    ]
    if "threshold" in mel:
        rows += [
            row(
                "melanoma sensitivity",
                "val threshold",
                ba.get("mel_sensitivity_threshold"),
                mel["threshold"]["sensitivity"],
            ),
            row(
                "melanoma specificity",
                "val threshold",
                ba.get("mel_specificity_threshold"),
                mel["threshold"]["specificity"],
            ),
            row(
                "lesions excised per melanoma (NNE)",
                "val threshold",
                ba.get("mel_nne_threshold"),
                mel["threshold"]["nne"],
            ),
        ]
    for key, entry in mel["specificity_at_sensitivity"].items():
        t = float(key)
        rows.append(
            row(
                f"melanoma specificity at {t:.0%} sensitivity",
                "roc curve",
                ba.get(f"mel_specificity_at_sensitivity_{key}"),
                entry["specificity"],
            )
        )
    rows += [
        row("log loss", "probabilities", estimate=s["argmax"]["log_loss"]),
        row(
            "expected calibration error",
            "probabilities",
            estimate=s["calibration"]["ece"],
        ),
    ]
    return rows


def _data_section(summary: Mapping[str, Any]) -> list[str]:
    out = ["## Data", ""]
    out.append(
        f"{summary['n_images']} images of {summary['n_lesions']} lesions in the split "
        "assignment (HAM10000; diagnoses: "
        + ", ".join(f"`{c}` {CLASS_NAMES[c]}" for c in CLASSES)
        + ")."
    )
    out.append("")
    out.append("### Split sizes per class (images / lesions)")
    out.append("")
    splits = list(summary["per_split"].keys())
    rows = []
    for c in [*CLASSES, "total"]:
        cells = [f"**{c}**" if c == "total" else f"`{c}`"]
        for sp in splits:
            e = summary["per_split"][sp].get(c, {"images": 0, "lesions": 0})
            cells.append(f"{e['images']} / {e['lesions']}")
        rows.append(cells)
    out.append(_table(["class", *splits], rows))
    out.append("")
    return out


def build_markdown(
    metrics: Mapping[str, Any],
    data_summary: Mapping[str, Any],
    config: Mapping[str, Any],
    figures: Mapping[str, str],
    mlflow_run: Mapping[str, Any] | None = None,
    title: str = "Skin-lesion classifier: evaluation report",
) -> str:
    """The whole report as Markdown.

    ``figures`` maps figure keys (see :data:`FIGURE_CAPTIONS`) to the image reference to
    write (a relative file name, or a ``data:`` URI for the self-contained HTML);
    ``mlflow_run`` holds ``run_id``, ``experiment_id``, ``tracking_uri`` and an optional
    ``url`` (``None``: the run was not tracked).
    """
    rule = metrics["decision_rule"]
    chosen = rule["rule"]
    lines = [f"# {title}", ""]
    model = metrics.get("model", {})
    lines.append(
        f"Model `{model.get('arch', '?')}` at input size "
        f"{'x'.join(str(v) for v in model.get('input_size', []))}; "
        f"test-time augmentation: {metrics.get('tta', False)}. "
        f"Decision rule chosen on validation: **{chosen}**. "
        "The test split is only scored: nothing is chosen on it."
    )
    lines.append("")

    # headline
    lines += ["## Headline (test split)", ""]
    ci = metrics.get("bootstrap_settings", {})
    lines.append(
        f"Intervals: {fmt(ci.get('level', 0.95), 2)} percentile intervals of a bootstrap "
        f"over lesions ({ci.get('n_boot', '?')} replicates, seed {ci.get('seed', '?')}); "
        "all images of a drawn lesion come along. The *rule* column says which decision "
        "produced each figure."
    )
    lines.append("")
    lines.append(
        _table(
            ["metric", "rule", "estimate [95% CI]"],
            [[r["metric"], r["rule"], fmt_ci(r)] for r in headline_rows(metrics)],
        )
    )
    lines.append("")

    lines += _data_section(data_summary)

    # config
    lines += [
        "## Configuration",
        "",
        "```json",
        json.dumps(to_jsonable(config), indent=2, sort_keys=True),
        "```",
        "",
    ]

    # decision rules
    lines += ["## Decision rules (chosen on validation)", ""]
    lines.append(
        "Candidates are scored by validation balanced accuracy; a rule fitted on "
        "validation is scored by cross-fitting over validation lesions. Chosen: "
        f"**{chosen}**."
    )
    lines.append("")
    cand_rows = []
    for name, entry in rule.get("candidates", {}).items():
        cand_rows.append(
            [
                f"**{name}**" if name == chosen else name,
                fmt(entry.get("val_balanced_accuracy")),
                entry.get("scored", ""),
            ]
        )
    if cand_rows:
        lines.append(_table(["rule", "val balanced accuracy", "how scored"], cand_rows))
        lines.append("")
    w = rule.get("class_weights", {})
    lines.append(
        _table(["class", *w.keys()], [["weight", *(fmt(v) for v in w.values())]])
    )
    lines.append("")
    lines.append(
        f"Melanoma threshold: p_mel >= {fmt(rule.get('melanoma_threshold'), 4)} "
        f"({rule.get('melanoma_threshold_rule', '')})."
    )
    lines.append("")

    # metrics per split
    for split in ("val", "test"):
        if split not in metrics["splits"]:
            continue
        s = metrics["splits"][split]
        lines += [f"## Metrics: {split} split", ""]
        boot = s.get("bootstrap", {})
        rows = []
        for rname, key in (("argmax", "argmax"), (chosen, "chosen")):
            if key == "chosen" and chosen == "argmax":
                continue
            m = s[key]
            b = boot.get(key, {})
            rows.append(
                [
                    rname,
                    m["n"],
                    fmt(m["accuracy"]),
                    fmt_ci(
                        b.get("balanced_accuracy")
                        or {"estimate": m["balanced_accuracy"]}
                    ),
                    fmt(m["average_specificity"]),
                    fmt_ci(
                        boot.get("argmax", {}).get("macro_auc")
                        or {"estimate": m["macro_auc"]}
                    ),
                    fmt(m["log_loss"]),
                ]
            )
        lines.append(
            _table(
                [
                    "rule",
                    "n",
                    "accuracy",
                    "balanced accuracy (= avg sensitivity)",
                    "avg specificity",
                    "macro AUC",
                    "log loss",
                ],
                rows,
            )
        )
        lines.append("")
        absent = s["argmax"].get("absent_classes") or []
        if absent:
            lines.append(
                f"Classes absent from this split (recall and AUC undefined, left out of "
                f"the means): {', '.join(absent)}."
            )
            lines.append("")
        lines.append(f"Per class ({chosen} decisions; AUC from the probabilities):")
        lines.append("")
        lines.append(
            _table(
                ["class", "support", "precision", "recall", "F1", "specificity", "AUC"],
                [
                    [
                        f"`{r['class']}`",
                        r["support"],
                        fmt(r["precision"]),
                        fmt(r["recall"]),
                        fmt(r["f1"]),
                        fmt(r["specificity"]),
                        fmt(r.get("auc")),
                    ]
                    for r in s["chosen"]["per_class"]
                ],
            )
        )
        lines.append("")
        cal = s["calibration"]
        lines.append(
            f"Calibration: expected calibration error {fmt(cal['ece'])}, maximum "
            f"{fmt(cal['mce'])} ({cal['n_bins']} bins)."
        )
        lines.append("")

    # clinical
    lines += ["## Clinical: melanoma vs rest (test split)", ""]
    mel = metrics["splits"]["test"]["melanoma"]
    boot = metrics["splits"]["test"].get("bootstrap", {})
    ba = boot.get("argmax", {})
    lines.append(
        f"{mel['n_melanoma']} melanomas among {mel['n']} test images. NNE = lesions "
        "excised per melanoma found, (TP + FP) / TP, when every flagged lesion is cut out."
    )
    lines.append("")
    op_rows = []
    for label, key, src in (
        ("arg-max", "argmax", "argmax"),
        (f"{chosen} rule", "rule", None),
        (
            f"p_mel >= {fmt(mel.get('threshold', {}).get('value'), 4)} (val threshold)",
            "threshold",
            "threshold",
        ),
    ):
        if key not in mel or (key == "rule" and chosen == "argmax"):
            continue
        e = mel[key]
        b = (
            {m: ba.get(f"mel_{m}_{src}") for m in ("sensitivity", "specificity", "nne")}
            if src
            else {}
        )
        op_rows.append(
            [
                label,
                fmt_ci(b.get("sensitivity") or {"estimate": e["sensitivity"]}),
                fmt_ci(b.get("specificity") or {"estimate": e["specificity"]}),
                fmt(e["ppv"]),
                fmt_ci(b.get("nne") or {"estimate": e["nne"]}, 2),
                f"{e['tp']} / {e['fp']} / {e['fn']} / {e['tn']}",
            ]
        )
    lines.append(
        _table(
            [
                "operating point",
                "sensitivity",
                "specificity",
                "PPV",
                "NNE",
                "TP / FP / FN / TN",
            ],
            op_rows,
        )
    )
    lines.append("")
    lines.append(
        f"Melanoma AUC: {fmt_ci(ba.get('mel_auc') or {'estimate': mel['auc']})}."
    )
    lines.append("")
    sas_rows = [
        [
            f"{float(k):.0%}",
            fmt(v["sensitivity"]),
            fmt_ci(
                ba.get(f"mel_specificity_at_sensitivity_{k}")
                or {"estimate": v["specificity"]}
            ),
            fmt(v["threshold"], 4),
        ]
        for k, v in mel["specificity_at_sensitivity"].items()
    ]
    lines.append(
        "Specificity at a fixed sensitivity, read off the test ROC curve (descriptive: "
        "these thresholds are not chosen on validation and not used as decisions):"
    )
    lines.append("")
    lines.append(
        _table(
            ["target sensitivity", "sensitivity reached", "specificity", "threshold"],
            sas_rows,
        )
    )
    lines.append("")

    imb = metrics.get("class_imbalance")
    if imb and imb.get("r2") is None:
        lines.append(
            "Class imbalance: no F1-against-training-size fit (it needs at least 3 "
            "classes with a defined F1 and different training sizes)."
        )
        lines.append("")
    elif imb:
        lines.append(
            f"Class imbalance: F1 = {fmt(imb['intercept'], 2)} + {fmt(imb['slope'], 2)} "
            f"log10(training images), R² = {fmt(imb['r2'])} over {imb['n_classes']} classes."
        )
        lines.append("")

    # figures
    lines += ["## Figures", ""]
    for key, caption in FIGURE_CAPTIONS.items():
        if key in figures:
            lines += [f"### {caption}", "", f"![{caption}]({figures[key]})", ""]

    # mlflow
    lines += ["## MLflow", ""]
    if mlflow_run and mlflow_run.get("run_id"):
        link = mlflow_run.get("url")
        rid = mlflow_run["run_id"]
        lines.append(f"- run: [{rid}]({link})" if link else f"- run: `{rid}`")
        lines.append(f"- experiment id: `{mlflow_run.get('experiment_id')}`")
        lines.append(f"- tracking store: `{mlflow_run.get('tracking_uri')}`")
        lines.append(
            "- open it with `kedro mlflow ui` (or `mlflow ui --backend-store-uri "
            f"{mlflow_run.get('tracking_uri')}`)"
        )
    else:
        lines.append("This run was not tracked in MLflow (no active run).")
    lines.append("")
    return "\n".join(lines)


def data_summary(split_assignment: pd.DataFrame) -> dict[str, Any]:
    """Images and lesions per class and split of a split-assignment frame."""
    needed = {"image_id", "lesion_id", "dx", "split"}
    missing = needed - set(split_assignment.columns)
    if missing:
        raise ValueError(f"split_assignment lacks columns {sorted(missing)}")
    per_split: dict[str, dict[str, dict[str, int]]] = {}
    for sp in [
        s for s in ("train", "val", "test") if s in set(split_assignment["split"])
    ]:
        part = split_assignment[split_assignment["split"] == sp]
        entry = {
            c: {
                "images": int((part["dx"] == c).sum()),
                "lesions": int(part.loc[part["dx"] == c, "lesion_id"].nunique()),
            }
            for c in CLASSES
        }
        entry["total"] = {
            "images": len(part),
            "lesions": int(part["lesion_id"].nunique()),
        }
        per_split[sp] = entry
    return {
        "n_images": len(split_assignment),
        "n_lesions": int(split_assignment["lesion_id"].nunique()),
        "per_split": per_split,
    }


_HTML_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f2f2f2; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; }
code, pre { background: #f6f6f6; } pre { padding: 0.6em; overflow-x: auto; }
"""


def markdown_to_html(markdown_text: str, title: str = "Evaluation report") -> str:
    """A complete HTML page from the report Markdown (``markdown`` package, tables and
    fenced code)."""
    import markdown

    body = markdown.markdown(markdown_text, extensions=["tables", "fenced_code"])
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_HTML_STYLE}</style></head>"
        f"<body>\n{body}\n</body></html>\n"
    )


def png_data_uri(png: bytes) -> str:
    """``data:image/png;base64,...`` for embedding a PNG in HTML."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
