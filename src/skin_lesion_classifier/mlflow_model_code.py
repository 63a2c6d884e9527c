"""The models-from-code file of the project's MLflow pyfunc.

MLflow copies this file into the logged model and runs it to build the model, at logging
and at every load, instead of unpickling a Python object: ``mlflow.models.set_model``
names the model it builds. The device, batch size and test-time augmentation arrive as the
logged ``model_config`` (see :func:`skin_lesion_classifier.mlflow_model.log_model_args`).
Run only by MLflow: importing it elsewhere would set MLflow's current model.
"""

from mlflow.models import set_model

from skin_lesion_classifier.mlflow_model import SkinLesionPyfunc

set_model(SkinLesionPyfunc())
