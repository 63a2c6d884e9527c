"""The uint8 image cache: every image decoded and resized once at the training resolution.

An :class:`ImageCache` is a ``(N, H, W, 3)`` uint8 array plus the ``image_id`` of each row.
It is built from the ``image_index`` frame (its ``path`` column) with
:func:`skin_lesion_classifier.data.images.load_resized`, the same resize that serving uses,
so 600x450 originals and 200x150 copies both work. The Kedro dataset
(:mod:`skin_lesion_classifier.datasets.image_cache`) stores it as ``.npy`` + JSON and
memory-maps it back, so later runs reuse it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from skin_lesion_classifier.data.images import load_resized

logger = logging.getLogger(__name__)


@dataclass
class ImageCache:
    """Decoded, resized images and their ids (row ``i`` of ``images`` is ``image_ids[i]``)."""

    images: np.ndarray
    image_ids: list[str]
    input_size: tuple[int, int]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (
            self.images.ndim != 4
            or self.images.shape[-1] != 3
            or self.images.dtype != np.uint8
        ):
            raise ValueError(
                f"image cache must be (N, H, W, 3) uint8, got {self.images.shape} {self.images.dtype}"
            )
        if len(self.image_ids) != len(self.images):
            raise ValueError(
                f"image cache has {len(self.images)} images but {len(self.image_ids)} ids"
            )
        if tuple(self.images.shape[1:3]) != tuple(self.input_size):
            raise ValueError(
                f"image cache arrays are {self.images.shape[1:3]}, meta says {self.input_size}"
            )
        self.image_ids = [str(i) for i in self.image_ids]
        self._row = {image_id: k for k, image_id in enumerate(self.image_ids)}
        if len(self._row) != len(self.image_ids):
            dup = pd.Series(self.image_ids)
            raise ValueError(
                f"duplicate image ids in cache: {sorted(dup[dup.duplicated()])[:10]}"
            )

    def __len__(self) -> int:
        return len(self.image_ids)

    def rows(self, image_ids: Sequence[str]) -> np.ndarray:
        """Row numbers of ``image_ids``; ``KeyError`` names ids that are not cached."""
        missing = [i for i in image_ids if str(i) not in self._row]
        if missing:
            raise KeyError(
                f"{len(missing)} image id(s) not in the image cache (rebuild it): {missing[:10]}"
            )
        return np.fromiter(
            (self._row[str(i)] for i in image_ids), dtype=np.int64, count=len(image_ids)
        )

    def take(self, image_ids: Sequence[str]) -> np.ndarray:
        """The ``(len(image_ids), H, W, 3)`` uint8 images, in the order asked for (a copy)."""
        return np.ascontiguousarray(self.images[self.rows(list(image_ids))])


def build_image_cache(
    image_index: pd.DataFrame,
    input_size: Sequence[int],
    num_workers: int = 2,
    progress: bool = True,
) -> ImageCache:
    """Decode and resize every image of ``image_index`` (columns ``image_id``, ``path``) to
    ``input_size = (H, W)`` with a thread pool. A file that cannot be decoded raises
    :class:`~skin_lesion_classifier.data.images.ImageDecodeError` naming it."""
    for col in ("image_id", "path"):
        if col not in image_index.columns:
            raise ValueError(
                f"image_index lacks column {col!r} needed for the image cache"
            )
    h, w = int(input_size[0]), int(input_size[1])
    if h <= 0 or w <= 0:
        raise ValueError(f"cache size must be positive (H, W), got {input_size}")
    paths = image_index["path"].astype(str).tolist()
    ids = image_index["image_id"].astype(str).tolist()
    out = np.empty((len(paths), h, w, 3), dtype=np.uint8)

    def work(k: int) -> None:
        out[k] = load_resized(paths[k], (h, w))

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(paths), desc=f"image cache {h}x{w}", unit="img")
    with ThreadPoolExecutor(max_workers=max(1, int(num_workers))) as pool:
        for _ in pool.map(work, range(len(paths)), chunksize=64):
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    logger.info("Built image cache of %d images at %dx%d", len(ids), h, w)
    return ImageCache(out, ids, (h, w), {"n_images": len(ids)})
