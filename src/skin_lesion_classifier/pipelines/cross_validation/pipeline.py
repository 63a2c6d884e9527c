"""cross_validation: K models over the lesion-grouped folds -> out-of-fold predictions,
per-fold metrics, mean +- sd (``kedro run --pipelines cross_validation``; needs the image
cache of the model_input pipeline).

The nodes live under the namespace ``cross_validation`` (kedro-viz collapses them into
one box); their inputs, outputs and parameters keep their catalog names. The K fold
models are trained inside ``cross_validate`` (K is ``splitting.n_folds``, a parameter, so
the graph cannot hold one node per fold)."""

from kedro.pipeline import Node, Pipeline, pipeline

from .nodes import cross_validate, summarize_cross_validation

OUTPUTS = (
    "cv_oof_predictions",
    "cv_training_histories",
    "cv_fold_metrics",
    "cv_summary",
    "cv_mlflow_metrics",
    "cv_report_md",
)


def create_pipeline(**kwargs) -> Pipeline:
    nodes = Pipeline(
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
    return pipeline(
        nodes,
        namespace="cross_validation",
        inputs={"image_cache", "split_assignment", "image_index"},
        outputs={name: name for name in OUTPUTS},
        parameters={"params:training", "params:cross_validation"},
    )
