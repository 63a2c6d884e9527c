"""Inference: a folder (or list) of pictures -> ISIC-format predictions + an errors table."""
