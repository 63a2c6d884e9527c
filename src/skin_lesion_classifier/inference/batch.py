"""Predict a folder (or list) of pictures into an ISIC-format table plus an errors table.

The ISIC table has ``image, MEL, NV, BCC, AKIEC, BKL, DF, VASC`` (ISIC 2018 task 3 column
order) followed by ``predicted_class`` (arg-max, project class code) and ``melanoma_flag``
(the validated threshold rule, see :mod:`inference.decision`). Every file that cannot be
decoded becomes one ``image, reason`` row of the errors table; the others are still
predicted.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from skin_lesion_classifier.constants import CLASSES, ISIC_COLUMNS
from skin_lesion_classifier.data.images import ImageDecodeError
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


def collect_inputs(
    inputs: str | os.PathLike | Iterable[str | os.PathLike], recursive: bool = False
) -> list[Path]:
    """The files to predict: every regular, non-hidden file of a folder (sorted), or the
    given list of paths as is.

    Files are not filtered by suffix: anything that does not decode lands in the errors
    table with its reason rather than being skipped silently.
    """
    if isinstance(inputs, str | os.PathLike):
        root = Path(inputs)
        if root.is_dir():
            pattern = "**/*" if recursive else "*"
            files = [
                p
                for p in sorted(root.glob(pattern))
                if p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(root).parts)
            ]
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
    predictor: Predictor, paths: Sequence[str | os.PathLike], batch_size: int = 32
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Predict ``paths`` in batches of ``batch_size`` decoded pictures.

    Returns ``(predictions, errors)``: the ISIC table for the readable pictures (input
    order) and ``image, reason`` rows for the others. Memory stays bounded by the batch.
    """
    paths = [Path(p) for p in paths]
    ids = image_ids(paths)
    done_ids: list[str] = []
    probs: list[np.ndarray] = []
    errors: list[dict[str, str]] = []
    batch: list[np.ndarray] = []
    batch_ids: list[str] = []

    def flush() -> None:
        if batch:
            probs.append(predictor.predict(np.stack(batch)))
            done_ids.extend(batch_ids)
            batch.clear()
            batch_ids.clear()

    for path, image_id in zip(paths, ids, strict=True):
        try:
            batch.append(predictor.prepare(path, name=path.name))
            batch_ids.append(image_id)
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
    predictions = isic_frame(done_ids, p, predictor.decision)
    error_frame = pd.DataFrame(errors, columns=list(ERROR_COLUMNS))
    logger.info(
        "Predicted %d images, %d unreadable", len(predictions), len(error_frame)
    )
    return predictions, error_frame
