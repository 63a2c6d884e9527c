"""ONNX export: ONNX Runtime reproduces PyTorch's probabilities on real pictures.

Stated tolerance: max |p_onnx - p_torch| <= 1e-4 for the fp32 export (FP32_TOLERANCE),
over every class of the 21 real 600x450 samples. The int8 model's drift is bounded
loosely (<= 0.05) and its top-1 agreement reported by ``export-onnx``.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch

from skin_lesion_classifier.inference.onnx_export import (
    FP32_TOLERANCE,
    compare_predictors,
)
from skin_lesion_classifier.inference.predictor import (
    OnnxPredictor,
    load_predictor,
)
from skin_lesion_classifier.models.checkpoint import save_checkpoint
from tests.conftest import tiny_model

INPUT_SIZE = [48, 64]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    model, meta = tiny_model(
        INPUT_SIZE,
        mean=[0.5, 0.5, 0.5],
        std=[0.25, 0.25, 0.25],
        decision={"melanoma_threshold": 0.2},
        metrics={"val_balanced_accuracy": 0.5},
    )
    return save_checkpoint(tmp_path_factory.mktemp("onnx") / "model.pt", model, meta)


@pytest.fixture(scope="module")
def sample_images(samples_dir: Path) -> np.ndarray:
    from skin_lesion_classifier.data.images import load_resized

    paths = sorted((samples_dir / "images").glob("*.jpg"))
    return np.stack([load_resized(p, INPUT_SIZE) for p in paths])


@pytest.fixture(scope="module")
def cli_export(checkpoint: Path, samples_dir: Path) -> tuple[dict, str]:
    """``export-onnx --int8`` of the checkpoint, checked on all 21 sample pictures: the report
    that ``export_and_verify`` handed the command (recorded by a spy that calls the real
    function) and what the command printed. This one export serves every test here."""
    from skin_lesion_classifier.cli import main
    from skin_lesion_classifier.inference import onnx_export

    torch.set_num_threads(1)
    real, reports = onnx_export.export_and_verify, []

    def spy(*args, **kwargs):
        reports.append(real(*args, **kwargs))
        return reports[-1]

    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
        mp.setattr(onnx_export, "export_and_verify", spy)
        rc = main(
            ["export-onnx", "--model", str(checkpoint), "--output",
             str(checkpoint.with_suffix(".onnx")), "--images", str(samples_dir / "images"),
             "--n-check", "21", "--int8"]
        )  # fmt: skip
    assert rc == 0 and len(reports) == 1
    return reports[0], printed.getvalue()


@pytest.fixture(scope="module")
def exported(cli_export: tuple[dict, str]) -> dict:
    return cli_export[0]


def test_onnx_runtime_matches_pytorch_within_tolerance(
    exported: dict, checkpoint: Path, sample_images
) -> None:
    assert FP32_TOLERANCE == 1e-4
    fp32 = exported["fp32"]
    assert fp32["n_images"] == 21
    assert fp32["max_abs_diff"] <= FP32_TOLERANCE
    assert fp32["top1_agreement"] == 1.0
    # recomputed independently, at batch sizes 1 and 21 (the batch axis is dynamic)
    torch_pred = load_predictor(checkpoint)
    onnx_pred = OnnxPredictor(exported["onnx_path"], batch_size=1)
    p_torch = torch_pred.predict(sample_images)
    p_one = onnx_pred.predict(sample_images)
    onnx_pred.batch_size = 21
    p_all = onnx_pred.predict(sample_images)
    assert np.abs(p_one - p_torch).max() <= FP32_TOLERANCE
    assert np.abs(p_all - p_torch).max() <= FP32_TOLERANCE


def test_onnx_file_carries_the_meta(exported: dict, checkpoint: Path) -> None:
    torch_pred = load_predictor(checkpoint)
    onnx_pred = load_predictor(exported["onnx_path"])
    assert isinstance(onnx_pred, OnnxPredictor) and onnx_pred.torch_model is None
    for key in ("arch", "classes", "input_size", "mean", "std", "decision", "metrics"):
        assert onnx_pred.meta[key] == torch_pred.meta[key], key
    assert onnx_pred.decision.melanoma_threshold == 0.2
    assert onnx_pred.version.startswith("model.onnx@sha256:")


def test_int8_model_is_smaller_and_close(
    exported: dict, checkpoint: Path, sample_images
) -> None:
    q = OnnxPredictor(exported["int8_path"])
    assert exported["size_bytes"]["int8"] < exported["size_bytes"]["fp32"]
    p = q.predict(sample_images)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-5)
    drift = compare_predictors(load_predictor(checkpoint), q, sample_images)
    assert drift == pytest.approx(exported["int8"])
    assert drift["max_abs_diff"] <= 0.05
    assert exported["int8_recommended"] is (drift["top1_agreement"] >= 0.99)


def test_onnx_without_meta_is_refused(tmp_path: Path, exported: dict) -> None:
    import onnx

    model = onnx.load(exported["onnx_path"])
    del model.metadata_props[:]
    onnx.save(model, str(tmp_path / "bare.onnx"))
    with pytest.raises(ValueError, match="export-onnx"):
        OnnxPredictor(tmp_path / "bare.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a loadable ONNX model"):
        OnnxPredictor(tmp_path / "junk.onnx")


def test_cli_export_onnx_reports_the_difference(
    cli_export: tuple[dict, str], checkpoint: Path
) -> None:
    report, text = cli_export
    assert Path(report["onnx_path"]) == checkpoint.with_suffix(".onnx")
    assert Path(report["onnx_path"]).is_file() and Path(report["int8_path"]).is_file()
    assert "fp32 ONNX Runtime vs PyTorch on 21 pictures: max |dp| =" in text
    assert "tolerance 0.0001" in text
    assert f"int8 model {report['int8_path']}: " in text
    assert "int8 vs PyTorch: max |dp| =" in text
