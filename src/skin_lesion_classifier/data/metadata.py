"""HAM10000 metadata schema and validation.

:func:`validate_metadata` never drops a row silently: every row it rejects, and every value
it repairs, is listed in the returned issues frame with its reason.
"""

from __future__ import annotations

import pandas as pd

from skin_lesion_classifier.constants import CLASS_TO_INDEX, CLASSES

#: Columns without which the metadata cannot be used.
REQUIRED_COLUMNS: tuple[str, ...] = ("lesion_id", "image_id", "dx")
#: Columns of the original file that are filled in when absent.
OPTIONAL_COLUMNS: dict[str, object] = {
    "dx_type": "unknown",
    "age": float("nan"),
    "sex": "unknown",
    "localization": "unknown",
}
VALID_SEX = ("male", "female", "unknown")
#: Columns of the validated metadata, in order.
CLEAN_COLUMNS: tuple[str, ...] = (
    "image_id",
    "lesion_id",
    "dx",
    "label",
    "dx_type",
    "age",
    "sex",
    "localization",
)
ISSUE_COLUMNS = [
    "stage",
    "severity",
    "image_id",
    "lesion_id",
    "field",
    "value",
    "reason",
]


class MetadataSchemaError(ValueError):
    """The metadata file as a whole cannot be used (for example a required column is missing)."""


def _issue(severity, image_id, lesion_id, field, value, reason) -> dict:
    return {
        "stage": "metadata",
        "severity": severity,
        "image_id": None if pd.isna(image_id) else str(image_id),
        "lesion_id": None if pd.isna(lesion_id) else str(lesion_id),
        "field": field,
        "value": None
        if value is None or (not isinstance(value, str) and pd.isna(value))
        else str(value),
        "reason": reason,
    }


def check_schema(metadata: pd.DataFrame, source: str = "metadata CSV") -> None:
    """Raise :class:`MetadataSchemaError` naming every missing required column."""
    columns = [str(c).strip() for c in metadata.columns]
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise MetadataSchemaError(
            f"{source} lacks required column(s) {missing}; found columns {columns}. "
            f"A HAM10000 metadata file has {list(REQUIRED_COLUMNS) + list(OPTIONAL_COLUMNS)}."
        )
    if len(metadata) == 0:
        raise MetadataSchemaError(f"{source} has no rows")


