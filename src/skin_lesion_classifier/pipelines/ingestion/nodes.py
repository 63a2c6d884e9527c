"""Ingestion nodes: metadata validation, image decode checks, the clean image index and the
data-quality report. Every rejected row or file is listed with its reason."""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd

from skin_lesion_classifier.data.discovery import (
    UnionFind,
    check_images,
    near_duplicate_pairs,
)
from skin_lesion_classifier.data.metadata import (
    CLEAN_COLUMNS,
    ISSUE_COLUMNS,
    OPTIONAL_COLUMNS,
    validate_metadata,
)

logger = logging.getLogger(__name__)

INDEX_COLUMNS = [
    *CLEAN_COLUMNS,
    "path",
    "width",
    "height",
    "mode",
    "sha256",
    "duplicate_group",
    "group_id",
]


def validate_metadata_node(
    raw_metadata: pd.DataFrame, params: dict[str, Any]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Check columns, class codes, ids, ages, sex and site; see ``data.metadata.validate_metadata``."""
    clean, issues = validate_metadata(
        raw_metadata,
        min_age=params["min_age"],
        max_age=params["max_age"],
        source="HAM10000 metadata (raw_metadata)",
        absent_columns=params["absent_columns"],
    )
    logger.info("metadata: %d usable rows, %d issues", len(clean), len(issues))
    return clean, issues


def check_image_files(raw_images: pd.DataFrame, params: dict[str, Any]) -> pd.DataFrame:
    """Decode every image file once: size, mode, SHA-256, near-duplicate signature, or why not.

    Files that repeat an image id already found elsewhere are not decoded again; they come back
    with ``ok = False`` and the reason.
    """
    if raw_images.empty:
        raise ValueError(
            "no image files found in the raw image folder; run `make data` first"
        )
    first = raw_images[raw_images["duplicate_of"].isna()]
    checks = check_images(
        first["path"].tolist(),
        workers=params["workers"],
        max_pixels=int(params["max_pixels"]),
    )
    repeated = raw_images[raw_images["duplicate_of"].notna()]
    if len(repeated):
        extra = pd.DataFrame(
            {
                "image_id": repeated["image_id"],
                "path": repeated["path"],
                "ok": False,
                "reason": "another file with this image id was found first: "
                + repeated["duplicate_of"],
                "width": -1,
                "height": -1,
                "mode": None,
                "sha256": None,
                "signature": None,
            }
        )
        checks = pd.concat([checks, extra], ignore_index=True)
    logger.info(
        "images: %d decoded, %d rejected",
        int(checks["ok"].sum()),
        int((~checks["ok"]).sum()),
    )
    return checks


def _issues(
    stage, severity, frame, reason_col="reason", field="path", value_col="path"
):
    return pd.DataFrame(
        {
            "stage": stage,
            "severity": severity,
            "image_id": frame["image_id"].astype(str),
            "lesion_id": frame["lesion_id"] if "lesion_id" in frame else None,
            "field": field,
            "value": frame[value_col].astype(str) if value_col else None,
            "reason": frame[reason_col] if reason_col in frame else reason_col,
        },
        columns=ISSUE_COLUMNS,
    )


def build_image_index(
    metadata: pd.DataFrame,
    metadata_issues: pd.DataFrame,
    image_checks: pd.DataFrame,
    params: dict[str, Any],
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Join validated metadata with decoded images into the clean ``image_index``.

    Returns ``(image_index, image_issues, duplicates)``. Rows without a readable image, and
    images without a metadata row, are issues; an image whose row was rejected
    (``metadata_issues``) is already listed there with the row's reason, and not again.
    Images with the same SHA-256, or whose grey-level
    thumbnails correlate at ``near_duplicate_min_correlation`` or more, share a
    ``duplicate_group``; ``group_id`` joins lesions linked by such duplicates, so that the
    splitter keeps them on one side.
    """
    checks = image_checks.drop_duplicates("image_id", keep="first")
    merged = metadata.merge(checks, on="image_id", how="left", indicator=True)
    issues = []

    missing = merged[merged["_merge"] == "left_only"].assign(
        reason="image file not found for this metadata row", path=""
    )
    if len(missing):
        issues.append(
            _issues("images", "error", missing, field="image_id", value_col="image_id")
        )
    unreadable = merged[(merged["_merge"] == "both") & (~merged["ok"].astype(bool))]
    if len(unreadable):
        issues.append(_issues("images", "error", unreadable))
    rejected = metadata_issues.loc[metadata_issues["severity"] == "error", "image_id"]
    orphans = image_checks[
        ~image_checks["image_id"].isin(metadata["image_id"])
        & ~image_checks["image_id"].isin(rejected.dropna())
    ].assign(reason="image file has no metadata row (not labelled); not used")
    if len(orphans):
        issues.append(_issues("images", "warning", orphans))
    repeated = image_checks[image_checks.duplicated("image_id", keep="first")]
    if len(repeated):
        issues.append(_issues("images", "warning", repeated.assign(lesion_id=None)))

    index = merged[(merged["_merge"] == "both") & (merged["ok"].astype(bool))].drop(
        columns=["_merge", "ok", "reason"]
    )
    index = index.reset_index(drop=True)

    # Duplicates: identical bytes, and near-identical pictures (same image, other colour balance).
    # (only groups of two or more link anything: grouping the few repeated keys, not every
    # image, keeps this fast on 10,015 images)
    uf = UnionFind()
    same_bytes = index[index.duplicated("sha256", keep=False)]
    exact = []
    for _, grp in same_bytes.groupby("sha256"):
        ids = grp["image_id"].tolist()
        for other in ids[1:]:
            uf.union(ids[0], other)
        exact += [(a, b, 1.0, "identical bytes") for a, b in zip(ids, ids[1:])]
    near = near_duplicate_pairs(
        index["image_id"].tolist(),
        index["signature"].tolist(),
        params["near_duplicate_min_correlation"],
    )
    for a, b, _ in near:
        uf.union(a, b)
    for a, b in params["known_duplicates"] or []:
        if a in set(index["image_id"]) and b in set(index["image_id"]):
            uf.union(a, b)
    index["duplicate_group"] = index["image_id"].map(uf.find)

    lesion_of = dict(zip(index["image_id"], index["lesion_id"], strict=True))
    exact_pairs = {tuple(sorted((a, b))) for a, b, _, _ in exact}
    dup_rows = [
        {
            "image_a": a,
            "image_b": b,
            "lesion_a": lesion_of[a],
            "lesion_b": lesion_of[b],
            "correlation": round(c, 5),
            "kind": k,
        }
        for a, b, c, k in exact
    ] + [
        {
            "image_a": a,
            "image_b": b,
            "lesion_a": lesion_of[a],
            "lesion_b": lesion_of[b],
            "correlation": round(c, 5),
            "kind": "near-identical picture",
        }
        for a, b, c in near
        if tuple(sorted((a, b))) not in exact_pairs
    ]
    duplicates = pd.DataFrame(
        dup_rows,
        columns=["image_a", "image_b", "lesion_a", "lesion_b", "correlation", "kind"],
    )

    # Groups for splitting: lesions joined by any duplicate pair.
    groups = UnionFind()
    for lesion in index["lesion_id"]:
        groups.find(lesion)
    linked = index[index.duplicated("duplicate_group", keep=False)]
    for _, grp in linked.groupby("duplicate_group"):
        lesions = grp["lesion_id"].unique().tolist()
        for other in lesions[1:]:
            groups.union(lesions[0], other)
    index["group_id"] = index["lesion_id"].map(groups.find)

    all_issues = (
        pd.concat(issues, ignore_index=True)
        if issues
        else pd.DataFrame(columns=ISSUE_COLUMNS)
    )
    logger.info(
        "image index: %d images, %d lesions, %d split groups, %d duplicate pairs",
        len(index),
        index["lesion_id"].nunique(),
        index["group_id"].nunique(),
        len(duplicates),
    )
    return index[INDEX_COLUMNS], all_issues, duplicates


def summarize_data_quality(
    raw_metadata: pd.DataFrame,
    metadata_issues: pd.DataFrame,
    image_issues: pd.DataFrame,
    image_index: pd.DataFrame,
    duplicates: pd.DataFrame,
) -> tuple[dict[str, Any], pd.DataFrame, dict[str, Any]]:
    """The data-quality report (JSON), the full issue list (CSV) and figures for MLflow.

    ``absent_columns`` lists the optional metadata columns the file leaves out (accepted
    only when the ``absent_columns`` parameter names them; their values are unknown)."""
    raw_columns = {str(c).strip() for c in raw_metadata.columns}
    issues = pd.concat([metadata_issues, image_issues], ignore_index=True)
    errors = issues[issues["severity"] == "error"]
    cross = (
        duplicates[duplicates["lesion_a"] != duplicates["lesion_b"]]
        if len(duplicates)
        else duplicates
    )
    report = {
        "metadata_rows": len(raw_metadata),
        "absent_columns": [c for c in OPTIONAL_COLUMNS if c not in raw_columns],
        "usable_images": len(image_index),
        "lesions": int(image_index["lesion_id"].nunique()),
        "split_groups": int(image_index["group_id"].nunique()),
        "rejected_rows": int(errors["image_id"].nunique(dropna=False))
        if len(errors)
        else 0,
        "warnings": int((issues["severity"] == "warning").sum()),
        "issues_by_reason": {
            k: int(v)
            for k, v in issues["reason"]
            .str.replace(r"^line \d+: ", "", regex=True)
            .str.replace(r"ISIC_\d+", "ISIC_*", regex=True)
            .value_counts()
            .items()
        },
        "duplicate_pairs": len(duplicates),
        "cross_lesion_duplicate_pairs": cross[
            ["image_a", "image_b", "lesion_a", "lesion_b", "kind"]
        ].to_dict("records"),
        "class_counts": {
            k: int(v) for k, v in image_index["dx"].value_counts().sort_index().items()
        },
        "image_sizes": {
            f"{w}x{h}": int(n)
            for (w, h), n in image_index.groupby(["width", "height"]).size().items()
        },
        "age_missing": int(image_index["age"].isna().sum()),
        "sex_unknown": int((image_index["sex"] == "unknown").sum()),
        "localization_unknown": int((image_index["localization"] == "unknown").sum()),
    }
    metrics = {
        k: {"value": float(report[k]), "step": 0}
        for k in (
            "metadata_rows",
            "usable_images",
            "lesions",
            "split_groups",
            "rejected_rows",
            "warnings",
            "duplicate_pairs",
            "age_missing",
        )
    }
    return report, issues, metrics
