"""The sections of the evaluation report, one function each: every function takes the
evaluation metrics (or the part it shows) and returns its Markdown lines.

A new section is one more function here plus one line in ``report.build_markdown``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from skin_lesion_classifier.constants import CLASS_NAMES, CLASSES
from skin_lesion_classifier.reporting.format import fmt, fmt_ci, table, to_jsonable

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


_SENS_SPEC = (
    ("sensitivity", "melanoma sensitivity"),
    ("specificity", "melanoma specificity"),
)
#: Melanoma operating points of the headline: (``mel`` key, rule shown, (measure, label)).
_MELANOMA_POINTS = (
    ("argmax", "argmax", _SENS_SPEC),
    (
        "threshold",
        "val threshold",
        (*_SENS_SPEC, ("nne", "lesions excised per melanoma (NNE)")),
    ),
)


def _boot_ci(boot: Mapping[str, Any], key: str, estimate: Any, digits: int = 3) -> str:
    """A table cell: the bootstrap interval ``boot[key]`` when there is one, else the
    bare ``estimate``."""
    return fmt_ci(boot.get(key) or {"estimate": estimate}, digits)


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
    ]
    for src, rule, measures in _MELANOMA_POINTS:
        if src == "threshold" and src not in mel:
            continue  # no melanoma threshold was fitted on validation
        rows += [
            row(label, rule, ba.get(f"mel_{m}_{src}"), mel[src][m])
            for m, label in measures
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


def intro_section(metrics: Mapping[str, Any], title: str) -> list[str]:
    """Title, model, input size, TTA and the decision rule chosen on validation."""
    model = metrics.get("model", {})
    return [
        f"# {title}",
        "",
        f"Model `{model.get('arch', '?')}` at input size "
        f"{'x'.join(str(v) for v in model.get('input_size', []))}; "
        f"test-time augmentation: {metrics.get('tta', False)}. "
        f"Decision rule chosen on validation: **{metrics['decision_rule']['rule']}**. "
        "The test split is only scored: nothing is chosen on it.",
        "",
    ]


def headline_section(metrics: Mapping[str, Any]) -> list[str]:
    """The headline figures of the test split with their bootstrap intervals (and, for a
    model that fuses patient metadata, the same figures with the metadata withheld)."""
    ci = metrics.get("bootstrap_settings", {})
    withheld = metrics.get("metadata_withheld")
    if withheld:
        rows = headline_rows(metrics)
        other = {(r["metric"], r["rule"]): r for r in headline_rows(withheld)}
        body = [
            [
                r["metric"],
                r["rule"],
                fmt_ci(r),
                fmt_ci(other[(r["metric"], r["rule"])])
                if (r["metric"], r["rule"]) in other
                else "",
            ]
            for r in rows
        ]
        headers = ["metric", "rule", "estimate [95% CI]", "metadata withheld"]
    else:
        body = [[r["metric"], r["rule"], fmt_ci(r)] for r in headline_rows(metrics)]
        headers = ["metric", "rule", "estimate [95% CI]"]
    note = (
        [
            "The model fuses the patient's age, sex and site; *metadata withheld* is the "
            "same model and decision rule with every field unknown, as for most "
            "external pictures.",
            "",
        ]
        if withheld
        else []
    )
    return [
        "## Headline (test split)",
        "",
        f"Intervals: {fmt(ci.get('level', 0.95), 2)} percentile intervals of a bootstrap "
        f"over lesions ({ci.get('n_boot', '?')} replicates, seed {ci.get('seed', '?')}); "
        "all images of a drawn lesion come along. The *rule* column says which decision "
        "produced each figure.",
        "",
        *note,
        table(headers, body),
        "",
    ]


def data_section(summary: Mapping[str, Any]) -> list[str]:
    """Images and lesions per class and split."""
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
    out.append(table(["class", *splits], rows))
    out.append("")
    return out


def config_section(config: Mapping[str, Any]) -> list[str]:
    """The run's configuration as JSON."""
    return [
        "## Configuration",
        "",
        "```json",
        json.dumps(to_jsonable(config), indent=2, sort_keys=True),
        "```",
        "",
    ]


