"""Image decoding and resizing shared by ingestion, the uint8 cache, prediction and the API.

Training and serving call the same :func:`load_rgb` and :func:`resize_rgb`, so a picture is
turned into model input the same way everywhere. :func:`load_rgb` is also the one place
where untrusted bytes are decoded: only the formats in :data:`ALLOWED_FORMATS` are opened
(anything else, e.g. EPS, which Pillow would hand to Ghostscript, raises
:class:`UnsupportedImageFormat` naming the detected format), and the pixel count read from
the header is checked against ``max_pixels`` before any pixel is decoded
(:class:`ImageTooLarge`).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
#: Pillow formats :func:`load_rgb` opens (GIF and multi-page TIFF: the first frame only).
ALLOWED_FORMATS = ("JPEG", "PNG", "TIFF", "BMP", "WEBP", "GIF")
#: Largest picture :func:`load_rgb` decodes, in pixels (width x height) read from the
#: header: 40 MP, above the largest ISIC archive pictures (6000x4000 = 24 MP). The one
#: default; the service (``SLC_MAX_PIXELS``) and ``predict --max-pixels`` override it.
MAX_PIXELS = 40_000_000
#: Rows converted at a time from 16/32-bit grey to 8 bits (bounds the temporary copy).
_ROW_BLOCK = 512


class ImageDecodeError(ValueError):
    """An image file or upload could not be decoded; the message names it and says why."""


class UnsupportedImageFormat(ImageDecodeError):
    """A readable image in a format outside :data:`ALLOWED_FORMATS`; ``detected`` names it."""

    def __init__(self, message: str, detected: str | None):
        super().__init__(message)
        self.detected = detected


class ImageTooLarge(ImageDecodeError):
    """The header announces more pixels than the limit; nothing was decoded."""

    def __init__(self, message: str, pixels: int, limit: int):
        super().__init__(message)
        self.pixels, self.limit = pixels, limit


def load_rgb(
    source: str | os.PathLike | bytes,
    name: str | None = None,
    max_pixels: int = MAX_PIXELS,
) -> Image.Image:
    """Decode ``source`` (a path or raw bytes) fully and return it as an RGB ``PIL.Image``.

    Only :data:`ALLOWED_FORMATS` are opened (else :class:`UnsupportedImageFormat`), and a
    header announcing more than ``max_pixels`` pixels raises :class:`ImageTooLarge` before
    decoding. Grayscale, palette, RGBA, CMYK and 16-bit images are converted to 8-bit RGB
    (alpha is composited on white); EXIF orientation is applied. Empty, truncated or
    undecodable input raises :class:`ImageDecodeError` naming the culprit.
    """
    label = name or (
        str(source) if not isinstance(source, bytes | bytearray) else "<bytes>"
    )
    try:
        fh = _open_source(source, label)
        with _open_allowed(fh, label) as opened:
            pixels = opened.width * opened.height
            if pixels > max_pixels:
                raise ImageTooLarge(
                    f"{label}: {opened.width}x{opened.height} = {pixels} pixels exceeds "
                    f"the limit of {max_pixels} pixels",
                    pixels,
                    max_pixels,
                )
            opened.load()  # forces a full decode: truncated files fail here
            return to_rgb(ImageOps.exif_transpose(opened))
    except ImageDecodeError:
        raise
    except (PermissionError, IsADirectoryError, FileNotFoundError) as exc:
        # the file system refused the file: not a decoding problem
        raise ImageDecodeError(
            f"{label}: cannot read the file ({exc.strerror or exc})"
        ) from exc
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(f"{label}: corrupt or truncated image ({exc})") from exc


def _open_source(source: str | os.PathLike | bytes, label: str) -> io.BytesIO | Path:
    if isinstance(source, bytes | bytearray):
        if len(source) == 0:
            raise ImageDecodeError(f"{label}: empty file (0 bytes)")
        return io.BytesIO(source)
    path = Path(source)
    if not path.exists():
        raise ImageDecodeError(f"{label}: file not found")
    if path.stat().st_size == 0:
        raise ImageDecodeError(f"{label}: empty file (0 bytes)")
    return path


def _open_allowed(fh: io.BytesIO | Path, label: str) -> Image.Image:
    """``Image.open`` restricted to :data:`ALLOWED_FORMATS` (header only, nothing decoded)."""
    try:
        return Image.open(fh, formats=ALLOWED_FORMATS)
    except UnidentifiedImageError:
        pass
    detected = detect_format(fh)
    if detected is None:
        raise ImageDecodeError(
            f"{label}: not a readable image (no image format recognised)"
        )
    raise UnsupportedImageFormat(
        f"{label}: image format {detected} is not accepted; accepted formats: "
        f"{', '.join(ALLOWED_FORMATS)}",
        detected,
    )


def detect_format(fh: io.BytesIO | Path) -> str | None:
    """The Pillow format name of ``fh`` from its header, or ``None``. Nothing is decoded
    (for EPS, Ghostscript is only called on ``load``, which never happens here)."""
    if isinstance(fh, io.BytesIO):
        fh.seek(0)
    try:
        with Image.open(fh) as probe:
            return probe.format or "unknown"
    except Exception:  # noqa: BLE001 - any failure to identify means "no format"
        return None


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
        img = _wide_grey_to_l(img)
    return img.convert("RGB")


def _wide_grey_to_l(img: Image.Image) -> Image.Image:
    """16/32-bit grey scaled to 8 bits by its maximum, a block of rows at a time: the
    only full-size arrays are the source's own integers and the uint8 result."""
    arr = np.asarray(img)
    hi = int(arr.max()) or 1
    out = np.empty(arr.shape, dtype=np.uint8)
    for top in range(0, arr.shape[0], _ROW_BLOCK):
        block = arr[top : top + _ROW_BLOCK].astype(np.int64) * 255 // hi
        out[top : top + _ROW_BLOCK] = np.clip(block, 0, 255)
    return Image.fromarray(out, mode="L")


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
