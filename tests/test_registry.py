"""The MLflow model registry rule: every run registers a version with its validation
figures as tags; ``champion`` moves only to a strictly better version (both ways)."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from skin_lesion_classifier.registry import promote_if_better, register_and_promote

pytestmark = pytest.mark.slow  # logs and registers several models

NAME = "skin-lesion-test"


class _Constant(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return model_input


@pytest.fixture
def store(tmp_path: Path):
    old = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = mlflow.create_experiment("registry", artifact_location=str(tmp_path / "art"))
    yield exp
    mlflow.set_tracking_uri(old)


def _log(exp: str) -> str:
    with mlflow.start_run(experiment_id=exp):
        info = mlflow.pyfunc.log_model(
            name="model", python_model=_Constant(), pip_requirements=["pandas"]
        )
    return info.model_uri


def _register(exp: str, ba: float) -> dict:
    return register_and_promote(
        _log(exp),
        NAME,
        metrics={"val_balanced_accuracy": ba, "val_macro_auc": 0.9},
        metric="val_balanced_accuracy",
        alias="champion",
    )


def test_champion_moves_only_to_a_better_version(store: str) -> None:
    client = MlflowClient()
    first = _register(store, 0.60)
    assert first["version"] == "1" and first["promoted"] and first["previous"] is None
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"

    worse = _register(store, 0.55)  # worse: registered, alias stays
    assert worse["version"] == "2" and not worse["promoted"]
    assert worse["champion"] == "1" and worse["champion_value"] == pytest.approx(0.60)
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"
    assert float(client.get_model_version(NAME, "2").tags["val_balanced_accuracy"]) == (
        pytest.approx(0.55)
    )

    tie = _register(store, 0.60)  # equal is not better
    assert not tie["promoted"]
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"

    better = _register(store, 0.65)  # better: the alias moves
    assert better["promoted"] and better["previous"] == "1"
    champion = client.get_model_version_by_alias(NAME, "champion")
    assert str(champion.version) == better["version"] == "4"
    assert champion.tags["val_macro_auc"] == "0.9"


def test_a_version_without_the_figure_never_becomes_champion(store: str) -> None:
    client = MlflowClient()
    _register(store, 0.5)
    mv = mlflow.register_model(_log(store), NAME)  # registered by hand, no tags
    decision = promote_if_better(
        client, NAME, mv.version, "val_balanced_accuracy", "champion"
    )
    assert not decision["promoted"] and decision["champion"] == "1"
