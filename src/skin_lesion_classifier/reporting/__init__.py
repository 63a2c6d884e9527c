"""Reporting: turns metrics into documents (report sections, figures, formatting).

Sits above ``evaluation/`` (which computes the metrics) and imports nothing from Kedro or
MLflow.
"""
