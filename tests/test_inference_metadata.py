"""Patient metadata and ensembles everywhere a model is used: evaluation's predict_split,
the predictor, the predict command and the inference pipeline, the HTTP service, Grad-CAM
and ONNX export, on tiny real checkpoints and real HAM10000 pictures and metadata."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import torch

from skin_lesion_classifier.api.server import LocalServer
from skin_lesion_classifier.constants import CLASSES
from skin_lesion_classifier.data.images import load_resized, load_rgb
from skin_lesion_classifier.data.metadata_features import MetadataEncoder
from skin_lesion_classifier.data.transforms import to_float_nchw
from skin_lesion_classifier.evaluation.evaluate import PROB_COLUMNS
from skin_lesion_classifier.inference.batch import ISIC_CSV_COLUMNS
from skin_lesion_classifier.inference.predictor import load_predictor
from skin_lesion_classifier.models.checkpoint import (
    load_model,
    make_checkpoint,
    save_checkpoint,
)
from skin_lesion_classifier.models.ensemble_checkpoint import (
    build_ensemble_checkpoint,
    save_ensemble,
)
from skin_lesion_classifier.models.factory import create_model

FUSION_SIZE = (60, 80)  # H, W: the ensemble's input (its largest member's)
IMAGE_SIZE = (48, 64)
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
WEIGHTS = (0.4, 0.6)  # image-only member, fusion member


def _settle_batchnorm(model: torch.nn.Module, size, metadata_dim: int | None) -> None:
    """Move the BatchNorm statistics off their defaults with a few training-mode passes."""
    model.train()
    with torch.no_grad():
        x = torch.randn(8, 3, *size)
        model(x) if metadata_dim is None else model(x, torch.randn(8, metadata_dim))
    model.eval()


@pytest.fixture(scope="module")
def encoder(small_split) -> MetadataEncoder:
    return MetadataEncoder.fit(
        small_split[small_split.split == "train"], min_site_count=1
    )


@pytest.fixture(scope="module")
def models(tmp_path_factory, encoder) -> dict[str, Path]:
    """A tiny image-only checkpoint, a tiny fusion checkpoint whose metadata branch clearly
    moves the output, and their weighted ensemble, saved as files."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("metadata-models")
    image = create_model("test_efficientnet", pretrained=False, input_size=IMAGE_SIZE)
    _settle_batchnorm(image, IMAGE_SIZE, None)
    image_meta = {
        "arch": "test_efficientnet",
        "classes": list(CLASSES),
        "input_size": list(IMAGE_SIZE),
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
    }
    fusion = create_model(
        "resnet10t",
        pretrained=False,
        allow_random_init=True,
        input_size=FUSION_SIZE,
        metadata_dim=encoder.dim,
        fusion_kwargs={"hidden": [8]},
    )
    _settle_batchnorm(fusion, FUSION_SIZE, encoder.dim)
    with torch.no_grad():  # let the patient's data matter as much as the picture
        fusion.metadata_head.weight.mul_(4.0)
    fusion_meta = {
        "arch": "resnet10t",
        "classes": list(CLASSES),
        "input_size": list(FUSION_SIZE),
        "mean": MEAN,
        "std": STD,
        "model_kwargs": {
            "metadata_dim": encoder.dim,
            "fusion_kwargs": {"hidden": [8]},
        },
        "uses_metadata": True,
        "metadata_encoder": encoder.to_dict(),
    }
    paths = {
        "image": save_checkpoint(folder / "image.pt", image, image_meta),
        "fusion": save_checkpoint(folder / "fusion.pt", fusion, fusion_meta),
    }
    ens = build_ensemble_checkpoint(
        [("lite", make_checkpoint(image, image_meta)), ("resnet_meta", make_checkpoint(fusion, fusion_meta))],
        list(WEIGHTS),
        fit={"objective": "log_loss"},
    )  # fmt: skip
    paths["ensemble"] = folder / "ensemble.pt"
    save_ensemble(paths["ensemble"], ens)
    return paths


