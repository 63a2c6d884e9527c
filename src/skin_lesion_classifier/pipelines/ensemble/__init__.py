"""Ensemble pipeline: namespaced members, metadata fusion, a validation-weighted ensemble."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
