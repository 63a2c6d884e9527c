"""Lesion-grouped K-fold cross-validation on the real HAM10000 metadata."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from skin_lesion_classifier.constants import CLASSES
from skin_lesion_classifier.evaluation.cross_validation import (
    FOLD_METRICS,
    check_folds,
    collect_oof,
    fold_metrics,
    fold_split,
    mlflow_fold_metrics,
    report_section,
    summarize_folds,
)
from skin_lesion_classifier.evaluation.evaluate import predictions_frame
from tests.conftest import catalog_section, project_params, train_params


@pytest.fixture(scope="module")
def assignment(full_split_assignment: pd.DataFrame) -> pd.DataFrame:
    """The project's split of all 10,015 images with 5 lesion-grouped folds (groups are
    lesions, with the known cross-lesion duplicate pair merged); see ``conftest``."""
    return full_split_assignment.copy()


def test_folds_never_share_a_lesion(assignment):
    folds = check_folds(assignment)
    assert folds == [0, 1, 2, 3, 4]
    dev = assignment[assignment.split != "test"]
    # checked directly on the original lesion ids, not only on the group ids
    per_lesion = dev.groupby("orig_lesion")["fold"].nunique()
    assert per_lesion.max() == 1
    pair = dev[dev.image_id.isin(["ISIC_0025226", "ISIC_0030074"])]
    assert pair.fold.nunique() <= 1
    # every class in every fold, sizes within 10% of each other
    counts = pd.crosstab(dev.dx, dev.fold)
    assert (counts > 0).all().all()
    sizes = dev.fold.value_counts()
    assert sizes.max() / sizes.min() < 1.1
    # a fold's split: its own images are val, the other folds train, test untouched
    f2 = fold_split(assignment, 2)
    assert (f2.loc[dev.index[dev.fold == 2], "split"] == "val").all()
    assert (f2.loc[dev.index[dev.fold != 2], "split"] == "train").all()
    assert (f2.split == "test").sum() == (assignment.split == "test").sum()
    train_lesions = set(f2.loc[f2.split == "train", "orig_lesion"])
    val_lesions = set(f2.loc[f2.split == "val", "orig_lesion"])
    assert not train_lesions & val_lesions


def test_check_folds_names_a_lesion_split_across_folds(assignment):
    broken = assignment.copy()
    dev = broken.index[broken.split != "test"]
    lesion = broken.loc[dev, "group_id"].value_counts().index[0]  # a multi-image lesion
    rows = broken.index[broken.group_id == lesion]
    broken.loc[rows[0], "fold"] = (broken.loc[rows[0], "fold"] + 1) % 5
    with pytest.raises(ValueError, match=lesion):
        check_folds(broken)
    no_fold = assignment.copy()
    no_fold.loc[dev[0], "fold"] = -1
    with pytest.raises(ValueError, match="no fold"):
        check_folds(no_fold)


def _fake_fold_predictions(assignment: pd.DataFrame, skill: dict[int, float]):
    """Held-out 'predictions' mixing the true one-hot label with noise; fold k's model
    has accuracy-ish ``skill[k]`` (a stand-in for K trained models)."""
    rng = np.random.default_rng(0)
    out = {}
    for k, s in skill.items():
        rows = assignment[(assignment.split != "test") & (assignment.fold == k)]
        onehot = np.eye(len(CLASSES))[rows.label.to_numpy()]
        noise = rng.dirichlet(np.ones(len(CLASSES)), size=len(rows))
        out[k] = predictions_frame(rows, s * onehot + (1 - s) * noise)
    return out


def test_oof_predictions_cover_every_image_once_and_folds_summarise(assignment):
    skill = {0: 0.2, 1: 0.3, 2: 0.4, 3: 0.5, 4: 0.6}
    preds = _fake_fold_predictions(assignment, skill)
    oof = collect_oof(preds, assignment)
    dev = assignment[assignment.split != "test"]
    assert sorted(oof.image_id) == sorted(dev.image_id)
    per_fold = fold_metrics(oof)
    assert per_fold.fold.tolist() == [0, 1, 2, 3, 4]
    assert per_fold.n.sum() == len(dev)
    # a more skilled fold model scores higher
    assert per_fold.balanced_accuracy.is_monotonic_increasing
    summary = summarize_folds(per_fold)
    ba = per_fold.balanced_accuracy.to_numpy()
    assert summary["balanced_accuracy"]["mean"] == pytest.approx(ba.mean())
    assert summary["balanced_accuracy"]["sd"] == pytest.approx(ba.std(ddof=1))
    logged = mlflow_fold_metrics(per_fold, summary)
    assert [h["step"] for h in logged["cv_balanced_accuracy"]] == [0, 1, 2, 3, 4]
    assert logged["cv_macro_auc_sd"]["value"] == pytest.approx(
        summary["macro_auc"]["sd"]
    )
    md = report_section(per_fold, summary)
    assert "mean ± sd" in md and all(m in md for m in FOLD_METRICS)
    # a prediction of an image by a model that trained on it is refused
    leaky = dict(preds)
    leaky[0] = pd.concat([preds[0], preds[1].head(1)])
    with pytest.raises(ValueError, match="not held out"):
        collect_oof(leaky, assignment)
    partial = {k: v for k, v in preds.items() if k != 3}
    with pytest.raises(ValueError, match="no out-of-fold prediction"):
        collect_oof(partial, assignment)


@pytest.fixture(scope="module")
def folded_small_split(small_split):
    """``small_split`` with 3 lesion-grouped folds over its train+val rows."""
    from skin_lesion_classifier.data.splitting import group_kfold

    out = small_split.copy()
    dev = out.split != "test"
    out.loc[dev, "fold"] = group_kfold(
        out.loc[dev, "dx"], out.loc[dev, "lesion_id"], 3, seed=0
    )
    return out


def test_fold_assignment_keeps_the_held_out_fold_out_of_training_and_selection(
    folded_small_split,
):
    from skin_lesion_classifier.pipelines.cross_validation.nodes import fold_assignment

    for k in (0, 1, 2):
        a = fold_assignment(folded_small_split, k, inner_validation=True)
        held = set(a.loc[a.split == "heldout", "lesion_id"])
        used = set(a.loc[a.split.isin(["train", "val"]), "lesion_id"])
        assert held and not held & used
        assert set(a.loc[a.split == "val", "fold"]) == {(k + 1) % 3}
        assert (a.split == "test").sum() == (folded_small_split.split == "test").sum()


@pytest.mark.slow
def test_cross_validation_pipeline_trains_each_fold_and_reports(
    folded_small_split, project_root, tmp_path
):
    """Three tiny models, one per fold, on the real images; OOF predictions, per-fold
    metrics, mean +- sd, MLflow, report section."""
    import json

    import mlflow
    import torch
    from kedro.io import DataCatalog
    from kedro.runner import SequentialRunner
    from kedro_mlflow.io.metrics import MlflowMetricsHistoryDataset

    from skin_lesion_classifier.data.cache import build_image_cache
    from skin_lesion_classifier.pipelines.cross_validation import create_pipeline

    torch.set_num_threads(1)
    conf = catalog_section(project_root, "cross_validation")
    for entry in conf.values():
        inner = entry.get("dataset", entry)
        if "filepath" in inner:
            inner["filepath"] = str(tmp_path / inner["filepath"])
    catalog = DataCatalog.from_config(conf)
    catalog["cv_mlflow_metrics"] = MlflowMetricsHistoryDataset(
        prefix="cv_mlflow_metrics"
    )
    params = project_params()["cross_validation"]
    params.update(checkpoint_dir=str(tmp_path / "cv"))
    params["predict"]["device"] = "cpu"
    training = project_params()["training"]
    training["train"] = train_params(
        arch="test_efficientnet",
        pretrained=False,
        allow_random_init=True,
        input_size=[48, 64],
        epochs=2,
        batch_size=16,
        eval_batch_size=32,
        ema=False,
        amp="off",
        channels_last=False,
        device="cpu",
        progress=False,
        data_path="dataloader",
        num_workers=0,
    )
    split = folded_small_split
    for name, value in {
        "image_cache": build_image_cache(
            split, (48, 64), num_workers=1, progress=False
        ),
        "split_assignment": split.drop(columns=["path"]),
        "image_index": split,
        "params:training": training,
        "params:cross_validation": params,
    }.items():
        catalog[name] = value
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("cv_test")
    try:
        with mlflow.start_run() as run:
            SequentialRunner().run(create_pipeline(), catalog)
        client = mlflow.tracking.MlflowClient()
        history = client.get_metric_history(
            run.info.run_id, "cv_mlflow_metrics.cv_balanced_accuracy"
        )
        logged = client.get_run(run.info.run_id).data.metrics
    finally:
        mlflow.set_tracking_uri(None)

    oof = pd.read_parquet(tmp_path / "data/07_model_output/cv_oof_predictions.parquet")
    dev = split[split.split != "test"]
    assert sorted(oof.image_id) == sorted(dev.image_id)  # every image once
    fold_of = dev.set_index("image_id").fold
    assert (oof.set_index("image_id").fold == fold_of.loc[oof.image_id]).all()
    per_fold = pd.read_csv(
        tmp_path / "data/08_reporting/cross_validation/fold_metrics.csv"
    )
    assert per_fold.fold.tolist() == [0, 1, 2] and per_fold.n.sum() == len(dev)
    summary = json.loads(
        (tmp_path / "data/08_reporting/cross_validation/summary.json").read_text()
    )
    ba = per_fold.balanced_accuracy.to_numpy()
    assert summary["summary"]["balanced_accuracy"]["mean"] == pytest.approx(ba.mean())
    assert summary["summary"]["balanced_accuracy"]["sd"] == pytest.approx(
        ba.std(ddof=1)
    )
    assert [m.step for m in history] == [0, 1, 2]
    assert logged["cv_mlflow_metrics.cv_balanced_accuracy_sd"] == pytest.approx(
        ba.std(ddof=1)
    )
    md = (tmp_path / "data/08_reporting/cross_validation/report.md").read_text()
    assert "mean ± sd" in md and "inner_validation = `True`" in md
    for k in (0, 1, 2):  # one model per fold, kept for resuming
        assert (tmp_path / f"cv/fold_{k}/best.pt").is_file()
