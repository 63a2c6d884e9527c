"""A Kedro dataset for a labelled external set: an image folder plus its ISIC ground truth."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kedro.io import AbstractDataset, DatasetError

from skin_lesion_classifier.evaluation.external import read_external_set


class ExternalSetDataset(AbstractDataset[None, dict]):
    """An external validation set, loaded as ``{"rows", "issues", "source"}``.

    ``rows`` and ``issues`` are what :func:`evaluation.external.read_external_set` returns
    (every image or label row left out is listed in ``issues``, with its reason);
    ``source`` names the folder and files read, for the report. Example::

        external_set:
          type: skin_lesion_classifier.datasets.external_set.ExternalSetDataset
          image_dir: data/01_raw/external/images
          labels_csv: data/01_raw/external/ground_truth.csv
          metadata_csv: null     # optional: image, age, sex, localization, lesion_id
          check_decode: true     # decode every image; unreadable ones are listed
    """

    def __init__(
        self,
        image_dir: str,
        labels_csv: str,
        metadata_csv: str | None = None,
        check_decode: bool = True,
        metadata: dict | None = None,
    ) -> None:
        for name, value in (("image_dir", image_dir), ("labels_csv", labels_csv)):
            if not value:
                raise DatasetError(
                    f"external_set.{name} is not set: point it at the external image "
                    "folder and its ISIC ground-truth CSV"
                )
        self._image_dir = Path(image_dir)
        self._labels_csv = Path(labels_csv)
        self._metadata_csv = Path(metadata_csv) if metadata_csv else None
        self._check_decode = bool(check_decode)
        self.metadata = metadata

    def load(self) -> dict:
        if not self._image_dir.is_dir():
            raise DatasetError(f"external image folder not found: {self._image_dir}")
        rows, issues = read_external_set(
            self._image_dir,
            self._labels_csv,
            metadata_csv=self._metadata_csv,
            check_decode=self._check_decode,
        )
        source = {
            "image_dir": str(self._image_dir),
            "labels_csv": str(self._labels_csv),
            "metadata_csv": str(self._metadata_csv) if self._metadata_csv else None,
        }
        return {"rows": rows, "issues": issues, "source": source}

    def save(self, data: None) -> None:
        raise DatasetError(
            "ExternalSetDataset is read-only: external data is never overwritten"
        )

    def _exists(self) -> bool:
        return self._image_dir.is_dir() and self._labels_csv.is_file()

    def _describe(self) -> dict[str, Any]:
        return {
            "image_dir": str(self._image_dir),
            "labels_csv": str(self._labels_csv),
            "metadata_csv": str(self._metadata_csv) if self._metadata_csv else None,
            "check_decode": self._check_decode,
        }
