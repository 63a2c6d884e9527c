"""Lesion-grouped K-fold cross-validation on the real HAM10000 metadata."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from skin_lesion_classifier.constants import CLASS_TO_INDEX, CLASSES
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
from skin_lesion_classifier.pipelines.splitting.nodes import assign_splits


@pytest.fixture(scope="module")
def assignment(metadata_df: pd.DataFrame) -> pd.DataFrame:
    """The project's split of all 10,015 images with 5 lesion-grouped folds (groups are
    lesions, with the known cross-lesion duplicate pair merged)."""
    index = metadata_df.copy()
    index["label"] = index["dx"].map(CLASS_TO_INDEX)
    index["group_id"] = index["lesion_id"]
    pair = index.image_id.isin(["ISIC_0025226", "ISIC_0030074"])
    index.loc[pair, "group_id"] = "GROUP_dup_0025226"
    params = {
        "train_size": 0.7,
        "val_size": 0.15,
        "test_size": 0.15,
        "seed": 42,
        "n_folds": 5,
    }
    return assign_splits(index, params).merge(
        index[["image_id", "lesion_id"]].rename(columns={"lesion_id": "orig_lesion"}),
        on="image_id",
    )


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
