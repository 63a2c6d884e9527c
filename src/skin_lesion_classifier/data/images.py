"""Image decoding and resizing shared by ingestion, the uint8 cache, prediction and the API.

Training and serving call the same :func:`load_rgb` and :func:`resize_rgb`, so a picture is
turned into model input the same way everywhere.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class ImageDecodeError(ValueError):
    """An image file or upload could not be decoded; the message names it and says why."""


def load_rgb(source: str | os.PathLike | bytes, name: str | None = None) -> Image.Image:
    """Decode ``source`` (a path or raw bytes) fully and return it as an RGB ``PIL.Image``.

    Grayscale, palette, RGBA, CMYK and 16-bit images are converted to 8-bit RGB (alpha is
    composited on white); EXIF orientation is applied. Empty, truncated or undecodable input
    raises :class:`ImageDecodeError` naming the culprit.
    """
    label = name or (
        str(source) if not isinstance(source, bytes | bytearray) else "<bytes>"
    )
    try:
        if isinstance(source, bytes | bytearray):
            if len(source) == 0:
                raise ImageDecodeError(f"{label}: empty file (0 bytes)")
            fh: io.BytesIO | Path = io.BytesIO(source)
        else:
            fh = Path(source)
            if not fh.exists():
                raise ImageDecodeError(f"{label}: file not found")
            if fh.stat().st_size == 0:
                raise ImageDecodeError(f"{label}: empty file (0 bytes)")
        with Image.open(fh) as opened:
            opened.load()  # forces a full decode: truncated files fail here
            return to_rgb(ImageOps.exif_transpose(opened))
    except ImageDecodeError:
        raise
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(
            f"{label}: not a readable image (no image format recognised)"
        ) from exc
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(f"{label}: corrupt or truncated image ({exc})") from exc


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; transparency is composited on white."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max() or 1.0
        img = Image.fromarray((arr / hi * 255.0).astype(np.uint8), mode="L")
    return img.convert("RGB")


def resize_rgb(img: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """Return ``img`` as a ``(H, W, 3)`` uint8 array of ``size = (H, W)``.

    The picture is first centre-cropped to the target aspect ratio (a no-op for HAM10000's
    4:3 pictures at a 4:3 size such as 192x256), then resized with antialiased bicubic
    filtering. Any input size works: 600x450 originals and 200x150 copies alike.
    """
    height, width = (int(size[0]), int(size[1]))
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive (H, W), got {size}")
    src_w, src_h = img.size
    target_aspect = width / height
    src_aspect = src_w / src_h
    if abs(src_aspect - target_aspect) > 1e-3:
        if src_aspect > target_aspect:  # too wide: crop left and right
            new_w = round(src_h * target_aspect)
            left = (src_w - new_w) // 2
            img = img.crop((left, 0, left + new_w, src_h))
        else:  # too tall: crop top and bottom
            new_h = round(src_w / target_aspect)
            top = (src_h - new_h) // 2
            img = img.crop((0, top, src_w, top + new_h))
    if img.size != (width, height):
        img = img.resize((width, height), Image.Resampling.BICUBIC, reducing_gap=3.0)
    return np.asarray(img, dtype=np.uint8).copy()


def load_resized(
    source: str | os.PathLike | bytes, size: tuple[int, int]
) -> np.ndarray:
    """:func:`load_rgb` then :func:`resize_rgb`: a ``(H, W, 3)`` uint8 array."""
    return resize_rgb(load_rgb(source), size)
