"""The model_input + training Kedro pipelines on 56 real images, logging to a temporary MLflow."""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner
from kedro_mlflow.io.artifacts import MlflowArtifactDataset
from kedro_mlflow.io.metrics import MlflowMetricsHistoryDataset
from mlflow.tracking import MlflowClient

from skin_lesion_classifier.constants import CLASSES
from skin_lesion_classifier.datasets.image_cache import ImageCacheDataset
from skin_lesion_classifier.datasets.pyfunc_model import PyfuncModelDataset
from skin_lesion_classifier.datasets.torch_checkpoint import TorchCheckpointDataset
from skin_lesion_classifier.mlflow_model import PIP_REQUIREMENTS
from skin_lesion_classifier.pipelines.model_input import (
    create_pipeline as model_input_pipeline,
)
from skin_lesion_classifier.pipelines.training import (
    create_pipeline as training_pipeline,
)
from tests.conftest import train_params

EPOCHS = 2

pytestmark = pytest.mark.slow  # trains a model


@pytest.fixture
def mlflow_run(tmp_path):
    old_uri = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = mlflow.create_experiment(
        "training-test", artifact_location=(tmp_path / "mlruns").as_uri()
    )
    with mlflow.start_run(experiment_id=exp) as run:
        yield run
    mlflow.set_tracking_uri(old_uri)


def test_training_pipeline_runs_and_logs_to_mlflow(tmp_path, small_split, mlflow_run):
    torch.set_num_threads(1)
    model_path = tmp_path / "06_models" / "model.pt"
    params = {
        "checkpoint_dir": str(tmp_path / "checkpoints"),
        "mlflow_model": {"device": "cpu", "batch_size": 16, "tta": False},
        "registry": {
            "model_name": "slc-training-test",
            "champion_alias": "champion",
            "champion_metric": "val_balanced_accuracy",
        },
        "train": train_params(
            arch="test_efficientnet",
            pretrained=False,
            allow_random_init=True,
            input_size=[64, 64],
            epochs=EPOCHS,
            batch_size=8,
            lr=3e-3,
            progress=False,
            ema=True,
            ema_decay=0.9,
            data_path="dataloader",
            num_workers=0,
        ),
    }
    catalog = DataCatalog(
        {
            "image_index": MemoryDataset(small_split.drop(columns=["split", "fold"])),
            "split_assignment": MemoryDataset(small_split),
            "params:model_input": MemoryDataset(
                {"input_size": [64, 64], "num_workers": 2, "progress": False}
            ),
            "params:training": MemoryDataset(params),
            "image_cache": ImageCacheDataset(
                str(tmp_path / "05_model_input" / "cache")
            ),
            "model_checkpoint": MlflowArtifactDataset(
                dataset={"type": TorchCheckpointDataset, "filepath": str(model_path)},
                artifact_path="checkpoint",
            ),
            "training_history": MemoryDataset(),
            "training_metrics": MlflowMetricsHistoryDataset(),
            "best_validation_metrics": MlflowMetricsHistoryDataset(),
            "mlflow_model": PyfuncModelDataset(
                save_args={
                    "name": "model",
                    "artifacts": {"checkpoint": str(model_path)},
                    "pip_requirements": PIP_REQUIREMENTS,
                },
            ),
        }
    )
    pipeline = model_input_pipeline() + training_pipeline()
    SequentialRunner().run(pipeline, catalog)

    # the cache was written and reloads memory-mapped
    cache = catalog["image_cache"].load()
    assert cache.images.shape == (len(small_split), 64, 64, 3)
    # checkpoint per the contract
    ckpt = TorchCheckpointDataset(str(model_path)).load()
    assert ckpt["meta"]["classes"] == list(CLASSES)
    history = catalog["training_history"].load()
    assert list(history.epoch) == list(range(1, EPOCHS + 1))

    client = MlflowClient()
    run_id = mlflow_run.info.run_id
    for key in (
        "train_loss",
        "val_loss",
        "val_balanced_accuracy",
        "val_macro_auc",
        "lr",
    ):
        series = client.get_metric_history(run_id, key)
        assert [m.step for m in series] == list(range(1, EPOCHS + 1)), key
        assert np.allclose([m.value for m in series], history[key].to_numpy())
    assert client.get_metric_history(run_id, "best_val_balanced_accuracy")[
        0
    ].value == pytest.approx(history.val_balanced_accuracy.max())
    artifacts = [a.path for a in client.list_artifacts(run_id, "checkpoint")]
    assert "checkpoint/model.pt" in artifacts

    # the logged pyfunc model predicts probabilities from image paths
    model_uri = catalog["mlflow_model"]._last_saved_model_uri
    pyfunc = mlflow.pyfunc.load_model(model_uri)
    test = small_split[small_split.split == "test"]
    out = pyfunc.predict(pd.DataFrame({"path": test.path}))
    assert list(out.columns) == [f"prob_{c}" for c in CLASSES] + ["pred"]
    probs = out[[f"prob_{c}" for c in CLASSES]].to_numpy()
    assert np.allclose(probs.sum(1), 1, atol=1e-5)
    # uint8 arrays of any size work too, and give the same answer as the files
    from skin_lesion_classifier.data.images import load_rgb

    # the run registered its model, tagged with the validation figures, as champion
    registration = catalog["model_registration"].load()
    assert registration["version"] == "1" and registration["promoted"]
    version = client.get_model_version_by_alias("slc-training-test", "champion")
    assert float(version.tags["val_balanced_accuracy"]) == pytest.approx(
        history.val_balanced_accuracy.max()
    )

    arrays = pd.DataFrame({"image": [np.asarray(load_rgb(p)) for p in test.path[:3]]})
    assert np.allclose(
        pyfunc.predict(arrays)[[f"prob_{c}" for c in CLASSES]].to_numpy(),
        probs[:3],
        atol=1e-5,
    )
