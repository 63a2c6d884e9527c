"""cross_validation: K models over the lesion-grouped folds -> out-of-fold predictions,
per-fold metrics, mean +- sd (``kedro run --pipelines cross_validation``; needs the image
cache of the model_input pipeline)."""

from kedro.pipeline import Node, Pipeline

from .nodes import cross_validate, summarize_cross_validation


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                cross_validate,
                [
                    "image_cache",
                    "split_assignment",
                    "image_index",
                    "params:training",
                    "params:cross_validation",
                ],
                ["cv_oof_predictions", "cv_training_histories"],
                name="cross_validate",
            ),
            Node(
                summarize_cross_validation,
                ["cv_oof_predictions", "params:cross_validation"],
                ["cv_fold_metrics", "cv_summary", "cv_mlflow_metrics", "cv_report_md"],
                name="summarize_cross_validation",
            ),
        ]
    )