def _by_hand(model, images: np.ndarray, meta: dict, x_meta: np.ndarray) -> np.ndarray:
    """Softmax of ``model(images, metadata)`` called directly."""
    with torch.no_grad():
        logits = model(
            to_float_nchw(images, meta["mean"], meta["std"]), torch.as_tensor(x_meta)
        )
    return torch.softmax(logits, 1).numpy()


# ---------------------------------------------------------------------- evaluation
def test_evaluation_predict_split_feeds_each_rows_metadata(
    models, small_split, encoder
) -> None:
    from skin_lesion_classifier.pipelines.evaluation.nodes import predict_split

    split_assignment = small_split.drop(
        columns=["path", "age", "sex", "localization", "dx_type"]
    )
    params = {"device": "cpu", "batch_size": 64, "tta": False}
    frame = predict_split(
        models["fusion"], split_assignment, small_split, params, "test"
    )
    rows = small_split[small_split.split == "test"].reset_index(drop=True)
    assert frame.image_id.tolist() == rows.image_id.tolist()
    model, meta = load_model(models["fusion"])
    images = np.stack([load_resized(p, FUSION_SIZE) for p in rows.path])
    x_meta = encoder.transform(rows)
    expected = _by_hand(model, images, meta, x_meta)
    np.testing.assert_allclose(frame[list(PROB_COLUMNS)], expected, atol=1e-6)
    # the metadata really reaches the model: another patient's data, other probabilities
    other = _by_hand(model, images, meta, x_meta[::-1].copy())
    assert np.abs(other - expected).max() > 1e-2
    # the one-file ensemble (one fusion member) is evaluated like any model
    ens = predict_split(
        models["ensemble"], split_assignment, small_split, params, "val"
    )
    assert len(ens) == (small_split.split == "val").sum()
    np.testing.assert_allclose(ens[list(PROB_COLUMNS)].sum(axis=1), 1.0, atol=1e-5)


def test_evaluation_from_the_image_cache_needs_metadata_from_somewhere(
    models, small_split
) -> None:
    from skin_lesion_classifier.data.cache import build_image_cache
    from skin_lesion_classifier.pipelines.evaluation.nodes import predict_split

    split_assignment = small_split.drop(columns=["path", "age", "sex", "localization"])
    test_rows = small_split[small_split.split == "test"]
    cache = build_image_cache(test_rows, FUSION_SIZE, num_workers=1, progress=False)
    params = {"device": "cpu", "batch_size": 64, "tta": False}
    with pytest.raises(ValueError, match="image_index"):
        predict_split(models["fusion"], split_assignment, cache, params, "test")
    from_cache = predict_split(
        models["fusion"],
        split_assignment,
        cache,
        params,
        "test",
        image_index=small_split,
    )
    from_paths = predict_split(
        models["fusion"], split_assignment, small_split, params, "test"
    )
    np.testing.assert_allclose(
        from_cache[list(PROB_COLUMNS)], from_paths[list(PROB_COLUMNS)], atol=1e-6
    )


def test_rows_with_unknown_sex_and_blank_age(
    models, metadata_df, ham10000_dir, encoder
) -> None:
    from skin_lesion_classifier.pipelines.evaluation.nodes import predict_split

    unknown_sex = metadata_df[metadata_df.sex == "unknown"].head(2)
    blank_age = metadata_df[metadata_df.age.isna()].head(2)
    rows = pd.concat([unknown_sex, blank_age], ignore_index=True)
    assert rows.age.isna().any() and (rows.sex == "unknown").any()
    rows["label"] = rows.dx.map(CLASSES.index)
    rows["split"] = "test"
    rows["path"] = [str(ham10000_dir / "images" / f"{i}.jpg") for i in rows.image_id]
    frame = predict_split(
        models["fusion"],
        rows.drop(columns=["age", "sex", "localization"]),
        rows,
        {"device": "cpu", "batch_size": 64, "tta": False},
        "test",
    )
    p = frame[list(PROB_COLUMNS)].to_numpy()
    assert np.isfinite(p).all()
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-5)
    # the predictor given the same fields (blank age as None) answers the same
    pred = load_predictor(models["fusion"])
    for i, r in rows.iterrows():
        fields = {
            "age": None if pd.isna(r.age) else float(r.age),
            "sex": r.sex,
            "localization": r.localization,
        }
        np.testing.assert_allclose(
            pred.predict_one(r.path, metadata=fields), p[i], atol=1e-5
        )
    info = pred.describe_metadata({"age": None, "sex": "unknown"})
    assert info["unknown"] == ["age", "sex", "localization"]
    assert info["localization_bucket"] == "unknown"


