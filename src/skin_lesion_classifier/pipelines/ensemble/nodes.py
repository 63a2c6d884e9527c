"""Nodes of the ensemble pipeline: member predictions (with metadata when a model fuses
it), the metadata-fusion second stage, validation-chosen weights, the one-file ensemble
checkpoint, and the comparison against the best single model on test.

Everything chosen here (fusion epochs, ensemble weights, which single model is "best")
is chosen on the validation split; the test split is only scored.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from skin_lesion_classifier.config_defaults import soft_merge
from skin_lesion_classifier.data.metadata_features import (
    MetadataEncoder,
    with_metadata,
)
from skin_lesion_classifier.device import detect_device
from skin_lesion_classifier.evaluation.ensemble import (
    compare_models,
    ensemble_predictions,
    fit_weights,
)
from skin_lesion_classifier.evaluation.evaluate import (
    predictions_frame,
    probabilities_of,
    split_rows,
)
from skin_lesion_classifier.evaluation.metrics import balanced_accuracy
from skin_lesion_classifier.inference.predictor import images_for
from skin_lesion_classifier.models.checkpoint import load_model, read_checkpoint
from skin_lesion_classifier.models.ensemble_checkpoint import build_ensemble_checkpoint
from skin_lesion_classifier.models.fusion import proba_from_features
from skin_lesion_classifier.pipelines.evaluation.nodes import predict_split
from skin_lesion_classifier.reporting.format import fmt, to_jsonable
from skin_lesion_classifier.training.fusion import fusion_features, train_fusion_head

logger = logging.getLogger(__name__)

ID_COLUMNS = ["image_id", "lesion_id", "split", "dx", "label"]


MEMBER_KEYS = ("input_size", "checkpoint_dir", "train")


def member_parameters(
    model_input: Mapping[str, Any],
    training: Mapping[str, Any],
    member: Mapping[str, Any],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A member's ``model_input`` and ``training`` parameters: the project's, with the
    member's ``input_size`` (declared once, for its image cache and its model), its
    ``checkpoint_dir`` and the ``train`` keys it names on top (soft merge), without the
    metadata prior (a member is an image model; ``<member>_meta`` fuses the metadata)."""
    keys = set(member)
    if keys != set(MEMBER_KEYS):
        raise ValueError(
            f"an ensemble member has the keys {list(MEMBER_KEYS)}; got {sorted(keys)} "
            f"(unknown: {sorted(keys - set(MEMBER_KEYS))}, "
            f"missing: {sorted(set(MEMBER_KEYS) - keys)})"
        )
    size = list(member["input_size"])
    train = soft_merge(training["train"], {**dict(member["train"]), "input_size": size})
    return (
        {**dict(model_input), "input_size": size},
        {
            **dict(training),
            "checkpoint_dir": member["checkpoint_dir"],
            "train": train,
            # a member is an image model; its metadata fusion is the <member>_meta stage
            "metadata_prior": {"enabled": False},
        },
    )


def _images(
    image_cache: Any, rows: pd.DataFrame, image_index: pd.DataFrame, size
) -> np.ndarray:
    """uint8 images of ``rows`` at ``size``: from the cache when it is at that size, else
    decoded from ``image_index.path`` with the shared resize."""
    fits = image_cache is not None and tuple(image_cache.input_size) == tuple(size)
    return images_for(image_cache if fits else image_index, rows["image_id"], size)


def predict_member(
    model_checkpoint: Mapping[str, Any],
    split_assignment: pd.DataFrame,
    image_cache: Any,
    image_index: pd.DataFrame,
    params: Mapping[str, Any],
    split: str,
) -> pd.DataFrame:
    """Class probabilities of every image of ``split`` (the ``predictions`` contract) for a
    single model, a fusion model (metadata joined from ``image_index``) or an ensemble:
    the evaluation pipeline's ``predict_split``, fed from the member's cache when it is at
    the model's input size, else from ``image_index``."""
    size = read_checkpoint(model_checkpoint)["meta"]["input_size"]
    cache_fits = image_cache is not None and tuple(image_cache.input_size) == tuple(
        size
    )
    return predict_split(
        model_checkpoint,
        split_assignment,
        image_cache if cache_fits else image_index,
        params["predict"],
        split,
        image_index=image_index,
    )


def predict_member_val(
    model_checkpoint, split_assignment, image_cache, image_index, params
):
    """:func:`predict_member` on ``val``."""
    return predict_member(
        model_checkpoint, split_assignment, image_cache, image_index, params, "val"
    )


def predict_member_test(
    model_checkpoint, split_assignment, image_cache, image_index, params
):
    """:func:`predict_member` on ``test``."""
    return predict_member(
        model_checkpoint, split_assignment, image_cache, image_index, params, "test"
    )


