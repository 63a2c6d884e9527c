"""Kedro dataset for model checkpoints (``{"state_dict", "meta"}`` dicts, ``torch.save``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kedro.io import AbstractDataset, DatasetError

from skin_lesion_classifier.models.checkpoint import read_checkpoint, save_checkpoint


class TorchCheckpointDataset(AbstractDataset[dict, dict]):
    """A checkpoint dict per docs/architecture.md, saved atomically and loaded without
    unpickling arbitrary objects (``weights_only=True``). Example::

        model_checkpoint:
          type: skin_lesion_classifier.datasets.torch_checkpoint.TorchCheckpointDataset
          filepath: data/06_models/model.pt
    """

    def __init__(self, filepath: str, metadata: dict | None = None) -> None:
        self._filepath = Path(filepath)
        self.metadata = metadata

    def load(self) -> dict:
        try:
            return read_checkpoint(self._filepath)
        except FileNotFoundError as exc:
            raise DatasetError(f"{exc}; run the training pipeline first") from exc

    def save(self, data: dict) -> None:
        if not isinstance(data, dict) or "state_dict" not in data or "meta" not in data:
            raise DatasetError(
                "TorchCheckpointDataset saves a {'state_dict', 'meta'} dict"
            )
        save_checkpoint(self._filepath, None, data)

    def _exists(self) -> bool:
        return self._filepath.is_file()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath)}
