"""Nodes of the evaluation pipeline: thin wrappers over ``skin_lesion_classifier.evaluation``.

The test split chooses nothing: the decision rule and the melanoma threshold are fitted on
the validation predictions only and then applied unchanged to test.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from skin_lesion_classifier.constants import CLASSES
from skin_lesion_classifier.data.metadata_features import metadata_inputs
from skin_lesion_classifier.device import detect_device
from skin_lesion_classifier.evaluation.decision import (
    DecisionRule,
    choose_decision_rule,
)
from skin_lesion_classifier.evaluation.evaluate import (
    evaluate_split,
    isic_submission,
    predictions_frame,
    probabilities_of,
    split_rows,
    train_counts_from,
)
from skin_lesion_classifier.evaluation.metrics import f1_vs_training_size
from skin_lesion_classifier.inference.predictor import TorchPredictor, images_for
from skin_lesion_classifier.inference.versions import WEIGHTS_KEY, weights_digest
from skin_lesion_classifier.models.checkpoint import read_checkpoint
from skin_lesion_classifier.reporting.format import to_jsonable
from skin_lesion_classifier.reporting.sections import headline_rows

logger = logging.getLogger(__name__)


def _checkpoint_source(model_checkpoint: Any) -> Any:
    """A path or checkpoint dict for ``load_model`` from whatever the catalog returned."""
    if isinstance(model_checkpoint, tuple) and len(model_checkpoint) == 2:
        model, meta = model_checkpoint  # an already loaded (model, meta)
        return {"state_dict": model.state_dict(), "meta": meta}
    return model_checkpoint


def predict_split(
    model_checkpoint: Any,
    split_assignment: pd.DataFrame,
    images: Any,
    params: Mapping[str, Any],
    split: str,
    image_index: pd.DataFrame | None = None,
    withhold_metadata: bool = False,
) -> pd.DataFrame:
    """Class probabilities of every image of ``split`` (the ``predictions`` contract).

    ``images`` is the uint8 image cache at the model's ``meta["input_size"]`` or the
    ``image_index`` (pictures decoded from ``path`` and resized with the shared resize, so
    any checkpoint works whatever the resolution of the originals); ``params["tta"]``
    averages flips / rotations. The checkpoint may be a single model, a metadata-fusion
    model or an ensemble: a model that fuses metadata gets each row's encoded ``age, sex,
    localization`` (its own ``metadata_encoder``; blank age and unknown sex / site are
    encoded as such), taken from the split rows when they carry those columns, else joined
    by ``image_id`` from ``image_index`` (or from ``images`` when that is the index).
    ``withhold_metadata``: every field unknown instead (what a request without metadata
    gets).
    """
    predictor = TorchPredictor.from_checkpoint(
        _checkpoint_source(model_checkpoint),
        device=detect_device(params["device"]),
        batch_size=int(params["batch_size"]),
        tta=params["tta"],
    )
    rows = split_rows(split_assignment, split)
    if image_index is None and isinstance(images, pd.DataFrame):
        image_index = images
    extra = (
        None
        if withhold_metadata
        else metadata_inputs(predictor.meta, rows, image_index)
    )
    prob = predictor.predict(
        images_for(images, rows["image_id"], predictor.input_size), extra
    )
    logger.info(
        "predicted %d %s images (tta=%s, metadata=%s)",
        len(rows),
        split,
        params["tta"],
        "withheld" if withhold_metadata else extra is not None,
    )
    return predictions_frame(rows, prob)


def predict_validation(model_checkpoint, split_assignment, images, params):
    """:func:`predict_split` on the ``val`` split."""
    return predict_split(model_checkpoint, split_assignment, images, params, "val")


def predict_test(model_checkpoint, split_assignment, images, params):
    """:func:`predict_split` on the ``test`` split."""
    return predict_split(model_checkpoint, split_assignment, images, params, "test")


def uses_metadata(model_checkpoint: Any) -> bool:
    """Whether the checkpoint's model fuses patient metadata."""
    meta = read_checkpoint(_checkpoint_source(model_checkpoint))["meta"]
    return bool(meta.get("uses_metadata"))


