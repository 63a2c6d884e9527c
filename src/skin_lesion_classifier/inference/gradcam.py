"""Grad-CAM heat-map overlays with ``pytorch_grad_cam`` (the grad-cam package).

The target layer is found generically: the last feature stage that timm reports in
``feature_info`` when the model (or a sub-module) is a timm model, else the last
``nn.Conv2d``. No architecture-specific branches.

* **Metadata-fusion models** are explained along the image path with the patient's
  metadata held fixed: :class:`FixedMetadata` wraps the model so that ``forward(images)``
  closes over the encoded metadata vector, which is what the library calls.
* **Ensembles** (:class:`models.ensemble.EnsembleModel`): the target is the weighted
  ensemble's output (``log sum_m w_m p_m``) and the map is the weight-averaged Grad-CAM of
  every member's last feature stage, ``sum_m w_m cam_m / sum_m w_m`` (each ``cam_m`` scaled to
  ``[0, 1]`` by the library). One backward pass per member: the library pairs activations
  and gradients of several layers by order, which parallel branches do not keep. Members
  whose input aspect differs from the ensemble's see a centre crop, so their map would not
  line up with the picture; they are left out and :attr:`Explanation.members` says so.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

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


class FixedMetadata(torch.nn.Module):
    """``model(images, metadata)`` as ``forward(images)``, the metadata vector held fixed
    (repeated over the batch), so image-only tools such as Grad-CAM can drive a fusion
    model."""

    def __init__(self, model: torch.nn.Module, metadata: torch.Tensor) -> None:
        super().__init__()
        if metadata.ndim != 2 or metadata.shape[0] != 1:
            raise ValueError(
                f"FixedMetadata holds one patient's vector (1, D), got {tuple(metadata.shape)}"
            )
        self.model = model
        self.register_buffer("metadata", metadata, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images, self.metadata.expand(images.shape[0], -1))


@dataclass
class CamTarget:
    """One layer Grad-CAM looks at, with its weight in the combined map."""

    name: str  # module name inside the explained model
    module: torch.nn.Module
    weight: float = 1.0
    member: str | None = None  # ensemble member name


def cam_targets(
    model: torch.nn.Module, meta: Mapping[str, Any]
) -> tuple[list[CamTarget], list[dict[str, Any]]]:
    """The layers to explain and, for an ensemble, every member's entry
    ``{name, weight, layer, used, reason}`` (``used`` false with a reason for members whose
    input aspect differs from the ensemble's)."""
    members = getattr(model, "members", None)
    if not isinstance(members, torch.nn.ModuleList):
        name, module = find_target_layer(model)
        return [CamTarget(name, module)], []
    metas = list((meta.get("model_kwargs") or {}).get("members") or [])
    weights = [float(w) for w in model.weights.detach().cpu()]
    h, w = (int(v) for v in meta["input_size"])
    targets, report = [], []
    for i, member in enumerate(members):
        mname = (
            str(metas[i].get("name", f"member_{i}"))
            if i < len(metas)
            else f"member_{i}"
        )
        mh, mw = model.member_sizes[i]
        lname, module = find_target_layer(member)
        entry = {
            "name": mname,
            "weight": weights[i],
            "layer": f"members.{i}.{lname}",
            "used": True,
            "reason": None,
        }
        if abs(mw / mh - w / h) > 1e-3:
            entry.update(
                used=False,
                reason=f"input {mh}x{mw} has another aspect than the ensemble's {h}x{w}",
            )
        elif weights[i] > 0:
            targets.append(CamTarget(entry["layer"], module, weights[i], mname))
        else:
            entry.update(used=False, reason="zero weight")
        report.append(entry)
    if not targets:
        raise ValueError("no ensemble member can be explained at the ensemble's input")
    return targets, report


@dataclass
class Explanation:
    """A Grad-CAM result: the overlay as PNG bytes, the heat map and what it explains."""

    png: bytes
    heatmap: np.ndarray  # (H, W) float in [0, 1], at model input size
    class_index: int
    class_name: str
    probability: float
    target_layer: (
        str  # the layer, or for an ensemble the weighted layers of its members
    )
    members: list[dict[str, Any]] = field(default_factory=list)  # ensembles only


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
    meta: Mapping[str, Any],
    class_name: str | None = None,
    metadata: np.ndarray | None = None,
) -> Explanation:
    """Grad-CAM overlay for a decoded RGB ``picture`` (any size).

    Explains ``class_name`` when given, else the model's top class. ``metadata`` is the
    encoded ``(1, D)`` patient vector a fusion model (or an ensemble with a fusion member)
    needs; it is held fixed while the image path is explained.
    """
    from skin_lesion_classifier.inference.predict import predict_proba

    classes = list(meta["classes"])
    size = tuple(int(v) for v in meta["input_size"])
    image = resize_rgb(picture, size)
    device = next(model.parameters()).device
    if meta.get("uses_metadata") and metadata is None:
        raise ValueError(
            "this model fuses patient metadata: pass its encoded (1, D) metadata vector"
        )
    extra = None
    net = model
    if meta.get("uses_metadata"):
        extra = np.asarray(metadata, dtype=np.float32).reshape(1, -1)
        net = FixedMetadata(
            model, torch.as_tensor(extra, dtype=torch.float32, device=device)
        )
    probs = predict_proba(
        model, image[None], meta["mean"], meta["std"], device=device, extra_inputs=extra
    )[0]
    if class_name is None:
        idx = int(probs.argmax())
    elif class_name in classes:
        idx = classes.index(class_name)
    else:
        raise ValueError(f"unknown class {class_name!r}; choose from {classes}")
    targets, members = cam_targets(model, meta)
    total = sum(t.weight for t in targets)
    heat = np.zeros(size, dtype=np.float64)
    for t in targets:
        heat += (t.weight / total) * gradcam(
            net, image, meta["mean"], meta["std"], idx, target_layer=t.module
        )
    if len(targets) > 1 and heat.max() > 0:
        heat = heat / heat.max()
    heat = np.clip(heat, 0.0, 1.0).astype(np.float32)
    label = (
        " + ".join(f"{t.name} (w={t.weight:.3f})" for t in targets)
        if members
        else targets[0].name
    )
    return Explanation(
        png=overlay_png(picture, heat, size),
        heatmap=heat,
        class_index=idx,
        class_name=classes[idx],
        probability=float(probs[idx]),
        target_layer=label,
        members=members,
    )
