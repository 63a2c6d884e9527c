"""Model checkpoints: ``{"state_dict", "meta"}`` dicts saved with ``torch.save``.

``meta`` (see docs/architecture.md) holds everything needed to rebuild and feed the model
with no network access: ``arch``, ``model_kwargs``, ``classes``, ``input_size`` ``[H, W]``,
``mean``, ``std``, ``uses_metadata``, ``metadata_encoder`` (fusion only),
``train_class_counts`` and optionally ``decision`` and ``metrics``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from skin_lesion_classifier.models.ensemble import build_ensemble, is_ensemble
from skin_lesion_classifier.models.factory import create_model

REQUIRED_META = ("arch", "classes", "input_size", "mean", "std")
_PREFIXES = ("_orig_mod.", "module.")


def _plain(value: Any) -> Any:
    """Python scalars/lists/dicts only, so ``torch.load(weights_only=True)`` accepts it."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, torch.Tensor):
        return _plain(value.detach().cpu().tolist())
    if isinstance(value, Path):
        return str(value)
    return value


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under ``torch.compile`` / ``DataParallel`` wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(
            model, torch.nn.DataParallel | torch.nn.parallel.DistributedDataParallel
        ):
            model = model.module
        else:
            return model


def clean_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU copies with wrapper prefixes (``_orig_mod.``, ``module.``) stripped."""
    out = {}
    for raw_key, value in state_dict.items():
        key = raw_key
        for prefix in _PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value.detach().to("cpu").clone()
    return out


def validate_meta(meta: Mapping[str, Any]) -> dict[str, Any]:
    """Check the required keys and fill defaults; returns a plain copy."""
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(
            f"checkpoint meta lacks {missing}; required: {list(REQUIRED_META)}"
        )
    meta = _plain(dict(meta))
    if len(meta["input_size"]) != 2:
        raise ValueError(f"meta input_size must be [H, W], got {meta['input_size']}")
    if len(meta["mean"]) != 3 or len(meta["std"]) != 3:
        raise ValueError(
            f"meta mean/std need 3 values, got {meta['mean']} / {meta['std']}"
        )
    meta.setdefault("model_kwargs", {})
    meta.setdefault("uses_metadata", False)
    meta.setdefault("train_class_counts", None)
    meta["input_size"] = [int(v) for v in meta["input_size"]]
    meta["classes"] = [str(c) for c in meta["classes"]]
    return meta


def make_checkpoint(model: torch.nn.Module, meta: Mapping[str, Any]) -> dict[str, Any]:
    """The checkpoint dict ``{"state_dict", "meta"}`` for ``model`` (weights on CPU)."""
    return {
        "state_dict": clean_state_dict(unwrap_model(model).state_dict()),
        "meta": validate_meta(meta),
    }


def save_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module | None,
    meta: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` + ``meta`` to ``path`` atomically (temp file then rename).

    ``model`` may be ``None`` when ``meta`` is an already-built checkpoint dict. ``extra``
    entries (optimizer state, epoch, ... for resuming) are stored beside ``state_dict`` and
    ``meta``.
    """
    if model is None:
        if not isinstance(meta, Mapping) or "state_dict" not in meta:
            raise ValueError(
                "save_checkpoint(path, None, ckpt) needs a checkpoint dict"
            )
        ckpt = {
            "state_dict": dict(meta["state_dict"]),
            "meta": validate_meta(meta["meta"]),
        }
        ckpt.update({k: v for k, v in meta.items() if k not in ckpt})
    else:
        if meta is None:
            raise ValueError(
                "save_checkpoint needs meta (arch, classes, input_size, mean, std)"
            )
        ckpt = make_checkpoint(model, meta)
    if extra:
        ckpt.update(extra)
    path = Path(path)
    atomic_torch_save(ckpt, path)
    return path


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename: a run killed while
    writing never leaves a half-written checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; checkpoints are shared files
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_checkpoint(
    path_or_dict: str | os.PathLike | Mapping[str, Any],
) -> dict[str, Any]:
    """The checkpoint dict from a path or a dict (validated)."""
    if isinstance(path_or_dict, Mapping):
        ckpt = dict(path_or_dict)
    else:
        path = Path(path_or_dict)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"{path}: not a readable checkpoint ({exc})") from exc
    if not isinstance(ckpt, Mapping) or "state_dict" not in ckpt or "meta" not in ckpt:
        raise ValueError("a checkpoint is a dict with 'state_dict' and 'meta'")
    ckpt["meta"] = validate_meta(ckpt["meta"])
    return ckpt


def build_from_meta(meta: Mapping[str, Any]) -> torch.nn.Module:
    """An untrained model of the architecture described by ``meta`` (no network).

    An ensemble (``arch == models.ensemble.ENSEMBLE_ARCH``) is built by
    :func:`~skin_lesion_classifier.models.ensemble.build_ensemble` from its members'
    metas; every other ``arch`` by the factory."""
    if is_ensemble(meta):
        kwargs = dict(meta.get("model_kwargs") or {})
        return build_ensemble(len(meta["classes"]), build_from_meta, **kwargs)
    kwargs = dict(meta.get("model_kwargs") or {})
    for key in ("pretrained", "allow_random_init", "num_classes", "input_size"):
        kwargs.pop(key, None)
    return create_model(
        meta["arch"],
        num_classes=len(meta["classes"]),
        pretrained=False,
        allow_random_init=True,
        input_size=meta["input_size"],
        check_size=False,
        **kwargs,
    )


def load_model(
    path_or_dict: str | os.PathLike | Mapping[str, Any],
    device: torch.device | str = "cpu",
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the model of a checkpoint: ``(model in eval mode on device, meta)``."""
    ckpt = read_checkpoint(path_or_dict)
    meta = ckpt["meta"]
    model = build_from_meta(meta)
    result = model.load_state_dict(clean_state_dict(ckpt["state_dict"]), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"checkpoint weights do not fit {meta['arch']}: missing {result.missing_keys[:10]}, "
            f"unexpected {result.unexpected_keys[:10]}"
        )
    return model.to(device).eval(), meta
