"""Ensembles: weighted averages of members' class probabilities, weights chosen on
validation only, saved as one ordinary checkpoint.

**Weights.** :func:`fit_weights` picks ``w`` on the probability simplex
(``w_m >= 0``, ``sum_m w_m = 1``) for ``p_ens = sum_m w_m p_m`` from the members'
*validation* probabilities:

* ``objective="log_loss"`` (default) minimises ``-1/n sum_i log(sum_m w_m p_m[i, y_i])``,
  a convex function of ``w``, with SciPy's SLSQP (so the optimum is global);
* ``objective="balanced_accuracy"`` searches a simplex grid of step ``grid_step`` for the
  highest validation balanced accuracy of the arg-max, ties broken by log loss, then by
  closeness to uniform weights.

**Artifact.** :func:`build_ensemble_checkpoint` writes a checkpoint of the project contract
(``{"state_dict", "meta"}``, see ``models/checkpoint.py``) whose ``meta["arch"]`` is
:data:`ENSEMBLE_ARCH`, a timm model registered by this module. Its ``model_kwargs`` hold
every member's own meta and weight, and its ``state_dict`` every member's weights under
``members.<i>.``. So ``models.checkpoint.load_model`` rebuilds it like any single model once
this module is imported (:func:`load_any_model` does that), and
``inference.predict.predict_proba`` runs it unchanged: :class:`EnsembleModel` takes the
images normalised with the ensemble's ``mean``/``std`` at its ``input_size``, re-normalises
(and, if a member was trained at another size, resizes with antialiased bicubic) for each
member, and returns ``log(sum_m w_m softmax(z_m))``, whose softmax is the weighted average.
Members that fuse metadata get the metadata vector; all of them must share one
``metadata_encoder`` (they do when fitted on the same training split).
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy.optimize import minimize
from timm.models import register_model
from torch import nn

from skin_lesion_classifier.evaluation.evaluate import (
    PROB_COLUMNS,
    predictions_frame,
    probabilities_of,
)
from skin_lesion_classifier.evaluation.metrics import (
    balanced_accuracy,
    check_labels,
    check_probabilities,
    log_loss,
)
from skin_lesion_classifier.models.checkpoint import (
    build_from_meta,
    clean_state_dict,
    load_model,
    read_checkpoint,
    save_checkpoint,
)

logger = logging.getLogger(__name__)

#: The registered timm name of the ensemble "architecture".
ENSEMBLE_ARCH = "slc_ensemble"
#: Meta keys of a member kept in the ensemble (what rebuilding and feeding it needs).
MEMBER_META_KEYS = (
    "arch",
    "model_kwargs",
    "classes",
    "input_size",
    "mean",
    "std",
    "uses_metadata",
)
OBJECTIVES = ("log_loss", "balanced_accuracy")


# --------------------------------------------------------------------------- weights
def _stack(member_probs: Sequence[np.ndarray]) -> np.ndarray:
    if len(member_probs) < 1:
        raise ValueError("an ensemble needs at least one member")
    k = np.asarray(member_probs[0]).shape[-1]
    arrays = [check_probabilities(p, n_classes=k) for p in member_probs]
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"members' probabilities differ in shape: {sorted(shapes)}")
    return np.stack(arrays)


def average_probabilities(member_probs: Sequence[np.ndarray], weights) -> np.ndarray:
    """``p_ens[i, c] = sum_m w_m p_m[i, c]`` with ``w`` renormalised to sum to one."""
    p = _stack(member_probs)
    w = check_weights(weights, len(p))
    return np.tensordot(w, p, axes=1)


def check_weights(weights, n_members: int) -> np.ndarray:
    """``weights`` as a float array on the simplex; raises naming a bad value."""
    w = np.asarray(weights, dtype=np.float64).ravel()
    if w.shape != (n_members,):
        raise ValueError(f"need {n_members} ensemble weights, got {w.tolist()}")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(
            f"ensemble weights must be >= 0 with a positive sum, got {w.tolist()}"
        )
    return w / w.sum()


def simplex_grid(n_members: int, step: float) -> np.ndarray:
    """Every weight vector with entries in ``{0, step, 2 step, ..., 1}`` summing to one."""
    k = round(1.0 / float(step))
    if k < 1 or not np.isclose(k * float(step), 1.0):
        raise ValueError(f"grid_step must divide 1 (e.g. 0.1, 0.05), got {step}")
    points = [
        c for c in itertools.product(range(k + 1), repeat=n_members - 1) if sum(c) <= k
    ]
    return np.array([[*c, k - sum(c)] for c in points], dtype=np.float64) / k


def _mixture_log_loss(w: np.ndarray, p_true: np.ndarray) -> float:
    return float(-np.mean(np.log(np.clip(p_true.T @ w, 1e-15, None))))


def fit_weights(
    y_val,
    member_probs: Sequence[np.ndarray],
    objective: str = "log_loss",
    grid_step: float = 0.05,
    names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Ensemble weights chosen on **validation** predictions (see the module docstring).

    Returns ``{"weights", "objective", "names", "val": {"log_loss", "balanced_accuracy"},
    "val_uniform": {...}, "val_members": {name: {...}}}`` so the report can show the
    chosen mixture beside uniform averaging and each member alone.
    """
    if objective not in OBJECTIVES:
        raise ValueError(
            f"unknown ensemble objective {objective!r}; choose from {OBJECTIVES}"
        )
    p = _stack(member_probs)
    m, n, k = p.shape
    y = check_labels(y_val, k)
    if y.size != n:
        raise ValueError(f"y_val has {y.size} rows but the members predicted {n}")
    if n == 0:
        raise ValueError("cannot choose ensemble weights on an empty validation set")
    names = list(names) if names is not None else [f"member_{i}" for i in range(m)]
    if len(names) != m:
        raise ValueError(f"{len(names)} names for {m} members")

    def scores(w: np.ndarray) -> dict[str, float]:
        q = np.tensordot(w, p, axes=1)
        return {
            "log_loss": log_loss(y, q, k),
            "balanced_accuracy": balanced_accuracy(y, q.argmax(axis=1), k),
        }

    uniform = np.full(m, 1.0 / m)
    if m == 1:
        w = uniform
    elif objective == "log_loss":
        p_true = p[:, np.arange(n), y]  # (m, n)
        res = minimize(
            _mixture_log_loss,
            uniform,
            args=(p_true,),
            method="SLSQP",
            bounds=[(0.0, 1.0)] * m,
            constraints=[{"type": "eq", "fun": lambda v: v.sum() - 1.0}],
            options={"ftol": 1e-10, "maxiter": 500},
        )
        w = np.clip(res.x, 0.0, None)
        w = w / w.sum() if w.sum() > 0 else uniform
        if _mixture_log_loss(w, p_true) > _mixture_log_loss(uniform, p_true):
            w = uniform  # never worse than plain averaging on validation
    else:
        grid = simplex_grid(m, grid_step)
        best, best_key = uniform, None
        for cand in grid:
            s = scores(cand)
            key = (
                -s["balanced_accuracy"],
                s["log_loss"],
                float(np.abs(cand - uniform).sum()),
            )
            if best_key is None or key < best_key:
                best, best_key = cand, key
        w = best
    return {
        "weights": [float(v) for v in w],
        "objective": objective,
        "names": names,
        "val": scores(w),
        "val_uniform": scores(uniform),
        "val_members": {names[i]: scores(np.eye(m)[i]) for i in range(m)},
    }


