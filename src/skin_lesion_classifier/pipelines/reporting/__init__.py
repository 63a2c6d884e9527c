"""Reporting pipeline: figures and the per-run Markdown/HTML report."""
