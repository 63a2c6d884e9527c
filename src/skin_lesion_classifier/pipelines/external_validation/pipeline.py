"""External validation: external folder + ISIC CSV -> predictions -> metrics, figures,
report (``kedro run --pipelines external_validation``)."""

from kedro.pipeline import Node, Pipeline

from .nodes import (
    FIGURES,
    build_external_report,
    evaluate_external,
    plot_external,
    predict_external,
    read_external,
)


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                read_external,
                "external_set",
                ["external_rows", "external_issues", "external_source"],
                name="read_external_set",
            ),
            Node(
                predict_external,
                ["external_rows", "external_checkpoint", "params:external_validation"],
                "external_predictions",
                name="predict_external",
            ),
            Node(
                evaluate_external,
                [
                    "external_predictions",
                    "external_issues",
                    "external_source",
                    "external_checkpoint",
                    "params:external_validation",
                ],
                ["external_metrics", "external_mlflow_metrics"],
                name="evaluate_external",
            ),
            Node(
                plot_external,
                [
                    "external_predictions",
                    "external_metrics",
                    "params:external_validation",
                ],
                [*(f"external_plot_{k}" for k in FIGURES), "external_plot_png"],
                name="plot_external",
            ),
            Node(
                build_external_report,
                [
                    "external_metrics",
                    "external_issues",
                    "external_plot_png",
                    "params:external_validation",
                ],
                ["external_report_md", "external_report_html"],
                name="build_external_report",
            ),
        ]
    )