# ---------------------------------------------------------------------- predict command
@pytest.fixture(scope="module")
def picture_folder(tmp_path_factory, samples_dir) -> Path:
    """Six real 600x450 samples and one truncated JPEG."""
    folder = tmp_path_factory.mktemp("pictures")
    originals = sorted((samples_dir / "images").glob("*.jpg"))[:6]
    for p in originals:
        shutil.copy(p, folder / p.name)
    data = originals[0].read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 3])
    return folder


def _predict_cli(args: list[str], out: Path) -> pd.DataFrame:
    from skin_lesion_classifier.cli import main

    assert main(["predict", *args, "--output", str(out)]) == 0
    return pd.read_csv(out, keep_default_na=False).set_index("image")


def test_predict_command_with_and_without_a_metadata_csv(
    models, picture_folder, samples_dir, tmp_path, capsys
) -> None:
    samples_csv = samples_dir / "HAM10000_metadata_samples.csv"
    folder, model = str(picture_folder), ["--model", str(models["fusion"])]
    plain = _predict_cli([folder, *model], tmp_path / "plain.csv")
    printed = capsys.readouterr().out
    assert list(plain.reset_index().columns) == [
        *ISIC_CSV_COLUMNS,
        "metadata",
        "metadata_unknown",
    ]
    assert len(plain) == 6 and (plain["metadata"] == "missing").all()
    assert (plain["metadata_unknown"] == "age;sex;localization").all()
    assert "6 without a row" in printed and "give --metadata" in printed
    # HAM10000's own metadata CSV, as is
    full = _predict_cli(
        [folder, *model, "--metadata", str(samples_csv)], tmp_path / "full.csv"
    )
    assert set(full["metadata"]) <= {"provided", "partial"}
    probs = list(plain.columns[:7])
    assert np.abs(full[probs].to_numpy() - plain[probs].to_numpy()).max() > 1e-3
    # a hand-written CSV keyed by file name, for some of the pictures only
    ids = sorted(plain.index)
    mine = pd.DataFrame(
        {
            "image": [f"{ids[0]}.jpg", ids[1], ids[2]],
            "age": [80, "", 35],
            "sex": ["male", "female", "unknown"],
            "localization": ["face", "back", "elbow crease"],
        }
    )
    mine.to_csv(tmp_path / "mine.csv", index=False)
    part = _predict_cli(
        [folder, *model, "--metadata", str(tmp_path / "mine.csv")],
        tmp_path / "part.csv",
    )
    printed = capsys.readouterr().out
    assert (
        "1 image(s) with every field, 2 with some unknown, 3 without a row" in printed
    )
    assert part.loc[ids[0], "metadata"] == "provided"
    assert part.loc[ids[1], "metadata_unknown"] == "age"
    assert part.loc[ids[2], "metadata_unknown"] == "sex"
    assert (part.loc[ids[3:], "metadata"] == "missing").all()
    # rows without metadata are predicted exactly as with no CSV at all; the others differ
    np.testing.assert_allclose(
        part.loc[ids[3:], probs], plain.loc[ids[3:], probs], atol=2e-6
    )
    assert np.abs(part.loc[ids[:3], probs].to_numpy() - plain.loc[ids[:3], probs].to_numpy()).max() > 1e-3  # fmt: skip


