"""Nodes of the model_input pipeline."""

from __future__ import annotations

from typing import Any

import pandas as pd

from skin_lesion_classifier.data.cache import ImageCache, build_image_cache


def build_image_cache_node(
    image_index: pd.DataFrame, params: dict[str, Any]
) -> ImageCache:
    """Decode every indexed image once and resize it to ``params["input_size"]`` (H, W)."""
    return build_image_cache(
        image_index,
        params["input_size"],
        num_workers=int(params["num_workers"]),
        progress=bool(params["progress"]),
    )
