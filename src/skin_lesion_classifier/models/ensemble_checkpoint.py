"""Ensemble checkpoints: one ordinary checkpoint (``{"state_dict", "meta"}``, see
``models/checkpoint.py``) holding every member.

:func:`build_ensemble_checkpoint` writes ``meta["arch"] = ENSEMBLE_ARCH``; its
``model_kwargs`` hold every member's own meta and weight, and its ``state_dict`` every
member's weights under ``members.<i>.``. So ``models.checkpoint.load_model`` rebuilds it
like any single model, and ``inference`` runs it unchanged. Members that fuse metadata
must share one ``metadata_encoder`` (they do when fitted on the same training split).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from skin_lesion_classifier.models.checkpoint import (
    clean_state_dict,
    load_model,
    read_checkpoint,
    save_checkpoint,
)
from skin_lesion_classifier.models.ensemble import (
    ENSEMBLE_ARCH,
    MEMBER_META_KEYS,
    EnsembleModel,
    check_weights,
    is_ensemble,
)


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


def load_ensemble(
    path_or_dict: str | os.PathLike | Mapping[str, Any],
    device: torch.device | str = "cpu",
) -> tuple[EnsembleModel, dict[str, Any]]:
    """``models.checkpoint.load_model`` that raises unless the checkpoint is an ensemble."""
    ckpt = read_checkpoint(path_or_dict)
    if not is_ensemble(ckpt["meta"]):
        raise ValueError(
            f"not an ensemble checkpoint (arch {ckpt['meta']['arch']!r}); use load_model"
        )
    return load_model(ckpt, device)