def decision_section(rule: Mapping[str, Any]) -> list[str]:
    """The candidate decision rules, the chosen one's class weights and the melanoma
    threshold."""
    chosen = rule["rule"]
    lines = ["## Decision rules (chosen on validation)", ""]
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
        lines.append(table(["rule", "val balanced accuracy", "how scored"], cand_rows))
        lines.append("")
    w = rule.get("class_weights", {})
    lines.append(
        table(["class", *w.keys()], [["weight", *(fmt(v) for v in w.values())]])
    )
    lines.append("")
    lines.append(
        f"Melanoma threshold: p_mel >= {fmt(rule.get('melanoma_threshold'), 4)} "
        f"({rule.get('melanoma_threshold_rule', '')})."
    )
    lines.append("")
    return lines


def split_section(s: Mapping[str, Any], split: str, chosen: str) -> list[str]:
    """Summary figures per decision rule, per-class table and calibration of one split
    (``s`` = ``metrics["splits"][split]``)."""
    lines = [f"## Metrics: {split} split", ""]
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
                _boot_ci(b, "balanced_accuracy", m["balanced_accuracy"]),
                fmt(m["average_specificity"]),
                _boot_ci(boot.get("argmax", {}), "macro_auc", m["macro_auc"]),
                fmt(m["log_loss"]),
            ]
        )
    lines.append(
        table(
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
        table(
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
    return lines


def melanoma_section(test: Mapping[str, Any], chosen: str) -> list[str]:
    """Melanoma vs rest on test: operating points (arg-max, chosen rule, validation
    threshold) with NNE, the AUC, and specificity at fixed sensitivities
    (``test`` = ``metrics["splits"]["test"]``)."""
    mel = test["melanoma"]
    ba = test.get("bootstrap", {}).get("argmax", {})
    lines = ["## Clinical: melanoma vs rest (test split)", ""]
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
                _boot_ci(b, "sensitivity", e["sensitivity"]),
                _boot_ci(b, "specificity", e["specificity"]),
                fmt(e["ppv"]),
                _boot_ci(b, "nne", e["nne"], 2),
                f"{e['tp']} / {e['fp']} / {e['fn']} / {e['tn']}",
            ]
        )
    lines.append(
        table(
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
    lines.append(f"Melanoma AUC: {_boot_ci(ba, 'mel_auc', mel['auc'])}.")
    lines.append("")
    return lines + _specificity_at_sensitivity(mel, ba)


def _specificity_at_sensitivity(
    mel: Mapping[str, Any], ba: Mapping[str, Any]
) -> list[str]:
    sas_rows = [
        [
            f"{float(k):.0%}",
            fmt(v["sensitivity"]),
            _boot_ci(ba, f"mel_specificity_at_sensitivity_{k}", v["specificity"]),
            fmt(v["threshold"], 4),
        ]
        for k, v in mel["specificity_at_sensitivity"].items()
    ]
    return [
        "Specificity at a fixed sensitivity, read off the test ROC curve (descriptive: "
        "these thresholds are not chosen on validation and not used as decisions):",
        "",
        table(
            ["target sensitivity", "sensitivity reached", "specificity", "threshold"],
            sas_rows,
        ),
        "",
    ]


def class_imbalance_section(imb: Mapping[str, Any] | None) -> list[str]:
    """The fit of test F1 against log10 training-set size per class (a paragraph)."""
    if imb and imb.get("r2") is None:
        return [
            "Class imbalance: no F1-against-training-size fit (it needs at least 3 "
            "classes with a defined F1 and different training sizes).",
            "",
        ]
    if imb:
        return [
            f"Class imbalance: F1 = {fmt(imb['intercept'], 2)} + {fmt(imb['slope'], 2)} "
            f"log10(training images), R² = {fmt(imb['r2'])} over {imb['n_classes']} classes.",
            "",
        ]
    return []


def figures_section(figures: Mapping[str, str]) -> list[str]:
    """Every figure given, in :data:`FIGURE_CAPTIONS` order."""
    lines = ["## Figures", ""]
    for key, caption in FIGURE_CAPTIONS.items():
        if key in figures:
            lines += [f"### {caption}", "", f"![{caption}]({figures[key]})", ""]
    return lines


def mlflow_section(mlflow_run: Mapping[str, Any] | None) -> list[str]:
    """Where the run is in MLflow (or that it was not tracked)."""
    lines = ["## MLflow", ""]
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
    return lines