def test_predict_command_rejects_bad_metadata_naming_the_culprit(
    models, picture_folder, tmp_path, capsys
) -> None:
    from skin_lesion_classifier.cli import main

    target = sorted(picture_folder.glob("ISIC_*.jpg"))[1].stem
    bad = pd.DataFrame(
        {
            "image_id": [target],
            "age": ["fifty"],
            "sex": ["male"],
            "localization": ["back"],
        }
    )
    bad.to_csv(tmp_path / "bad.csv", index=False)
    args = ["predict", str(picture_folder), "--model", str(models["fusion"])]
    out = ["--output", str(tmp_path / "x.csv")]
    assert main([*args, "--metadata", str(tmp_path / "bad.csv"), *out]) == 2
    err = capsys.readouterr().err
    assert "'age'" in err and target in err
    bad.drop(columns=["sex"]).to_csv(tmp_path / "nosex.csv", index=False)
    assert main([*args, "--metadata", str(tmp_path / "nosex.csv"), *out]) == 2
    assert "lacks column(s) ['sex']" in capsys.readouterr().err


def test_predict_command_with_an_ensemble_and_an_image_only_model(
    models, picture_folder, samples_dir, tmp_path, capsys
) -> None:
    csv = str(samples_dir / "HAM10000_metadata_samples.csv")
    ens = _predict_cli(
        [str(picture_folder), "--model", str(models["ensemble"]), "--metadata", csv],
        tmp_path / "ens.csv",
    )
    assert "ensemble of 2 model(s) fuses age" in capsys.readouterr().out
    pred = load_predictor(models["ensemble"])
    meta = pd.read_csv(csv).set_index("image_id")
    for image_id in ens.index[:2]:
        fields = meta.loc[image_id, ["age", "sex", "localization"]].to_dict()
        expected = pred.predict_one(picture_folder / f"{image_id}.jpg", metadata=fields)
        got = ens.loc[image_id, [c.upper() for c in CLASSES]].to_numpy(dtype=float)
        np.testing.assert_allclose(got, expected, atol=2e-6)
    # an image-only model keeps the plain ISIC columns and says the CSV was not used
    plain = _predict_cli(
        [str(picture_folder), "--model", str(models["image"]), "--metadata", csv],
        tmp_path / "img.csv",
    )
    assert list(plain.reset_index().columns) == list(ISIC_CSV_COLUMNS)
    assert "image-only" in capsys.readouterr().out


def test_inference_pipeline_takes_a_metadata_csv(
    models, picture_folder, samples_dir, tmp_path, project_root
) -> None:
    import yaml
    from kedro.io import DataCatalog, MemoryDataset
    from kedro.runner import SequentialRunner
    from kedro_datasets.pandas import CSVDataset

    from skin_lesion_classifier.pipelines.inference import create_pipeline

    params = yaml.safe_load(
        (project_root / "conf/base/parameters_inference.yml").read_text()
    )["inference"]
    assert "metadata" in params
    rows = pd.read_csv(samples_dir / "HAM10000_metadata_samples.csv")
    rows[rows.image_id != sorted(picture_folder.glob("ISIC_*"))[0].stem].to_csv(
        tmp_path / "meta.csv", index=False
    )
    params |= {
        "input": str(picture_folder),
        "model": str(models["ensemble"]),
        "metadata": str(tmp_path / "meta.csv"),
    }
    catalog = DataCatalog(
        datasets={
            "inference_predictions": CSVDataset(
                filepath=str(tmp_path / "isic.csv"), save_args={"index": False}
            ),
            "inference_errors": CSVDataset(
                filepath=str(tmp_path / "errors.csv"), save_args={"index": False}
            ),
            "params:inference": MemoryDataset(params),
        }
    )
    result = SequentialRunner().run(create_pipeline(), catalog)
    preds = pd.read_csv(tmp_path / "isic.csv")
    assert (preds["metadata"] == "missing").sum() == 1
    metrics = result["inference_metrics"].load()
    assert metrics["inference_images_without_metadata"]["value"] == 1.0
    assert metrics["inference_images_unreadable"]["value"] == 1.0


