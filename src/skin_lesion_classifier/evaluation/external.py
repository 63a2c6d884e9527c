"""External validation sets: a folder of images plus an ISIC-format ground-truth CSV.

The CSV has the ISIC 2018 task 3 layout, ``image,MEL,NV,BCC,AKIEC,BKL,DF,VASC`` with one
``1`` per row (values ``0``/``1`` or ``0.0``/``1.0``). :func:`read_external_set` matches its
rows to the image files by image id (the file stem) and returns the matched rows plus an
``issues`` frame that lists, one row each, everything it could not use. Nothing is dropped
silently:

==========================  =============================================================
``issue``                   meaning
==========================  =============================================================
``no_label``                an image file with no row in the CSV
``no_image``                a CSV row with no image file
``not_one_hot``             a row whose class columns are not exactly one ``1``, rest ``0``
``duplicate_label_row``     an image listed twice (same label: kept once; conflicting: not
                            used)
``duplicate_image_file``    two files with the same id (the first, in sorted order, is used)
``unreadable_image``        the file exists but does not decode
``unknown_column``          a CSV column that is neither ``image`` nor a class column
``no_metadata``             with a metadata CSV: an image without a metadata row (its
                            age / sex / site are then unknown)
==========================  =============================================================

The optional metadata CSV has ``image`` (or ``image_id``) plus any of ``age``, ``sex``,
``localization`` (``anatom_site_general`` is accepted as the site) and ``lesion_id``.
Without ``lesion_id`` every image is its own lesion for the bootstrap.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from skin_lesion_classifier.constants import CLASS_TO_INDEX, ISIC_COLUMNS
from skin_lesion_classifier.data.discovery import check_images, find_image_files
from skin_lesion_classifier.data.images import IMAGE_SUFFIXES

#: Columns of the issues frame.
ISSUE_COLUMNS = ["image_id", "issue", "detail"]
#: Columns of the matched-rows frame (the ``predictions`` identifiers + path + metadata).
ROW_COLUMNS = [
    "image_id",
    "lesion_id",
    "split",
    "dx",
    "label",
    "path",
    "age",
    "sex",
    "localization",
]
#: Site column names accepted in a metadata CSV, first match wins.
SITE_ALIASES = ("localization", "anatom_site_general", "anatom_site_general_challenge")


def _strip_suffix(name: str) -> str:
    p = Path(str(name).strip())
    return p.stem if p.suffix.lower() in IMAGE_SUFFIXES else p.name


def _issue(image_id, issue: str, detail: str) -> dict:
    return {
        "image_id": None if image_id is None else str(image_id),
        "issue": issue,
        "detail": detail,
    }


def read_ground_truth(
    labels_csv: str | os.PathLike | pd.DataFrame,
) -> tuple[pd.DataFrame, list[dict]]:
    """Parse an ISIC-format ground truth into ``image_id, dx, label`` rows plus issues.

    Column names are matched case-insensitively. A missing ``image`` column or a missing
    class column raises ``ValueError`` naming it (the file cannot be read as ISIC ground
    truth at all); everything else is an issue row.
    """
    if isinstance(labels_csv, pd.DataFrame):
        raw, source = labels_csv.copy(), "ground-truth frame"
    else:
        path = Path(labels_csv)
        if not path.is_file():
            raise FileNotFoundError(f"ground-truth CSV not found: {path}")
        raw, source = pd.read_csv(path, dtype=str), str(path)
    rename = {c: str(c).strip() for c in raw.columns}
    raw = raw.rename(columns=rename)
    upper = {c.upper(): c for c in raw.columns}
    image_col = upper.get("IMAGE") or upper.get("IMAGE_ID")
    missing = [c for c in ISIC_COLUMNS if c not in upper]
    if image_col is None or missing:
        what = (["image"] if image_col is None else []) + missing
        raise ValueError(
            f"{source} is not an ISIC ground-truth CSV: it lacks column(s) {what}; "
            f"expected image,{','.join(ISIC_COLUMNS)} (found {list(raw.columns)})"
        )
    issues: list[dict] = []
    known = {image_col, *(upper[c] for c in ISIC_COLUMNS)}
    for col in raw.columns:
        if col not in known:
            issues.append(
                _issue(
                    None,
                    "unknown_column",
                    f"column {col!r} is not used (only "
                    f"image and {','.join(ISIC_COLUMNS)} are)",
                )
            )
    values = raw[[upper[c] for c in ISIC_COLUMNS]].apply(pd.to_numeric, errors="coerce")
    ids = raw[image_col].astype("object")
    rows = []
    for i in range(len(raw)):
        image_id = ids.iloc[i]
        if pd.isna(image_id) or str(image_id).strip() == "":
            issues.append(
                _issue(None, "not_one_hot", f"CSV line {i + 2}: blank image id")
            )
            continue
        image_id = _strip_suffix(image_id)
        v = values.iloc[i].to_numpy(dtype=np.float64)
        ones = np.isclose(v, 1.0)
        zeros = np.isclose(v, 0.0)
        if np.isnan(v).any() or not np.all(ones | zeros) or ones.sum() != 1:
            shown = ",".join("blank" if np.isnan(x) else f"{x:g}" for x in v)
            issues.append(
                _issue(
                    image_id,
                    "not_one_hot",
                    f"CSV line {i + 2}: class values {shown} (in {','.join(ISIC_COLUMNS)} "
                    "order) are not exactly one 1 and six 0",
                )
            )
            continue
        dx = ISIC_COLUMNS[int(np.argmax(ones))].lower()
        rows.append({"image_id": image_id, "dx": dx, "line": i + 2})
    gt = pd.DataFrame(rows, columns=["image_id", "dx", "line"])
    keep = []
    for image_id, grp in gt.groupby("image_id", sort=False):
        lines = ", ".join(str(v) for v in grp["line"])
        if len(grp) == 1:
            keep.append(grp.index[0])
        elif grp["dx"].nunique() == 1:
            keep.append(grp.index[0])
            issues.append(
                _issue(
                    image_id,
                    "duplicate_label_row",
                    f"listed {len(grp)} times (CSV lines {lines}) with the same label; "
                    "used once",
                )
            )
        else:
            issues.append(
                _issue(
                    image_id,
                    "duplicate_label_row",
                    f"listed {len(grp)} times (CSV lines {lines}) with conflicting labels "
                    f"{sorted(grp['dx'])}; not used",
                )
            )
    gt = gt.loc[sorted(keep)].drop(columns="line").reset_index(drop=True)
    gt["label"] = gt["dx"].map(CLASS_TO_INDEX).astype("int64")
    return gt, issues


def read_external_metadata(
    metadata_csv: str | os.PathLike | None,
) -> pd.DataFrame | None:
    """``image_id`` + ``age, sex, localization`` (+ ``lesion_id`` when present) from an
    optional metadata CSV; ``None`` when no CSV is given."""
    if metadata_csv is None or str(metadata_csv) == "":
        return None
    path = Path(metadata_csv)
    if not path.is_file():
        raise FileNotFoundError(f"external metadata CSV not found: {path}")
    raw = pd.read_csv(path)
    raw.columns = [str(c).strip() for c in raw.columns]
    id_col = next((c for c in ("image_id", "image") if c in raw.columns), None)
    if id_col is None:
        raise ValueError(
            f"{path} lacks an 'image' (or 'image_id') column; found {list(raw.columns)}"
        )
    out = pd.DataFrame({"image_id": raw[id_col].map(_strip_suffix)})
    out["age"] = raw["age"] if "age" in raw.columns else raw.get("age_approx", np.nan)
    out["sex"] = raw["sex"] if "sex" in raw.columns else "unknown"
    site = next((c for c in SITE_ALIASES if c in raw.columns), None)
    out["localization"] = raw[site] if site else "unknown"
    if "lesion_id" in raw.columns:
        out["lesion_id"] = raw["lesion_id"]
    dup = out["image_id"].duplicated(keep=False)
    if dup.any():
        raise ValueError(
            f"{path}: image ids listed more than once: "
            f"{sorted(set(out.loc[dup, 'image_id']))[:5]}"
        )
    return out


def read_external_set(
    image_dir: str | os.PathLike,
    labels_csv: str | os.PathLike | pd.DataFrame,
    metadata_csv: str | os.PathLike | None = None,
    check_decode: bool = True,
    workers: int | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Match an external image folder to its ISIC ground truth.

    Returns ``(rows, issues)``. ``rows`` has one row per usable labelled image with the
    columns :data:`ROW_COLUMNS` (``split == "external"``; ``lesion_id`` from the metadata
    CSV, else the image id); ``issues`` lists every file or row left out, and why
    (:data:`ISSUE_COLUMNS`, see the module docstring). Raises ``ValueError`` when no image
    at all can be used.
    """
    image_dir = Path(image_dir)
    files = find_image_files(image_dir)
    gt, issues = read_ground_truth(labels_csv)
    for r in files[files["duplicate_of"].notna()].itertuples():
        issues.append(
            _issue(
                r.image_id,
                "duplicate_image_file",
                f"{r.path} has the same id as {r.duplicate_of}; the latter is used",
            )
        )
    files = files[files["duplicate_of"].isna()]
    labelled = set(gt["image_id"])
    on_disk = set(files["image_id"])
    not_one_hot = {
        i["image_id"]
        for i in issues
        if i["issue"] in ("not_one_hot", "duplicate_label_row")
    }
    for r in files[~files["image_id"].isin(labelled)].itertuples():
        if r.image_id in not_one_hot:
            continue  # its label row is unusable and already listed
        issues.append(
            _issue(
                r.image_id, "no_label", f"{r.path} has no row in the ground-truth CSV"
            )
        )
    for image_id in gt.loc[~gt["image_id"].isin(on_disk), "image_id"]:
        issues.append(
            _issue(
                image_id,
                "no_image",
                f"ground-truth row has no image file {image_id}.* under {image_dir}",
            )
        )
    rows = gt.merge(files[["image_id", "path"]], on="image_id", how="inner")
    if check_decode and len(rows):
        checks = check_images(rows["path"].tolist(), workers=workers, progress=False)
        bad = ~checks["ok"].to_numpy(dtype=bool)
        for r in checks[bad].itertuples():
            issues.append(
                _issue(r.image_id, "unreadable_image", f"{r.path}: {r.reason}")
            )
        rows = rows[~rows["path"].isin(checks.loc[bad, "path"])]
    meta = read_external_metadata(metadata_csv)
    if meta is not None:
        rows = rows.merge(meta, on="image_id", how="left", indicator=True)
        for image_id in rows.loc[rows["_merge"] == "left_only", "image_id"]:
            issues.append(
                _issue(
                    image_id,
                    "no_metadata",
                    "no row in the metadata CSV: age, sex and site are unknown",
                )
            )
        rows = rows.drop(columns="_merge")
    for col, default in (
        ("age", np.nan),
        ("sex", "unknown"),
        ("localization", "unknown"),
    ):
        if col not in rows.columns:
            rows[col] = default
        rows[col] = rows[col].where(rows[col].notna(), default)
    if "lesion_id" not in rows.columns:
        rows["lesion_id"] = rows["image_id"]
    rows["lesion_id"] = rows["lesion_id"].where(
        rows["lesion_id"].notna(), rows["image_id"]
    )
    rows["split"] = "external"
    rows = rows[ROW_COLUMNS].sort_values("image_id").reset_index(drop=True)
    issues_frame = pd.DataFrame(issues, columns=ISSUE_COLUMNS)
    if rows.empty:
        counts = issues_frame["issue"].value_counts().to_dict()
        raise ValueError(
            f"no usable labelled image in {image_dir} with {labels_csv}: issues {counts}"
        )
    return rows, issues_frame


def issue_summary(issues: pd.DataFrame, n_used: int) -> dict[str, int]:
    """Counts per issue kind plus ``used`` (the matched images), for the report and MLflow."""
    out = {"used": int(n_used)}
    for kind, n in issues["issue"].value_counts().items():
        out[str(kind)] = int(n)
    return out
