"""Project hooks: versioned outputs that no run overwrites, and an MLflow store that two
runs can share.

* Model and evaluation outputs are Kedro-versioned (``versioned: true`` in the catalog):
  each run saves ``<filepath>/<save version>/<name>``. A file left at such a path by an
  older, unversioned checkout is moved into a version folder named by its modification
  time instead of blocking the run (nothing is deleted); for an entry a factory pattern
  builds (the ensemble's members), when the run first asks for it.
* A versioned output the run also reads (evaluation reads the checkpoint training saved)
  is read at this run's own version, not the "latest", which another run started at the
  same time may have saved in between.
* The MLflow model's ``checkpoint`` artifact names the checkpoint's path in the catalog;
  for a versioned checkpoint it is pointed at this run's version, so that the model logged
  is the one this run trained, even when another run saves its own at the same time.
* The local ``sqlite:///`` MLflow store is created under a file lock and switched to
  write-ahead logging, so that two runs started together neither race to create its
  tables nor fail on a locked database.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kedro.framework.hooks import hook_impl
from kedro.io import AbstractDataset, AbstractVersionedDataset, Version

logger = logging.getLogger(__name__)

#: Seconds a connection waits for another run's write before "database is locked".
SQLITE_BUSY_TIMEOUT_S = 60


def _version_from_mtime(path: Path) -> str:
    stamp = datetime.fromtimestamp(path.stat().st_mtime, tz=UTC)
    return stamp.strftime("%Y-%m-%dT%H.%M.%S.%f")[:-3] + "Z"


def move_into_version_folder(path: Path) -> Path | None:
    """Move a plain file at a versioned dataset's path to ``path/<mtime version>/<name>``;
    returns the new location (``None`` when ``path`` is not a plain file)."""
    if not path.is_file():
        return None
    version = _version_from_mtime(path)
    staging = path.with_name(f".{path.name}.{os.getpid()}.unversioned")
    try:
        os.rename(path, staging)
    except FileNotFoundError:  # another run moved it first
        return None
    target = path / version / path.name
    target.parent.mkdir(parents=True, exist_ok=True)
    os.rename(staging, target)
    logger.warning(
        "moved the unversioned %s to %s (outputs are versioned)", path, target
    )
    return target


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` tracking URI, else ``None``."""
    prefix = "sqlite:///"
    return (
        Path(tracking_uri[len(prefix) :]) if tracking_uri.startswith(prefix) else None
    )


def prepare_sqlite_store(tracking_uri: str) -> None:
    """Create the MLflow tables once, under a lock, and switch the file to WAL mode."""
    db = sqlite_path(tracking_uri)
    if db is None:
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            with sqlite3.connect(db, timeout=SQLITE_BUSY_TIMEOUT_S) as conn:
                conn.execute("PRAGMA journal_mode=WAL")
            from mlflow.tracking import MlflowClient

            MlflowClient(tracking_uri).search_experiments(max_results=1)  # migrations
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _version_mlflow_artifacts(
    catalog: Any, conf: dict[str, Any], save_version: str | None, load_versions: dict
) -> None:
    """Build each ``MlflowArtifactDataset`` around a ``versioned: true`` dataset with the
    run's versions: kedro-mlflow builds the inner dataset without them, and Kedro then
    refuses its own, different save version. Factory patterns (``"{name}.decision_rule"``)
    use ``VersionedMlflowArtifactDataset``, which takes the run's versions itself."""
    for name, entry in conf.items():
        inner = entry.get("dataset") if isinstance(entry, dict) else None
        if "{" in name or not (
            str(entry.get("type", "")).endswith("MlflowArtifactDataset")
            and isinstance(inner, dict)
            and inner.get("versioned")
        ):
            continue
        version = Version(load_versions.get(name), save_version)
        dataset = AbstractDataset.from_config(name, entry, *version)
        dataset._version = version
        with _quiet_replacement():
            catalog[name] = dataset


class _NoReplacingWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Replacing dataset")


@contextlib.contextmanager
def _quiet_replacement() -> Iterator[None]:
    """The replacements above are the point: Kedro's "Replacing dataset" warning about
    them (one per versioned MLflow artifact, at every run) would only alarm."""
    logger = logging.getLogger("kedro.io.data_catalog")  # the DataCatalog's logger
    quiet = _NoReplacingWarning()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


class ProjectHooks:
    @hook_impl(tryfirst=True)
    def after_context_created(self, context: Any) -> None:
        try:
            conf = context.config_loader["mlflow"]
        except Exception:  # noqa: BLE001 - no mlflow.yml: kedro-mlflow's defaults apply
            return
        uri = os.environ.get("MLFLOW_TRACKING_URI") or (conf.get("server") or {}).get(
            "mlflow_tracking_uri"
        )
        if uri and sqlite_path(str(uri)) is not None:
            db = sqlite_path(str(uri))
            if not db.is_absolute():
                uri = f"sqlite:///{Path(context.project_path) / db}"
            prepare_sqlite_store(str(uri))

    @hook_impl(tryfirst=True)  # before kedro-mlflow's, which builds every dataset
    def after_catalog_created(
        self,
        catalog: Any,
        conf_catalog: dict[str, Any] | None = None,
        save_version: str | None = None,
        load_versions: dict[str, str] | None = None,
    ) -> None:
        _version_mlflow_artifacts(catalog, conf_catalog or {}, save_version,
                                  load_versions or {})  # fmt: skip
        versioned: dict[Path, AbstractVersionedDataset] = {}
        for name in list(catalog.keys()):
            dataset = catalog.get(name)
            if isinstance(dataset, AbstractVersionedDataset) and dataset._version:
                path = Path(str(dataset._filepath))
                move_into_version_folder(path)
                versioned[path.resolve()] = dataset
        for name in list(catalog.keys()):
            dataset = catalog.get(name)
            artifacts = (getattr(dataset, "_save_args", None) or {}).get("artifacts")
            if not isinstance(artifacts, dict):
                continue
            for key, value in artifacts.items():
                source = versioned.get(Path(str(value)).resolve())
                if source is not None:
                    artifacts[key] = str(source._get_save_path())

    @hook_impl
    def before_pipeline_run(self, pipeline: Any, catalog: Any) -> None:
        for name in pipeline.all_outputs():
            dataset = catalog.get(name) if name in catalog else None  # patterns too
            if isinstance(dataset, AbstractVersionedDataset) and dataset._version:
                save = dataset.resolve_save_version()
                dataset._version = Version(save, save)
                move_into_version_folder(Path(str(dataset._filepath)))
