"""The project's MLflow pyfunc model as a catalog entry, logged in the "models from code"
form (no pickled Python object)."""

from __future__ import annotations

from typing import Any

import mlflow
from kedro.io import DatasetError
from kedro_mlflow.io.models import MlflowModelTrackingDataset


class PyfuncModelDataset(MlflowModelTrackingDataset):
    """kedro-mlflow's ``MlflowModelTrackingDataset`` (flavor ``mlflow.pyfunc``) for a node
    that returns the ``mlflow.pyfunc.log_model`` arguments which define the model rather
    than a model object: ``python_model`` as the path of a models-from-code file, its
    ``model_config``, the signature, an input example (see
    :func:`skin_lesion_classifier.mlflow_model.log_model_args`). The catalog's
    ``save_args`` add the rest; a key given by both is an error. Loading is
    kedro-mlflow's: the last logged model (or ``load_args.model_uri``). Example::

        mlflow_model:
          type: skin_lesion_classifier.datasets.pyfunc_model.PyfuncModelDataset
          save_args:
            name: model
            artifacts:
              checkpoint: data/06_models/model.pt
            pip_requirements: [torch, timm]
    """

    def __init__(
        self,
        load_args: dict[str, Any] | None = None,
        save_args: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(
            flavor="mlflow.pyfunc",
            pyfunc_workflow="python_model",
            load_args=load_args,
            save_args=save_args,
            metadata=metadata,
        )

    def _save(self, model: dict[str, Any]) -> None:
        if not self._logging_activated:
            return
        if self._user_defined_model_uri:
            raise DatasetError(
                "a model with 'model_uri' in its load_args is read-only: MLflow does not "
                "overwrite a logged model"
            )
        if not isinstance(model, dict) or "python_model" not in model:
            raise DatasetError(
                f"{type(self).__name__} saves the log_model arguments of a pyfunc "
                f"(python_model, model_config, ...), got {type(model).__name__}"
            )
        both = sorted(set(model) & set(self._save_args))
        if both:
            raise DatasetError(
                f"given by the node and by the catalog's save_args: {both}"
            )
        self.model_info = mlflow.pyfunc.log_model(**self._save_args, **model)
        self._last_saved_model_uri = self.model_info.model_uri
