"""Training augmentation: batched on any device, or per sample with torchvision v2.

Both paths apply the same knobs (:class:`AugmentConfig`, filled from parameters):
random rotation, zoom 0.8-1.2, horizontal and vertical flips, random resized crop and
brightness / contrast / saturation jitter. Normalisation (the model's mean/std) is applied
afterwards by the caller.

* :func:`augment_batch` works on a whole ``(N, H, W, 3)`` uint8 batch already on the device
  (GPU or CPU): one ``affine_grid`` + ``grid_sample`` per batch carries flips, rotation,
  zoom and crop for every sample at once; colour jitter is vectorised.
* :func:`torchvision_transform` builds the equivalent per-sample ``torchvision.transforms.v2``
  pipeline for the DataLoader path.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from skin_lesion_classifier.config_defaults import check_keys

# ITU-R 601 luma weights, as torchvision's rgb_to_grayscale.
_LUMA = (0.299, 0.587, 0.114)


@dataclass
class AugmentConfig:
    """Augmentation knobs. Probabilities are per sample; ranges are sampled uniformly.
    The defaults are ``training.train.augment`` in ``conf/base/parameters_training.yml``."""

    enabled: bool
    hflip: float
    vflip: float
    rotation: float  # max degrees either way
    zoom: tuple[float, float]  # >1 magnifies
    translate: float  # max shift as a fraction of the side
    crop_p: float  # probability of a random resized crop
    crop_scale: tuple[float, float]  # area fraction kept
    crop_ratio: tuple[float, float]  # aspect change of the crop
    brightness: float
    contrast: float
    saturation: float
    padding_mode: str  # grid_sample padding for rotated corners

    @classmethod
    def from_dict(cls, params: Mapping[str, Any] | None) -> AugmentConfig:
        """Build from a parameters dict; unknown or missing keys raise ``ValueError``
        naming them."""
        params = dict(params or {})
        check_keys(cls, params, "augmentation")
        for key in ("zoom", "crop_scale", "crop_ratio"):
            if key in params:
                params[key] = tuple(float(v) for v in params[key])
                if (
                    len(params[key]) != 2
                    or params[key][0] > params[key][1]
                    or params[key][0] <= 0
                ):
                    raise ValueError(
                        f"augmentation {key} must be [low, high] with 0 < low <= high"
                    )
        cfg = cls(**params)
        for key in ("hflip", "vflip", "crop_p"):
            if not 0.0 <= getattr(cfg, key) <= 1.0:
                raise ValueError(
                    f"augmentation {key} is a probability, got {getattr(cfg, key)}"
                )
        for key in ("brightness", "contrast", "saturation"):
            if not 0.0 <= getattr(cfg, key) < 1.0:
                raise ValueError(
                    f"augmentation {key} must be in [0, 1), got {getattr(cfg, key)}"
                )
        if cfg.padding_mode not in ("zeros", "border", "reflection"):
            raise ValueError(
                f"padding_mode must be zeros, border or reflection, got {cfg.padding_mode!r}"
            )
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()
        }


def _uniform(n: int, low: float, high: float, device, generator=None) -> torch.Tensor:
    return torch.rand(n, device=device, generator=generator) * (high - low) + low


def random_affine_theta(
    n: int, height: int, width: int, cfg: AugmentConfig, device, generator=None
) -> torch.Tensor:
    """Per-sample ``(n, 2, 3)`` affine matrices for ``F.affine_grid`` (output -> input coords).

    Built in pixel-proportional coordinates so that rotations do not shear non-square images:
    ``in = D^-1 · Crop · Rot · Zoom^-1 · Flip · D · out + shift``, ``D = diag(W, H)``.
    """
    ones = torch.ones(n, device=device)
    flip_x = torch.where(
        torch.rand(n, device=device, generator=generator) < cfg.hflip, -ones, ones
    )
    flip_y = torch.where(
        torch.rand(n, device=device, generator=generator) < cfg.vflip, -ones, ones
    )
    angle = _uniform(n, -cfg.rotation, cfg.rotation, device, generator) * (
        math.pi / 180.0
    )
    zoom = _uniform(n, cfg.zoom[0], cfg.zoom[1], device, generator)
    # random resized crop: the kept window as a fraction of each side
    crop_w, crop_h = ones.clone(), ones.clone()
    if cfg.crop_p > 0:
        area = _uniform(n, cfg.crop_scale[0], cfg.crop_scale[1], device, generator)
        log_r = _uniform(
            n,
            math.log(cfg.crop_ratio[0]),
            math.log(cfg.crop_ratio[1]),
            device,
            generator,
        )
        ratio = torch.exp(log_r)
        cw = torch.sqrt(area * ratio).clamp(max=1.0)
        ch = torch.sqrt(area / ratio).clamp(max=1.0)
        use = torch.rand(n, device=device, generator=generator) < cfg.crop_p
        crop_w = torch.where(use, cw, ones)
        crop_h = torch.where(use, ch, ones)
    # crop centre anywhere the window fits, plus optional translation
    cx = (torch.rand(n, device=device, generator=generator) * 2 - 1) * (1 - crop_w)
    cy = (torch.rand(n, device=device, generator=generator) * 2 - 1) * (1 - crop_h)
    if cfg.translate > 0:
        cx = cx + _uniform(n, -cfg.translate, cfg.translate, device, generator) * 2
        cy = cy + _uniform(n, -cfg.translate, cfg.translate, device, generator) * 2

    cos, sin = torch.cos(angle), torch.sin(angle)
    aspect = width / height
    # Linear part in normalised coords: D^-1 R D with D = diag(aspect, 1), then zoom and flip.
    a = cos * flip_x / zoom
    b = -sin / aspect * flip_y / zoom
    c = sin * aspect * flip_x / zoom
    d = cos * flip_y / zoom
    theta = torch.zeros(n, 2, 3, device=device)
    theta[:, 0, 0] = crop_w * a
    theta[:, 0, 1] = crop_w * b
    theta[:, 1, 0] = crop_h * c
    theta[:, 1, 1] = crop_h * d
    theta[:, 0, 2] = cx
    theta[:, 1, 2] = cy
    return theta


def color_jitter(x: torch.Tensor, cfg: AugmentConfig, generator=None) -> torch.Tensor:
    """Per-sample brightness, contrast and saturation jitter of a float ``(N, 3, H, W)``
    batch in [0, 1] (torchvision's formulas: blend with black, the mean grey, the grey image)."""
    n = x.shape[0]
    dev = x.device
    luma = torch.tensor(_LUMA, device=dev, dtype=x.dtype).view(1, 3, 1, 1)
    if cfg.brightness > 0:
        f = _uniform(n, 1 - cfg.brightness, 1 + cfg.brightness, dev, generator).view(
            n, 1, 1, 1
        )
        x = (x * f.to(x.dtype)).clamp_(0, 1)
    if cfg.contrast > 0:
        f = _uniform(n, 1 - cfg.contrast, 1 + cfg.contrast, dev, generator).view(
            n, 1, 1, 1
        )
        mean = (x * luma).sum(1, keepdim=True).mean(dim=(2, 3), keepdim=True)
        x = (f.to(x.dtype) * x + (1 - f.to(x.dtype)) * mean).clamp_(0, 1)
    if cfg.saturation > 0:
        f = _uniform(n, 1 - cfg.saturation, 1 + cfg.saturation, dev, generator).view(
            n, 1, 1, 1
        )
        grey = (x * luma).sum(1, keepdim=True)
        x = (f.to(x.dtype) * x + (1 - f.to(x.dtype)) * grey).clamp_(0, 1)
    return x


def augment_batch(
    images: torch.Tensor,
    cfg: AugmentConfig,
    out_size: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Randomly augment a batch on its own device; returns float ``(N, 3, H, W)`` in [0, 1].

    ``images`` is ``(N, H, W, 3)`` uint8 (the cache layout) or float ``(N, 3, H, W)`` in
    [0, 1]. ``out_size`` ``(H, W)`` defaults to the input size. Every sample gets its own
    flips, rotation, zoom, crop and colour factors; labels are untouched by construction.
    """
    if images.ndim != 4:
        raise ValueError(f"expected a 4-D image batch, got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        if images.shape[-1] != 3:
            raise ValueError(
                f"uint8 batches are (N, H, W, 3), got {tuple(images.shape)}"
            )
        x = images.permute(0, 3, 1, 2).float().div_(255.0)
    else:
        if images.shape[1] != 3:
            raise ValueError(
                f"float batches are (N, 3, H, W), got {tuple(images.shape)}"
            )
        x = images.float()
    n, _, h, w = x.shape
    oh, ow = (int(out_size[0]), int(out_size[1])) if out_size is not None else (h, w)
    if not cfg.enabled:
        if (oh, ow) != (h, w):
            x = F.interpolate(
                x, size=(oh, ow), mode="bilinear", align_corners=False, antialias=True
            )
        return x
    theta = random_affine_theta(n, oh, ow, cfg, x.device, generator)
    grid = F.affine_grid(theta, [n, 3, oh, ow], align_corners=False)
    x = F.grid_sample(
        x, grid, mode="bilinear", padding_mode=cfg.padding_mode, align_corners=False
    )
    return color_jitter(x, cfg, generator)


def torchvision_transform(cfg: AugmentConfig, size: Sequence[int], mean, std):
    """The per-sample ``torchvision.transforms.v2`` equivalent for the DataLoader path.

    Input: a uint8 ``(3, H, W)`` tensor; output: normalised float ``(3, H, W)``.
    """
    from torchvision.transforms import v2

    size = (int(size[0]), int(size[1]))
    steps: list[Any] = []
    if cfg.enabled:
        if cfg.crop_p > 0:
            steps.append(
                v2.RandomApply(
                    [
                        v2.RandomResizedCrop(
                            size,
                            scale=cfg.crop_scale,
                            ratio=tuple(r * size[1] / size[0] for r in cfg.crop_ratio),
                            antialias=True,
                        )
                    ],
                    p=cfg.crop_p,
                )
            )
        steps += [
            v2.RandomHorizontalFlip(cfg.hflip),
            v2.RandomVerticalFlip(cfg.vflip),
            v2.RandomAffine(
                degrees=cfg.rotation,
                translate=(cfg.translate, cfg.translate) if cfg.translate > 0 else None,
                scale=cfg.zoom,  # > 1 magnifies, as in augment_batch
                interpolation=v2.InterpolationMode.BILINEAR,
            ),
            v2.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation),
        ]
    steps += [
        v2.Resize(size, antialias=True),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(mean), list(std)),
    ]
    return v2.Compose(steps)
