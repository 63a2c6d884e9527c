"""The per-run evaluation report: Markdown with the figures beside it, and one
self-contained HTML file (figures embedded as base64 PNG).

:func:`build_markdown` puts together the sections of :mod:`reporting.sections` (one
function per section; :func:`~skin_lesion_classifier.reporting.sections.headline_rows`
picks the figures a dermatology researcher reads first, also printed by ``python -m
skin_lesion_classifier.show_results``); :func:`markdown_to_html` turns it into HTML.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

from skin_lesion_classifier.constants import CLASSES
from skin_lesion_classifier.reporting.format import (
    figure_png,
    fmt,
    fmt_ci,
    markdown_to_html,
    png_data_uri,
    to_jsonable,
)
from skin_lesion_classifier.reporting.sections import (
    FIGURE_CAPTIONS,
    class_imbalance_section,
    config_section,
    data_section,
    decision_section,
    figures_section,
    headline_rows,
    headline_section,
    intro_section,
    melanoma_section,
    mlflow_section,
    split_section,
)

#: ``fmt``, ``to_jsonable`` & co. live in ``reporting.format`` and ``headline_rows`` in
#: ``reporting.sections``; they stay importable from here for existing callers.
__all__ = [
    "FIGURE_CAPTIONS",
    "build_markdown",
    "data_summary",
    "figure_png",
    "fmt",
    "fmt_ci",
    "headline_rows",
    "markdown_to_html",
    "png_data_uri",
    "to_jsonable",
]


def build_markdown(
    metrics: Mapping[str, Any],
    data_summary: Mapping[str, Any],
    config: Mapping[str, Any],
    figures: Mapping[str, str],
    mlflow_run: Mapping[str, Any] | None = None,
    title: str = "Skin-lesion classifier: evaluation report",
) -> str:
    """The whole report as Markdown, section by section.

    ``figures`` maps figure keys (see :data:`FIGURE_CAPTIONS`) to the image reference to
    write (a relative file name, or a ``data:`` URI for the self-contained HTML);
    ``mlflow_run`` holds ``run_id``, ``experiment_id``, ``tracking_uri`` and an optional
    ``url`` (``None``: the run was not tracked).
    """
    chosen = metrics["decision_rule"]["rule"]
    lines = intro_section(metrics, title)
    lines += headline_section(metrics)
    lines += data_section(data_summary)
    lines += config_section(config)
    lines += decision_section(metrics["decision_rule"])
    for split in ("val", "test"):
        if split in metrics["splits"]:
            lines += split_section(metrics["splits"][split], split, chosen)
    lines += melanoma_section(metrics["splits"]["test"], chosen)
    lines += class_imbalance_section(metrics.get("class_imbalance"))
    lines += figures_section(figures)
    lines += mlflow_section(mlflow_run)
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
