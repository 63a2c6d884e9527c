"""Inference: pictures -> ISIC-format CSV + errors CSV. Not part of the default pipeline:

kedro run --pipelines inference --params "inference.input=path/to/folder,inference.model=data/06_models/model.pt"
"""

from kedro.pipeline import Node, Pipeline

from .nodes import list_inputs, predict_images


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                list_inputs,
                "params:inference",
                "inference_inputs",
                name="list_inference_inputs",
            ),
            Node(
                predict_images,
                ["inference_inputs", "params:inference"],
                ["inference_predictions", "inference_errors", "inference_metrics"],
                name="predict_images",
            ),
        ]
    )
