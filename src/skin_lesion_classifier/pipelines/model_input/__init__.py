"""model_input pipeline: the uint8 image cache at the training resolution."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
