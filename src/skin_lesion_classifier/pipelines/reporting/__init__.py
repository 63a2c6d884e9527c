"""Reporting pipeline: figures and the per-run Markdown/HTML report."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