def _withheld(model_checkpoint, split_assignment, images, predictions, params, split):
    if not uses_metadata(model_checkpoint):
        return predictions  # an image model: withholding metadata changes nothing
    return predict_split(
        model_checkpoint,
        split_assignment,
        images,
        params,
        split,
        withhold_metadata=True,
    )


def predict_validation_withheld(
    model_checkpoint, split_assignment, images, val_predictions, params
):
    """The ``val`` predictions with every metadata field unknown (a model that fuses
    metadata; an image model's ``val_predictions`` are returned as they are)."""
    return _withheld(
        model_checkpoint, split_assignment, images, val_predictions, params, "val"
    )


def predict_test_withheld(
    model_checkpoint, split_assignment, images, test_predictions, params
):
    """:func:`predict_validation_withheld` for the ``test`` split."""
    return _withheld(
        model_checkpoint, split_assignment, images, test_predictions, params, "test"
    )


def _train_counts(model_checkpoint: Any, split_assignment: pd.DataFrame) -> list[int]:
    meta = read_checkpoint(_checkpoint_source(model_checkpoint))["meta"]
    return train_counts_from(meta, split_assignment)


def choose_rule(
    val_predictions: pd.DataFrame,
    model_checkpoint: Any,
    split_assignment: pd.DataFrame,
    params: Mapping[str, Any],
) -> dict[str, Any]:
    """The decision rule and melanoma threshold, chosen on validation predictions only
    (see :func:`~skin_lesion_classifier.evaluation.decision.choose_decision_rule`)."""
    if set(val_predictions["split"]) != {"val"}:
        raise ValueError(
            "decision rules are chosen on validation only; got predictions of splits "
            f"{sorted(set(val_predictions['split']))}"
        )
    d = params["decision"]
    mel = params["melanoma"]
    rule = choose_decision_rule(
        val_predictions["label"].to_numpy(),
        probabilities_of(val_predictions),
        _train_counts(model_checkpoint, split_assignment),
        val_predictions["lesion_id"].to_numpy(),
        candidates=tuple(d["candidates"]),
        target_prior=d["target_prior"],
        melanoma_target_sensitivity=mel["target_sensitivity"],
        n_folds=int(d["n_folds"]),
        min_gain=float(d["min_gain"]),
        n_sweeps=int(d["n_sweeps"]),
    )
    logger.info(
        "decision rule chosen on validation: %s, melanoma threshold %s",
        rule.name,
        rule.melanoma_threshold,
    )
    # names the weights it was chosen for: serving pairs a versioned model with its rule
    weights = read_checkpoint(_checkpoint_source(model_checkpoint))["state_dict"]
    return to_jsonable({**rule.to_dict(), WEIGHTS_KEY: weights_digest(weights)})


