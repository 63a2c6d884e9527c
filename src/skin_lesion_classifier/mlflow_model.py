"""The trained classifier as an MLflow pyfunc model.

The model carries the checkpoint (``checkpoint.pt`` artifact) whose meta holds the class
names and the preprocessing (input size, mean, std); ``predict`` takes a DataFrame with a
``path`` column (image files) or an ``image`` column (file paths, raw bytes or ``(H, W, 3)``
uint8 arrays, any size) and returns one ``prob_<class>`` column per class plus ``pred``.
Models that fuse patient metadata also read optional ``age``, ``sex`` and ``localization``
columns; a missing column or blank value counts as unknown (the encoder's explicit
missing/unknown categories)::

    model = mlflow.pyfunc.load_model("models:/<model id>")
    model.predict(pd.DataFrame({"path": ["ISIC_0024306.jpg"]}))

It is logged in MLflow's "models from code" form (:func:`log_model_args`): the file
``mlflow_model_code.py`` builds it and the logged ``model_config`` sets its device, batch
size and test-time augmentation, so no Python object is pickled. Its signature is explicit
(:func:`pyfunc_signature`): the input columns (all optional), one output column per class
and the ``tta`` parameter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
from mlflow.types.schema import AnyType
from PIL import Image

from skin_lesion_classifier.data.images import load_resized, resize_rgb
from skin_lesion_classifier.data.metadata_features import METADATA_COLUMNS
from skin_lesion_classifier.device import detect_device
from skin_lesion_classifier.inference.predictor import TorchPredictor

#: Packages the pyfunc needs besides this project (given explicitly: no inference run).
PIP_REQUIREMENTS = [
    "torch",
    "torchvision",
    "timm",
    "numpy",
    "pandas",
    "pillow",
    "scikit-learn",
]

#: The models-from-code file that MLflow logs and runs to build the pyfunc.
MODEL_CODE = Path(__file__).with_name("mlflow_model_code.py")


def _to_uint8(item: Any, size: tuple[int, int]) -> np.ndarray:
    if isinstance(item, list):  # an array as JSON carries it (MLflow's scoring server)
        item = np.asarray(item)
        if (
            item.dtype.kind in "iu"
            and item.size
            and 0 <= item.min() <= item.max() <= 255
        ):
            item = item.astype(np.uint8)
    if isinstance(item, np.ndarray):
        if item.ndim != 3 or item.shape[-1] != 3 or item.dtype != np.uint8:
            raise ValueError(
                f"image arrays must be (H, W, 3) uint8, got {item.shape} {item.dtype}"
            )
        return resize_rgb(Image.fromarray(item), size)
    return load_resized(item, size)


def images_from_frame(frame: pd.DataFrame, size: tuple[int, int]) -> np.ndarray:
    """``(N, H, W, 3)`` uint8 model input from a DataFrame's ``path`` or ``image`` column."""
    if not isinstance(frame, pd.DataFrame):
        frame = pd.DataFrame(frame)
    column = (
        "path"
        if "path" in frame.columns
        else "image"
        if "image" in frame.columns
        else None
    )
    if column is None:
        raise ValueError(
            f"input needs a 'path' or 'image' column, got {list(frame.columns)}"
        )
    if len(frame) == 0:
        return np.zeros((0, size[0], size[1], 3), dtype=np.uint8)
    return np.stack([_to_uint8(v, size) for v in frame[column]])


class SkinLesionPyfunc(mlflow.pyfunc.PythonModel):
    """Probabilities of every class for a DataFrame of images (see the module docstring)."""

    def __init__(
        self, device: str = "auto", batch_size: int = 64, tta: bool = False
    ) -> None:
        self.device_name = device
        self.batch_size = batch_size
        self.tta = tta
        self.predictor: TorchPredictor | None = None

    def load_context(self, context) -> None:
        config = getattr(context, "model_config", None) or {}  # models from code
        self.device_name = config.get("device", self.device_name)
        self.batch_size = int(config.get("batch_size", self.batch_size))
        self.tta = bool(config.get("tta", self.tta))
        self.predictor = TorchPredictor.from_checkpoint(
            context.artifacts["checkpoint"],
            device=detect_device(self.device_name),
            batch_size=self.batch_size,
            tta=self.tta,
        )

    def predict(
        self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        if self.predictor is None:
            self.load_context(context)
        predictor = self.predictor
        images = images_from_frame(model_input, predictor.input_size)
        predictor.tta = (params or {}).get("tta", self.tta)
        rows = None
        if predictor.uses_metadata:
            rows = pd.DataFrame(model_input).reset_index(drop=True)
            defaults = {"age": np.nan, "sex": "unknown", "localization": "unknown"}
            rows = pd.DataFrame(
                {
                    c: rows[c] if c in rows.columns else defaults[c]
                    for c in METADATA_COLUMNS
                },
                index=rows.index,
            )
            rows["sex"] = rows["sex"].fillna("unknown")
            rows["localization"] = rows["localization"].fillna("unknown")
        proba = predictor.predict(images, rows)
        classes = predictor.classes
        out = pd.DataFrame(
            proba.reshape(len(images), len(classes)),
            columns=[f"prob_{c}" for c in classes],
        )
        out["pred"] = [classes[i] for i in out.to_numpy().argmax(1)] if len(out) else []
        return out


def pyfunc_signature(classes: list[str], tta: bool) -> ModelSignature:
    """The pyfunc's signature: ``path`` (an image file) or ``image`` (a file path, raw
    bytes or a uint8 array: any type), optional ``age``, ``sex`` and ``localization`` for
    models that fuse metadata; ``prob_<class>`` per class and ``pred`` out; ``tta`` as a
    parameter (default: the logged model's setting).

    Given explicitly: MLflow infers no signature from a ``pd.DataFrame`` type hint."""
    inputs = Schema(
        [
            ColSpec(DataType.string, "path", required=False),
            ColSpec(AnyType(), "image", required=False),
            ColSpec(AnyType(), "age", required=False),
            ColSpec(DataType.string, "sex", required=False),
            ColSpec(DataType.string, "localization", required=False),
        ]
    )
    outputs = Schema(
        [ColSpec(DataType.double, f"prob_{c}") for c in classes]
        + [ColSpec(DataType.string, "pred")]
    )
    params = ParamSchema([ParamSpec("tta", DataType.boolean, bool(tta))])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def log_model_args(
    classes: list[str], device: str, batch_size: int, tta: bool
) -> dict[str, Any]:
    """The ``mlflow.pyfunc.log_model`` arguments that define the model (the catalog's
    ``save_args`` add its name, checkpoint artifact, code and requirements): the
    models-from-code file, its ``model_config``, the signature and an input example."""
    return {
        "python_model": str(MODEL_CODE),
        # a small grey picture: MLflow checks at logging that it goes through the model
        "input_example": pd.DataFrame({"image": [np.full((3, 4, 3), 128, np.uint8)]}),
        "model_config": {
            "device": device,
            "batch_size": int(batch_size),
            "tta": bool(tta),
        },
        "signature": pyfunc_signature(classes, tta),
    }
