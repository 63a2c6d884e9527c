"""The HTTP service, started for real with uvicorn on a loopback port and called over HTTP
with the real 600x450 samples and with broken uploads."""

from __future__ import annotations

import io
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from skin_lesion_classifier.api.server import LocalServer
from skin_lesion_classifier.constants import CLASSES
from skin_lesion_classifier.inference.predictor import load_predictor
from skin_lesion_classifier.models.checkpoint import save_checkpoint
from tests.conftest import tiny_model

pytestmark = pytest.mark.slow

INPUT_SIZE = [48, 64]
MAX_UPLOAD = 300_000  # bytes; the 600x450 samples are 50-150 kB


@pytest.fixture(scope="module")
def model_files(tmp_path_factory) -> dict[str, Path]:
    """A tiny checkpoint (no decision in its meta) and its ONNX export."""
    from skin_lesion_classifier.inference.onnx_export import export_onnx

    model, meta = tiny_model(
        INPUT_SIZE,
        mean=[0.485, 0.456, 0.406],
        std=[0.229, 0.224, 0.225],
        metrics={"val_balanced_accuracy": 0.42},
    )
    folder = tmp_path_factory.mktemp("api-model")
    pt = save_checkpoint(folder / "model.pt", model, meta)
    onnx_path = export_onnx(model, meta, folder / "model.onnx")
    return {"pt": pt, "onnx": onnx_path}


