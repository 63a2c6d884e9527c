"""training: image cache + split assignment -> model checkpoint, history, MLflow model,
registered model version (the ``champion`` alias moves only to a better one)."""

from kedro.pipeline import Node, Pipeline

from .nodes import (
    best_validation_metrics,
    make_mlflow_model,
    register_model,
    train_classifier,
)


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                train_classifier,
                ["image_cache", "split_assignment", "params:training"],
                ["model_checkpoint", "training_history", "training_metrics"],
                name="train_classifier",
            ),
            Node(
                best_validation_metrics,
                "model_checkpoint",
                "best_validation_metrics",
                name="best_validation_metrics",
            ),
            Node(
                make_mlflow_model,
                ["model_checkpoint", "params:training"],
                "mlflow_model",
                name="log_mlflow_model",
            ),
            Node(
                register_model,
                ["mlflow_model", "model_checkpoint", "params:training"],
                "model_registration",
                name="register_model",
            ),
        ]
    )