# ---------------------------------------------------------------------- the service
@pytest.fixture(scope="module")
def ensemble_server(models, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "serve-ensemble.log"
    env = {"SLC_MODEL": str(models["ensemble"]), "SLC_THREADS": "1"}
    with LocalServer(env, log_path=log) as s:
        yield s


def _post(url: str, path: Path, fields: dict | None = None, endpoint="/predict"):
    return httpx.post(
        url + endpoint,
        files={"file": (path.name, path.read_bytes(), "image/jpeg")},
        data=fields or {},
        timeout=60,
    )


@pytest.mark.slow
def test_service_describes_the_ensemble_and_its_metadata(ensemble_server) -> None:
    info = httpx.get(ensemble_server.url + "/model").json()
    assert info["uses_metadata"] is True
    assert info["metadata_fields"] == ["age", "sex", "localization"]
    assert "other" not in info["metadata_sites"] and info["metadata_sites"]
    members = info["ensemble"]["members"]
    assert [m["name"] for m in members] == ["lite", "resnet_meta"]
    assert [m["weight"] for m in members] == pytest.approx(list(WEIGHTS))
    assert [m["uses_metadata"] for m in members] == [False, True]
    assert info["ensemble"]["objective"] == "log_loss"
    assert info["input_size"] == list(FUSION_SIZE) and info["explainable"]


@pytest.mark.slow
def test_service_uses_the_form_fields(ensemble_server, models, samples_dir) -> None:
    path = sorted((samples_dir / "images").glob("*.jpg"))[3]
    engine = load_predictor(models["ensemble"])
    fields = {"age": "45", "sex": "female", "localization": "Back"}
    r = _post(ensemble_server.url, path, fields)
    assert r.status_code == 200, r.text
    body = r.json()
    got = np.array(list(body["probabilities"].values()))
    expected = engine.predict_one(path, metadata={"age": 45, "sex": "female", "localization": "back"})  # fmt: skip
    np.testing.assert_allclose(got, expected, atol=1e-5)
    md = body["metadata"]
    assert md["used"] and md["age"] == 45 and md["sex"] == "female"
    assert md["localization"] == "back" and md["unknown"] == []
    # nothing given: every field unknown, said so, and other probabilities
    r = _post(ensemble_server.url, path)
    blank = np.array(list(r.json()["probabilities"].values()))
    np.testing.assert_allclose(blank, engine.predict_one(path), atol=1e-5)
    assert r.json()["metadata"]["unknown"] == ["age", "sex", "localization"]
    assert np.abs(blank - got).max() > 1e-3
    # a site never seen in training falls into the encoder's 'other' bucket
    r = _post(ensemble_server.url, path, {"localization": "left elbow crease"})
    assert r.status_code == 200
    assert r.json()["metadata"]["localization_bucket"] == "other"
    assert "other" in r.json()["metadata"]["note"]


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"age": "abc"}, "age"),
        ({"age": "130"}, "age"),
        ({"age": "-1"}, "age"),
        ({"age": "nan"}, "age"),
        ({"sex": "yes"}, "sex"),
        ({"localization": "x" * 200}, "localization"),
    ],
)
@pytest.mark.slow
def test_service_rejects_bad_fields_with_422_naming_them(
    ensemble_server, samples_dir, fields, field
) -> None:
    path = sorted((samples_dir / "images").glob("*.jpg"))[0]
    for endpoint in ("/predict", "/explain"):
        r = _post(ensemble_server.url, path, fields, endpoint)
        assert r.status_code == 422, r.text
        body = r.json()
        assert body["error"] == "invalid_metadata" and body["field"] == field
        assert body["detail"].startswith(f"{field}:")
    # and the service keeps serving
    assert _post(ensemble_server.url, path, {"age": "60"}).status_code == 200


@pytest.mark.slow
def test_service_explains_the_ensemble_with_metadata_held_fixed(
    ensemble_server, samples_dir
) -> None:
    path = sorted((samples_dir / "images").glob("*.jpg"))[5]
    r = _post(ensemble_server.url, path, {"age": "70", "sex": "male"}, "/explain")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png" and len(r.content) > 1000
    assert r.headers["x-metadata"] == "age=70; sex=male; localization=unknown"
    assert "lite w=0.400 used" in r.headers["x-gradcam-members"]
    assert "resnet_meta w=0.600 used" in r.headers["x-gradcam-members"]
    assert r.headers["x-target-layer"].count("members.") == 2


