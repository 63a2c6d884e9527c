"""Predict a folder (or list) of pictures into an ISIC-format table plus an errors table.

The ISIC table has ``image, MEL, NV, BCC, AKIEC, BKL, DF, VASC`` (ISIC 2018 task 3 column
order) followed by ``predicted_class`` (arg-max, project class code) and ``melanoma_flag``
(the validated threshold rule, see :mod:`inference.decision`). Every file that cannot be
decoded becomes one ``image, reason`` row of the errors table; the others are still
predicted.

A model that fuses patient metadata takes it from an optional metadata CSV
(:func:`read_metadata_csv`: ``image_id`` or ``image``, ``age``, ``sex``, ``localization``;
HAM10000's metadata CSV works as is), matched to the pictures by file stem. Its table gets
two more columns: ``metadata`` (``provided``: a row with every field known; ``partial``: a
row with some fields blank / unknown; ``missing``: no row, so age, sex and site were all
unknown to the model) and ``metadata_unknown`` (the unknown fields, ``;``-separated).
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from skin_lesion_classifier.constants import CLASSES, ISIC_COLUMNS
from skin_lesion_classifier.data.images import MAX_PIXELS, ImageDecodeError
from skin_lesion_classifier.data.metadata_features import (
    METADATA_COLUMNS,
    UNKNOWN_SITE,
    parse_age,
    parse_sex,
    parse_site,
)
from skin_lesion_classifier.inference.decision import Decision
from skin_lesion_classifier.inference.predictor import Predictor

logger = logging.getLogger(__name__)

ISIC_CSV_COLUMNS: tuple[str, ...] = (
    "image",
    *ISIC_COLUMNS,
    "predicted_class",
    "melanoma_flag",
)
ERROR_COLUMNS: tuple[str, ...] = ("image", "reason")
#: Columns added to the ISIC table when the model fuses patient metadata.
METADATA_STATUS_COLUMNS: tuple[str, ...] = ("metadata", "metadata_unknown")
#: Key columns accepted in a metadata CSV, in order of preference.
METADATA_KEYS: tuple[str, ...] = ("image_id", "image")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")


def _key(value: object) -> str:
    """An image id from a metadata key or file name: ``ISIC_1.jpg`` / ``a/ISIC_1`` ->
    ``ISIC_1``."""
    name = Path(str(value).strip()).name
    suffix = Path(name).suffix.lower()
    return name[: -len(suffix)] if suffix in _IMAGE_SUFFIXES else name


def read_metadata_csv(path: str | os.PathLike) -> pd.DataFrame:
    """A patient-metadata CSV as ``image_id, age, sex, localization`` (one row per image).

    The key column is ``image_id`` or ``image`` (an id or a file name; matched to the
    pictures' file stems); ``age``, ``sex`` and ``localization`` must all be there (leave a
    column blank when unknown), other columns are ignored. Raises ``ValueError`` naming a
    missing column or an image listed twice with different values.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metadata CSV not found: {path}")
    try:
        frame = pd.read_csv(path, dtype={"sex": "object", "localization": "object"})
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not a readable CSV ({exc})") from exc
    key = next((k for k in METADATA_KEYS if k in frame.columns), None)
    missing = [c for c in METADATA_COLUMNS if c not in frame.columns]
    if key is None or missing:
        need = ([" or ".join(METADATA_KEYS)] if key is None else []) + missing
        raise ValueError(
            f"{path}: metadata CSV lacks column(s) {need}; found {list(frame.columns)}. "
            "It needs image_id (or image), age, sex, localization; leave a value blank "
            "when it is unknown"
        )
    out = frame[[key, *METADATA_COLUMNS]].rename(columns={key: "image_id"})
    out["image_id"] = out["image_id"].map(_key)
    out = out.drop_duplicates()
    dup = out["image_id"].duplicated(keep=False)
    if dup.any():
        raise ValueError(
            f"{path}: images listed more than once with different metadata: "
            f"{sorted(set(out.loc[dup, 'image_id']))[:5]}"
        )
    return out.reset_index(drop=True)