def ensemble_predictions(
    member_predictions: Sequence[pd.DataFrame], weights
) -> pd.DataFrame:
    """A ``predictions`` frame averaging members' frames of the same images.

    Raises when the frames do not list the same images in the same order with the same
    labels (a silent misalignment would average different pictures)."""
    if not member_predictions:
        raise ValueError("no member predictions to average")
    first = member_predictions[0]
    for i, frame in enumerate(member_predictions[1:], start=1):
        if len(frame) != len(first) or not np.array_equal(
            frame["image_id"].to_numpy(), first["image_id"].to_numpy()
        ):
            raise ValueError(
                f"member {i}'s predictions list other images than member 0's "
                f"({len(frame)} vs {len(first)} rows); predict the same split with each"
            )
        if not np.array_equal(frame["label"].to_numpy(), first["label"].to_numpy()):
            raise ValueError(f"member {i}'s labels differ from member 0's")
    p = average_probabilities(
        [probabilities_of(f) for f in member_predictions], weights
    )
    return predictions_frame(first, p)


# --------------------------------------------------------------------------- comparison
#: Figures of :func:`compare_models` (keys of ``bootstrap.weighted_metrics``).
COMPARE_METRICS = ("balanced_accuracy", "macro_auc", "mel_auc")


def compare_models(
    frames: Mapping[str, pd.DataFrame],
    reference: str,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    metrics: Sequence[str] = COMPARE_METRICS,
) -> pd.DataFrame:
    """Each model's figures on the same images with lesion-bootstrap intervals, and its
    difference from ``reference`` with a **paired** interval (both models scored on the
    same resampled lesions in every replicate).

    ``frames`` maps model names to ``predictions`` frames of the same images (any order;
    aligned by ``image_id``). One row per model and metric: ``model, metric, estimate,
    low, high, diff, diff_low, diff_high, n_boot`` (percentile intervals at ``level``).
    """
    from skin_lesion_classifier.evaluation.bootstrap import (
        lesion_bootstrap_weights,
        weighted_metrics,
    )

    if reference not in frames:
        raise ValueError(f"reference model {reference!r} is not among {sorted(frames)}")
    ref = frames[reference].sort_values("image_id").reset_index(drop=True)
    y = ref["label"].to_numpy()
    groups = ref["lesion_id"].to_numpy()
    aligned = {}
    for name, frame in frames.items():
        f = frame.sort_values("image_id").reset_index(drop=True)
        if len(f) != len(ref) or not np.array_equal(
            f["image_id"].to_numpy(), ref["image_id"].to_numpy()
        ):
            raise ValueError(
                f"model {name!r} was scored on other images than {reference!r}"
            )
        aligned[name] = probabilities_of(f)
    w = np.vstack(
        [np.ones((1, len(y))), lesion_bootstrap_weights(groups, n_boot, seed)]
    )
    values = {
        name: weighted_metrics(y, p, w, sensitivity_targets=())
        for name, p in aligned.items()
    }
    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2

    def interval(v: np.ndarray) -> tuple[float, float]:
        v = v[np.isfinite(v)]
        return (
            (float(np.percentile(v, lo)), float(np.percentile(v, hi)))
            if v.size
            else (float("nan"), float("nan"))
        )

    rows = []
    for name in frames:
        for m in metrics:
            v, r = values[name][m], values[reference][m]
            low, high = interval(v[1:])
            dlow, dhigh = interval(v[1:] - r[1:])
            rows.append(
                {
                    "model": name,
                    "metric": m,
                    "estimate": float(v[0]),
                    "low": low,
                    "high": high,
                    "diff": float(v[0] - r[0]),
                    "diff_low": dlow,
                    "diff_high": dhigh,
                    "n_boot": int(n_boot),
                }
            )
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- the model
class EnsembleModel(nn.Module):
    """Weighted probability average of member models, as one ``nn.Module``.

    Input: images normalised with ``mean``/``std`` at ``input_size`` (what
    ``predict_proba`` makes from the ensemble meta), plus the metadata vector when a member
    fuses metadata. Output: ``log(sum_m w_m softmax(z_m))`` (``softmax`` of it is the
    average).
    """

    def __init__(
        self,
        members: Sequence[nn.Module],
        member_metas: Sequence[Mapping[str, Any]],
        weights,
        input_size: Sequence[int],
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        super().__init__()
        if len(members) != len(member_metas) or not members:
            raise ValueError(
                "an ensemble needs one meta per member and at least one member"
            )
        self.members = nn.ModuleList(members)
        w = check_weights(weights, len(members))
        self.register_buffer(
            "weights", torch.as_tensor(w, dtype=torch.float32), persistent=False
        )
        self.input_size = tuple(int(v) for v in input_size)
        self.register_buffer(
            "mean",
            torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1),
            persistent=False,
        )
        self.register_buffer(
            "std",
            torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1),
            persistent=False,
        )
        self.uses_metadata = [bool(m.get("uses_metadata", False)) for m in member_metas]
        self.member_sizes = [
            tuple(int(v) for v in m["input_size"]) for m in member_metas
        ]
        self.register_buffer(
            "member_mean",
            torch.tensor([list(m["mean"]) for m in member_metas], dtype=torch.float32),
            persistent=False,
        )
        self.register_buffer(
            "member_std",
            torch.tensor([list(m["std"]) for m in member_metas], dtype=torch.float32),
            persistent=False,
        )

    def _member_input(self, x01: torch.Tensor, i: int) -> torch.Tensor:
        size = self.member_sizes[i]
        if tuple(x01.shape[-2:]) != size:
            # same geometry as data.images.resize_rgb: centre-crop to the aspect, then resize
            src_h, src_w = x01.shape[-2:]
            target, src = size[1] / size[0], src_w / src_h
            if abs(src - target) > 1e-3:
                if src > target:
                    new_w = round(src_h * target)
                    left = (src_w - new_w) // 2
                    x01 = x01[..., :, left : left + new_w]
                else:
                    new_h = round(src_w / target)
                    top = (src_h - new_h) // 2
                    x01 = x01[..., top : top + new_h, :]
            x01 = F.interpolate(
                x01, size=size, mode="bicubic", antialias=True, align_corners=False
            )
        m = self.member_mean[i].view(1, 3, 1, 1)
        s = self.member_std[i].view(1, 3, 1, 1)
        return (x01 - m) / s

    def forward(
        self, images: torch.Tensor, metadata: torch.Tensor | None = None
    ) -> torch.Tensor:
        if any(self.uses_metadata) and metadata is None:
            raise ValueError(
                "this ensemble has members that fuse patient metadata: call it as "
                "model(images, metadata)"
            )
        x01 = images * self.std.to(images.dtype) + self.mean.to(images.dtype)
        acc = None
        for i, member in enumerate(self.members):
            xi = self._member_input(x01, i)
            z = member(xi, metadata) if self.uses_metadata[i] else member(xi)
            p = torch.softmax(z.float(), dim=1) * self.weights[i]
            acc = p if acc is None else acc + p
        return torch.log(acc.clamp_min(1e-12))


