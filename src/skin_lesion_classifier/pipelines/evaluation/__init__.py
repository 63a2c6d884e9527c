"""Evaluation pipeline: predictions, decision rules chosen on validation, metrics."""
