"""Finding HAM10000 images on disk and decode-checking each one.

Both official layouts work: one folder of images, or the two folders of the release
(``HAM10000_images_part_1/`` and ``HAM10000_images_part_2/``), at any depth below the root.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from skin_lesion_classifier.data.images import (
    IMAGE_SUFFIXES,
    MAX_PIXELS,
    ImageDecodeError,
    load_rgb,
)

FILE_COLUMNS = ["image_id", "path", "folder", "size_bytes", "duplicate_of"]
CHECK_COLUMNS = [
    "image_id",
    "path",
    "ok",
    "reason",
    "width",
    "height",
    "mode",
    "sha256",
    "signature",
]


def find_image_files(root: str | os.PathLike, suffixes=IMAGE_SUFFIXES) -> pd.DataFrame:
    """List image files below ``root`` (recursively, following links).

    One row per file: ``image_id`` (file stem), ``path``, ``folder`` (relative to ``root``),
    ``size_bytes`` and ``duplicate_of``: the path of the first file with the same image id (for
    example the same picture in both release parts), or ``None``.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"image folder {root} does not exist; put the HAM10000 images there "
            "(one folder, or HAM10000_images_part_1/ and HAM10000_images_part_2/), "
            "or run `make data`"
        )
    rows = []
    seen: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        for name in sorted(filenames):
            if name.startswith(".") or Path(name).suffix.lower() not in suffixes:
                continue
            path = Path(dirpath) / name
            rows.append(
                {
                    "image_id": path.stem,
                    "path": str(path),
                    "folder": str(Path(dirpath).relative_to(root)),
                    "size_bytes": path.stat().st_size if path.exists() else -1,
                    "duplicate_of": seen.get(path.stem),
                }
            )
            seen.setdefault(path.stem, str(path))
    return pd.DataFrame(rows, columns=FILE_COLUMNS)


#: (H, W) of the grey-level thumbnail behind near-duplicate search.
SIGNATURE_SIZE = (24, 32)


def image_signature(
    img: Image.Image, size: tuple[int, int] = SIGNATURE_SIZE
) -> np.ndarray:
    """Unit-norm, zero-mean grey-level thumbnail (``size = (H, W)``, bilinear) as float16 bytes.

    The dot product of two signatures is the Pearson correlation of the thumbnails: it is
    insensitive to brightness, contrast and colour-balance changes, resizing and re-encoding,
    and so finds the same picture stored twice under two ids.
    """
    g = np.asarray(
        img.convert("L").resize((size[1], size[0]), Image.Resampling.BILINEAR),
        dtype=np.float32,
    ).ravel()
    g -= g.mean()
    g /= np.linalg.norm(g) + 1e-6
    return g.astype(np.float16)


def check_image(path: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> dict:
    """Decode one file fully; return its size, mode, SHA-256 and near-duplicate signature,
    or the reason it failed (above ``max_pixels`` pixels: not decoded, the limit named)."""
    path = Path(path)
    row = {
        "image_id": path.stem,
        "path": str(path),
        "ok": False,
        "reason": None,
        "width": -1,
        "height": -1,
        "mode": None,
        "sha256": None,
        "signature": None,
    }
    if path.is_symlink() and not path.exists():
        row["reason"] = (
            f"dangling symbolic link (its target {os.readlink(path)} does not exist)"
        )
        return row
    try:
        data = path.read_bytes()
    except OSError as exc:
        row["reason"] = f"cannot read file: {exc}"
        return row
    row["sha256"] = hashlib.sha256(data).hexdigest()
    try:
        img = load_rgb(data, name=str(path), max_pixels=max_pixels)
        with Image.open(io.BytesIO(data)) as probe:
            row["mode"] = probe.mode
    except ImageDecodeError as exc:
        row["reason"] = str(exc).split(": ", 1)[-1]
        return row
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a reason, not a crash
        row["reason"] = f"cannot decode image: {type(exc).__name__}: {exc}"
        return row
    row.update(
        ok=True,
        width=img.width,
        height=img.height,
        signature=image_signature(img).tobytes(),
    )
    return row


def check_images(
    paths: list[str],
    workers: int | None = None,
    progress: bool = True,
    max_pixels: int = MAX_PIXELS,
) -> pd.DataFrame:
    """:func:`check_image` over many files with a thread pool (Pillow decodes without the GIL)."""
    workers = workers or min(8, (os.cpu_count() or 2) * 2)
    results: list[dict] = []
    check = functools.partial(check_image, max_pixels=max_pixels)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        iterator = pool.map(check, paths, chunksize=32)
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(
                iterator,
                total=len(paths),
                desc="checking images",
                unit="img",
                mininterval=1.0,
            )
        results.extend(iterator)
    return pd.DataFrame(results, columns=CHECK_COLUMNS)


def near_duplicate_pairs(
    image_ids: list[str], signatures: list[bytes], min_correlation: float = 0.99
) -> list[tuple[str, str, float]]:
    """Pairs of images whose :func:`image_signature` correlation is at least ``min_correlation``.

    ``corr(a, b) = sum_i a_i * b_i`` over unit-norm, zero-mean thumbnails. All pairs are compared
    by blocked matrix products (seconds for 10,015 images). On HAM10000, 0.99 finds the
    known cross-lesion pair (ISIC_0025226 / ISIC_0030074, 0.9986) and no other cross-lesion pair.
    """
    if not image_ids:
        return []
    v = np.stack([np.frombuffer(s, dtype=np.float16) for s in signatures]).astype(
        np.float32
    )
    pairs: list[tuple[str, str, float]] = []
    block = 2048
    for start in range(0, len(v), block):
        sim = v[start : start + block] @ v.T
        ii, jj = np.nonzero(sim >= min_correlation)
        for i, j in zip(ii + start, jj, strict=True):
            if i < j:
                pairs.append((image_ids[i], image_ids[j], float(sim[i - start, j])))
    return pairs


class UnionFind:
    """Disjoint sets over hashable items (used to merge lesions linked by duplicate images)."""

    def __init__(self) -> None:
        self.parent: dict = {}

    def find(self, x):
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a, b) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)
