"""An MLflow artifact around a ``versioned: true`` dataset that takes the run's versions,
also when a dataset factory pattern (``"{name}.decision_rule"``) builds it."""

from __future__ import annotations

from typing import Any

from kedro.io import AbstractDataset, DatasetError, Version
from kedro_mlflow.io.artifacts import MlflowArtifactDataset


class VersionedMlflowArtifactDataset(AbstractDataset):
    """kedro-mlflow's ``MlflowArtifactDataset`` whose inner dataset saves and loads at the
    catalog's versions (the run's save version, ``--load-versions``).

    kedro-mlflow builds the inner dataset without them, so it picks a save version of its
    own, and Kedro then refuses to add it to a catalog that has a different one. For an
    explicit entry the project's hook rebuilds it; a pattern entry is built only when a
    pipeline asks for one of its names, so it is this type instead. Kedro hands it the
    run's :class:`~kedro.io.Version` (``versioned = True``); everything else is as for
    ``MlflowArtifactDataset``. Example::

        "{name}.decision_rule":
          type: skin_lesion_classifier.datasets.versioned_artifact.VersionedMlflowArtifactDataset
          artifact_path: ensemble/members
          dataset:
            type: json.JSONDataset
            filepath: data/06_models/ensemble/members/{name}_decision_rule.json
            versioned: true
    """

    versioned = True  # Kedro passes ``version=Version(load, save)`` of the catalog

    def __new__(  # type: ignore[misc]
        cls, dataset: dict[str, Any], version: Version | None = None, **kwargs: Any
    ) -> Any:
        if not (isinstance(dataset, dict) and dataset.get("versioned")):
            raise DatasetError(
                f"{cls.__name__} wraps a dataset with `versioned: true`; got {dataset!r}"
            )
        wrapped = MlflowArtifactDataset(dataset=dataset, **kwargs)
        if version is not None:
            wrapped._version = version
        return wrapped
