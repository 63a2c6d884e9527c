"""Where a model comes from: a local ``.pt``/``.onnx`` file, an MLflow run or the registry.

``runs:/<run_id>/model`` and ``models:/<name>/<version>`` (or ``models:/<name>@<alias>``)
are downloaded with ``mlflow.artifacts.download_artifacts`` and searched for
``checkpoint.pt`` (or an ``.onnx`` file). MLflow is imported only for such URIs, so
serving a local file needs no tracking store.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from skin_lesion_classifier.inference.predictor import Predictor, load_predictor
from skin_lesion_classifier.inference.versions import resolve_version

logger = logging.getLogger(__name__)

#: The model a local training run leaves behind.
DEFAULT_MODEL = "data/06_models/model.pt"
MLFLOW_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/")


def is_mlflow_uri(uri: str) -> bool:
    return str(uri).startswith(MLFLOW_SCHEMES)


def _find_model_file(root: Path, backend: str) -> Path:
    """``checkpoint.pt`` (or any ``.pt``) in a downloaded artifact tree; ``.onnx`` for the
    onnx backend."""
    if root.is_file():
        return root
    if backend == "onnx":
        patterns = ["**/*.onnx"]
    else:
        patterns = ["**/checkpoint.pt", "**/*.pt"]
    for pattern in patterns:
        found = sorted(root.glob(pattern))
        if found:
            return found[0]
    listing = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())[
        :20
    ]
    raise FileNotFoundError(
        f"no {'ONNX file' if backend == 'onnx' else 'checkpoint.pt'} in the MLflow artifacts "
        f"downloaded to {root}; files there: {listing}"
    )


def resolve_model_file(
    uri: str | os.PathLike,
    backend: str = "auto",
    tracking_uri: str | None = None,
    dst: str | None = None,
) -> tuple[Path, str]:
    """A local model file for ``uri`` and a version tag for it.

    Local paths are returned as they are (version tag added later from the file digest),
    except a Kedro-versioned folder (``data/06_models/model.pt/<version>/model.pt``), which
    resolves to its latest version's file; MLflow URIs are downloaded to ``dst`` (a
    temporary folder when ``None``).
    """
    uri = str(uri)
    if not is_mlflow_uri(uri):
        path = resolve_version(uri)
        if not path.is_file():
            raise FileNotFoundError(
                f"no model at {path} (train first: make quick-train)"
            )
        return path, ""
    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    dst = dst or tempfile.mkdtemp(prefix="slc-model-")
    try:
        local = Path(
            mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dst)
        )
    except Exception as exc:  # mlflow raises MlflowException and OSError subclasses
        raise FileNotFoundError(
            f"could not fetch {uri} from MLflow at {mlflow.get_tracking_uri()}: {exc} "
            "(train first: make quick-train, or check the run id / model name)"
        ) from exc
    version = (
        uri.removeprefix("models:/")
        if uri.startswith("models:/")
        else uri.removeprefix("runs:/").split("/")[0]
    )
    if uri.startswith("models:/"):
        version = _registry_version(uri) or version
    return _find_model_file(local, "onnx" if backend == "onnx" else "torch"), version


def _registry_version(uri: str) -> str | None:
    """``name/version`` for ``models:/name/version`` or ``models:/name@alias``."""
    from mlflow import MlflowClient

    ref = uri.removeprefix("models:/")
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            mv = MlflowClient().get_model_version_by_alias(name, alias)
            return f"{name}/{mv.version}"
        return ref
    except Exception:  # noqa: BLE001 - the version tag is informative only
        logger.warning("could not resolve the registry version of %s", uri)
        return None


def open_predictor(
    uri: str | os.PathLike = DEFAULT_MODEL,
    backend: str = "auto",
    device: torch.device | str = "cpu",
    explain_checkpoint: str | os.PathLike | None = None,
    tracking_uri: str | None = None,
    decision_file: str | os.PathLike | None = None,
    **kwargs: Any,
) -> Predictor:
    """Load a :class:`Predictor` from any supported model reference (see module doc).

    The decision rule: ``decision_file`` when given, else the checkpoint meta's, else
    ``decision_rule.json`` beside the model file.
    """
    path, version = resolve_model_file(uri, backend, tracking_uri)
    predictor = load_predictor(
        path,
        backend=backend,
        device=device,
        torch_checkpoint=explain_checkpoint,
        decision_file=decision_file,
        **kwargs,
    )
    if version:
        predictor.version = version
    predictor.source = str(uri)
    return predictor