@register_model
def slc_ensemble(
    pretrained: bool = False,
    num_classes: int = 7,
    members: Sequence[Mapping[str, Any]] = (),
    ensemble_input_size: Sequence[int] = (224, 224),
    ensemble_mean: Sequence[float] = (0.485, 0.456, 0.406),
    ensemble_std: Sequence[float] = (0.229, 0.224, 0.225),
    **_: Any,
) -> EnsembleModel:
    """timm entry point of :class:`EnsembleModel` (used by ``load_model`` through the
    factory). ``members`` are the member metas, each with its ``weight``."""
    if pretrained:
        raise ValueError(
            f"{ENSEMBLE_ARCH} has no pretrained weights; build it from members"
        )
    if not members:
        raise ValueError(
            f"{ENSEMBLE_ARCH} needs a non-empty 'members' list in model_kwargs"
        )
    metas = [dict(m) for m in members]
    for m in metas:
        if len(m.get("classes", [])) != num_classes:
            raise ValueError(
                f"ensemble member {m.get('name')} has {len(m.get('classes', []))} classes, "
                f"the ensemble {num_classes}"
            )
    modules = [build_from_meta(m) for m in metas]
    return EnsembleModel(
        modules,
        metas,
        [float(m["weight"]) for m in metas],
        ensemble_input_size,
        ensemble_mean,
        ensemble_std,
    )


