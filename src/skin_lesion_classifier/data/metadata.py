"""HAM10000 metadata schema and validation.

:func:`validate_metadata` never drops a row silently: every row it rejects, and every value
it repairs, is listed in the returned issues frame with its reason.
"""

from __future__ import annotations

import difflib
from collections.abc import Collection

import pandas as pd

from skin_lesion_classifier.constants import CLASS_TO_INDEX, CLASSES

#: Columns without which the metadata cannot be used.
REQUIRED_COLUMNS: tuple[str, ...] = ("lesion_id", "image_id", "dx")
#: Columns of the original file that may be left out on purpose (``absent_columns``):
#: every row's value is then this one (unknown). Absent without saying so, they stop the run.
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


def close_match(name: str, columns: Collection[str]) -> str | None:
    """The column of ``columns`` that looks like a misspelling of ``name`` (case-insensitive
    ``difflib`` ratio at least 0.6; columns of the schema itself are not candidates)."""
    known = set(REQUIRED_COLUMNS) | set(OPTIONAL_COLUMNS)
    candidates = {c.lower(): c for c in columns if c not in known}
    hits = difflib.get_close_matches(name.lower(), list(candidates), n=1, cutoff=0.6)
    return candidates[hits[0]] if hits else None


def _missing(names: list[str], columns: list[str]) -> str:
    """``'age' (close match: 'Age')`` for each missing column."""
    parts = []
    for name in names:
        match = close_match(name, columns)
        parts.append(f"{name!r}" + (f" (close match: {match!r})" if match else ""))
    return ", ".join(parts)


def check_schema(
    metadata: pd.DataFrame,
    source: str = "metadata CSV",
    absent_columns: Collection[str] = (),
) -> None:
    """Raise :class:`MetadataSchemaError` naming every missing column and its close match.

    A missing optional column (:data:`OPTIONAL_COLUMNS`) is accepted only when
    ``absent_columns`` names it: a misspelt ``Age`` must not silently make every age unknown.
    """
    columns = [str(c).strip() for c in metadata.columns]
    schema = list(REQUIRED_COLUMNS) + list(OPTIONAL_COLUMNS)
    unknown = sorted(set(absent_columns) - set(OPTIONAL_COLUMNS))
    if unknown:
        raise MetadataSchemaError(
            f"absent_columns names {unknown}, which are not optional columns; only "
            f"{list(OPTIONAL_COLUMNS)} may be absent"
        )
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise MetadataSchemaError(
            f"{source} lacks required column(s) {missing}: {_missing(missing, columns)}; "
            f"found columns {columns}. A HAM10000 metadata file has {schema}."
        )
    missing = [
        c for c in OPTIONAL_COLUMNS if c not in columns and c not in absent_columns
    ]
    if missing:
        raise MetadataSchemaError(
            f"{source} lacks column(s) {_missing(missing, columns)}; found columns "
            f"{columns}. Rename a misspelt column, or, if the file has no such column on "
            "purpose, list it in the ingestion parameter absent_columns (every row's "
            "value is then unknown)."
        )
    if len(metadata) == 0:
        raise MetadataSchemaError(f"{source} has no rows")