# ---------------------------------------------------------------------- Grad-CAM
def test_gradcam_of_a_fusion_model_and_of_an_ensemble(models, encoder, samples_dir, small_split) -> None:  # fmt: skip
    from skin_lesion_classifier.inference.gradcam import FixedMetadata, explain, gradcam

    picture = load_rgb(sorted((samples_dir / "images").glob("*.jpg"))[2])
    model, meta = load_model(models["fusion"])
    x_a = encoder.transform_one(age=30, sex="female", localization="back")
    x_b = encoder.transform_one(age=85, sex="male", localization="face")
    image = load_resized(sorted((samples_dir / "images").glob("*.jpg"))[2], FUSION_SIZE)
    wrapped = FixedMetadata(model, torch.as_tensor(x_a))
    with torch.no_grad():
        xin = to_float_nchw(image[None], MEAN, STD)
        torch.testing.assert_close(wrapped(xin), model(xin, torch.as_tensor(x_a)))
    with pytest.raises(ValueError, match="metadata"):
        explain(model, picture, meta)
    ea = explain(model, picture, meta, class_name="mel", metadata=x_a)
    eb = explain(model, picture, meta, class_name="mel", metadata=x_b)
    assert (
        ea.heatmap.shape == FUSION_SIZE
        and 0 <= ea.heatmap.min() <= ea.heatmap.max() <= 1
    )
    assert ea.heatmap.max() > 0 and ea.probability != pytest.approx(
        eb.probability, abs=1e-4
    )
    assert not ea.members
    # an ensemble with a member of another aspect: that member is left out, said why
    ckpts = {n: torch.load(models[n], weights_only=True) for n in ("image", "fusion")}
    square = create_model("test_efficientnet", pretrained=False, input_size=(48, 48))
    sq = make_checkpoint(square, {**ckpts["image"]["meta"], "input_size": [48, 48]})
    ens = build_ensemble_checkpoint(
        [("lite", ckpts["image"]), ("resnet_meta", ckpts["fusion"]), ("square", sq)],
        [0.3, 0.5, 0.2],
    )
    e_model, e_meta = load_model(ens)
    exp = explain(e_model, picture, e_meta, metadata=x_a)
    used = {m["name"]: m["used"] for m in exp.members}
    assert used == {"lite": True, "resnet_meta": True, "square": False}
    assert "aspect" in next(m["reason"] for m in exp.members if m["name"] == "square")
    # the map is the weight-averaged Grad-CAM of the ensemble's output at each used
    # member's last stage (computed here with the library, one member at a time)
    net = FixedMetadata(e_model, torch.as_tensor(x_a))
    maps = [
        gradcam(net, image, e_meta["mean"], e_meta["std"], exp.class_index, layer)
        for layer in (e_model.members[0].blocks[-1], e_model.members[1].backbone.layer4)
    ]
    expected = (0.3 * maps[0] + 0.5 * maps[1]) / 0.8
    expected = expected / expected.max() if expected.max() > 0 else expected
    np.testing.assert_allclose(exp.heatmap, expected, atol=1e-5)
    assert exp.target_layer.startswith("members.0.") and "w=0.500" in exp.target_layer


# ---------------------------------------------------------------------- ONNX
@pytest.mark.parametrize(
    "name",
    [
        # the ensemble holds the fusion model as a member: its export (fast) goes through
        # the same metadata input; the fusion model alone is a second export of seconds
        pytest.param("fusion", marks=pytest.mark.slow),
        "ensemble",
    ],
)
def test_onnx_with_a_metadata_input_agrees_with_pytorch(
    models, samples_dir, tmp_path, name
) -> None:
    from skin_lesion_classifier.inference.onnx_export import (
        FP32_TOLERANCE,
        export_and_verify,
    )
    from skin_lesion_classifier.inference.predictor import OnnxPredictor

    torch.set_num_threads(1)
    paths = sorted((samples_dir / "images").glob("*.jpg"))
    images = np.stack([load_resized(p, FUSION_SIZE) for p in paths])
    table = pd.read_csv(samples_dir / "HAM10000_metadata_samples.csv").set_index(
        "image_id"
    )
    rows = table.loc[[p.stem for p in paths], ["age", "sex", "localization"]].reset_index(drop=True)  # fmt: skip
    torch_pred = load_predictor(models[name])
    report = export_and_verify(
        torch_pred, tmp_path / f"{name}.onnx", images, int8=False, metadata=rows
    )
    assert report["inputs"] == ["input", "metadata"]
    assert report["fp32"]["max_abs_diff"] <= FP32_TOLERANCE
    assert report["fp32"]["n_images"] == 21
    onnx = OnnxPredictor(tmp_path / f"{name}.onnx")
    assert onnx.uses_metadata and onnx.meta["arch"] == torch_pred.meta["arch"]
    with_rows = onnx.predict(images[:4], rows.iloc[:4].reset_index(drop=True))
    np.testing.assert_allclose(
        with_rows,
        torch_pred.predict(images[:4], rows.iloc[:4].reset_index(drop=True)),
        atol=FP32_TOLERANCE,  # fmt: skip
    )
    assert np.abs(with_rows - onnx.predict(images[:4])).max() > 1e-3