# --------------------------------------------------------------------------- artifact
def build_ensemble_checkpoint(
    members: Sequence[tuple[str, Any]],
    weights,
    fit: Mapping[str, Any] | None = None,
    drop_zero_weight: bool = True,
) -> dict[str, Any]:
    """One checkpoint dict for the ensemble of ``members`` (``(name, path or checkpoint
    dict)`` pairs) with ``weights`` (validation-chosen; see :func:`fit_weights`).

    The ensemble's ``input_size``, ``mean`` and ``std`` are those of its largest-input
    member. Members with zero weight are left out of the model (listed in
    ``meta["ensemble"]["members"]`` with ``kept: false``) unless ``drop_zero_weight`` is
    false. Raises when members disagree on classes or on the metadata encoder.
    """
    if not members:
        raise ValueError("an ensemble needs at least one member")
    names = [str(n) for n, _ in members]
    if len(set(names)) != len(names):
        raise ValueError(f"ensemble member names must be unique, got {names}")
    w = check_weights(weights, len(members))
    ckpts = [read_checkpoint(src) for _, src in members]
    classes = ckpts[0]["meta"]["classes"]
    for name, ck in zip(names, ckpts):
        if ck["meta"]["classes"] != classes:
            raise ValueError(
                f"member {name!r} has classes {ck['meta']['classes']}, member "
                f"{names[0]!r} has {classes}"
            )
        if ck["meta"]["arch"] == ENSEMBLE_ARCH:
            raise ValueError(
                f"member {name!r} is itself an ensemble; list its members instead"
            )
    kept = [i for i in range(len(members)) if w[i] > 0 or not drop_zero_weight]
    encoders = {
        names[i]: ckpts[i]["meta"].get("metadata_encoder")
        for i in kept
        if ckpts[i]["meta"].get("uses_metadata")
    }
    if any(e is None for e in encoders.values()):
        bad = [n for n, e in encoders.items() if e is None]
        raise ValueError(
            f"members {bad} use metadata but have no metadata_encoder in their meta"
        )
    if len({repr(sorted(e.items())) for e in encoders.values()}) > 1:
        raise ValueError(
            f"members {sorted(encoders)} fuse metadata with different encoders; fit them on "
            "the same training split with the same metadata settings"
        )
    largest = max(kept, key=lambda i: int(np.prod(ckpts[i]["meta"]["input_size"])))
    lead = ckpts[largest]["meta"]
    member_metas = []
    state_dict: dict[str, torch.Tensor] = {}
    for j, i in enumerate(kept):
        mm = {k: ckpts[i]["meta"].get(k) for k in MEMBER_META_KEYS}
        mm["name"] = names[i]
        mm["weight"] = float(w[i])
        member_metas.append(mm)
        for key, value in clean_state_dict(ckpts[i]["state_dict"]).items():
            state_dict[f"members.{j}.{key}"] = value
    counts = [ck["meta"].get("train_class_counts") for ck in ckpts]
    meta = {
        "arch": ENSEMBLE_ARCH,
        "model_kwargs": {
            "members": member_metas,
            "ensemble_input_size": list(lead["input_size"]),
            "ensemble_mean": list(lead["mean"]),
            "ensemble_std": list(lead["std"]),
        },
        "classes": list(classes),
        "input_size": list(lead["input_size"]),
        "mean": list(lead["mean"]),
        "std": list(lead["std"]),
        "uses_metadata": bool(encoders),
        "train_class_counts": counts[0],
        "ensemble": {
            "members": [
                {
                    "name": names[i],
                    "arch": ckpts[i]["meta"]["arch"],
                    "weight": float(w[i]),
                    "input_size": ckpts[i]["meta"]["input_size"],
                    "uses_metadata": bool(ckpts[i]["meta"].get("uses_metadata")),
                    "kept": i in kept,
                }
                for i in range(len(members))
            ],
            "weights_fit": dict(fit or {}),
        },
    }
    if encoders:
        meta["metadata_encoder"] = next(iter(encoders.values()))
    return {"state_dict": state_dict, "meta": meta}


