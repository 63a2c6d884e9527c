"""The project's MLflow pyfunc as training logs it: the models-from-code form (no pickled
object), an explicit signature and an input example, so that MLflow warns about none of
it; the logged ``model_config`` reaches the model, and the model loads back and predicts.
Saved to a local folder (no tracking store); logging in a run is the slow tests'."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from skin_lesion_classifier.constants import CLASSES
from skin_lesion_classifier.models.checkpoint import save_checkpoint
from tests.conftest import tiny_model


def test_the_pyfunc_is_saved_from_code_without_warnings_and_loads_back(
    tmp_path: Path, samples_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import mlflow

    from skin_lesion_classifier.data.images import load_resized, load_rgb
    from skin_lesion_classifier.inference.predictor import load_predictor
    from skin_lesion_classifier.mlflow_model import (
        MODEL_CODE,
        PIP_REQUIREMENTS,
        log_model_args,
    )

    model, meta = tiny_model([48, 64])
    ckpt = save_checkpoint(tmp_path / "model.pt", model, meta)
    args = log_model_args(meta["classes"], device="cpu", batch_size=4, tta=True)
    assert args["python_model"] == str(MODEL_CODE)  # a file, not a Python object

    mlflow_logger = logging.getLogger("mlflow")  # MLflow's loggers do not propagate
    mlflow_logger.addHandler(caplog.handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mlflow.pyfunc.save_model(
                path=str(tmp_path / "pyfunc"),
                artifacts={"checkpoint": str(ckpt)},
                pip_requirements=PIP_REQUIREMENTS,
                **args,
            )
    finally:
        mlflow_logger.removeHandler(caplog.handler)
    # no "Failed to infer model signature", no "serialized using CloudPickle", no missing
    # input example, and the input example went through the model (else a warning);
    # deprecation warnings are MLflow's own and hidden outside tests
    shown = [
        str(w.message)
        for w in caught
        if not issubclass(w.category, DeprecationWarning | PendingDeprecationWarning)
    ]
    logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert shown == [] and logged == [], (shown, logged)
    assert not list((tmp_path / "pyfunc").glob("*.pkl"))  # nothing pickled

    loaded = mlflow.pyfunc.load_model(str(tmp_path / "pyfunc"))
    flavor = loaded.metadata.flavors["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    signature = loaded.metadata.signature
    assert signature.inputs.input_names() == [
        "path",
        "image",
        "age",
        "sex",
        "localization",
    ]
    assert not any(signature.inputs.required_input_names())
    columns = [f"prob_{c}" for c in CLASSES] + ["pred"]
    assert signature.outputs.input_names() == columns
    assert signature.params.params[0].name == "tta"
    assert signature.params.params[0].default is True
    pyfunc = loaded.unwrap_python_model()  # the model_config reached the model
    assert (pyfunc.device_name, pyfunc.batch_size, pyfunc.tta) == ("cpu", 4, True)

    pictures = sorted((samples_dir / "images").glob("*.jpg"))[:2]
    out = loaded.predict(pd.DataFrame({"path": [str(p) for p in pictures]}))
    assert list(out.columns) == columns
    predictor = load_predictor(ckpt, tta=True)
    expected = np.stack([predictor.predict_one(p) for p in pictures])
    np.testing.assert_allclose(out[columns[:-1]].to_numpy(), expected, atol=1e-5)
    # arrays give the same; arrays as a JSON request carries them (nested lists) too
    arrays = [np.asarray(load_rgb(p)) for p in pictures]
    again = loaded.predict(pd.DataFrame({"image": arrays}))
    np.testing.assert_allclose(again[columns[:-1]].to_numpy(), expected, atol=1e-5)
    small = [load_resized(p, (48, 64)) for p in pictures]  # short lists
    as_arrays = loaded.predict(pd.DataFrame({"image": small}))
    as_lists = loaded.predict(pd.DataFrame({"image": [a.tolist() for a in small]}))
    pd.testing.assert_frame_equal(as_lists, as_arrays)
    # the tta parameter still switches test-time augmentation per call
    plain = loaded.predict(
        pd.DataFrame({"path": [str(p) for p in pictures]}), params={"tta": False}
    )
    np.testing.assert_allclose(
        plain[columns[:-1]].to_numpy(),
        np.stack([load_predictor(ckpt).predict_one(p) for p in pictures]),
        atol=1e-5,
    )


def test_the_pyfunc_dataset_refuses_an_argument_given_twice() -> None:
    from kedro.io import DatasetError

    from skin_lesion_classifier.datasets.pyfunc_model import PyfuncModelDataset

    dataset = PyfuncModelDataset(save_args={"name": "model", "model_config": {}})
    with pytest.raises(DatasetError, match="model_config"):
        dataset.save({"python_model": "model.py", "model_config": {"tta": True}})
    with pytest.raises(DatasetError, match="log_model arguments"):
        dataset.save(object())
