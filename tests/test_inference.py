"""Batch prediction: predictors, the decision rule, the ISIC CSV, the CLI and the pipeline,
on the real 600x450 HAM10000 samples mixed with broken files."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from skin_lesion_classifier.constants import CLASSES, ISIC_COLUMNS, MELANOMA_INDEX
from skin_lesion_classifier.data.images import load_rgb, resize_rgb
from skin_lesion_classifier.data.transforms import to_float_nchw
from skin_lesion_classifier.inference.batch import (
    ISIC_CSV_COLUMNS,
    collect_inputs,
    isic_frame,
    predict_files,
)
from skin_lesion_classifier.inference.decision import (
    NO_THRESHOLD_NOTE,
    decision_from_meta,
)
from skin_lesion_classifier.inference.predictor import (
    DECISION_FILE,
    TorchPredictor,
    load_predictor,
)
from skin_lesion_classifier.models.checkpoint import save_checkpoint
from skin_lesion_classifier.models.factory import create_model
from tests.conftest import catalog_section

INPUT_SIZE = [48, 64]  # H, W: the 4:3 aspect of HAM10000 pictures
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _meta(**extra) -> dict:
    return {
        "arch": "test_efficientnet",
        "classes": list(CLASSES),
        "input_size": INPUT_SIZE,
        "mean": MEAN,
        "std": STD,
        **extra,
    }


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny random-init timm model saved with the project's checkpoint contract; the
    validated melanoma threshold is set low enough that some pictures are flagged."""
    torch.manual_seed(0)
    model = create_model("test_efficientnet", num_classes=7, input_size=INPUT_SIZE)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    return save_checkpoint(path, model, _meta(decision={"melanoma_threshold": 0.143}))


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory, samples_dir: Path) -> Path:
    """The 21 real 600x450 samples plus a truncated JPEG, an empty file, a text file and
    two unusual-but-valid pictures (RGBA PNG, 16-bit grayscale PNG)."""
    folder = tmp_path_factory.mktemp("mixed")
    originals = sorted((samples_dir / "images").glob("*.jpg"))
    assert len(originals) == 21
    for p in originals:
        shutil.copy(p, folder / p.name)
    data = originals[0].read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.txt").write_text("not a picture\n")
    rgb = load_rgb(originals[1])
    rgba = rgb.convert("RGBA")
    rgba.putalpha(200)
    rgba.save(folder / "alpha_copy.png")
    gray16 = (np.asarray(rgb.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(gray16).save(folder / "gray16_copy.png")
    (folder / ".hidden.jpg").write_bytes(data)  # hidden: listed as not predicted
    return folder


def test_predictor_preprocessing_matches_training(
    checkpoint: Path, samples_dir: Path
) -> None:
    pred = load_predictor(checkpoint)
    assert isinstance(pred, TorchPredictor)
    assert pred.input_size == (48, 64)
    path = sorted((samples_dir / "images").glob("*.jpg"))[0]
    assert Image.open(path).size == (600, 450)  # a real original, not the 200x150 copy
    prepared = pred.prepare(path)
    expected = resize_rgb(load_rgb(path), (48, 64))
    np.testing.assert_array_equal(prepared, expected)
    # the same probabilities as the model applied by hand to the training transform
    with torch.no_grad():
        logits = pred.torch_model(to_float_nchw(expected[None], MEAN, STD))
    manual = torch.softmax(logits, 1).numpy()[0]
    np.testing.assert_allclose(pred.predict_one(path.read_bytes()), manual, atol=1e-6)


def test_predict_folder_mixing_good_and_corrupt_files(
    checkpoint: Path, mixed_folder: Path
) -> None:
    pred = load_predictor(checkpoint)
    paths = collect_inputs(mixed_folder)
    assert len(paths) == 27
    predictions, errors = predict_files(pred, paths, batch_size=8)

    assert list(predictions.columns) == list(ISIC_CSV_COLUMNS)
    assert list(predictions.columns[1:8]) == list(ISIC_COLUMNS)
    expected_ids = sorted(p.stem for p in mixed_folder.glob("ISIC_*.jpg")) + [
        "alpha_copy",
        "gray16_copy",
    ]
    assert sorted(predictions["image"]) == sorted(expected_ids)
    probs = predictions[list(ISIC_COLUMNS)].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert ((probs >= 0) & (probs <= 1)).all()
    # melanoma flag = MEL >= the validated threshold; predicted_class = arg-max class
    np.testing.assert_array_equal(
        predictions["melanoma_flag"].to_numpy(), probs[:, 0] >= 0.143
    )
    isic_to_code = [c.lower() for c in ISIC_COLUMNS]
    assert list(predictions["predicted_class"]) == [
        isic_to_code[i] for i in probs.argmax(1)
    ]

    assert list(errors.columns) == ["image", "reason"]
    reasons = {Path(r.image).name: r.reason for r in errors.itertuples()}
    assert set(reasons) == {"truncated.jpg", "empty.jpg", "notes.txt", ".hidden.jpg"}
    assert "hidden" in reasons[".hidden.jpg"]
    assert "truncated" in reasons["truncated.jpg"] and reasons[
        "truncated.jpg"
    ].startswith("truncated.jpg")
    assert "empty" in reasons["empty.jpg"]
    assert "not a readable image" in reasons["notes.txt"]

    # batch size does not change the answers; probabilities follow the ISIC permutation
    again, _ = predict_files(pred, paths, batch_size=3)
    pd.testing.assert_frame_equal(predictions, again, atol=1e-6)
    one = mixed_folder / (predictions["image"].iloc[0] + ".jpg")
    p_one = pred.predict_one(one)
    assert probs[0, 0] == pytest.approx(p_one[MELANOMA_INDEX], abs=1e-6)
    assert probs[0, 1] == pytest.approx(p_one[CLASSES.index("nv")], abs=1e-6)


def test_decision_rules_from_meta() -> None:
    p = np.array(
        [[0.1, 0.05, 0.05, 0.0, 0.3, 0.5, 0.0], [0.6, 0.1, 0.1, 0.0, 0.1, 0.1, 0.0]]
    )
    none = decision_from_meta({})
    assert (
        none.melanoma_threshold is None
        and none.note == NO_THRESHOLD_NOTE
        and none.source == "none"
    )
    np.testing.assert_array_equal(none.predict(p), [5, 0])
    np.testing.assert_array_equal(none.flag_melanoma(p), [False, False])

    thr = decision_from_meta({"decision": {"melanoma_threshold": 0.25}})
    np.testing.assert_array_equal(thr.flag_melanoma(p), [True, False])
    assert thr.note is None

    # evaluation's DecisionRule form: class weights move the decision, the flag uses raw p
    weights = {c: 1.0 for c in CLASSES} | {"mel": 2.0}
    rule = decision_from_meta(
        {
            "decision": {
                "rule": "class_weights",
                "class_weights": weights,
                "melanoma_threshold": 0.5,
            }
        }
    )
    np.testing.assert_array_equal(rule.predict(p), [MELANOMA_INDEX, 0])  # 0.3*2 > 0.5
    np.testing.assert_array_equal(rule.flag_melanoma(p), [False, False])

    with pytest.raises(ValueError, match="melanoma_threshold"):
        decision_from_meta({"decision": {"melanoma_threshold": 1.5}})
    with pytest.raises(ValueError, match="class_weights"):
        decision_from_meta(
            {"decision": {"rule": "class_weights", "class_weights": {"mel": 2.0}}}
        )


def test_decision_file_beside_the_model_is_applied(
    checkpoint: Path, tmp_path: Path, samples_dir: Path
) -> None:
    torch.manual_seed(1)
    model = create_model("test_efficientnet", num_classes=7, input_size=INPUT_SIZE)
    path = save_checkpoint(
        tmp_path / "model.pt", model, _meta()
    )  # no decision in the meta
    assert load_predictor(path).decision.source == "none"
    rule = {
        "rule": "argmax",
        "class_weights": {c: 1.0 for c in CLASSES},
        "melanoma_threshold": 0.0,
    }
    (tmp_path / DECISION_FILE).write_text(json.dumps(rule))
    pred = load_predictor(path)
    assert pred.decision.melanoma_threshold == 0.0
    assert pred.decision.source.endswith(DECISION_FILE)
    frame, _ = predict_files(pred, sorted((samples_dir / "images").glob("*.jpg"))[:4])
    assert frame["melanoma_flag"].all()  # p_mel >= 0 always


def test_isic_frame_rejects_mismatched_input() -> None:
    with pytest.raises(ValueError, match="2 image ids but 1"):
        isic_frame(["a", "b"], np.full((1, 7), 1 / 7), decision_from_meta({}))


def test_bad_model_references_fail_clearly(tmp_path: Path) -> None:
    from skin_lesion_classifier.api.model_source import open_predictor

    with pytest.raises(FileNotFoundError, match="train first"):
        open_predictor(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pt"):
        load_predictor(bad)
    with pytest.raises(ValueError, match="onnx backend needs an .onnx file"):
        load_predictor(bad, backend="onnx")


def test_fusion_model_without_its_encoder_is_refused_with_a_reason() -> None:
    # fusion models are served (tests/test_inference_metadata.py); one whose meta lost
    # the metadata encoder cannot encode age / sex / site as in training
    model = create_model("test_efficientnet", num_classes=7, input_size=INPUT_SIZE)
    with pytest.raises(ValueError, match="no metadata_encoder"):
        TorchPredictor(model, _meta(uses_metadata=True))


def test_cli_predict_writes_both_csvs(
    checkpoint: Path, mixed_folder: Path, tmp_path: Path, capsys
) -> None:
    from skin_lesion_classifier.cli import main

    out = tmp_path / "out" / "preds.csv"
    rc = main(
        [
            "predict",
            str(mixed_folder),
            "--model",
            str(checkpoint),
            "--output",
            str(out),
            "--batch-size",
            "5",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "predicted 23 image(s)" in printed and "not predicted 4 input(s)" in printed
    preds = pd.read_csv(out)
    errors = pd.read_csv(tmp_path / "out" / "preds_errors.csv")
    assert list(preds.columns) == list(ISIC_CSV_COLUMNS) and len(preds) == 23
    assert sorted(Path(p).name for p in errors["image"]) == [
        ".hidden.jpg",
        "empty.jpg",
        "notes.txt",
        "truncated.jpg",
    ]
    # a list of files works as well as a folder
    files = sorted(str(p) for p in mixed_folder.glob("ISIC_*.jpg"))[:2]
    rc = main(
        [
            "predict",
            *files,
            "--model",
            str(checkpoint),
            "--output",
            str(tmp_path / "two.csv"),
        ]
    )
    assert rc == 0 and len(pd.read_csv(tmp_path / "two.csv")) == 2
    assert (
        main(["predict", str(mixed_folder), "--model", str(tmp_path / "nothing.pt")])
        == 2
    )
    assert "train first" in capsys.readouterr().err


def test_every_input_is_predicted_or_listed_with_its_true_reason(
    checkpoint: Path, samples_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    import builtins
    import errno
    import os

    folder = tmp_path / "inputs"
    folder.mkdir()
    originals = sorted((samples_dir / "images").glob("*.jpg"))[:3]
    for p in originals:
        shutil.copy(p, folder / p.name)
    (folder / "gone.jpg").symlink_to(tmp_path / "deleted.jpg")  # dangling link
    os.mkfifo(folder / "pipe.jpg")  # reading it would block forever
    (folder / "sub").mkdir()
    shutil.copy(originals[0], folder / "sub" / "nested.jpg")
    locked = folder / "locked.jpg"
    shutil.copy(originals[1], locked)
    locked.chmod(0)
    if os.geteuid() == 0:  # root reads mode-000 files: the OS refusal is simulated
        real_open = builtins.open

        def refusing_open(file, *args, **kwargs):
            if str(file) == str(locked):
                raise PermissionError(errno.EACCES, "Permission denied", str(file))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", refusing_open)
    pred = load_predictor(checkpoint)

    paths = collect_inputs(folder)
    predictions, errors = predict_files(pred, paths, batch_size=2)
    assert len(paths) == 7 == len(predictions) + len(errors)
    assert sorted(predictions["image"]) == sorted(p.stem for p in originals)
    reasons = {Path(r.image).name: r.reason for r in errors.itertuples()}
    assert set(reasons) == {"gone.jpg", "pipe.jpg", "sub", "locked.jpg"}
    assert "dangling symbolic link" in reasons["gone.jpg"]
    assert "deleted.jpg" in reasons["gone.jpg"]
    assert "FIFO" in reasons["pipe.jpg"]
    assert "folder, not searched" in reasons["sub"]
    assert "Permission denied" in reasons["locked.jpg"]
    assert "corrupt" not in reasons["locked.jpg"]

    # recursive: the sub-folder's picture replaces the folder
    paths = collect_inputs(folder, recursive=True)
    predictions, errors = predict_files(pred, paths, batch_size=2)
    assert len(paths) == 7 == len(predictions) + len(errors)
    assert "nested" in set(predictions["image"])
    assert "sub" not in {Path(p).name for p in errors["image"]}


def test_cli_predict_refuses_an_unwritable_output_before_any_work(
    checkpoint: Path, mixed_folder: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    from skin_lesion_classifier.cli import main
    from skin_lesion_classifier.inference import batch

    def no_work(*args, **kwargs):
        raise AssertionError("predictions computed before the output was checked")

    monkeypatch.setattr(batch, "predict_files", no_work)
    args = ["predict", str(mixed_folder), "--model", str(checkpoint)]
    existing = tmp_path / "existing_folder"
    existing.mkdir()
    assert main([*args, "--output", str(existing)]) == 2
    err = capsys.readouterr().err
    assert "--output" in err and "is an existing folder" in err
    assert (
        main([*args, "--output", str(tmp_path / "a.csv"), "--errors", str(existing)])
        == 2
    )
    assert "--errors" in capsys.readouterr().err
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    assert main([*args, "--output", str(blocker / "sub" / "p.csv")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    same = str(tmp_path / "p.csv")
    assert main([*args, "--output", same, "--errors", same]) == 2
    assert "same file" in capsys.readouterr().err
    assert not list(existing.iterdir())


def test_inference_pipeline_runs_with_its_catalog_entries(
    checkpoint: Path, mixed_folder: Path, tmp_path: Path, project_root: Path
) -> None:
    import yaml
    from kedro.io import DataCatalog, MemoryDataset
    from kedro.runner import SequentialRunner
    from kedro_datasets.pandas import CSVDataset

    # imported from the package, as find_pipelines does
    from skin_lesion_classifier.pipelines.inference import create_pipeline

    pipeline = create_pipeline()
    catalog_conf = catalog_section(project_root, "inference")
    params = yaml.safe_load(
        (project_root / "conf/base/parameters_inference.yml").read_text()
    )["inference"]
    # every free output is declared in the catalog, every parameter the nodes read exists
    assert set(pipeline.outputs()) <= set(catalog_conf)
    assert {"input", "model", "backend", "device", "batch_size"} <= set(params)
    params |= {"input": str(mixed_folder), "model": str(checkpoint)}
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
    result = SequentialRunner().run(pipeline, catalog)
    preds = pd.read_csv(tmp_path / "isic.csv")
    errors = pd.read_csv(tmp_path / "errors.csv")
    assert len(preds) == 23 and len(errors) == 4
    assert list(preds.columns) == list(ISIC_CSV_COLUMNS)
    metrics = result[
        "inference_metrics"
    ].load()  # free outputs come back as MemoryDatasets
    assert metrics["inference_images_unreadable"]["value"] == 4.0
    assert metrics["inference_images_predicted"]["value"] == 23.0


def test_images_of_any_size_are_accepted(checkpoint: Path, samples_dir: Path) -> None:
    pred = load_predictor(checkpoint)
    picture = load_rgb(sorted((samples_dir / "images").glob("*.jpg"))[0])
    sizes = [(600, 450), (200, 150), (333, 500), (64, 64)]
    for w, h in sizes:
        buf = io.BytesIO()
        picture.resize((w, h)).save(buf, format="PNG")
        p = pred.predict_one(buf.getvalue(), name=f"{w}x{h}.png")
        assert p.shape == (7,) and abs(p.sum() - 1) < 1e-5


def test_predict_refuses_pictures_above_the_configured_pixel_limit(
    checkpoint: Path, samples_dir: Path, tmp_path: Path, project_root: Path
) -> None:
    import yaml

    from skin_lesion_classifier.cli import main
    from skin_lesion_classifier.pipelines.inference.nodes import predict_images

    folder = tmp_path / "inputs"
    folder.mkdir()
    for p in sorted((samples_dir / "images").glob("*.jpg"))[:2]:  # 600x450 = 270000
        shutil.copy(p, folder / p.name)
    args = ["predict", str(folder), "--model", str(checkpoint)]
    out = tmp_path / "small_limit.csv"
    assert main([*args, "--output", str(out), "--max-pixels", "200000"]) == 0
    errors = pd.read_csv(tmp_path / "small_limit_errors.csv")
    assert len(pd.read_csv(out)) == 0 and len(errors) == 2
    assert errors.reason.str.contains("exceeds the limit of 200000 pixels").all()
    out = tmp_path / "default_limit.csv"
    assert main([*args, "--output", str(out)]) == 0
    assert len(pd.read_csv(out)) == 2
    assert len(pd.read_csv(tmp_path / "default_limit_errors.csv")) == 0
    # the inference pipeline's parameter (conf/base/parameters_inference.yml)
    params = yaml.safe_load(
        (project_root / "conf/base/parameters_inference.yml").read_text()
    )["inference"] | {"model": str(checkpoint)}
    paths = sorted(str(p) for p in folder.iterdir())
    preds, errors, _ = predict_images(paths, params | {"max_pixels": 270_000})
    assert len(preds) == 2 and len(errors) == 0
    preds, errors, _ = predict_images(paths, params | {"max_pixels": 269_999})
    assert len(preds) == 0
    assert errors.reason.str.contains("exceeds the limit of 269999 pixels").all()
