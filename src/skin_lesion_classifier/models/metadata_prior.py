"""Metadata prior: the patient's age, sex and site as a likelihood ratio on the image
model's class probabilities (late fusion; no image features, no second training stage).

With the metadata ``m`` independent of the picture ``x`` given the class ``y``, Bayes' rule
combines the two sources as

    p(y | x, m)  ∝  p(y | x) · p(y | m) / p(y)

and a partly known ``m`` enters through the fields that are known. Here ``p(y | m)`` is a
multinomial logistic regression of the class on the encoded metadata
(:class:`~skin_lesion_classifier.data.metadata_features.MetadataEncoder`), fitted on the
**training** split only, each lesion weighing as much as any other (its images share the
weight 1). Every training row is seen once per pattern of known and unknown fields (the
2^3 patterns of age, sex, site, each with weight 1/8; a masked field takes its
``unknown`` encoding), so the regression has learned what a partly known patient tells,
and the all-unknown patient ``u`` stands for ``p(y)``. The fused logits are

    z(x, m) = z_image(x) + alpha · (W e(m) - W e(u))

with ``W`` the regression's coefficients and ``alpha`` the weight of the metadata evidence
(1: the Bayes combination; smaller when the picture already shows part of what the
metadata says, e.g. the body site; chosen on validation by :func:`choose_alpha`). For a
patient with every field unknown the second term is exactly 0: the model predicts exactly
what the image model predicts, so external pictures without metadata lose nothing.

The term is linear in ``e(m)``, so the fused model is a
:class:`~skin_lesion_classifier.models.fusion.MetadataFusionModel` with no hidden metadata
layers whose metadata head has weight ``alpha W`` and bias ``-alpha W e(u)``
(:func:`attach_metadata_prior`): every path that serves a fusion model (evaluation, the
predict command, the API, MLflow, ONNX, Grad-CAM) serves it unchanged.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression

from skin_lesion_classifier.data.metadata_features import MetadataEncoder

logger = logging.getLogger(__name__)

#: What a fused checkpoint's meta says about its metadata prior (``meta["metadata_prior"]``).
PRIOR_KEY = "metadata_prior"


@dataclass
class MetadataPrior:
    """A fitted metadata prior: ``log_ratio(e) = W e - W e(u)`` per class.

    Attributes:
        encoder: the metadata encoder fitted on the training rows.
        coef: ``(C, D)`` coefficients ``W`` of the logistic regression.
        classes: class names, in the image model's order.
    """

    encoder: MetadataEncoder
    coef: np.ndarray
    classes: tuple[str, ...]

    def log_ratio(self, encoded: np.ndarray) -> np.ndarray:
        """``(n, C)`` log likelihood ratios ``W (e - e(u))`` of encoded metadata rows."""
        x = np.asarray(encoded, dtype=np.float64)
        return (x - self.encoder.unknown_vector()) @ self.coef.T

    def fuse(self, probabilities: np.ndarray, encoded: np.ndarray, alpha: float):
        """``p(y|x) exp(alpha * log_ratio)``, renormalised: the fused model's probabilities
        (exact for one view; with test-time augmentation the fused model averages the
        fused probabilities of every view instead)."""
        p = np.clip(np.asarray(probabilities, dtype=np.float64), 1e-12, None)
        z = np.log(p) + float(alpha) * self.log_ratio(encoded)
        z -= z.max(axis=1, keepdims=True)
        q = np.exp(z)
        return q / q.sum(axis=1, keepdims=True)


def masking_patterns(encoded: np.ndarray, encoder: MetadataEncoder) -> np.ndarray:
    """``(8 n, D)``: every row once per pattern of known / unknown fields (pattern-major:
    rows ``k n .. (k+1) n`` are the ``k``-th pattern), masked fields set to their
    ``unknown`` encoding."""
    unknown = encoder.unknown_vector()
    slices = list(encoder.field_slices().values())
    out = []
    for pattern in itertools.product((False, True), repeat=len(slices)):
        x = np.array(encoded, dtype=np.float32, copy=True)
        for masked, sl in zip(pattern, slices):
            if masked:
                x[:, sl] = unknown[sl]
        out.append(x)
    return np.concatenate(out)


def fit_metadata_prior(
    train_rows: pd.DataFrame,
    classes: Sequence[str],
    *,
    C: float = 1.0,
    min_site_count: int = 10,
    max_iter: int = 2000,
) -> MetadataPrior:
    """Fit the prior on the training rows (columns ``label``: the class index in
    ``classes``, ``lesion_id``, ``age``, ``sex``, ``localization``); ``C`` is the inverse
    L2 strength of the regression, whose data weigh one per lesion.

    A class without a training row gets no metadata evidence (a zero row, with a
    warning). Raises ``ValueError`` naming a missing column, a label that is not a class
    index, or fewer than 2 classes."""
    needed = ["label", "lesion_id", "age", "sex", "localization"]
    missing = [c for c in needed if c not in train_rows.columns]
    if missing:
        raise ValueError(
            f"the metadata prior needs training rows with columns {needed}; "
            f"missing {missing}"
        )
    classes = tuple(str(c) for c in classes)
    labels = pd.to_numeric(train_rows["label"], errors="coerce").to_numpy()
    bad = ~np.isin(labels, np.arange(len(classes)))
    if bad.any():
        raise ValueError(
            f"training labels must be class indices 0..{len(classes) - 1} of {classes}; "
            f"got {sorted(set(train_rows['label'][bad].astype(str)))[:5]}"
        )
    labels = labels.astype(int)
    present = np.unique(labels)
    if len(present) < 2:
        raise ValueError(
            f"the metadata prior needs training rows of at least 2 classes; got "
            f"{[classes[i] for i in present]}"
        )
    absent = [c for i, c in enumerate(classes) if i not in set(present)]
    if absent:
        logger.warning(
            "no training row of class(es) %s: the metadata prior says nothing about them",
            absent,
        )
    if float(C) <= 0:
        raise ValueError(f"C must be > 0, got {C}")
    encoder = MetadataEncoder.fit(train_rows, min_site_count=min_site_count)
    x = masking_patterns(encoder.transform(train_rows), encoder)
    y = np.tile(labels, 8)
    # each lesion weighs 1 in all (its images and their 8 patterns share it)
    per_lesion = train_rows.groupby("lesion_id")["lesion_id"].transform("size")
    w = np.tile(1.0 / per_lesion.to_numpy(dtype=np.float64), 8) / 8.0
    reg = LogisticRegression(C=float(C), max_iter=int(max_iter))
    reg.fit(x, y, sample_weight=w)
    coef = np.zeros((len(classes), encoder.dim))
    if len(reg.classes_) == 2:  # sklearn's binary form: one row for the second class
        coef[reg.classes_] = np.stack([-reg.coef_[0], reg.coef_[0]]) / 2
    else:
        coef[reg.classes_] = reg.coef_
    logger.info(
        "metadata prior fitted on %d training images (%d lesions), %d features",
        len(train_rows),
        train_rows["lesion_id"].nunique(),
        encoder.dim,
    )
    return MetadataPrior(encoder=encoder, coef=coef, classes=classes)


def log_loss_of(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood ``-1/n sum_i log p_i[y_i]`` (probabilities clipped at
    1e-12)."""
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 1e-12, None)
    return float(-np.mean(np.log(p[np.arange(len(labels)), labels])))


