"""Evaluation: saved model -> val/test predictions -> decision rule (val only) -> metrics.

A model that fuses patient metadata is also scored with the metadata withheld (every field
unknown, as for most external pictures): ``val/test_predictions_withheld`` and the
``metadata_withheld`` block of the metrics. For an image model those are its predictions."""

from kedro.pipeline import Node, Pipeline

from .nodes import (
    choose_rule,
    compute_metrics,
    make_isic_submission,
    predict_test,
    predict_test_withheld,
    predict_validation,
    predict_validation_withheld,
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
                predict_validation_withheld,
                [
                    "model_checkpoint",
                    "split_assignment",
                    "image_index",
                    "val_predictions",
                    "params:evaluation",
                ],
                "val_predictions_withheld",
                name="predict_validation_withheld",
            ),
            Node(
                predict_test_withheld,
                [
                    "model_checkpoint",
                    "split_assignment",
                    "image_index",
                    "test_predictions",
                    "params:evaluation",
                ],
                "test_predictions_withheld",
                name="predict_test_withheld",
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
                    "val_predictions_withheld",
                    "test_predictions_withheld",
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
