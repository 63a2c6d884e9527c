"""Nodes of the ``inference`` pipeline: thin wrappers over :mod:`skin_lesion_classifier.inference`."""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd

from skin_lesion_classifier.api.model_source import open_predictor
from skin_lesion_classifier.device import detect_device
from skin_lesion_classifier.inference.batch import (
    collect_inputs,
    predict_files,
    read_metadata_csv,
)

logger = logging.getLogger(__name__)


def list_inputs(params: dict[str, Any]) -> list[str]:
    """The inputs to predict: ``params["input"]`` is a folder (every entry, sorted;
    sub-folders' entries with ``recursive: true``) or a list of files. Entries that are
    not predicted go to the errors table with their reason."""
    return [
        str(p)
        for p in collect_inputs(params["input"], recursive=bool(params["recursive"]))
    ]


def predict_images(
    paths: list[str], params: dict[str, Any]
) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Load the model (``params["model"]``: ``.pt``, ``.onnx``, ``runs:/`` or ``models:/``;
    a single model or an ensemble) once and predict ``paths``.

    ``params["metadata"]`` (optional) is a patient-metadata CSV (``image_id`` or ``image``,
    ``age``, ``sex``, ``localization``) for models that fuse metadata.

    Returns the ISIC table (``image, MEL, NV, BCC, AKIEC, BKL, DF, VASC, predicted_class,
    melanoma_flag``, plus ``metadata, metadata_unknown`` for a fusion model), the errors
    table (``image, reason``) and MLflow metrics counting both.
    """
    metadata = read_metadata_csv(params["metadata"]) if params["metadata"] else None
    predictor = open_predictor(
        params["model"],
        backend=params["backend"],
        device=detect_device(params["device"]),
        decision_file=params["decision_file"],
        batch_size=int(params["batch_size"]),
        **({"tta": params["tta"]} if params["tta"] else {}),
    )
    logger.info(
        "Predicting %d file(s) with %s (%s)",
        len(paths),
        predictor.version,
        predictor.backend,
    )
    predictions, errors = predict_files(
        predictor,
        paths,
        batch_size=int(params["batch_size"]),
        metadata=metadata,
        max_pixels=int(params["max_pixels"]),
    )
    metrics = {
        "inference_images_predicted": {"value": float(len(predictions)), "step": 0},
        "inference_images_unreadable": {"value": float(len(errors)), "step": 0},
        "inference_melanoma_flags": {
            "value": float(predictions["melanoma_flag"].sum()),
            "step": 0,
        },
    }
    if predictor.uses_metadata:
        metrics["inference_images_without_metadata"] = {
            "value": float((predictions["metadata"] == "missing").sum()),
            "step": 0,
        }
    elif metadata is not None:
        logger.warning(
            "%s is image-only: the metadata CSV %s was not used",
            predictor.version,
            params["metadata"],
        )
    return predictions, errors, metrics