def validate_metadata(
    metadata: pd.DataFrame,
    min_age: float = 0.0,
    max_age: float = 120.0,
    source: str = "metadata CSV",
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Validate and normalise HAM10000 metadata.

    Returns ``(clean, issues)``. ``clean`` has one row per image id with columns
    ``image_id, lesion_id, dx, label, dx_type, age, sex, localization``. ``issues`` lists, one row
    each, the rows rejected (``severity == "error"``: unknown class code, missing image id,
    conflicting duplicate rows) and the values repaired (``severity == "warning"``: an age out of
    ``[min_age, max_age]`` or not a number becomes blank, an unknown sex becomes ``unknown``,
    an exact duplicate row is kept once, a missing lesion id makes the image its own lesion).
    """
    check_schema(metadata, source)
    df = metadata.reset_index(drop=True)  # row labels must be unique below
    df.columns = [str(c).strip() for c in df.columns]
    for col, default in OPTIONAL_COLUMNS.items():
        if col not in df.columns:
            df[col] = default
    df = df[list(REQUIRED_COLUMNS) + list(OPTIONAL_COLUMNS)].copy()
    df["_row"] = range(2, len(df) + 2)  # line number in the CSV (header is line 1)
    issues: list[dict] = []

    for col in ("lesion_id", "image_id", "dx", "dx_type", "sex", "localization"):
        df[col] = df[col].astype("string").str.strip()
        df.loc[df[col] == "", col] = pd.NA
    df["dx"] = df["dx"].str.lower()

    # Rows that cannot be used at all.
    bad = df["image_id"].isna()
    for _, r in df[bad].iterrows():
        issues.append(
            _issue(
                "error",
                None,
                r.lesion_id,
                "image_id",
                None,
                f"line {r._row}: missing image_id",
            )
        )
    df = df[~bad]

    unknown = ~df["dx"].isin(CLASSES)
    for _, r in df[unknown].iterrows():
        issues.append(
            _issue(
                "error",
                r.image_id,
                r.lesion_id,
                "dx",
                r.dx,
                f"line {r._row}: unknown class code {r.dx!r}; expected one of {', '.join(CLASSES)}",
            )
        )
    df = df[~unknown]

    # Duplicate image ids: identical rows are kept once, conflicting ones are all rejected.
    fields = ["lesion_id", "dx", "dx_type", "age", "sex", "localization"]
    dup_mask = df["image_id"].duplicated(keep=False)
    if dup_mask.any():
        keep_rows = []
        for image_id, grp in df[dup_mask].groupby("image_id", sort=False):
            distinct = grp[fields].astype("string").fillna("<NA>").drop_duplicates()
            if len(distinct) == 1:
                keep_rows.append(grp.index[0])
                for _, r in grp.iloc[1:].iterrows():
                    issues.append(
                        _issue(
                            "warning",
                            image_id,
                            r.lesion_id,
                            "image_id",
                            image_id,
                            f"line {r._row}: exact duplicate row of image {image_id}, kept once",
                        )
                    )
            else:
                for _, r in grp.iterrows():
                    issues.append(
                        _issue(
                            "error",
                            image_id,
                            r.lesion_id,
                            "image_id",
                            image_id,
                            f"line {r._row}: image {image_id} appears {len(grp)} times with conflicting values",
                        )
                    )
        df = pd.concat([df[~dup_mask], df.loc[keep_rows]]).sort_values("_row")

    # Repairs that keep the row.
    no_lesion = df["lesion_id"].isna()
    for idx, r in df[no_lesion].iterrows():
        issues.append(
            _issue(
                "warning",
                r.image_id,
                None,
                "lesion_id",
                None,
                f"line {r._row}: missing lesion_id; image treated as its own lesion",
            )
        )
        df.loc[idx, "lesion_id"] = f"NOLESION_{r.image_id}"

    raw_age = df["age"]
    age = pd.to_numeric(raw_age, errors="coerce")
    not_number = (
        raw_age.notna() & age.isna() & (raw_age.astype("string").str.strip() != "")
    )
    out_of_range = age.notna() & ((age < min_age) | (age > max_age))
    for _, r in df[not_number].iterrows():
        issues.append(
            _issue(
                "warning",
                r.image_id,
                r.lesion_id,
                "age",
                r.age,
                f"line {r._row}: age {r.age!r} is not a number; set blank",
            )
        )
    for _, r in df[out_of_range].iterrows():
        issues.append(
            _issue(
                "warning",
                r.image_id,
                r.lesion_id,
                "age",
                r.age,
                f"line {r._row}: age {r.age} outside [{min_age}, {max_age}]; set blank",
            )
        )
    df["age"] = age.where(~out_of_range).astype(float)

    df["sex"] = df["sex"].str.lower().fillna("unknown")
    bad_sex = ~df["sex"].isin(VALID_SEX)
    for _, r in df[bad_sex].iterrows():
        issues.append(
            _issue(
                "warning",
                r.image_id,
                r.lesion_id,
                "sex",
                r.sex,
                f"line {r._row}: sex {r.sex!r} not one of {VALID_SEX}; set 'unknown'",
            )
        )
    df.loc[bad_sex, "sex"] = "unknown"
    df["localization"] = df["localization"].str.lower().fillna("unknown")
    df["dx_type"] = df["dx_type"].str.lower().fillna("unknown")

    df["label"] = df["dx"].map(CLASS_TO_INDEX).astype("int64")
    clean = df[list(CLEAN_COLUMNS)]
    for col in ("image_id", "lesion_id", "dx", "dx_type", "sex", "localization"):
        clean[col] = clean[col].astype(str)
    return clean.reset_index(drop=True), pd.DataFrame(issues, columns=ISSUE_COLUMNS)
