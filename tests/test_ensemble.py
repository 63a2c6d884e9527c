"""Ensembles: validation-chosen weights, the one-file ensemble checkpoint, and its loading
by the shared model loader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from skin_lesion_classifier.constants import CLASSES
from skin_lesion_classifier.data.images import load_resized
from skin_lesion_classifier.data.metadata_features import MetadataEncoder
from skin_lesion_classifier.evaluation.ensemble import (
    ensemble_predictions,
    fit_weights,
    simplex_grid,
)
from skin_lesion_classifier.evaluation.evaluate import predictions_frame
from skin_lesion_classifier.evaluation.metrics import log_loss
from skin_lesion_classifier.inference.predict import predict_proba
from skin_lesion_classifier.inference.versions import resolve_version, saved_versions
from skin_lesion_classifier.models.checkpoint import load_model, make_checkpoint
from skin_lesion_classifier.models.ensemble import ENSEMBLE_ARCH
from skin_lesion_classifier.models.ensemble_checkpoint import (
    build_ensemble_checkpoint,
    load_ensemble,
    save_ensemble,
)
from skin_lesion_classifier.models.factory import create_model
from tests.conftest import catalog_section, project_params


def _noisy(y: np.ndarray, skill: float, rng) -> np.ndarray:
    onehot = np.eye(len(CLASSES))[y]
    return skill * onehot + (1 - skill) * rng.dirichlet(np.ones(len(CLASSES)), len(y))


def test_log_loss_weights_favour_the_better_member_and_beat_uniform(small_split):
    rng = np.random.default_rng(0)
    y = small_split.label.to_numpy()
    good, bad = _noisy(y, 0.6, rng), _noisy(y, 0.05, rng)
    fit = fit_weights(y, [good, bad], names=["good", "bad"])
    w = np.asarray(fit["weights"])
    assert w.sum() == pytest.approx(1.0)
    assert w[0] > 0.8
    assert fit["val"]["log_loss"] <= fit["val_uniform"]["log_loss"]
    assert fit["val"]["log_loss"] <= fit["val_members"]["good"]["log_loss"] + 1e-9
    # the optimum agrees with a fine grid search of the same (convex) objective
    grid = simplex_grid(2, 0.01)
    losses = [log_loss(y, g[0] * good + g[1] * bad) for g in grid]
    assert fit["val"]["log_loss"] == pytest.approx(min(losses), abs=1e-3)


def test_balanced_accuracy_grid_weights(small_split):
    rng = np.random.default_rng(1)
    y = small_split.label.to_numpy()
    members = [_noisy(y, s, rng) for s in (0.1, 0.12, 0.3)]
    fit = fit_weights(y, members, objective="balanced_accuracy", grid_step=0.1)
    assert len(fit["weights"]) == 3
    best_single = max(v["balanced_accuracy"] for v in fit["val_members"].values())
    assert fit["val"]["balanced_accuracy"] >= best_single
    assert len(simplex_grid(3, 0.1)) == 66
    with pytest.raises(ValueError, match="objective"):
        fit_weights(y, members, objective="accuracy")
    with pytest.raises(ValueError, match="differ in shape"):
        fit_weights(y, [members[0], members[1][:5]])


@pytest.fixture(scope="module")
def two_members(small_split):
    """Two different tiny models (one fusing metadata) as checkpoint dicts."""
    torch.manual_seed(0)
    train = small_split[small_split.split == "train"]
    enc = MetadataEncoder.fit(train, min_site_count=1)
    a = create_model("test_efficientnet", input_size=(48, 64))
    b = create_model(
        "resnet10t",
        input_size=(60, 80),
        metadata_dim=enc.dim,
        fusion_kwargs={"hidden": [8]},
    )
    for m in (a, b):  # move the BatchNorm statistics off their defaults
        m.train()
        with torch.no_grad():
            x = torch.randn(8, 3, 60, 80)
            m(x) if m is a else m(x, torch.randn(8, enc.dim))
    ca = make_checkpoint(
        a,
        {
            "arch": "test_efficientnet",
            "classes": list(CLASSES),
            "input_size": [48, 64],
            "mean": [0.5, 0.5, 0.5],
            "std": [0.5, 0.5, 0.5],
            "train_class_counts": [4] * 7,
        },
    )
    cb = make_checkpoint(
        b,
        {
            "arch": "resnet10t",
            "classes": list(CLASSES),
            "input_size": [60, 80],
            "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225],
            "model_kwargs": {"metadata_dim": enc.dim, "fusion_kwargs": {"hidden": [8]}},
            "uses_metadata": True,
            "metadata_encoder": enc.to_dict(),
            "train_class_counts": [4] * 7,
        },
    )
    return ca, cb, enc


def test_ensemble_checkpoint_equals_weighted_average_of_members(
    two_members, small_split, tmp_path
):
    ca, cb, enc = two_members
    ck = build_ensemble_checkpoint([("lite", ca), ("resnet", cb)], [0.25, 0.75])
    meta = ck["meta"]
    assert meta["arch"] == ENSEMBLE_ARCH and meta["uses_metadata"]
    assert meta["input_size"] == [60, 80]  # the largest member's
    assert meta["metadata_encoder"] == enc.to_dict()
    path = tmp_path / "ensemble.pt"
    save_ensemble(path, ck)
    model, meta2 = load_model(path)
    rows = small_split[small_split.split == "test"]
    x_meta = MetadataEncoder.from_dict(meta2["metadata_encoder"]).transform(rows)
    images = np.stack([load_resized(p, tuple(meta2["input_size"])) for p in rows.path])
    p_ens = predict_proba(
        model, images, meta2["mean"], meta2["std"], extra_inputs=x_meta
    )
    # each member alone, fed as it was trained (its own size, normalisation)
    ma, meta_a = load_model(ca)
    mb, meta_b = load_model(cb)
    img_a = np.stack([load_resized(p, (48, 64)) for p in rows.path])
    pa = predict_proba(ma, img_a, meta_a["mean"], meta_a["std"])
    pb = predict_proba(mb, images, meta_b["mean"], meta_b["std"], extra_inputs=x_meta)
    # member a sees a 60x80 -> 48x64 tensor resize instead of the PIL resize of its
    # originals, hence the tolerance
    np.testing.assert_allclose(p_ens, 0.25 * pa + 0.75 * pb, atol=2e-3)
    np.testing.assert_allclose(p_ens.sum(axis=1), 1.0, atol=1e-5)
    # the same through the frame-level average (what the pipeline evaluates)
    frame = ensemble_predictions(
        [predictions_frame(rows, pa), predictions_frame(rows, pb)], [0.25, 0.75]
    )
    np.testing.assert_allclose(frame.filter(like="prob_").to_numpy(), p_ens, atol=2e-3)
    with pytest.raises(ValueError, match="model\\(images, metadata\\)"):
        model(torch.zeros(1, 3, 60, 80))
    with pytest.raises(ValueError, match="not an ensemble"):
        load_ensemble(ca)


def test_ensemble_refuses_mismatched_members(two_members):
    ca, cb, enc = two_members
    other = dict(
        cb, meta=dict(cb["meta"], metadata_encoder={**enc.to_dict(), "age_mean": 1.0})
    )
    with pytest.raises(ValueError, match="different encoders"):
        build_ensemble_checkpoint([("b", cb), ("c", other)], [0.5, 0.5])
    with pytest.raises(ValueError, match="unique"):
        build_ensemble_checkpoint([("a", ca), ("a", cb)], [0.5, 0.5])
    with pytest.raises(ValueError, match="weights"):
        build_ensemble_checkpoint([("a", ca), ("b", cb)], [0.5, -0.5])
    # a zero-weight member is listed but left out of the model
    ck = build_ensemble_checkpoint([("a", ca), ("b", cb)], [1.0, 0.0])
    kept = [m["kept"] for m in ck["meta"]["ensemble"]["members"]]
    assert kept == [True, False]
    assert not ck["meta"]["uses_metadata"]
    assert all(k.startswith("members.0.") for k in ck["state_dict"])


# ------------------------------------------------------------------ the Kedro pipeline
def _moved_catalog(project_root, out):

    conf = catalog_section(project_root, "ensemble")
    for entry in conf.values():
        inner = entry.get("dataset", entry)
        for key in ("filepath", "path"):
            if key in inner:
                inner[key] = str(out / inner[key])
        arts = entry.get("save_args", {}).get("artifacts", {})
        for k, v in arts.items():
            arts[k] = str(out / v)
    return conf


def _param_inputs(pipe, params: dict) -> dict:
    """``params:a.b.c`` inputs of ``pipe`` resolved in the nested ``params``."""
    out = {}
    for name in pipe.inputs():
        if name.startswith("params:"):
            value = params
            for key in name.removeprefix("params:").split("."):
                value = value[key]
            out[name] = value
    return out


@pytest.fixture(scope="module")
def ensemble_run(tmp_path_factory, small_split, project_root):
    """The ensemble pipeline end to end: two tiny architectures trained for two epochs on
    the 56 real images of ``small_split``, their metadata fusions, the ensemble."""
    import mlflow
    from kedro.io import DataCatalog
    from kedro.io.core import generate_timestamp
    from kedro.runner import SequentialRunner

    from skin_lesion_classifier.hooks import ProjectHooks
    from skin_lesion_classifier.pipelines.ensemble import create_pipeline

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("ensemble_run")
    params = project_params()
    tiny = {
        "pretrained": False,
        "allow_random_init": True,
        "epochs": 2,
        "batch_size": 16,
        "eval_batch_size": 32,
        "lr": 3e-3,
        "ema": False,
        "amp": "off",
        "channels_last": False,
        "device": "cpu",
        "progress": False,
        "data_path": "dataloader",
        "num_workers": 0,
    }
    params["model_input"].update(num_workers=1, progress=False)
    for m, arch in (("member_1", "test_efficientnet"), ("member_2", "resnet10t")):
        params["ensemble"]["members"][m] = {
            "input_size": [48, 64],
            "checkpoint_dir": str(out / m),
            "train": {**tiny, "arch": arch},
        }
    params["ensemble"]["fusion"].update(
        hidden=[8],
        epochs=3,
        batch_size=8,
        feature_views=1,
        min_site_count=1,
        patience=3,
    )
    params["ensemble"]["predict"]["device"] = "cpu"
    params["ensemble"]["compare"]["n_boot"] = 100
    params["evaluation"].update(device="cpu")
    params["evaluation"]["bootstrap"]["n_boot"] = 100
    pipe = create_pipeline()
    conf = _moved_catalog(project_root, out)
    version = generate_timestamp()  # versioned outputs, as in a kedro run
    catalog = DataCatalog.from_config(conf, save_version=version)
    hooks = ProjectHooks()
    hooks.after_catalog_created(catalog, conf_catalog=conf, save_version=version)
    from kedro_mlflow.io.metrics import MlflowMetricsHistoryDataset

    for name in list(catalog.keys()):  # what kedro-mlflow's hook does in a kedro run
        if isinstance(catalog.get(name), MlflowMetricsHistoryDataset):
            catalog[name] = MlflowMetricsHistoryDataset(prefix=name)
    inputs = {
        "split_assignment": small_split.drop(columns=["path"]),
        "image_index": small_split,
        **_param_inputs(pipe, params),
    }
    for name, value in inputs.items():
        catalog[name] = value
    hooks.before_pipeline_run(pipe, catalog)
    mlflow.set_tracking_uri(f"sqlite:///{out / 'mlflow.db'}")
    mlflow.set_experiment("ensemble_test")
    try:
        with mlflow.start_run() as run:
            SequentialRunner().run(pipe, catalog)
        logged = mlflow.get_run(run.info.run_id).data.metrics
    finally:
        mlflow.set_tracking_uri(None)
    return {"out": out, "split": small_split, "metrics": logged, "params": params,
            "version": version}  # fmt: skip


def _latest(out: Path, file: str) -> Path:
    """The run's file of a versioned output (``<file>/<version>/<name>``, one version)."""
    assert len(saved_versions(out / file)) == 1, file
    return resolve_version(out / file)


