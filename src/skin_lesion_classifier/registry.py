"""The MLflow model registry: one registered model, a ``champion`` alias that only moves up.

Every training run registers its logged pyfunc as a new version of one registered model
(``training.registry.model_name``, default ``skin-lesion-classifier``) with the best
epoch's validation figures as version tags (``val_balanced_accuracy``, ...). The alias
``champion`` then points at the new version only when its validation figure
(``training.registry.champion_metric``) is strictly higher than the current champion's;
the first version with the figure becomes champion. Serve it with
``make serve MODEL=models:/skin-lesion-classifier@champion``.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

logger = logging.getLogger(__name__)


def _figure(tags: dict[str, str], metric: str) -> float | None:
    value = tags.get(metric)
    try:
        number = float(value) if value is not None else None
    except ValueError:
        return None
    return number if number is not None and math.isfinite(number) else None


def current_champion(client: MlflowClient, name: str, alias: str):
    """The model version behind ``name@alias``, or ``None`` when the alias is not set."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def promote_if_better(
    client: MlflowClient, name: str, version: str, metric: str, alias: str
) -> dict[str, Any]:
    """Move ``alias`` to ``version`` when its ``metric`` tag beats the current holder's.

    Returns ``{"promoted", "champion", "previous", "candidate_value", "champion_value"}``
    (``champion`` is the version the alias points at afterwards).
    """
    candidate = client.get_model_version(name, version)
    value = _figure(candidate.tags, metric)
    holder = current_champion(client, name, alias)
    held = _figure(holder.tags, metric) if holder is not None else None
    if value is None:
        logger.warning(
            "%s version %s has no %s tag: %s stays where it is",
            name,
            version,
            metric,
            alias,
        )
        promoted = False
    elif holder is None:
        promoted = True
    elif held is None:
        logger.warning(
            "%s@%s (version %s) has no %s tag to compare with: it stays",
            name,
            alias,
            holder.version,
            metric,
        )
        promoted = False
    else:
        promoted = value > held
    if promoted:
        client.set_registered_model_alias(name, alias, str(version))
    return {
        "promoted": promoted,
        "champion": str(version) if promoted else (holder and str(holder.version)),
        "previous": holder and str(holder.version),
        "candidate_value": value,
        "champion_value": value if promoted else held,
    }


def register_and_promote(
    model_uri: str,
    name: str,
    metrics: dict[str, float],
    metric: str,
    alias: str,
    extra_tags: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Register ``model_uri`` as a new version of ``name`` tagged with ``metrics`` (and
    ``extra_tags``), then apply :func:`promote_if_better`. Returns the version and the
    promotion decision."""
    import mlflow

    tags = {k: repr(float(v)) for k, v in metrics.items()}
    tags.update(extra_tags or {})
    version = mlflow.register_model(model_uri, name, tags=tags)
    client = MlflowClient()
    decision = promote_if_better(client, name, str(version.version), metric, alias)
    logger.info(
        "Registered %s version %s (%s=%s); %s@%s -> version %s",
        name,
        version.version,
        metric,
        tags.get(metric),
        name,
        alias,
        decision["champion"],
    )
    return {"name": name, "version": str(version.version), "alias": alias, **decision}
