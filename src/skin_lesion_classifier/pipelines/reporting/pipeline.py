"""Reporting: evaluation metrics + predictions -> figures (PNG, MLflow) -> report (MD, HTML)."""

from kedro.pipeline import Node, Pipeline

from .nodes import (
    build_report,
    plot_class_imbalance,
    plot_confusion_matrix,
    plot_melanoma_roc,
    plot_per_class,
    plot_reliability,
    plot_roc_curves,
    plot_training_curves,
)

#: figure key -> (node function, its data inputs)
PLOTS = {
    "training_curves": (plot_training_curves, ["training_history"]),
    "per_class": (plot_per_class, ["evaluation_metrics"]),
    "confusion_matrix": (plot_confusion_matrix, ["evaluation_metrics"]),
    "roc_curves": (plot_roc_curves, ["test_predictions"]),
    "melanoma_roc": (plot_melanoma_roc, ["test_predictions", "evaluation_metrics"]),
    "reliability": (plot_reliability, ["evaluation_metrics"]),
    "class_imbalance": (plot_class_imbalance, ["evaluation_metrics"]),
}


def create_pipeline(**kwargs) -> Pipeline:
    nodes = [
        Node(
            func,
            [*inputs, "params:reporting"],
            [f"plot_{key}", f"plot_{key}_png"],
            name=f"plot_{key}",
        )
        for key, (func, inputs) in PLOTS.items()
    ]
    nodes.append(
        Node(
            build_report,
            {
                "metrics": "evaluation_metrics",
                "split_assignment": "split_assignment",
                "evaluation_params": "params:evaluation",
                "params": "params:reporting",
                **{key: f"plot_{key}_png" for key in PLOTS},
            },
            ["evaluation_report_md", "evaluation_report_html"],
            name="build_report",
        )
    )
    return Pipeline(nodes)