def metadata_for(
    paths: Sequence[Path], metadata: pd.DataFrame | None
) -> tuple[pd.DataFrame, list[str], list[str]]:
    """The metadata rows of ``paths`` (matched by file stem; all blank where there is no
    row), each row's status (``provided`` / ``partial`` / ``missing``) and its unknown fields
    (``;``-separated)."""
    n = len(paths)
    if metadata is None:
        rows = pd.DataFrame({c: [None] * n for c in METADATA_COLUMNS}, dtype=object)
        found = np.zeros(n, dtype=bool)
    else:
        table = metadata.set_index("image_id")
        keys = [_key(p) for p in paths]
        found = np.array([k in table.index for k in keys], dtype=bool)
        rows = (
            table.reindex(keys)[list(METADATA_COLUMNS)]
            .astype(object)
            .reset_index(drop=True)
        )
        rows = rows.where(rows.notna(), None)
    rows.insert(0, "image_id", [str(p) for p in paths])
    age_unknown = ~np.isfinite(parse_age(rows))
    sex_unknown = parse_sex(rows) == "unknown"
    site_unknown = parse_site(rows) == UNKNOWN_SITE
    status, unknown = [], []
    for i in range(n):
        fields = [
            name
            for name, flag in (
                ("age", age_unknown[i]),
                ("sex", sex_unknown[i]),
                ("localization", site_unknown[i]),
            )
            if flag
        ]
        status.append(
            "missing" if not found[i] else ("partial" if fields else "provided")
        )
        unknown.append(";".join(fields))
    return rows, status, unknown


def collect_inputs(
    inputs: str | os.PathLike | Iterable[str | os.PathLike], recursive: bool = False
) -> list[Path]:
    """The inputs to predict: every entry of a folder (sorted; with ``recursive`` the
    entries of its non-hidden sub-folders instead of the sub-folders), or the given list
    of paths as is.

    Nothing is filtered here: hidden entries, folders that are not searched, links to
    nothing, FIFOs and files that do not decode all reach :func:`predict_files`, which lists
    each in the errors table with its reason (:func:`input_problem`), so that every input
    is either predicted or explained.
    """
    if isinstance(inputs, str | os.PathLike):
        root = Path(inputs)
        if root.is_dir():
            files = _folder_entries(root, recursive)
            if not files:
                raise FileNotFoundError(f"no files in {root}")
            return files
        if root.is_file():
            return [root]
        raise FileNotFoundError(f"input not found: {root}")
    files = [Path(p) for p in inputs]
    if not files:
        raise ValueError("the list of images to predict is empty")
    return files


def _folder_entries(root: Path, recursive: bool) -> list[Path]:
    """Sorted entries of ``root``; with ``recursive``, a readable non-hidden sub-folder
    (also through a link, each real folder once) is replaced by its own entries."""
    seen = {root.resolve()}
    entries: list[Path] = []

    def walk(folder: Path) -> None:
        for entry in sorted(folder.iterdir()):
            real = entry.resolve() if entry.is_dir() else None
            if (
                recursive
                and real is not None
                and real not in seen
                and not entry.name.startswith(".")
                and os.access(entry, os.R_OK | os.X_OK)
            ):
                seen.add(real)
                walk(entry)
            else:
                entries.append(entry)

    walk(root)
    return entries


def input_problem(path: Path) -> str | None:
    """Why ``path`` is not an image file to decode (``"<name>: <reason>"``), or ``None``.

    Hidden entries (name starting with ``.``), folders, links to nothing and special
    files (FIFO, socket, device: reading them could block forever) are not read; a
    regular file's problems (permission, format, truncation) are found by decoding it.
    """
    name = path.name
    if name.startswith("."):
        return f"{name}: hidden (name starts with '.'), not predicted"
    if path.is_symlink() and not path.exists():
        return (
            f"{name}: dangling symbolic link (its target {os.readlink(path)} "
            "does not exist)"
        )
    if not path.exists():
        return f"{name}: file not found"
    if path.is_dir():
        if not os.access(path, os.R_OK | os.X_OK):
            return f"{name}: a folder that cannot be listed (permission denied)"
        return (
            f"{name}: a folder, not searched (predict it with --recursive / "
            "recursive: true, or name its files)"
        )
    if not path.is_file():
        mode = path.stat().st_mode
        kind = next((k for k, test in _SPECIAL_FILES if test(mode)), "special file")
        return f"{name}: not a regular file ({kind}), not read"
    return None


_SPECIAL_FILES = (
    ("FIFO / named pipe", stat.S_ISFIFO),
    ("socket", stat.S_ISSOCK),
    ("character device", stat.S_ISCHR),
    ("block device", stat.S_ISBLK),
)


