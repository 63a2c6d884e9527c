"""training pipeline: image cache + split -> trained model, history, MLflow model."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
