"""Ingestion: raw metadata + image folders -> validated image index + data-quality report."""

from kedro.pipeline import Node, Pipeline

from .nodes import (
    build_image_index,
    check_image_files,
    summarize_data_quality,
    validate_metadata_node,
)


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                validate_metadata_node,
                ["raw_metadata", "params:ingestion"],
                ["metadata_validated", "metadata_issues"],
                name="validate_metadata",
            ),
            Node(
                check_image_files,
                ["raw_images", "params:ingestion"],
                "image_checks",
                name="check_image_files",
            ),
            Node(
                build_image_index,
                [
                    "metadata_validated",
                    "metadata_issues",
                    "image_checks",
                    "params:ingestion",
                ],
                ["image_index", "image_issues", "duplicate_pairs"],
                name="build_image_index",
            ),
            Node(
                summarize_data_quality,
                [
                    "raw_metadata",
                    "metadata_issues",
                    "image_issues",
                    "image_index",
                    "duplicate_pairs",
                ],
                ["data_quality_report", "data_quality_issues", "data_quality_metrics"],
                name="summarize_data_quality",
            ),
        ]
    )