def image_ids(paths: Sequence[Path]) -> list[str]:
    """ISIC ``image`` ids: the file stem (``ISIC_0024306.jpg`` -> ``ISIC_0024306``); where two
    files share a stem the full file name (or path) is used for all of them so that no row
    is ambiguous."""
    stems = [p.stem for p in paths]
    counts = pd.Series(stems).value_counts()
    ids = []
    for p, s in zip(paths, stems, strict=True):
        ids.append(s if counts[s] == 1 else str(p))
    return ids


def isic_frame(
    ids: Sequence[str], probabilities: np.ndarray, decision: Decision
) -> pd.DataFrame:
    """The ISIC-format table for ``(n, 7)`` ``probabilities`` in :data:`CLASSES` order."""
    probabilities = np.asarray(probabilities, dtype=np.float64).reshape(
        -1, len(CLASSES)
    )
    if len(probabilities) != len(ids):
        raise ValueError(
            f"{len(ids)} image ids but {len(probabilities)} probability rows"
        )
    frame = pd.DataFrame({"image": [str(i) for i in ids]})
    for col in ISIC_COLUMNS:
        frame[col] = probabilities[:, CLASSES.index(col.lower())]
    frame["predicted_class"] = [CLASSES[i] for i in decision.predict(probabilities)]
    frame["melanoma_flag"] = decision.flag_melanoma(probabilities).astype(bool)
    return frame[list(ISIC_CSV_COLUMNS)]


def predict_files(
    predictor: Predictor,
    paths: Sequence[str | os.PathLike],
    batch_size: int = 32,
    metadata: pd.DataFrame | None = None,
    max_pixels: int = MAX_PIXELS,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Predict ``paths`` in batches of ``batch_size`` decoded pictures.

    A picture whose header announces more than ``max_pixels`` pixels is not decoded; it
    goes to the errors with the limit named.

    ``metadata`` (from :func:`read_metadata_csv`) feeds a model that fuses patient
    metadata; pictures without a row are predicted with every field unknown and the
    ``metadata`` column says so. An image-only model ignores it (a warning is logged).

    Returns ``(predictions, errors)``: the ISIC table for the readable pictures (input
    order) and ``image, reason`` rows for every other input (:func:`input_problem`, or
    the decoding error), so that ``len(predictions) + len(errors) == len(paths)``. Memory stays bounded by the batch.
    """
    paths = [Path(p) for p in paths]
    ids = image_ids(paths)
    uses_metadata = predictor.uses_metadata
    if metadata is not None and not uses_metadata:
        logger.warning(
            "the model is image-only: the %d metadata row(s) given are not used",
            len(metadata),
        )
    rows, status, unknown = metadata_for(paths, metadata if uses_metadata else None)
    if uses_metadata:  # fail on impossible values before any picture is decoded
        predictor.encode_metadata(rows, len(rows))
    done: list[int] = []
    probs: list[np.ndarray] = []
    errors: list[dict[str, str]] = []
    batch: list[np.ndarray] = []
    batch_index: list[int] = []

    def flush() -> None:
        if batch:
            meta_rows = (
                rows.iloc[batch_index].reset_index(drop=True) if uses_metadata else None
            )
            probs.append(predictor.predict(np.stack(batch), meta_rows))
            done.extend(batch_index)
            batch.clear()
            batch_index.clear()

    for i, path in enumerate(paths):
        problem = input_problem(path)
        if problem is not None:
            logger.warning("Not predicted: %s", problem)
            errors.append({"image": str(path), "reason": problem})
            continue
        try:
            batch.append(predictor.prepare(path, path.name, max_pixels))
            batch_index.append(i)
        except ImageDecodeError as exc:
            logger.warning("Skipping unreadable image: %s", exc)
            errors.append({"image": str(path), "reason": str(exc)})
        if len(batch) >= batch_size:
            flush()
    flush()
    p = (
        np.concatenate(probs)
        if probs
        else np.zeros((0, len(predictor.classes)), dtype=np.float32)
    )
    predictions = isic_frame([ids[i] for i in done], p, predictor.decision)
    if uses_metadata:
        predictions["metadata"] = [status[i] for i in done]
        predictions["metadata_unknown"] = [unknown[i] for i in done]
    error_frame = pd.DataFrame(errors, columns=list(ERROR_COLUMNS))
    if len(predictions) + len(error_frame) != len(paths):  # nothing may be lost
        raise RuntimeError(
            f"{len(paths)} inputs but {len(predictions)} predictions and "
            f"{len(error_frame)} errors"
        )
    logger.info(
        "Predicted %d images, %d unreadable", len(predictions), len(error_frame)
    )
    return predictions, error_frame