def validate_metadata(
    metadata: pd.DataFrame,
    min_age: float = 0.0,
    max_age: float = 120.0,
    source: str = "metadata CSV",
    absent_columns: Collection[str] = (),
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Validate and normalise HAM10000 metadata.

    Returns ``(clean, issues)``. ``clean`` has one row per image id with columns
    ``image_id, lesion_id, dx, label, dx_type, age, sex, localization``. ``issues`` lists, one row
    each, the rows rejected (``severity == "error"``: unknown class code, missing image id,
    conflicting duplicate rows) and the values repaired (``severity == "warning"``: an age out of
    ``[min_age, max_age]`` or not a number becomes blank, an unknown sex becomes ``unknown``,
    an exact duplicate row is kept once, a missing lesion id makes the image its own lesion).
    A missing column stops the run (:func:`check_schema`) unless ``absent_columns`` names
    it; such a column is filled as unknown and listed once as a warning.
    """
    check_schema(metadata, source, absent_columns)
    df = metadata.reset_index(drop=True)  # row labels must be unique below
    df.columns = [str(c).strip() for c in df.columns]
    issues: list[dict] = []
    for col, default in OPTIONAL_COLUMNS.items():
        if col not in df.columns:
            df[col] = default
            issues.append(
                _issue("warning", None, None, col, None,
                       f"column {col} absent on purpose (absent_columns): every "
                       f"row's {col} is unknown")
            )  # fmt: skip
    df = df[list(REQUIRED_COLUMNS) + list(OPTIONAL_COLUMNS)].copy()
    df["_row"] = range(2, len(df) + 2)  # line number in the CSV (header is line 1)

    for col in ("lesion_id", "image_id", "dx", "dx_type", "sex", "localization"):
        df[col] = df[col].astype("string").str.strip()
        df.loc[df[col] == "", col] = pd.NA
    df["dx"] = df["dx"].str.lower()

    def flag(rows: pd.DataFrame, severity: str, field: str, reason) -> None:
        """One issue per row of ``rows``: ``reason(row)`` follows the CSV line number."""
        for _, r in rows.iterrows():
            issues.append(
                _issue(severity, r.image_id, r.lesion_id, field, r[field],
                       f"line {r._row}: {reason(r)}")
            )  # fmt: skip

    # Rows that cannot be used at all.
    bad = df["image_id"].isna()
    flag(df[bad], "error", "image_id", lambda r: "missing image_id")
    df = df[~bad]

    unknown = ~df["dx"].isin(CLASSES)
    flag(
        df[unknown], "error", "dx",
        lambda r: f"unknown class code {r.dx!r}; expected one of {', '.join(CLASSES)}",
    )  # fmt: skip
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
                flag(grp.iloc[1:], "warning", "image_id",
                     lambda r: f"exact duplicate row of image {r.image_id}, kept once")  # fmt: skip
            else:
                flag(grp, "error", "image_id",
                     lambda r, n=len(grp): f"image {r.image_id} appears {n} times with conflicting values")  # fmt: skip
        df = pd.concat([df[~dup_mask], df.loc[keep_rows]]).sort_values("_row")

    # Repairs that keep the row.
    no_lesion = df["lesion_id"].isna()
    flag(df[no_lesion], "warning", "lesion_id",
         lambda r: "missing lesion_id; image treated as its own lesion")  # fmt: skip
    df.loc[no_lesion, "lesion_id"] = "NOLESION_" + df.loc[no_lesion, "image_id"]

    raw_age = df["age"]
    age = pd.to_numeric(raw_age, errors="coerce")
    not_number = (
        raw_age.notna() & age.isna() & (raw_age.astype("string").str.strip() != "")
    )
    out_of_range = age.notna() & ((age < min_age) | (age > max_age))
    flag(df[not_number], "warning", "age",
         lambda r: f"age {r.age!r} is not a number; set blank")  # fmt: skip
    flag(df[out_of_range], "warning", "age",
         lambda r: f"age {r.age} outside [{min_age}, {max_age}]; set blank")  # fmt: skip
    df["age"] = age.where(~out_of_range).astype(float)

    df["sex"] = df["sex"].str.lower().fillna("unknown")
    bad_sex = ~df["sex"].isin(VALID_SEX)
    flag(df[bad_sex], "warning", "sex",
         lambda r: f"sex {r.sex!r} not one of {VALID_SEX}; set 'unknown'")  # fmt: skip
    df.loc[bad_sex, "sex"] = "unknown"
    df["localization"] = df["localization"].str.lower().fillna("unknown")
    df["dx_type"] = df["dx_type"].str.lower().fillna("unknown")

    df["label"] = df["dx"].map(CLASS_TO_INDEX).astype("int64")
    clean = df[list(CLEAN_COLUMNS)]
    for col in ("image_id", "lesion_id", "dx", "dx_type", "sex", "localization"):
        clean[col] = clean[col].astype(str)
    return clean.reset_index(drop=True), pd.DataFrame(issues, columns=ISSUE_COLUMNS)
