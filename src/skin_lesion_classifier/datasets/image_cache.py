"""Kedro dataset for the uint8 image cache: ``images.npy`` + ``index.json`` in a folder."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from kedro.io import AbstractDataset, DatasetError

from skin_lesion_classifier.data.cache import ImageCache


class ImageCacheDataset(AbstractDataset[ImageCache, ImageCache]):
    """An :class:`~skin_lesion_classifier.data.cache.ImageCache` stored in ``path`` as
    ``images.npy`` (``(N, H, W, 3)`` uint8) and ``index.json`` (image ids, size).

    Loading memory-maps the array (``mmap: true``, the default), so a 10,015-image cache at
    192x256 (1.5 GB) opens instantly and pages in what is used. Example::

        image_cache:
          type: skin_lesion_classifier.datasets.image_cache.ImageCacheDataset
          path: data/05_model_input/image_cache
    """

    def __init__(
        self, path: str, mmap: bool = True, metadata: dict | None = None
    ) -> None:
        self._path = Path(path)
        self._mmap = bool(mmap)
        self.metadata = metadata

    def load(self) -> ImageCache:
        index_file, array_file = self._path / "index.json", self._path / "images.npy"
        if not index_file.is_file() or not array_file.is_file():
            raise DatasetError(
                f"no image cache at {self._path}; run the model_input pipeline to build it"
            )
        index = json.loads(index_file.read_text())
        images = np.load(array_file, mmap_mode="r" if self._mmap else None)
        return ImageCache(
            images,
            index["image_ids"],
            tuple(index["input_size"]),
            index.get("meta", {}),
        )

    def save(self, data: ImageCache) -> None:
        if not isinstance(data, ImageCache):
            raise DatasetError(
                f"ImageCacheDataset saves an ImageCache, got {type(data).__name__}"
            )
        self._path.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".npy", dir=self._path)
        os.close(fd)
        try:
            np.save(tmp, np.ascontiguousarray(data.images))
            os.replace(tmp, self._path / "images.npy")
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        index = {
            "image_ids": list(data.image_ids),
            "input_size": list(data.input_size),
            "meta": data.meta,
        }
        (self._path / "index.json").write_text(json.dumps(index))

    def _exists(self) -> bool:
        return (self._path / "images.npy").is_file() and (
            self._path / "index.json"
        ).is_file()

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path), "mmap": self._mmap}
