"""Evaluation pipeline: predictions, decision rules chosen on validation, metrics."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
