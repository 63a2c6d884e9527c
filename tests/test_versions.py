"""Versioned outputs: no run overwrites another's model, decision rule or report; the
predict / serve commands and show_results take the latest version or a named one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from kedro.io import DataCatalog, Version

from skin_lesion_classifier.constants import CLASSES
from skin_lesion_classifier.datasets.torch_checkpoint import TorchCheckpointDataset
from skin_lesion_classifier.hooks import ProjectHooks, move_into_version_folder
from skin_lesion_classifier.inference.versions import (
    WEIGHTS_KEY,
    paired_version,
    resolve_version,
    saved_versions,
    weights_digest,
)
from skin_lesion_classifier.models.checkpoint import make_checkpoint
from skin_lesion_classifier.models.factory import create_model

V1, V2, V3, V4 = (f"2026-01-0{d}T10.00.00.000Z" for d in (1, 2, 3, 4))


def _checkpoint(seed: int) -> dict:
    torch.manual_seed(seed)
    model = create_model("test_efficientnet", num_classes=7, input_size=[32, 32])
    meta = {
        "arch": "test_efficientnet",
        "classes": list(CLASSES),
        "input_size": [32, 32],
        "mean": [0.5] * 3,
        "std": [0.25] * 3,
        "seed": seed,
    }
    return make_checkpoint(model, meta)


def _write_rule(
    root: Path, version: str, threshold: float, weights: str | None = None
) -> None:
    path = root / "decision_rule.json" / version / "decision_rule.json"
    path.parent.mkdir(parents=True)
    rule = {"rule": "argmax", "class_weights": [1.0] * 7,
            "melanoma_threshold": threshold}  # fmt: skip
    if weights:
        rule[WEIGHTS_KEY] = weights
    path.write_text(json.dumps(rule))


def test_checkpoints_are_versioned_and_the_latest_is_found(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    for version, seed in ((V1, 1), (V2, 2)):
        TorchCheckpointDataset(str(path), version=Version(None, version)).save(
            _checkpoint(seed)
        )
    assert saved_versions(path) == [V1, V2]  # the first run's model is still there
    latest = TorchCheckpointDataset(str(path), version=Version(None, None)).load()
    assert latest["meta"]["seed"] == 2
    named = TorchCheckpointDataset(str(path), version=Version(V1, None)).load()
    assert named["meta"]["seed"] == 1
    assert resolve_version(path) == path / V2 / "model.pt"
    assert resolve_version(path, V1) == path / V1 / "model.pt"
    with pytest.raises(FileNotFoundError, match="saved versions"):
        resolve_version(path, V3)
    plain = tmp_path / "plain.pt"  # an unversioned file resolves to itself
    assert resolve_version(plain) == plain


def test_serving_takes_the_latest_model_with_the_rule_evaluated_for_it(
    tmp_path: Path,
) -> None:
    from skin_lesion_classifier.api.model_source import open_predictor

    models = tmp_path / "model.pt"
    digests = {}
    for version, seed in ((V1, 1), (V3, 3)):
        ckpt = _checkpoint(seed)
        digests[version] = weights_digest(ckpt["state_dict"])
        TorchCheckpointDataset(str(models), version=Version(None, version)).save(ckpt)
    # V1's own run; an older rule naming no weights (V2); V3's own run; then V1
    # re-evaluated after V3 was trained (V4): the latest model must not take V4's rule
    _write_rule(tmp_path, V1, 0.1, digests[V1])
    _write_rule(tmp_path, V2, 0.2)
    _write_rule(tmp_path, V3, 0.3, digests[V3])
    _write_rule(tmp_path, V4, 0.4, digests[V1])
    latest = open_predictor(models)
    assert latest.meta["seed"] == 3
    assert latest.decision.melanoma_threshold == pytest.approx(0.3)
    earlier = open_predictor(models / V1 / "model.pt")
    assert earlier.meta["seed"] == 1
    assert earlier.decision.melanoma_threshold == pytest.approx(0.4)
    # rules that name no weights: the latest saved before the next model
    assert paired_version(models / V1 / "model.pt", "decision_rule.json") == (
        tmp_path / "decision_rule.json" / V2 / "decision_rule.json"
    )


def test_an_unversioned_file_left_by_an_older_checkout_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(b"old weights")
    moved = move_into_version_folder(path)
    assert moved is not None and moved.read_bytes() == b"old weights"
    assert saved_versions(path) == [moved.parent.name]
    assert move_into_version_folder(path) is None  # a folder now: nothing to move


def test_the_logged_model_carries_this_runs_checkpoint_version(tmp_path: Path) -> None:
    from skin_lesion_classifier.datasets.pyfunc_model import PyfuncModelDataset

    path = str(tmp_path / "model.pt")
    checkpoint = TorchCheckpointDataset(path, version=Version(None, V2))
    model = PyfuncModelDataset(
        save_args={"name": "model", "artifacts": {"checkpoint": path}},
    )
    catalog = DataCatalog({"model_checkpoint": checkpoint, "mlflow_model": model})
    ProjectHooks().after_catalog_created(catalog)
    assert model._save_args["artifacts"]["checkpoint"] == str(
        tmp_path / "model.pt" / V2 / "model.pt"
    )


# ------------------------------------------------------------------ the ensemble's outputs
def _ensemble_catalog(project_root: Path, out: Path, version: str):
    """The ``ensemble`` section of the project's catalog under ``out``, as a run at save
    version ``version`` builds it (the project's hooks included)."""
    from tests.test_ensemble import _moved_catalog

    conf = _moved_catalog(project_root, out)
    catalog = DataCatalog.from_config(conf, save_version=version)
    hooks = ProjectHooks()
    hooks.after_catalog_created(catalog, conf_catalog=conf, save_version=version)
    return catalog, hooks


def test_every_ensemble_file_output_is_versioned(project_root: Path) -> None:
    from tests.conftest import catalog_section

    unversioned = [
        name
        for name, entry in catalog_section(project_root, "ensemble").items()
        if "filepath" in entry.get("dataset", entry)
        and not entry.get("dataset", entry).get("versioned")
    ]
    assert unversioned == []


def _ensemble_outputs(seed: int) -> dict:
    """One run's outputs: factory-pattern entries and explicit ones, MLflow-wrapped or not."""
    import pandas as pd

    from skin_lesion_classifier.models.ensemble_checkpoint import (
        build_ensemble_checkpoint,
    )

    ensemble = build_ensemble_checkpoint(
        [("a", _checkpoint(seed)), ("b", _checkpoint(seed + 10))], [0.5, 0.5]
    )
    rule = {"rule": "argmax", "class_weights": [1.0] * 7, "melanoma_threshold": seed / 10,
            WEIGHTS_KEY: weights_digest(ensemble["state_dict"])}  # fmt: skip
    return {
        "member_1.model_checkpoint": _checkpoint(seed),
        "member_1.decision_rule": {"rule": "argmax", "seed": seed},
        "member_1.val_predictions": pd.DataFrame({"seed": [seed]}),
        "ensemble.model_checkpoint": ensemble,
        "ensemble.decision_rule": rule,
        "ensemble.comparison": pd.DataFrame({"seed": [seed]}),
    }


def _nothing() -> None:
    return None


def test_a_second_ensemble_run_keeps_the_first_and_serving_takes_the_latest(
    tmp_path: Path, project_root: Path
) -> None:
    import warnings

    from kedro.pipeline import Node, Pipeline

    from skin_lesion_classifier.api.model_source import open_predictor

    ran = {}
    for version, seed in ((V1, 1), (V2, 2)):
        catalog, hooks = _ensemble_catalog(project_root, tmp_path, version)
        data = _ensemble_outputs(seed)
        with warnings.catch_warnings():  # dotted names: the pipeline's namespaces
            warnings.simplefilter("ignore", UserWarning)
            pipe = Pipeline([Node(_nothing, None, name, name=f"n{i}")
                             for i, name in enumerate(data)])  # fmt: skip
        hooks.before_pipeline_run(pipe, catalog)
        for name, value in data.items():
            dataset = catalog.get(name)
            if hasattr(dataset, "_logging_activated"):  # no MLflow run in this test
                dataset._logging_activated = False
            dataset.save(value)
        ran[version] = catalog
    for file in (
        "data/06_models/ensemble/members/member_1.pt",
        "data/06_models/ensemble/members/member_1_decision_rule.json",
        "data/07_model_output/ensemble/member_1/val_predictions.parquet",
        "data/06_models/ensemble/ensemble.pt",
        "data/06_models/ensemble/decision_rule.json",
        "data/08_reporting/ensemble/comparison.csv",
    ):  # the second run kept the first one's file, each run's at its own version
        assert saved_versions(tmp_path / file) == [V1, V2], file
    assert ran[V1].load("member_1.decision_rule")["seed"] == 1
    assert ran[V2].load("member_1.val_predictions")["seed"].tolist() == [2]
    # serve / predict: the latest ensemble with the rule evaluated for it, or a named one
    ensemble = tmp_path / "data/06_models/ensemble/ensemble.pt"
    latest = open_predictor(ensemble)
    assert latest.decision.melanoma_threshold == pytest.approx(0.2)
    earlier = open_predictor(ensemble / V1 / "ensemble.pt")
    assert earlier.decision.melanoma_threshold == pytest.approx(0.1)
