"""Helpers of the service tests: a tiny checkpoint, adversarial pictures, process memory."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

from skin_lesion_classifier.models.checkpoint import save_checkpoint
from tests.conftest import tiny_model

MIB = 1024 * 1024


def tiny_checkpoint(folder: Path, input_size=(48, 64)) -> Path:
    model, meta = tiny_model(input_size)
    return save_checkpoint(folder / "model.pt", model, meta)


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def grey16_bomb(side: int = 13000) -> bytes:
    """A ~330 kB 16-bit grey PNG of ``side`` x ``side`` pixels (4.4 GB through float64)."""
    return encode(Image.new("I;16", (side, side)), "PNG")


def rgb_bomb(side: int = 10000) -> bytes:
    """A ~300 kB 8-bit RGB PNG of ``side`` x ``side`` pixels."""
    return encode(Image.new("RGB", (side, side)), "PNG")


def memory_mib(pid: int, key: str = "VmRSS") -> float:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak resident) of a process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def reset_peak(pid: int) -> None:
    """Reset the process's peak resident memory (``VmHWM``) to its current size."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
