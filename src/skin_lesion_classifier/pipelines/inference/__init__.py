"""Inference: a folder (or list) of pictures -> ISIC-format predictions + an errors table."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