def _run_version(out: Path, file: str) -> str:
    (version,) = saved_versions(out / file)
    return version


@pytest.mark.slow
def test_ensemble_pipeline_end_to_end(ensemble_run):
    import json

    import pandas as pd

    out, split = ensemble_run["out"], ensemble_run["split"]
    weights = json.loads(
        (_latest(out, "data/06_models/ensemble/weights.json")).read_text()
    )
    combine = weights["combine"]
    assert combine["names"] == [
        "member_1",
        "member_2",
        "member_1_meta",
        "member_2_meta",
    ]
    assert sum(combine["weights"]) == pytest.approx(1.0)
    # every output is saved at the run's one version (members' and the ensemble's)
    for file in ("data/06_models/ensemble/members/member_2_meta.pt",
                 "data/06_models/ensemble/members/member_1_decision_rule.json",
                 "data/06_models/ensemble/ensemble.pt",
                 "data/08_reporting/ensemble/comparison.md"):  # fmt: skip
        assert _run_version(out, file) == ensemble_run["version"], file
    # weights were chosen on validation: the chosen mixture's val log loss is no worse
    # than uniform averaging
    assert combine["val"]["log_loss"] <= combine["val_uniform"]["log_loss"] + 1e-9
    # the saved ensemble is one checkpoint the shared loader rebuilds, and it reproduces
    # the ensemble's test predictions from the images and the patients' metadata
    model, meta = load_model(_latest(out, "data/06_models/ensemble/ensemble.pt"))
    assert meta["arch"] == ENSEMBLE_ARCH and meta["uses_metadata"]
    test_rows = split[split.split == "test"].reset_index(drop=True)
    pred = pd.read_parquet(
        _latest(out, "data/07_model_output/ensemble/ensemble/test_predictions.parquet")
    )
    assert pred.image_id.tolist() == test_rows.image_id.tolist()
    imgs = np.stack(
        [load_resized(p, tuple(meta["input_size"])) for p in test_rows.path]
    )
    x_meta = MetadataEncoder.from_dict(meta["metadata_encoder"]).transform(test_rows)
    p = predict_proba(model, imgs, meta["mean"], meta["std"], extra_inputs=x_meta)
    np.testing.assert_allclose(p, pred.filter(like="prob_").to_numpy(), atol=1e-4)
    image_model, image_meta = load_model(
        _latest(out, "data/06_models/ensemble/ensemble_image.pt")
    )
    assert not image_meta["uses_metadata"]
    assert [m["name"] for m in image_meta["ensemble"]["members"]] == [
        "member_1",
        "member_2",
    ]
    # evaluated and reported like a single model
    metrics = json.loads(
        (
            _latest(out, "data/08_reporting/ensemble/ensemble/evaluation_metrics.json")
        ).read_text()
    )
    assert metrics["splits"]["test"]["argmax"]["n"] == len(test_rows)
    assert metrics["model"]["arch"] == ENSEMBLE_ARCH
    report = (_latest(out, "data/08_reporting/ensemble/report.md")).read_text()
    assert "ensemble report" in report
    assert (
        _latest(out, "data/08_reporting/ensemble/figures/confusion_matrix.png")
    ).stat().st_size > 1000
    rule = json.loads(
        (_latest(out, "data/06_models/ensemble/decision_rule.json")).read_text()
    )
    assert rule["chosen_on"] == "val"
    # the comparison against the best single model (chosen on validation)
    table = pd.read_csv(_latest(out, "data/08_reporting/ensemble/comparison.csv"))
    best = table.best_single.iloc[0]
    assert best in ("member_1", "member_2")
    val_ba = table[table.metric == "balanced_accuracy"].set_index("model")[
        "val_balanced_accuracy"
    ]
    assert val_ba[best] == max(val_ba["member_1"], val_ba["member_2"])
    assert set(table.model) == {
        "member_1",
        "member_2",
        "member_1_meta",
        "member_2_meta",
        "member_1_meta_control",
        "member_2_meta_control",
        "ensemble_image",
        "ensemble",
    }
    ref = table[(table.model == best)]
    assert (ref["diff"] == 0).all()
    # MLflow: members' training curves, every model's evaluation, the comparison
    logged = ensemble_run["metrics"]
    assert any(k.startswith("member_2.training_metrics.") for k in logged)
    assert any(k.startswith("member_1_meta.evaluation_mlflow_metrics.") for k in logged)
    assert any(k.startswith("ensemble.evaluation_mlflow_metrics.") for k in logged)
    assert (
        "ensemble.comparison_metrics.compare_ensemble_test_balanced_accuracy" in logged
    )
    fusion_hist = pd.read_csv(
        _latest(out, "data/08_reporting/ensemble/member_1_meta/fusion_history.csv")
    )
    assert {"val_balanced_accuracy", "control_val_balanced_accuracy"} <= set(
        fusion_hist.columns
    )
