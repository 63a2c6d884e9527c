"""training: image cache + split assignment -> image model, the patient-metadata prior
fused into it (age, sex, site; off in the parameters keeps the image model) -> model
checkpoint, history, MLflow model, registered model version (the ``champion`` alias moves
only to a better one)."""

from kedro.pipeline import Node, Pipeline

from .nodes import (
    add_metadata_prior,
    best_validation_metrics,
    make_mlflow_model,
    register_model,
    train_classifier,
)


def create_pipeline(params: str = "params:training", **kwargs) -> Pipeline:
    """``params``: where the ``training`` parameters come from (the ensemble feeds each
    member's from a node that puts the member's keys on top of ``params:training``)."""
    return Pipeline(
        [
            Node(
                train_classifier,
                ["image_cache", "split_assignment", params],
                ["image_model_checkpoint", "training_history", "training_metrics"],
                name="train_classifier",
            ),
            Node(
                add_metadata_prior,
                [
                    "image_model_checkpoint",
                    "image_cache",
                    "split_assignment",
                    "image_index",
                    params,
                ],
                "model_checkpoint",
                name="add_metadata_prior",
            ),
            Node(
                best_validation_metrics,
                "model_checkpoint",
                "best_validation_metrics",
                name="best_validation_metrics",
            ),
            Node(
                make_mlflow_model,
                ["model_checkpoint", params],
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