def train_member_fusion(
    model_checkpoint: Mapping[str, Any],
    image_cache: Any,
    split_assignment: pd.DataFrame,
    image_index: pd.DataFrame,
    params: Mapping[str, Any],
) -> tuple[dict[str, Any], pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Second stage: the member with age, sex and site fused before its classifier, trained
    on its frozen backbone's features (``params["fusion"]``), and the image-only control
    trained on the same features with the same recipe and seed.

    Returns the fusion checkpoint, its per-epoch history, and the control's validation
    and test predictions (to measure the gain from metadata alone)."""
    device = detect_device(params["predict"]["device"])
    model, meta = load_model(model_checkpoint, device)
    cfg = dict(params["fusion"])
    rows = {
        s: with_metadata(split_rows(split_assignment, s), image_index)
        for s in ("train", "val", "test")
    }
    size = meta["input_size"]
    imgs = {s: _images(image_cache, r, image_index, size) for s, r in rows.items()}
    feats = fusion_features(model, meta, imgs["train"], imgs["val"], cfg, device)
    fusion = train_fusion_head(
        model, meta, None, rows["train"], None, rows["val"], cfg, device, features=feats
    )
    control = train_fusion_head(
        model,
        meta,
        None,
        rows["train"],
        None,
        rows["val"],
        cfg,
        device,
        use_metadata=False,
        features=feats,
    )
    from skin_lesion_classifier.training.engine import extract_features

    test_feats = extract_features(
        model,
        imgs["test"],
        meta["mean"],
        meta["std"],
        device,
        int(cfg["eval_batch_size"]),
    )
    control_val = predictions_frame(rows["val"], control.val_proba)
    control_test = predictions_frame(
        rows["test"], proba_from_features(control.model.to(device), test_feats, None)
    )
    enc = MetadataEncoder.from_dict(fusion.checkpoint["meta"]["metadata_encoder"])
    logger.info(
        "fusion of %s: val BA %.4f with metadata, %.4f image-only control; encoder %s",
        meta["arch"],
        balanced_accuracy(rows["val"]["label"], fusion.val_proba.argmax(1)),
        balanced_accuracy(rows["val"]["label"], control.val_proba.argmax(1)),
        enc.missing_summary(rows["train"]),
    )
    history = fusion.history.assign(control_val_balanced_accuracy=np.nan)
    history.loc[: len(control.history) - 1, "control_val_balanced_accuracy"] = (
        control.history["val_balanced_accuracy"].to_numpy()[: len(history)]
    )
    return fusion.checkpoint, history, control_val, control_test


def fit_ensemble_weights(
    params: Mapping[str, Any], **val_predictions: pd.DataFrame
) -> dict:
    """Weights of ``params["combine"]`` chosen on their validation predictions
    (:func:`evaluation.ensemble.fit_weights`), plus the same for ``params["image_only"]``
    (reported, not saved)."""
    w = params["weights"]
    out = {}
    for key in ("combine", "image_only"):
        names = list(params[key] or [])
        if not names:
            continue
        missing = [n for n in names if n not in val_predictions]
        if missing:
            raise ValueError(
                f"ensemble.{key} lists {missing}, which this pipeline does not produce; "
                f"choose from {sorted(val_predictions)}"
            )
        frames = [val_predictions[n] for n in names]
        ensemble_predictions(frames, np.ones(len(frames)))  # same images, same order
        fit = fit_weights(
            frames[0]["label"].to_numpy(),
            [probabilities_of(f) for f in frames],
            objective=w["objective"],
            grid_step=float(w["grid_step"]),
            names=names,
        )
        out[key] = fit
        logger.info(
            "ensemble %s weights (val %s): %s",
            key,
            fit["objective"],
            dict(zip(names, np.round(fit["weights"], 3))),
        )
    if "combine" not in out:
        raise ValueError("ensemble.combine must list the members of the saved ensemble")
    return to_jsonable(out)


def build_ensemble(
    weights: Mapping[str, Any], **checkpoints: Mapping[str, Any]
) -> dict:
    """The one-file ensemble checkpoint of the ``combine`` members and weights."""
    fit = weights["combine"]
    return build_ensemble_checkpoint(
        [(n, checkpoints[n]) for n in fit["names"]], fit["weights"], fit=fit
    )


def build_image_ensemble(
    weights: Mapping[str, Any], **checkpoints: Mapping[str, Any]
) -> dict:
    """The one-file checkpoint of the ``image_only`` ensemble (no metadata needed at
    prediction time), for services that have only the picture."""
    if "image_only" not in weights:
        raise ValueError("ensemble.image_only lists no members")
    fit = weights["image_only"]
    return build_ensemble_checkpoint(
        [(n, checkpoints[n]) for n in fit["names"]], fit["weights"], fit=fit
    )


def _combined(weights: Mapping[str, Any], key: str, frames: Mapping[str, pd.DataFrame]):
    fit = weights[key]
    return ensemble_predictions([frames[n] for n in fit["names"]], fit["weights"])


def combine_val(
    weights: Mapping[str, Any], **val_predictions: pd.DataFrame
) -> pd.DataFrame:
    """Validation predictions of the saved ensemble (weighted average of its members')."""
    return _combined(weights, "combine", val_predictions)


def combine_test(
    weights: Mapping[str, Any], **test_predictions: pd.DataFrame
) -> pd.DataFrame:
    """Test predictions of the saved ensemble (weighted average of its members')."""
    return _combined(weights, "combine", test_predictions)


def ensemble_history(
    weights: Mapping[str, Any], **histories: pd.DataFrame
) -> pd.DataFrame:
    """The training curves shown in the ensemble report: those of the image member with
    the largest weight (an ensemble has no training curve of its own), with a ``member``
    column naming it."""
    fit = weights["combine"]
    ranked = sorted(zip(fit["weights"], fit["names"]), reverse=True)
    for _, name in ranked:
        base = name.removesuffix("_meta")
        if base in histories:
            return histories[base].assign(member=base)
    raise ValueError(f"no training history for any of {fit['names']}")


def compare(
    params: Mapping[str, Any],
    weights: Mapping[str, Any],
    val_predictions: Mapping[str, pd.DataFrame],
    test_predictions: Mapping[str, pd.DataFrame],
) -> tuple[pd.DataFrame, str, dict[str, dict[str, float]]]:
    """Every model against the best single model on test: balanced accuracy, macro AUC
    and melanoma AUC with lesion-bootstrap intervals and paired intervals of the
    difference. The best single model is the image-only member with the best validation
    balanced accuracy. Returns the table, a Markdown section and MLflow metrics."""
    val = dict(val_predictions)
    test = dict(test_predictions)
    for key, label in (("image_only", "ensemble_image"), ("combine", "ensemble")):
        if key in weights:
            val[label] = _combined(weights, key, val_predictions)
            test[label] = _combined(weights, key, test_predictions)
    singles = [
        n
        for n in val
        if not n.endswith(("_meta", "_control")) and not n.startswith("ensemble")
    ]
    val_ba = {
        n: balanced_accuracy(f["label"].to_numpy(), probabilities_of(f).argmax(1))
        for n, f in val.items()
    }
    best = max(singles, key=lambda n: val_ba[n])
    c = params["compare"]
    level = float(c["level"])
    table = compare_models(
        test,
        best,
        n_boot=int(c["n_boot"]),
        seed=int(c["seed"]),
        level=level,
    )
    table.insert(2, "val_balanced_accuracy", table["model"].map(val_ba))
    table.insert(1, "best_single", best)
    md = comparison_section(table, best, weights, level)
    logged = {}
    for r in table.itertuples(index=False):
        logged[f"compare_{r.model}_test_{r.metric}"] = {
            "value": float(r.estimate),
            "step": 0,
        }
        if r.model != best:
            logged[f"compare_{r.model}_test_{r.metric}_gain"] = {
                "value": float(r.diff),
                "step": 0,
            }
    return table, md, logged


def comparison_section(
    table: pd.DataFrame, best: str, weights: Mapping[str, Any], level: float = 0.95
) -> str:
    """Markdown: the comparison table and the weights."""
    pct = f"{level:.0%}"
    lines = [
        "## Ensemble and metadata fusion against the best single model (test)",
        "",
        f"Best single model, chosen on validation balanced accuracy: **{best}**. "
        f"Intervals: {pct} lesion-bootstrap percentile intervals; the difference from "
        f"{best} uses the same resampled lesions for both models (paired). `<m>_meta`: "
        "member with age, sex and site fused; `<m>_meta_control`: the same second-stage "
        "head trained without metadata (same features, recipe and seed), so "
        "`<m>_meta` minus `<m>_meta_control` is the gain from metadata alone. "
        "Ensemble weights are chosen on validation.",
        "",
        "| model | val BA | test BA [CI] | Δ BA [paired CI] | test macro AUC [CI] | Δ AUC [paired CI] |",
        "|---|---|---|---|---|---|",
    ]
    for model, g in table.groupby("model", sort=False):
        ba = g[g.metric == "balanced_accuracy"].iloc[0]
        au = g[g.metric == "macro_auc"].iloc[0]
        lines.append(
            f"| {'**' + model + '**' if model == best else model} | "
            f"{fmt(ba.val_balanced_accuracy)} | {fmt(ba.estimate)} [{fmt(ba.low)}, {fmt(ba.high)}] | "
            f"{ba['diff']:+.3f} [{ba.diff_low:+.3f}, {ba.diff_high:+.3f}] | "
            f"{fmt(au.estimate)} [{fmt(au.low)}, {fmt(au.high)}] | "
            f"{au['diff']:+.3f} [{au.diff_low:+.3f}, {au.diff_high:+.3f}] |"
        )
    lines += ["", "Weights (chosen on validation):", ""]
    for key, fit in weights.items():
        pairs = ", ".join(f"{n} {w:.3f}" for n, w in zip(fit["names"], fit["weights"]))
        lines.append(f"* `{key}` ({fit['objective']}): {pairs}")
    lines.append("")
    return "\n".join(lines)


def compare_node(params, weights, **frames):
    """Kedro adapter of :func:`compare`: ``frames`` are ``val__<model>`` and
    ``test__<model>`` predictions."""
    val = {
        k.removeprefix("val__"): v for k, v in frames.items() if k.startswith("val__")
    }
    test = {
        k.removeprefix("test__"): v for k, v in frames.items() if k.startswith("test__")
    }
    return compare(params, weights, val, test)
