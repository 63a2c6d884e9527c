"""Splitting: image index -> lesion-aware stratified split assignment (+ folds)."""

from kedro.pipeline import Node, Pipeline

from .nodes import assign_splits, summarize_splits


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                assign_splits,
                ["image_index", "params:splitting"],
                "split_assignment",
                name="assign_splits",
            ),
            Node(
                summarize_splits,
                "split_assignment",
                ["split_summary", "split_metrics"],
                name="summarize_splits",
            ),
        ]
    )
