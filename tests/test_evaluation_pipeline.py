"""The evaluation and reporting pipelines end to end on a tiny model trained for two epochs
on ``small_split`` (real images), through the project's own catalog entries (paths moved
under a temporary folder) and a temporary MLflow store."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from sklearn import metrics as skm

from skin_lesion_classifier.constants import CLASSES, ISIC_COLUMNS, to_isic_order
from skin_lesion_classifier.data.images import load_resized
from skin_lesion_classifier.data.transforms import to_float_nchw
from skin_lesion_classifier.evaluation.evaluate import PROB_COLUMNS
from skin_lesion_classifier.evaluation.metrics import balanced_accuracy, macro_roc_auc
from skin_lesion_classifier.inference.predict import predict_proba
from skin_lesion_classifier.models.checkpoint import make_checkpoint
from skin_lesion_classifier.models.factory import create_model, resolve_preprocessing
from tests.conftest import catalog_section

SIZE = (48, 64)  # H, W: 4:3 like the pictures; not square, so TTA uses flips and 180°
FIGURES = (
    "training_curves",
    "per_class",
    "confusion_matrix",
    "roc_curves",
    "melanoma_roc",
    "reliability",
    "class_imbalance",
)

#: every test here reads the run of a model trained for the purpose (pipeline_run)
pytestmark = pytest.mark.slow


def _train_tiny_model(split: pd.DataFrame):
    """Two epochs of plain Adam on the 28 training images; returns the checkpoint dict and
    the real per-epoch history in the ``training_history`` format."""
    torch.manual_seed(0)
    model = create_model("test_efficientnet", pretrained=False, input_size=SIZE)
    pre = resolve_preprocessing(model)
    train, val = split[split.split == "train"], split[split.split == "val"]
    x = np.stack([load_resized(p, SIZE) for p in train.path])
    xv = np.stack([load_resized(p, SIZE) for p in val.path])
    y = torch.as_tensor(train.label.to_numpy().copy())
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    rows = []
    for epoch in (1, 2):
        model.train()
        loss = torch.nn.functional.cross_entropy(
            model(to_float_nchw(x, pre["mean"], pre["std"])), y
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        pv = predict_proba(model, xv, pre["mean"], pre["std"]).astype(np.float64)
        pv /= pv.sum(axis=1, keepdims=True)
        rows.append(
            {
                "epoch": epoch,
                "train_loss": loss.item(),
                "val_loss": float(skm.log_loss(val.label, pv, labels=range(7))),
                "val_balanced_accuracy": balanced_accuracy(val.label, pv.argmax(1)),
                "val_macro_auc": macro_roc_auc(val.label, pv),
                "lr": 3e-3,
            }
        )
    counts = train.dx.value_counts()
    meta = {
        "arch": "test_efficientnet",
        "classes": list(CLASSES),
        "input_size": list(SIZE),
        "mean": pre["mean"],
        "std": pre["std"],
        "train_class_counts": {c: int(counts.get(c, 0)) for c in CLASSES},
    }
    return make_checkpoint(model.eval(), meta), pd.DataFrame(rows)


def _catalog_conf(project_root: Path, out: Path) -> dict:
    """The evaluation and reporting catalog entries with ``data/`` moved under ``out``."""
    conf = catalog_section(project_root, "evaluation", "reporting")
    for entry in conf.values():
        inner = entry.get("dataset", entry)
        if isinstance(inner, dict) and "filepath" in inner:
            inner["filepath"] = str(out / inner["filepath"])
            inner.pop("versioned", None)  # versions: tests/test_versions.py
    return conf


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, small_split, project_root):
    import mlflow
    from kedro.io import DataCatalog
    from kedro.runner import SequentialRunner

    from skin_lesion_classifier.pipelines.evaluation import (
        create_pipeline as evaluation,
    )
    from skin_lesion_classifier.pipelines.reporting import (
        create_pipeline as reporting,
    )

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("evaluation_run")
    checkpoint, history = _train_tiny_model(small_split)
    params = yaml.safe_load(
        (project_root / "conf/base/parameters_evaluation.yml").read_text()
    )
    params["evaluation"].update(device="cpu", tta=True)
    params["evaluation"]["bootstrap"]["n_boot"] = 200
    params.update(
        yaml.safe_load(
            (project_root / "conf/base/parameters_reporting.yml").read_text()
        )
    )
    catalog = DataCatalog.from_config(_catalog_conf(project_root, out))
    inputs = {
        "model_checkpoint": checkpoint,
        "split_assignment": small_split.drop(columns=["path"]),
        "image_index": small_split,
        "training_history": history,
        "params:evaluation": params["evaluation"],
        "params:reporting": params["reporting"],
    }
    for name, value in inputs.items():
        catalog[name] = value

    mlflow.set_tracking_uri(f"sqlite:///{out / 'mlflow.db'}")
    mlflow.set_experiment("evaluation_test")
    try:
        with mlflow.start_run() as run:
            SequentialRunner().run(evaluation() + reporting(), catalog)
    finally:
        mlflow.set_tracking_uri(None)
    return {
        "out": out,
        "run_id": run.info.run_id,
        "db": out / "mlflow.db",
        "split": small_split,
    }


def test_predictions_follow_the_contract(pipeline_run):
    out, split = pipeline_run["out"], pipeline_run["split"]
    for name in ("val", "test"):
        pred = pd.read_parquet(out / f"data/07_model_output/{name}_predictions.parquet")
        expected = split[split.split == name]
        assert sorted(pred.image_id) == sorted(expected.image_id)
        assert list(pred.columns[:5]) == [
            "image_id",
            "lesion_id",
            "split",
            "dx",
            "label",
        ]
        assert set(PROB_COLUMNS) <= set(pred.columns) and set(pred.split) == {name}
        p = pred[list(PROB_COLUMNS)].to_numpy()
        assert np.allclose(p.sum(axis=1), 1.0, atol=1e-4)
        assert (pred.pred == p.argmax(axis=1)).all()


def test_isic_submission_is_the_test_probabilities_in_isic_order(pipeline_run):
    out = pipeline_run["out"]
    sub = pd.read_csv(out / "data/07_model_output/isic_submission_test.csv")
    assert list(sub.columns) == ["image", *ISIC_COLUMNS]
    pred = pd.read_parquet(out / "data/07_model_output/test_predictions.parquet")
    merged = pred.set_index("image_id").loc[sub.image]
    expected = to_isic_order(merged[list(PROB_COLUMNS)].to_numpy())
    assert np.allclose(sub[list(ISIC_COLUMNS)].to_numpy(), expected, atol=2e-6)


def test_decision_rule_is_chosen_on_validation(pipeline_run):
    out = pipeline_run["out"]
    rule = json.loads((out / "data/06_models/decision_rule.json").read_text())
    assert rule["chosen_on"] == "val"
    assert rule["rule"] in rule["candidates"]
    assert set(rule["class_weights"]) == set(CLASSES)
    # the threshold reaches the target sensitivity on validation
    val = pd.read_parquet(out / "data/07_model_output/val_predictions.parquet")
    mel = val[val.dx == "mel"]
    assert (mel.prob_mel >= rule["melanoma_threshold"] - 1e-6).mean() >= 0.9


def test_metrics_agree_with_the_saved_predictions(pipeline_run):
    out = pipeline_run["out"]
    m = json.loads((out / "data/08_reporting/evaluation_metrics.json").read_text())
    pred = pd.read_parquet(out / "data/07_model_output/test_predictions.parquet")
    t = m["splits"]["test"]
    assert t["argmax"]["n"] == len(pred) == 14
    assert t["argmax"]["balanced_accuracy"] == pytest.approx(
        skm.balanced_accuracy_score(pred.label, pred.pred)
    )
    ci = t["bootstrap"]["argmax"]["balanced_accuracy"]
    assert ci["low"] <= ci["estimate"] <= ci["high"] and ci["n_boot"] == 200
    assert {r["metric"] for r in m["headline"]} >= {"balanced accuracy", "macro AUC"}
    assert m["tta"] is True


def test_every_plot_and_the_report_are_written(pipeline_run):
    out = pipeline_run["out"] / "data/08_reporting"
    for key in FIGURES:
        png = out / "figures" / f"{key}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", key
    md = (out / "report.md").read_text()
    for section in (
        "## Headline (test split)",
        "## Data",
        "### Split sizes per class",
        "## Configuration",
        "## Decision rules (chosen on validation)",
        "## Metrics: val split",
        "## Metrics: test split",
        "## Clinical: melanoma vs rest (test split)",
        "## Figures",
        "## MLflow",
    ):
        assert section in md, section
    for key in FIGURES:
        assert f"(figures/{key}.png)" in md
    assert pipeline_run["run_id"] in md
    html = (out / "report.html").read_text()
    assert html.count('src="data:image/png;base64,') == len(FIGURES)
    assert "<table>" in html and "figures/" not in html


def test_mlflow_run_holds_the_figures_report_and_metrics(pipeline_run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{pipeline_run['db']}")
    rid = pipeline_run["run_id"]
    top = {a.path for a in client.list_artifacts(rid)}
    assert {
        "report.md",
        "report.html",
        "evaluation_metrics.json",
        "decision_rule.json",
    } <= top
    figs = {Path(a.path).name for a in client.list_artifacts(rid, "figures")}
    assert figs == {f"{k}.png" for k in FIGURES}
    metrics = client.get_run(rid).data.metrics
    assert "evaluation_mlflow_metrics.test_balanced_accuracy" in metrics or (
        "test_balanced_accuracy" in metrics
    )


def test_show_results_prints_the_headline_table(pipeline_run, capsys):
    from skin_lesion_classifier.show_results import main

    path = pipeline_run["out"] / "data/08_reporting/evaluation_metrics.json"
    m = json.loads(path.read_text())
    assert main([str(path)]) == 0
    printed = capsys.readouterr().out
    assert "balanced accuracy" in printed and "melanoma AUC" in printed
    ba = m["splits"]["test"]["argmax"]["balanced_accuracy"]
    assert f"{ba:.3f}" in printed
    assert main([str(pipeline_run["out"] / "missing.json")]) == 1


def test_prediction_from_the_image_cache_equals_prediction_from_paths(pipeline_run):
    from skin_lesion_classifier.data.cache import build_image_cache
    from skin_lesion_classifier.pipelines.evaluation.nodes import predict_test

    split = pipeline_run["split"]
    checkpoint, _ = _train_tiny_model(split)
    params = {"device": "cpu", "batch_size": 64, "tta": False}
    test_rows = split[split.split == "test"]
    cache = build_image_cache(test_rows, SIZE, num_workers=1, progress=False)
    from_cache = predict_test(checkpoint, split, cache, params)
    from_paths = predict_test(checkpoint, split, split, params)
    assert from_cache.image_id.tolist() == from_paths.image_id.tolist()
    assert np.allclose(from_cache[list(PROB_COLUMNS)], from_paths[list(PROB_COLUMNS)])
    wrong = build_image_cache(test_rows, (32, 32), num_workers=1, progress=False)
    with pytest.raises(ValueError, match="image cache is at"):
        predict_test(checkpoint, split, wrong, params)