def compute_metrics(
    val_predictions: pd.DataFrame,
    test_predictions: pd.DataFrame,
    decision_rule: Mapping[str, Any],
    model_checkpoint: Any,
    split_assignment: pd.DataFrame,
    params: Mapping[str, Any],
    val_predictions_withheld: pd.DataFrame | None = None,
    test_predictions_withheld: pd.DataFrame | None = None,
) -> tuple[dict[str, Any], dict[str, dict[str, float]]]:
    """Every figure of both splits under the arg-max and the chosen rule, plus the
    headline figures as MLflow metrics (``{name: {"value", "step"}}``).

    For a model that fuses patient metadata, the same figures with the metadata withheld
    (the same model and decision rule, every field unknown) go under
    ``metadata_withheld`` (``headline`` included) and into MLflow as
    ``<split>_withheld_<metric>``."""
    rule = DecisionRule.from_dict(decision_rule)
    meta = read_checkpoint(_checkpoint_source(model_checkpoint))["meta"]
    boot = params["bootstrap"]
    kwargs = {
        "n_bins": int(params["calibration_bins"]),
        "n_boot": int(boot["n_boot"]),
        "seed": int(boot["seed"]),
        "level": float(boot["level"]),
        "sensitivity_targets": tuple(params["melanoma"]["sensitivity_targets"]),
    }
    splits = {}
    for name, frame in (("val", val_predictions), ("test", test_predictions)):
        splits[name] = evaluate_split(
            frame["label"].to_numpy(),
            probabilities_of(frame),
            frame["lesion_id"].to_numpy(),
            rule,
            **kwargs,
        )
    counts = train_counts_from(meta, split_assignment)
    f1 = [r["f1"] for r in splits["test"]["chosen"]["per_class"]]
    metrics = {
        "model": {
            "arch": meta["arch"],
            "input_size": meta["input_size"],
            "classes": meta["classes"],
        },
        "tta": params["tta"],
        "train_class_counts": dict(zip(CLASSES, counts)),
        "decision_rule": dict(decision_rule),
        "bootstrap_settings": {k: kwargs[k] for k in ("n_boot", "seed", "level")},
        "splits": splits,
        "class_imbalance": f1_vs_training_size(counts, f1),
    }
    withheld = None
    if meta.get("uses_metadata") and val_predictions_withheld is not None:
        withheld = {
            name: evaluate_split(
                frame["label"].to_numpy(),
                probabilities_of(frame),
                frame["lesion_id"].to_numpy(),
                rule,
                **kwargs,
            )
            for name, frame in (
                ("val", val_predictions_withheld),
                ("test", test_predictions_withheld),
            )
        }
    metrics = to_jsonable(metrics)
    metrics["headline"] = to_jsonable(headline_rows(metrics, "test"))
    logged = mlflow_metrics(metrics)
    if withheld is not None:
        part = {
            "splits": to_jsonable(withheld),
            "decision_rule": metrics["decision_rule"],
        }
        part["headline"] = to_jsonable(headline_rows(part, "test"))
        metrics["metadata_withheld"] = part
        logged.update(
            {
                k.replace("_", "_withheld_", 1): v
                for k, v in mlflow_metrics(part).items()
            }
        )
    return metrics, logged


def mlflow_metrics(metrics: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Headline figures of both splits as MLflow metrics (NaN / undefined left out)."""
    out: dict[str, dict[str, float]] = {}
    for split in ("val", "test"):
        s = metrics["splits"][split]
        values = {
            "balanced_accuracy": s["argmax"]["balanced_accuracy"],
            "balanced_accuracy_chosen_rule": s["chosen"]["balanced_accuracy"],
            "accuracy": s["argmax"]["accuracy"],
            "macro_auc": s["argmax"]["macro_auc"],
            "log_loss": s["argmax"]["log_loss"],
            "ece": s["calibration"]["ece"],
            "mel_auc": s["melanoma"]["auc"],
            "mel_sensitivity_argmax": s["melanoma"]["argmax"]["sensitivity"],
            "mel_specificity_argmax": s["melanoma"]["argmax"]["specificity"],
        }
        if "threshold" in s["melanoma"]:
            for k in ("sensitivity", "specificity", "nne"):
                values[f"mel_{k}_threshold"] = s["melanoma"]["threshold"][k]
        for key, entry in s["melanoma"]["specificity_at_sensitivity"].items():
            values[f"mel_specificity_at_sens_{key}"] = entry["specificity"]
        for k, v in values.items():
            if v is not None and np.isfinite(v):
                out[f"{split}_{k}"] = {"value": float(v), "step": 0}
    return out


def make_isic_submission(test_predictions: pd.DataFrame) -> pd.DataFrame:
    """The test probabilities in ISIC 2018 submission format
    (``image,MEL,NV,BCC,AKIEC,BKL,DF,VASC``)."""
    return isic_submission(test_predictions)