def choose_alpha(
    prior: MetadataPrior,
    val_probabilities: np.ndarray,
    val_encoded: np.ndarray,
    val_labels: np.ndarray,
    grid: Sequence[float],
) -> tuple[float, dict[str, float]]:
    """The ``alpha`` of ``grid`` with the lowest validation log loss of the fused
    probabilities (ties: the smaller alpha), and every candidate's log loss."""
    losses = {
        float(a): log_loss_of(prior.fuse(val_probabilities, val_encoded, a), val_labels)
        for a in sorted(float(g) for g in grid)
    }
    if not losses:
        raise ValueError("the alpha grid is empty")
    best = min(losses, key=lambda a: (round(losses[a], 12), a))
    return best, losses


def attach_metadata_prior(
    model: torch.nn.Module,
    meta: Mapping[str, Any],
    prior: MetadataPrior,
    alpha: float,
    details: Mapping[str, Any] | None = None,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The image model with the prior fused into its logits (see the module docstring):
    a :class:`~skin_lesion_classifier.models.fusion.MetadataFusionModel` without hidden
    metadata layers, metadata head ``alpha W`` with bias ``-alpha W e(u)``. Its meta keeps
    the image model's training metrics and adds ``metadata_encoder`` and
    ``metadata_prior`` (alpha, C and ``details``)."""
    from skin_lesion_classifier.models.fusion import fusion_from_image_model

    if tuple(meta["classes"]) != tuple(prior.classes):
        raise ValueError(
            f"the prior's classes {prior.classes} differ from the model's {meta['classes']}"
        )
    fused, new_meta = fusion_from_image_model(
        model,
        meta,
        prior.encoder.dim,
        {"hidden": [], "dropout": 0.0, "metadata_dropout": 0.0},
    )
    weight = torch.as_tensor(float(alpha) * prior.coef, dtype=torch.float32)
    bias = -weight @ torch.as_tensor(
        prior.encoder.unknown_vector(), dtype=torch.float32
    )
    with torch.no_grad():
        fused.metadata_head.weight.copy_(weight)
        fused.metadata_head.bias.copy_(bias)
    fused.eval()
    if "metrics" in meta:
        new_meta["metrics"] = dict(
            meta["metrics"]
        )  # the image model's training metrics
    new_meta["metadata_encoder"] = prior.encoder.to_dict()
    new_meta[PRIOR_KEY] = {
        "alpha": float(alpha),
        "coef": prior.coef.tolist(),
        **dict(details or {}),
    }
    return fused, new_meta
