"""The one decode function for untrusted pictures: an allow-list of formats, a pixel limit
read from the header before decoding, and 16-bit conversion without float64 copies.
Checked on real samples and on adversarial files made here, through every caller
(the engine function, ingestion's check, the predictor)."""

from __future__ import annotations

import io
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import EpsImagePlugin, Image

from skin_lesion_classifier.data.discovery import check_image
from skin_lesion_classifier.data.images import (
    ALLOWED_FORMATS,
    MAX_PIXELS,
    ImageDecodeError,
    ImageTooLarge,
    UnsupportedImageFormat,
    load_rgb,
    to_rgb,
)


@pytest.fixture(scope="module")
def sample(samples_dir: Path) -> Image.Image:
    return Image.open(next((samples_dir / "images").glob("*.jpg"))).convert("RGB")


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "TIFF", "BMP", "WEBP", "GIF"])
def test_allowed_formats_decode_to_rgb(sample, fmt) -> None:
    out = load_rgb(_encode(sample, fmt), name=f"lesion.{fmt.lower()}")
    assert out.mode == "RGB" and out.size == sample.size
    if fmt in ("PNG", "TIFF", "BMP"):  # lossless: the very pixels
        assert np.array_equal(np.asarray(out), np.asarray(sample))


def test_gif_gives_its_first_frame(sample) -> None:
    frames = [sample, Image.new("RGB", sample.size, (255, 0, 0))]
    data = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    out = np.asarray(load_rgb(data, name="anim.gif")).astype(int)
    red = np.zeros_like(out) + np.array([255, 0, 0])
    assert np.abs(out - red).mean() > 50  # not the second (red) frame


@pytest.mark.parametrize("fmt", ["EPS", "PCX", "TGA", "ICO", "PPM", "DDS"])
def test_other_formats_are_refused_naming_the_detected_format(
    sample, fmt, monkeypatch
) -> None:
    def never(*args, **kwargs):  # Ghostscript must never see an upload
        raise AssertionError("Ghostscript was called")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", never)
    small = sample.resize((64, 48))
    with pytest.raises(UnsupportedImageFormat, match=f"lesion.bin.*format {fmt}") as e:
        load_rgb(_encode(small, fmt), name="lesion.bin")
    assert e.value.detected == fmt and fmt not in ALLOWED_FORMATS
    assert isinstance(
        e.value, ImageDecodeError
    )  # callers that list reasons keep working


def test_pixel_limit_is_checked_from_the_header_before_decoding(tmp_path) -> None:
    bomb = _encode(Image.new("1", (13000, 13000)), "PNG")  # ~20 kB, 169 MP
    assert len(bomb) < 1_000_000
    t0 = time.perf_counter()
    with pytest.raises(
        ImageTooLarge, match=f"13000x13000.*limit of {MAX_PIXELS} pixels"
    ):
        load_rgb(bomb, name="bomb.png")
    assert time.perf_counter() - t0 < 0.5  # decoding 169 MP takes seconds
    small = _encode(Image.new("RGB", (100, 80)), "PNG")
    with pytest.raises(ImageTooLarge, match="limit of 7999 pixels") as e:
        load_rgb(small, name="small.png", max_pixels=7999)
    assert (e.value.pixels, e.value.limit) == (8000, 7999)
    assert load_rgb(small, max_pixels=8000).size == (100, 80)
    # ingestion reports the same reason for a file on disk
    (tmp_path / "ISIC_bomb.png").write_bytes(bomb)
    row = check_image(tmp_path / "ISIC_bomb.png")
    assert not row["ok"] and "exceeds the limit" in row["reason"]


def test_16_bit_grey_converts_exactly_without_float64_copies() -> None:
    grey = (np.arange(1500 * 2000, dtype=np.uint32) % 60001).astype(np.uint16)
    grey = grey.reshape(1500, 2000)
    img = Image.fromarray(grey)
    assert img.mode == "I;16"
    tracemalloc.start()
    try:
        out = to_rgb(img)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    expected = (grey.astype(np.int64) * 255 // grey.max()).astype(np.uint8)
    assert np.array_equal(np.asarray(out)[..., 0], expected)
    # float64 conversion peaked at ~17 bytes per pixel; integers in row blocks at ~7
    assert peak / grey.size < 10, peak / grey.size


def test_the_predict_path_refuses_the_same_formats(tmp_path, sample) -> None:
    from skin_lesion_classifier.inference.predictor import TorchPredictor
    from tests.conftest import tiny_model

    model, meta = tiny_model((48, 64))
    predictor = TorchPredictor(model, meta)
    eps = tmp_path / "ISIC_0000001.eps"
    eps.write_bytes(_encode(sample.resize((64, 48)), "EPS"))
    with pytest.raises(UnsupportedImageFormat, match="ISIC_0000001.eps.*format EPS"):
        predictor.predict_one(eps)
    ok = tmp_path / "ISIC_0000002.webp"
    ok.write_bytes(_encode(sample, "WEBP"))
    assert predictor.predict_one(ok).shape == (7,)
