"""model_input: image index -> uint8 image cache (05_model_input), reused by training runs."""

from kedro.pipeline import Node, Pipeline

from .nodes import build_image_cache_node


def create_pipeline(params: str = "params:model_input", **kwargs) -> Pipeline:
    """``params``: where the ``model_input`` parameters come from (see training)."""
    return Pipeline(
        [
            Node(
                build_image_cache_node,
                ["image_index", params],
                "image_cache",
                name="build_image_cache",
            )
        ]
    )
