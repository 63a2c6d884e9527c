"""External validation sets: an image folder + ISIC one-hot ground truth, built here from
the 21 real 600x450 HAM10000 samples."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from skin_lesion_classifier.constants import CLASS_TO_INDEX, ISIC_COLUMNS
from skin_lesion_classifier.evaluation.external import (
    issue_summary,
    read_external_set,
    read_ground_truth,
)
from tests.conftest import catalog_section, fusion_params


def isic_ground_truth(meta: pd.DataFrame) -> pd.DataFrame:
    """ISIC 2018 task 3 ground truth (one-hot floats, ISIC column order)."""
    gt = pd.DataFrame({"image": meta["image_id"].to_numpy()})
    for col in ISIC_COLUMNS:
        gt[col] = (meta["dx"].str.upper().to_numpy() == col).astype(float)
    return gt


@pytest.fixture()
def external_set(samples_dir: Path, tmp_path: Path):
    """The samples as an external set with one label row whose image is missing and one
    image with no label row."""
    meta = pd.read_csv(samples_dir / "HAM10000_metadata_samples.csv")
    images = tmp_path / "images"
    images.mkdir()
    missing_image = meta.image_id.iloc[0]
    for image_id in meta.image_id.iloc[1:]:
        shutil.copy(
            samples_dir / "images" / f"{image_id}.jpg", images / f"{image_id}.jpg"
        )
    unlabeled = "EXT_0000001"
    shutil.copy(
        samples_dir / "images" / f"{meta.image_id.iloc[1]}.jpg",
        images / f"{unlabeled}.jpg",
    )
    csv = tmp_path / "ground_truth.csv"
    isic_ground_truth(meta).to_csv(csv, index=False)
    return {
        "images": images,
        "csv": csv,
        "meta": meta,
        "missing_image": missing_image,
        "unlabeled": unlabeled,
    }


def test_missing_image_and_unlabeled_image_are_listed(external_set):
    rows, issues = read_external_set(external_set["images"], external_set["csv"])
    meta = external_set["meta"]
    assert len(rows) == len(meta) - 1
    assert set(rows.image_id) == set(meta.image_id) - {external_set["missing_image"]}
    expected = meta.set_index("image_id").loc[rows.image_id, "dx"]
    assert rows.dx.tolist() == expected.tolist()
    assert rows.label.tolist() == [CLASS_TO_INDEX[d] for d in expected]
    assert (rows.split == "external").all()
    assert all(Path(p).is_file() for p in rows.path)
    by_kind = issues.groupby("issue")["image_id"].apply(list).to_dict()
    assert by_kind == {
        "no_image": [external_set["missing_image"]],
        "no_label": [external_set["unlabeled"]],
    }
    assert issue_summary(issues, len(rows)) == {
        "used": 20,
        "no_image": 1,
        "no_label": 1,
    }


def test_bad_rows_unreadable_images_and_unknown_columns(external_set):
    csv = external_set["csv"]
    gt = pd.read_csv(csv)
    gt["UNK"] = 0.0
    ids = gt.image.tolist()
    gt.loc[1, ["MEL", "NV"]] = [1.0, 1.0]  # two labels
    gt.loc[2, ISIC_COLUMNS] = np.nan  # blank row
    dup = gt.iloc[[3]].copy()  # same label twice: used once
    conflict = gt.iloc[[4]].copy()
    conflict[list(ISIC_COLUMNS)] = np.roll(conflict[list(ISIC_COLUMNS)].to_numpy(), 1)
    gt = pd.concat([gt, dup, conflict], ignore_index=True)
    gt.to_csv(csv, index=False)
    broken = external_set["images"] / f"{ids[5]}.jpg"
    broken.write_bytes(broken.read_bytes()[:400])  # truncated JPEG
    rows, issues = read_external_set(external_set["images"], csv)
    kinds = issues.groupby("issue")["image_id"].apply(lambda s: sorted(s.dropna()))
    assert kinds["not_one_hot"] == sorted([ids[1], ids[2]])
    assert kinds["duplicate_label_row"] == sorted([ids[3], ids[4]])
    assert kinds["unreadable_image"] == [ids[5]]
    assert (
        issues.loc[issues.issue == "unknown_column", "detail"].str.contains("UNK").all()
    )
    used = set(rows.image_id)
    assert ids[3] in used  # identical duplicate kept once
    assert not used & {ids[1], ids[2], ids[4], ids[5]}
    # every labelled image is either used or listed, none vanishes
    listed = set(issues.image_id.dropna())
    assert set(ids) <= used | listed


def test_ground_truth_without_isic_columns_is_refused(tmp_path):
    csv = tmp_path / "gt.csv"
    pd.DataFrame({"image": ["a"], "MEL": [1.0], "NV": [0.0]}).to_csv(csv, index=False)
    with pytest.raises(ValueError, match="BCC"):
        read_ground_truth(csv)


def test_external_metadata_joins_and_reports_gaps(external_set, tmp_path):
    meta = external_set["meta"]
    md = meta.rename(columns={"image_id": "image"})[
        ["image", "lesion_id", "age", "sex", "localization"]
    ].iloc[2:]
    md_csv = tmp_path / "metadata.csv"
    md.to_csv(md_csv, index=False)
    rows, issues = read_external_set(
        external_set["images"], external_set["csv"], metadata_csv=md_csv
    )
    no_meta = issues.loc[issues.issue == "no_metadata", "image_id"].tolist()
    assert no_meta == [meta.image_id.iloc[1]]
    r = rows.set_index("image_id")
    assert r.loc[meta.image_id.iloc[1], "sex"] == "unknown"
    assert r.loc[meta.image_id.iloc[1], "lesion_id"] == meta.image_id.iloc[1]
    assert r.loc[meta.image_id.iloc[3], "lesion_id"] == meta.lesion_id.iloc[3]


def _catalog(project_root: Path, out: Path) -> dict:

    conf = catalog_section(project_root, "external_validation")
    for entry in conf.values():
        inner = entry.get("dataset", entry)
        if "filepath" in inner:
            inner["filepath"] = str(out / inner["filepath"])
    return conf


@pytest.mark.slow
def test_external_pipeline_reports_an_ensemble_with_the_gaps_listed(
    external_set, small_split, project_root, tmp_path
):
    """Two tiny trained models (one fusing metadata) as one ensemble checkpoint, evaluated
    on the external set by the Kedro pipeline through its own catalog entries."""
    import json

    import mlflow
    import torch
    import yaml
    from kedro.io import DataCatalog
    from kedro.runner import SequentialRunner
    from sklearn.metrics import balanced_accuracy_score

    from skin_lesion_classifier.models.ensemble_checkpoint import (
        build_ensemble_checkpoint,
        save_ensemble,
    )
    from skin_lesion_classifier.pipelines.external_validation import create_pipeline
    from skin_lesion_classifier.training.fusion import train_fusion_head
    from tests.test_fusion import _tiny_trained_model

    torch.set_num_threads(1)
    base, load = _tiny_trained_model(small_split)
    tr = small_split[small_split.split == "train"].reset_index(drop=True)
    va = small_split[small_split.split == "val"].reset_index(drop=True)
    fused = train_fusion_head(
        base.model,
        base.checkpoint["meta"],
        load(tr),
        tr,
        load(va),
        va,
        fusion_params(
            hidden=[8], epochs=2, batch_size=8, feature_views=1, min_site_count=1
        ),
    )
    ckpt = tmp_path / "ensemble.pt"
    save_ensemble(
        ckpt,
        build_ensemble_checkpoint(
            [("image", base.checkpoint), ("meta", fused.checkpoint)], [0.5, 0.5]
        ),
    )
    params = yaml.safe_load(
        (project_root / "conf/base/parameters_external_validation.yml").read_text()
    )["external_validation"]
    params.update(
        device="cpu",
        bootstrap={"n_boot": 100, "seed": 0, "level": 0.95},
    )
    out = tmp_path / "run"
    conf = _catalog(project_root, out)
    conf["external_checkpoint"]["filepath"] = str(ckpt)
    conf["external_set"].update(
        image_dir=str(external_set["images"]),
        labels_csv=str(external_set["csv"]),
        metadata_csv=None,
    )
    catalog = DataCatalog.from_config(conf)
    catalog["params:external_validation"] = params
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("external_test")
    try:
        with mlflow.start_run() as run:
            SequentialRunner().run(create_pipeline(), catalog)
        logged = mlflow.get_run(run.info.run_id).data.metrics
    finally:
        mlflow.set_tracking_uri(None)

    issues = pd.read_csv(out / "data/08_reporting/external_issues.csv")
    assert sorted(zip(issues.issue, issues.image_id)) == [
        ("no_image", external_set["missing_image"]),
        ("no_label", external_set["unlabeled"]),
    ]
    pred = pd.read_parquet(out / "data/07_model_output/external_predictions.parquet")
    assert len(pred) == 20 and set(pred.split) == {"external"}
    m = json.loads((out / "data/08_reporting/external_metrics.json").read_text())
    s = m["splits"]["external"]
    assert s["argmax"]["n"] == 20
    assert s["argmax"]["balanced_accuracy"] == pytest.approx(
        balanced_accuracy_score(pred.label, pred.pred)
    )
    assert m["issues"] == {"used": 20, "no_image": 1, "no_label": 1}
    assert m["model"]["uses_metadata"] and len(m["model"]["ensemble"]) == 2
    # keys carry the dataset name, as kedro-mlflow names them in a `kedro run`
    key = "external_mlflow_metrics.external_n_{}".format
    assert logged[key("no_image")] == 1 and logged[key("no_label")] == 1
    report = (out / "data/08_reporting/external_report.md").read_text()
    assert (
        external_set["missing_image"] in report and external_set["unlabeled"] in report
    )
    assert "age, sex and site unknown" in report
    assert (
        f"`{external_set['images']}`" in report and str(external_set["csv"]) in report
    )
    for key in (
        "per_class",
        "confusion_matrix",
        "roc_curves",
        "melanoma_roc",
        "reliability",
    ):
        assert (
            out / f"data/08_reporting/figures/external_{key}.png"
        ).stat().st_size > 1000
    assert (
        "data:image/png;base64"
        in (out / "data/08_reporting/external_report.html").read_text()
    )


def test_external_set_dataset_gives_rows_issues_and_where_they_came_from(
    external_set, tmp_path
):
    from kedro.io import DatasetError

    from skin_lesion_classifier.datasets.external_set import ExternalSetDataset

    ds = ExternalSetDataset(
        str(external_set["images"]), str(external_set["csv"]), check_decode=False
    )
    data = ds.load()
    assert len(data["rows"]) == 20 and set(data["rows"].split) == {"external"}
    assert sorted(data["issues"].issue) == ["no_image", "no_label"]
    assert data["source"] == {
        "image_dir": str(external_set["images"]),
        "labels_csv": str(external_set["csv"]),
        "metadata_csv": None,
    }
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError, match="nowhere"):
        ExternalSetDataset(str(missing), str(external_set["csv"])).load()
    with pytest.raises(DatasetError, match="image_dir is not set"):
        ExternalSetDataset("", str(external_set["csv"]))


def test_external_checkpoint_over_a_versioned_model_folder_loads_the_latest(tmp_path):
    """``external_checkpoint`` (unversioned) points at the training run's versioned
    ``model.pt`` folder and loads its latest version; a plain file loads as is."""
    from kedro.io import Version

    from skin_lesion_classifier.datasets.torch_checkpoint import TorchCheckpointDataset
    from skin_lesion_classifier.models.checkpoint import make_checkpoint
    from tests.conftest import tiny_model

    folder = tmp_path / "model.pt"
    for i, version in enumerate(
        ("2026-01-01T00.00.00.000Z", "2026-01-02T00.00.00.000Z")
    ):
        model, meta = tiny_model(seed=i)
        TorchCheckpointDataset(str(folder), version=Version(None, version)).save(
            make_checkpoint(model, {**meta, "metrics": {"run": i}})
        )
    loaded = TorchCheckpointDataset(str(folder)).load()
    assert loaded["meta"]["metrics"] == {"run": 1}
    plain = folder / "2026-01-01T00.00.00.000Z" / "model.pt"
    assert TorchCheckpointDataset(str(plain)).load()["meta"]["metrics"] == {"run": 0}
