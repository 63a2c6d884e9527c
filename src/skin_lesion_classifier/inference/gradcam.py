"""Grad-CAM heat-map overlays with ``pytorch_grad_cam`` (the grad-cam package).

The target layer is found generically: the last feature stage that timm reports in
``feature_info`` when the model (or a sub-module) is a timm model, else the last
``nn.Conv2d``. No architecture-specific branches.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from skin_lesion_classifier.data.images import resize_rgb
from skin_lesion_classifier.data.transforms import to_float_nchw

#: Width of the overlay picture when the model's input is smaller than this.
MIN_DISPLAY_WIDTH = 384


def find_target_layer(model: torch.nn.Module) -> tuple[str, torch.nn.Module]:
    """``(name, module)`` of the layer Grad-CAM should look at.

    The last entry of timm's ``feature_info`` (the deepest feature stage) of the first timm
    model found in ``model.named_modules()``; otherwise the last ``nn.Conv2d``.
    """
    modules = dict(model.named_modules())
    for prefix, sub in model.named_modules():
        info = getattr(sub, "feature_info", None)
        if info is None:
            continue
        try:
            last = (
                info[-1]["module"] if isinstance(info, list) else info.module_name()[-1]
            )
        except (KeyError, IndexError, TypeError, AttributeError):
            continue
        name = f"{prefix}.{last}" if prefix else last
        if name in modules:
            return name, modules[name]
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    if not convs:
        raise ValueError(f"{type(model).__name__} has no Conv2d layer for Grad-CAM")
    return convs[-1]


@dataclass
class Explanation:
    """A Grad-CAM result: the overlay as PNG bytes, the heat map and what it explains."""

    png: bytes
    heatmap: np.ndarray  # (H, W) float in [0, 1], at model input size
    class_index: int
    class_name: str
    probability: float
    target_layer: str


def gradcam(
    model: torch.nn.Module,
    image: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    class_index: int,
    target_layer: torch.nn.Module | None = None,
) -> np.ndarray:
    """Grad-CAM map ``(H, W)`` in ``[0, 1]`` for a ``(H, W, 3)`` uint8 model-size ``image``."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    if target_layer is None:
        target_layer = find_target_layer(model)[1]
    device = next(model.parameters()).device
    x = to_float_nchw(image[None], mean, std, device)
    was_training = model.training
    model.eval()
    try:
        with GradCAM(model=model, target_layers=[target_layer]) as cam:
            maps = cam(
                input_tensor=x, targets=[ClassifierOutputTarget(int(class_index))]
            )
    finally:
        model.train(was_training)
    return np.clip(maps[0], 0.0, 1.0).astype(np.float32)


def overlay_png(
    picture: Image.Image, heatmap: np.ndarray, input_size: Sequence[int]
) -> bytes:
    """The heat map blended (jet colour map, 50 %) over ``picture`` cropped like the model
    input, as PNG bytes at least :data:`MIN_DISPLAY_WIDTH` wide."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    h, w = int(input_size[0]), int(input_size[1])
    scale = max(1.0, MIN_DISPLAY_WIDTH / w)
    dh, dw = round(h * scale), round(w * scale)
    rgb = resize_rgb(picture, (dh, dw)).astype(np.float32) / 255.0
    cam = np.asarray(
        Image.fromarray(heatmap.astype(np.float32), mode="F").resize(
            (dw, dh), Image.Resampling.BILINEAR
        )
    )
    blended = show_cam_on_image(
        rgb, np.clip(cam, 0.0, 1.0), use_rgb=True, image_weight=0.5
    )
    buf = io.BytesIO()
    Image.fromarray(blended).save(buf, format="PNG")
    return buf.getvalue()


def explain(
    model: torch.nn.Module,
    picture: Image.Image,
    meta: dict,
    class_name: str | None = None,
) -> Explanation:
    """Grad-CAM overlay for a decoded RGB ``picture`` (any size).

    Explains ``class_name`` when given, else the model's top class.
    """
    from skin_lesion_classifier.inference.predict import predict_proba

    classes = list(meta["classes"])
    size = tuple(int(v) for v in meta["input_size"])
    image = resize_rgb(picture, size)
    device = next(model.parameters()).device
    probs = predict_proba(model, image[None], meta["mean"], meta["std"], device=device)[
        0
    ]
    if class_name is None:
        idx = int(probs.argmax())
    elif class_name in classes:
        idx = classes.index(class_name)
    else:
        raise ValueError(f"unknown class {class_name!r}; choose from {classes}")
    layer_name, layer = find_target_layer(model)
    heat = gradcam(model, image, meta["mean"], meta["std"], idx, target_layer=layer)
    return Explanation(
        png=overlay_png(picture, heat, size),
        heatmap=heat,
        class_index=idx,
        class_name=classes[idx],
        probability=float(probs[idx]),
        target_layer=layer_name,
    )