@pytest.fixture(scope="module")
def server(model_files, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "serve-torch.log"
    env = {
        "SLC_MODEL": str(model_files["pt"]),
        "SLC_MAX_UPLOAD_BYTES": str(MAX_UPLOAD),
        "SLC_THREADS": "1",
    }
    with LocalServer(env, log_path=log) as s:
        yield s


@pytest.fixture(scope="module")
def samples(samples_dir: Path) -> list[Path]:
    return sorted((samples_dir / "images").glob("*.jpg"))


def _post(
    url: str, name: str, data: bytes, ctype: str, endpoint: str = "/predict"
) -> httpx.Response:
    return httpx.post(url + endpoint, files={"file": (name, data, ctype)}, timeout=60)


def test_health_and_model(server, model_files) -> None:
    health = httpx.get(server.url + "/health").json()
    assert (
        health["status"] == "ok"
        and health["model_loaded"]
        and health["backend"] == "torch"
    )
    info = httpx.get(server.url + "/model").json()
    assert info["arch"] == "test_efficientnet"
    assert info["classes"] == list(CLASSES)
    assert info["input_size"] == INPUT_SIZE
    assert info["metrics"] == {"val_balanced_accuracy": 0.42}
    assert info["explainable"] is True
    assert info["decision"]["melanoma_threshold"] is None
    assert "no validated melanoma threshold" in info["decision"]["note"]
    assert info["max_upload_bytes"] == MAX_UPLOAD
    assert health["model_version"] == info["version"]


def test_predict_real_samples_matches_the_engine(server, model_files, samples) -> None:
    engine = load_predictor(model_files["pt"])
    for path in samples[::5]:
        r = _post(server.url, path.name, path.read_bytes(), "image/jpeg")
        assert r.status_code == 200, r.text
        body = r.json()
        assert list(body["probabilities"]) == list(CLASSES)
        probs = np.array(list(body["probabilities"].values()))
        np.testing.assert_allclose(probs, engine.predict_one(path), atol=1e-5)
        assert body["top_class"] == CLASSES[int(probs.argmax())]
        assert body["melanoma_flag"] == (
            body["top_class"] == "mel"
        )  # no validated threshold
        assert body["decision"]["note"] and body["model_version"] == engine.version
        assert body["filename"] == path.name


def test_explain_returns_a_png_overlay(server, samples) -> None:
    r = _post(
        server.url, samples[0].name, samples[0].read_bytes(), "image/jpeg", "/explain"
    )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    assert r.headers["x-explained-class"] in CLASSES
    img = Image.open(io.BytesIO(r.content))
    assert (
        img.format == "PNG"
        and img.size[0] >= 384
        and img.size[0] * 3 == img.size[1] * 4
    )
    r = httpx.post(
        server.url + "/explain?class_name=mel",
        files={"file": ("a.jpg", samples[0].read_bytes(), "image/jpeg")},
    )
    assert r.status_code == 200 and r.headers["x-explained-class"] == "mel"
    r = httpx.post(
        server.url + "/explain?class_name=cancer",
        files={"file": ("a.jpg", samples[0].read_bytes(), "image/jpeg")},
    )
    assert r.status_code == 422 and "cancer" in r.json()["detail"]


def _broken_uploads(sample: bytes) -> list[tuple[str, bytes, str, int, str]]:
    """(name, data, content type, expected status, expected error code)."""
    return [
        ("notes.txt", b"just some text\n", "text/plain", 415, "unsupported_media_type"),
        ("lesion.jpg", sample, "application/json", 415, "unsupported_media_type"),
        ("empty.jpg", b"", "image/jpeg", 400, "empty_upload"),
        (
            "truncated.jpg",
            sample[: len(sample) // 2],
            "image/jpeg",
            422,
            "invalid_image",
        ),
        ("fake.jpg", b"GIF89a but not really" * 10, "image/jpeg", 422, "invalid_image"),
        (
            "huge.jpg",
            sample + b"\0" * (MAX_UPLOAD - len(sample) + 10),
            "image/jpeg",
            413,
            "payload_too_large",
        ),
        (
            "huger.jpg",
            b"\xff" * (2 * MAX_UPLOAD),
            "image/jpeg",
            413,
            "payload_too_large",
        ),
    ]


@pytest.mark.parametrize("endpoint", ["/predict", "/explain"])
def test_broken_uploads_get_clear_4xx_and_the_service_keeps_serving(
    server, samples, endpoint
) -> None:
    sample = samples[0].read_bytes()
    for name, data, ctype, status, code in _broken_uploads(sample):
        r = _post(server.url, name, data, ctype, endpoint)
        assert r.status_code == status, (name, r.text)
        body = r.json()
        assert body["error"] == code, (name, body)
        assert isinstance(body["detail"], str) and body["detail"]
        if code in ("empty_upload", "invalid_image", "unsupported_media_type"):
            assert name in body["detail"], body  # the culprit is named
        # the service still answers after every bad request
        ok = _post(server.url, samples[1].name, samples[1].read_bytes(), "image/jpeg")
        assert ok.status_code == 200
    # not multipart at all, and multipart without the file field
    r = httpx.post(
        server.url + endpoint, content=sample, headers={"content-type": "image/jpeg"}
    )
    assert r.status_code == 415 and "multipart/form-data" in r.json()["detail"]
    r = httpx.post(
        server.url + endpoint, files={"other": ("a.jpg", sample, "image/jpeg")}
    )
    assert r.status_code == 422 and r.json()["error"] == "invalid_request"


def test_chunked_oversized_body_is_refused(server) -> None:
    def body():
        yield b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="big.jpg"\r\n'
        yield b"Content-Type: image/jpeg\r\n\r\n"
        for _ in range(40):
            yield b"\xff" * 20_000
        yield b"\r\n--xyz--\r\n"

    r = httpx.post(
        server.url + "/predict",
        content=body(),
        headers={"content-type": "multipart/form-data; boundary=xyz"},
    )
    assert r.status_code == 413 and r.json()["error"] == "payload_too_large"
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_upload_page_and_openapi_docs(server) -> None:
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and 'id="file-input"' in page.text
    assert httpx.get(server.url + "/static/app.js").status_code == 200
    schema = httpx.get(server.url + "/openapi.json").json()
    assert {"/predict", "/explain", "/health", "/model"} <= set(schema["paths"])
    assert "413" in schema["paths"]["/predict"]["post"]["responses"]
    assert httpx.get(server.url + "/docs").status_code == 200
    missing = httpx.get(server.url + "/nothing-here")
    assert missing.status_code == 404 and missing.json()["error"] == "not_found"


def test_onnx_service_predicts_and_explains_only_with_a_checkpoint(
    model_files, samples, tmp_path
) -> None:
    sample = samples[2].read_bytes()
    engine = load_predictor(model_files["pt"]).predict_one(samples[2])
    decision = {
        "rule": "argmax",
        "class_weights": {c: 1.0 for c in CLASSES},
        "melanoma_threshold": 0.0,
    }
    (tmp_path / "rule.json").write_text(json.dumps(decision))
    env = {
        "SLC_MODEL": str(model_files["onnx"]),
        "SLC_THREADS": "1",
        "SLC_DECISION": str(tmp_path / "rule.json"),
    }
    with LocalServer(env, log_path=tmp_path / "serve-onnx.log") as s:
        r = _post(s.url, "x.jpg", sample, "image/jpeg")
        assert r.status_code == 200 and r.json()["backend"] == "onnx"
        probs = np.array(list(r.json()["probabilities"].values()))
        assert np.abs(probs - engine).max() <= 1e-4
        assert r.json()["melanoma_flag"] is True  # threshold 0 from the decision file
        assert r.json()["decision"]["source"].endswith("rule.json")
        r = _post(s.url, "x.jpg", sample, "image/jpeg", "/explain")
        assert r.status_code == 501 and r.json()["error"] == "explain_unavailable"
        assert "SLC_EXPLAIN_CHECKPOINT" in r.json()["detail"]
        assert httpx.get(s.url + "/model").json()["explainable"] is False
    env["SLC_EXPLAIN_CHECKPOINT"] = str(model_files["pt"])
    with LocalServer(env, log_path=tmp_path / "serve-onnx2.log") as s:
        r = _post(s.url, "x.jpg", sample, "image/jpeg", "/explain")
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"


def test_service_refuses_to_start_without_a_model(tmp_path) -> None:
    env = {"SLC_MODEL": str(tmp_path / "none.pt")}
    with pytest.raises(RuntimeError, match="train first"):
        with LocalServer(env, log_path=tmp_path / "serve.log", startup_timeout=60):
            pass