def save_ensemble(path: str | os.PathLike, checkpoint: Mapping[str, Any]) -> None:
    """Write an ensemble checkpoint dict (atomically, like any checkpoint)."""
    save_checkpoint(path, None, checkpoint)


def is_ensemble(meta: Mapping[str, Any]) -> bool:
    """Whether a checkpoint meta describes an ensemble."""
    return meta.get("arch") == ENSEMBLE_ARCH


def load_any_model(
    path_or_dict: str | os.PathLike | Mapping[str, Any],
    device: torch.device | str = "cpu",
) -> tuple[nn.Module, dict[str, Any]]:
    """``(model in eval mode, meta)`` for a single-model **or** ensemble checkpoint.

    Same as ``models.checkpoint.load_model``, with the ensemble architecture registered
    (importing this module registers it). Feed the model with ``predict_proba(model,
    images, meta["mean"], meta["std"], extra_inputs=...)`` at ``meta["input_size"]``;
    ``meta["uses_metadata"]`` says whether the metadata vector
    (``MetadataEncoder.from_dict(meta["metadata_encoder"])``) is needed.
    """
    return load_model(path_or_dict, device)


def load_ensemble(
    path_or_dict: str | os.PathLike | Mapping[str, Any],
    device: torch.device | str = "cpu",
) -> tuple[EnsembleModel, dict[str, Any]]:
    """Like :func:`load_any_model` but raises unless the checkpoint is an ensemble."""
    ckpt = read_checkpoint(path_or_dict)
    if not is_ensemble(ckpt["meta"]):
        raise ValueError(
            f"not an ensemble checkpoint (arch {ckpt['meta']['arch']!r}); use load_any_model"
        )
    return load_model(ckpt, device)


__all__ = [
    "COMPARE_METRICS",
    "ENSEMBLE_ARCH",
    "compare_models",
    "PROB_COLUMNS",
    "EnsembleModel",
    "average_probabilities",
    "build_ensemble_checkpoint",
    "ensemble_predictions",
    "fit_weights",
    "is_ensemble",
    "load_any_model",
    "load_ensemble",
    "save_ensemble",
    "simplex_grid",
]
