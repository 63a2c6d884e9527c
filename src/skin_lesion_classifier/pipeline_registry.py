"""Project pipelines."""

from kedro.framework.project import find_pipelines
from kedro.pipeline import Pipeline

#: Pipelines left out of ``__default__`` (they need inputs a plain run does not have).
NOT_IN_DEFAULT = ("inference",)


def register_pipelines() -> dict[str, Pipeline]:
    """Register the project's pipelines.

    ``kedro run`` (the ``__default__`` pipeline) chains ingestion -> splitting -> training ->
    evaluation -> reporting; ``inference`` runs on demand (``kedro run --pipelines inference``).
    """
    pipelines = find_pipelines(raise_errors=True)
    pipelines["__default__"] = sum(
        (p for name, p in pipelines.items() if name not in NOT_IN_DEFAULT), Pipeline([])
    )
    return pipelines
