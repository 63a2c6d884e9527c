"""Kedro dataset for model checkpoints (``{"state_dict", "meta"}`` dicts, ``torch.save``)."""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

from kedro.io import AbstractVersionedDataset, DatasetError, Version

from skin_lesion_classifier.inference.versions import resolve_version
from skin_lesion_classifier.models.checkpoint import read_checkpoint, save_checkpoint


class TorchCheckpointDataset(AbstractVersionedDataset[dict, dict]):
    """A checkpoint dict per docs/architecture.md, saved atomically and loaded without
    unpickling arbitrary objects (``weights_only=True``). With ``versioned: true`` every run
    saves ``<filepath>/<version>/<name>`` and a load takes the latest version (or the one
    ``kedro run --load-versions <dataset>:<version>`` names). An unversioned entry whose
    ``filepath`` is such a versioned folder (``external_checkpoint`` pointing at
    ``data/06_models/model.pt``) loads its latest version. Example::

        model_checkpoint:
          type: skin_lesion_classifier.datasets.torch_checkpoint.TorchCheckpointDataset
          filepath: data/06_models/model.pt
          versioned: true
    """

    def __init__(
        self,
        filepath: str,
        version: Version | None = None,
        metadata: dict | None = None,
    ) -> None:
        super().__init__(filepath=PurePosixPath(filepath), version=version)
        self.metadata = metadata

    def load(self) -> dict:
        try:
            path = Path(self._get_load_path())
        except DatasetError as exc:  # versioned, and no version saved yet
            raise DatasetError(f"{exc}; run the training pipeline first") from exc
        if self._version is None:  # unversioned entry over a versioned folder: latest
            path = resolve_version(path)
        try:
            return read_checkpoint(path)
        except FileNotFoundError as exc:
            raise DatasetError(f"{exc}; run the training pipeline first") from exc

    def save(self, data: dict) -> None:
        if not isinstance(data, dict) or "state_dict" not in data or "meta" not in data:
            raise DatasetError(
                "TorchCheckpointDataset saves a {'state_dict', 'meta'} dict"
            )
        save_checkpoint(Path(self._get_save_path()), None, data)

    def _exists(self) -> bool:
        try:
            path = self._get_load_path()
        except DatasetError:
            return False
        if self._version is None:
            path = resolve_version(path)
        return Path(path).is_file()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath), "version": self._version}
