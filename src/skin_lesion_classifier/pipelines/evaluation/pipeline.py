"""Evaluation: saved model -> val/test predictions -> decision rule (val only) -> metrics."""

from kedro.pipeline import Node, Pipeline

from .nodes import (
    choose_rule,
    compute_metrics,
    make_isic_submission,
    predict_test,
    predict_validation,
)


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                predict_validation,
                [
                    "model_checkpoint",
                    "split_assignment",
                    "image_index",
                    "params:evaluation",
                ],
                "val_predictions",
                name="predict_validation",
            ),
            Node(
                predict_test,
                [
                    "model_checkpoint",
                    "split_assignment",
                    "image_index",
                    "params:evaluation",
                ],
                "test_predictions",
                name="predict_test",
            ),
            Node(
                choose_rule,
                [
                    "val_predictions",
                    "model_checkpoint",
                    "split_assignment",
                    "params:evaluation",
                ],
                "decision_rule",
                name="choose_decision_rule",
            ),
            Node(
                compute_metrics,
                [
                    "val_predictions",
                    "test_predictions",
                    "decision_rule",
                    "model_checkpoint",
                    "split_assignment",
                    "params:evaluation",
                ],
                ["evaluation_metrics", "evaluation_mlflow_metrics"],
                name="compute_metrics",
            ),
            Node(
                make_isic_submission,
                "test_predictions",
                "isic_submission_test",
                name="make_isic_submission",
            ),
        ]
    )
