"""A Kedro dataset for a folder of raw images: loading lists the files, it decodes nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from kedro.io import AbstractDataset, DatasetError

from skin_lesion_classifier.data.discovery import find_image_files
from skin_lesion_classifier.data.images import IMAGE_SUFFIXES


class ImageFolderDataset(AbstractDataset[None, pd.DataFrame]):
    """Every image file below ``path`` (any depth: one folder or the two HAM10000 release
    parts), as a DataFrame ``image_id, path, folder, size_bytes, duplicate_of``.

    Example catalog entry::

        raw_images:
          type: skin_lesion_classifier.datasets.ImageFolderDataset
          path: data/01_raw
    """

    def __init__(
        self, path: str, suffixes: list[str] | None = None, metadata: dict | None = None
    ):
        self._path = Path(path)
        self._suffixes = tuple(s.lower() for s in (suffixes or IMAGE_SUFFIXES))
        self.metadata = metadata

    def load(self) -> pd.DataFrame:
        try:
            return find_image_files(self._path, self._suffixes)
        except FileNotFoundError as exc:
            raise DatasetError(str(exc)) from exc

    def save(self, data: None) -> None:
        raise DatasetError(
            "ImageFolderDataset is read-only: raw images are never overwritten"
        )

    def _exists(self) -> bool:
        return self._path.is_dir()

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path), "suffixes": self._suffixes}
