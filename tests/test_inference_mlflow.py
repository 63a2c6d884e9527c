"""Loading the served model from MLflow: ``runs:/<id>/model``, ``models:/<name>/<version>``
and ``models:/<model id>``, logged exactly as training logs it (the project's pyfunc with
the checkpoint as an artifact, in the models-from-code form), in a throw-away SQLite
tracking store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from skin_lesion_classifier.models.checkpoint import save_checkpoint
from tests.conftest import tiny_model

pytestmark = pytest.mark.slow


def test_model_references_from_the_tracking_store(
    tmp_path: Path, samples_dir: Path
) -> None:
    mlflow = pytest.importorskip("mlflow")
    from skin_lesion_classifier.api.model_source import open_predictor
    from skin_lesion_classifier.inference.predictor import load_predictor
    from skin_lesion_classifier.mlflow_model import PIP_REQUIREMENTS, log_model_args

    model, meta = tiny_model(
        [48, 64],
        mean=[0.5, 0.5, 0.5],
        std=[0.25, 0.25, 0.25],
        decision={"melanoma_threshold": 0.3},
    )
    ckpt = save_checkpoint(tmp_path / "model.pt", model, meta)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    exp = mlflow.create_experiment(
        "serving-test", artifact_location=str(tmp_path / "artifacts")
    )
    with mlflow.start_run(experiment_id=exp) as run:
        info = mlflow.pyfunc.log_model(
            name="model",
            artifacts={"checkpoint": str(ckpt)},
            pip_requirements=PIP_REQUIREMENTS,
            registered_model_name="skin-lesion-test",
            **log_model_args(meta["classes"], device="cpu", batch_size=8, tta=False),
        )
    picture = sorted((samples_dir / "images").glob("*.jpg"))[0]
    expected = load_predictor(ckpt).predict_one(picture)
    refs = {
        f"runs:/{run.info.run_id}/model": run.info.run_id,
        "models:/skin-lesion-test/1": "skin-lesion-test/1",
        info.model_uri: info.model_uri.removeprefix("models:/"),
    }
    for ref, version in refs.items():
        pred = open_predictor(ref, tracking_uri=uri)
        assert pred.version == version and pred.source == ref
        assert pred.decision.melanoma_threshold == 0.3
        np.testing.assert_allclose(pred.predict_one(picture), expected, atol=1e-6)
        # the pyfunc itself (from code, with the logged model_config) predicts the same
        pyfunc = mlflow.pyfunc.load_model(ref)
        out = pyfunc.predict(pd.DataFrame({"path": [str(picture)]}))
        np.testing.assert_allclose(
            out.iloc[0, :-1].to_numpy(float), expected, atol=1e-6
        )
    with pytest.raises(FileNotFoundError, match="could not fetch"):
        open_predictor("models:/no-such-model/7", tracking_uri=uri)
