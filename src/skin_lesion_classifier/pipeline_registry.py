"""Project pipelines."""

from kedro.framework.project import find_pipelines
from kedro.pipeline import Pipeline

#: Pipelines left out of ``__default__`` (they need inputs a plain run does not have).
NOT_IN_DEFAULT = ("inference", "ensemble", "cross_validation", "external_validation")


def register_pipelines() -> dict[str, Pipeline]:
    """Register the project's pipelines.

    ``kedro run`` (the ``__default__`` pipeline) chains ingestion -> splitting -> model_input ->
    training -> evaluation -> reporting. ``inference``, ``ensemble``, ``cross_validation`` and
    ``external_validation`` run on demand (``kedro run --pipelines ensemble``): they train
    several models or need inputs a plain run does not have.
    """
    pipelines = find_pipelines(raise_errors=True)
    pipelines["__default__"] = sum(
        (p for name, p in pipelines.items() if name not in NOT_IN_DEFAULT), Pipeline([])
    )
    return pipelines