@pytest.mark.slow
def test_service_runs_an_onnx_fusion_model_with_the_form_fields(
    models, samples_dir, tmp_path
) -> None:
    from skin_lesion_classifier.inference.onnx_export import FP32_TOLERANCE, export_onnx

    torch.set_num_threads(1)
    model, meta = load_model(models["fusion"])
    onnx_path = export_onnx(model, meta, tmp_path / "fusion.onnx")
    path = sorted((samples_dir / "images").glob("*.jpg"))[7]
    engine = load_predictor(models["fusion"])
    fields = {"age": "62", "sex": "male", "localization": "trunk"}
    env = {
        "SLC_MODEL": str(onnx_path),
        "SLC_EXPLAIN_CHECKPOINT": str(models["fusion"]),
        "SLC_THREADS": "1",
    }
    with LocalServer(env, log_path=tmp_path / "serve-onnx.log") as s:
        info = httpx.get(s.url + "/model").json()
        assert info["backend"] == "onnx" and info["uses_metadata"]
        assert info["ensemble"] is None
        r = _post(s.url, path, fields)
        assert r.status_code == 200, r.text
        got = np.array(list(r.json()["probabilities"].values()))
        expected = engine.predict_one(path, metadata={"age": 62, "sex": "male", "localization": "trunk"})  # fmt: skip
        assert np.abs(got - expected).max() <= FP32_TOLERANCE
        r = _post(s.url, path, {"age": "121"})
        assert r.status_code == 422 and r.json()["field"] == "age"
        r = _post(s.url, path, fields, "/explain")
        assert r.status_code == 200 and r.headers["x-metadata"].startswith("age=62;")


# ---------------------------------------------------------------------- MLflow pyfunc
def test_pyfunc_feeds_metadata_columns_to_a_fusion_model(
    models, small_split, encoder
) -> None:
    """The logged pyfunc reads age/sex/localization columns; absent columns mean unknown."""
    from types import SimpleNamespace

    from skin_lesion_classifier.data.images import load_resized
    from skin_lesion_classifier.mlflow_model import SkinLesionPyfunc
    from skin_lesion_classifier.models.checkpoint import load_model

    rows = small_split.head(6).reset_index(drop=True)
    pyfunc = SkinLesionPyfunc(device="cpu")
    pyfunc.load_context(
        SimpleNamespace(artifacts={"checkpoint": str(models["fusion"])})
    )
    cols = [f"prob_{c}" for c in CLASSES]
    with_meta = pyfunc.predict(None, rows[["path", "age", "sex", "localization"]])[cols]
    without = pyfunc.predict(None, rows[["path"]])[cols].to_numpy()

    model, meta = load_model(models["fusion"])
    images = np.stack([load_resized(p, tuple(meta["input_size"])) for p in rows.path])
    expected = _by_hand(model, images, meta, encoder.transform(rows))
    np.testing.assert_allclose(with_meta.to_numpy(), expected, atol=1e-5)
    unknown = rows.assign(age=np.nan, sex="unknown", localization="unknown")
    np.testing.assert_allclose(
        without, _by_hand(model, images, meta, encoder.transform(unknown)), atol=1e-5
    )
    assert np.abs(with_meta.to_numpy() - without).max() > 1e-3
