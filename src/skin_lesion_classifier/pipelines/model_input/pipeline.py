"""model_input: image index -> uint8 image cache (05_model_input), reused by training runs."""

from kedro.pipeline import Node, Pipeline

from .nodes import build_image_cache_node


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                build_image_cache_node,
                ["image_index", "params:model_input"],
                "image_cache",
                name="build_image_cache",
            )
        ]
    )
