"""``serve`` with a model it cannot load ends with one clear line (rc 3), no traceback;
the service settings read from ``SLC_*`` variables."""

from __future__ import annotations

import pytest

from skin_lesion_classifier.cli import SERVE_STARTUP_FAILED, main


@pytest.mark.parametrize(
    ("name", "content", "backend", "expected"),
    [
        ("bad.pt", b"not a checkpoint", "auto", "bad.pt: not a readable checkpoint"),
        ("model.pt", b"x", "onnx", "the onnx backend needs an .onnx file"),
        ("bad.onnx", b"not onnx", "auto", "bad.onnx: not a loadable ONNX model"),
    ],
)
def test_serve_with_a_bad_model_prints_one_clear_line(
    tmp_path, capsys, name, content, backend, expected
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    rc = main(["serve", "--model", str(path), "--backend", backend, "--port", "1"])
    err = capsys.readouterr().err
    assert rc == SERVE_STARTUP_FAILED == 3
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected in lines[0] and "Traceback" not in err
    assert "{path}" not in err and str(path) in err


def test_serve_without_a_model_says_train_first(tmp_path, capsys) -> None:
    rc = main(["serve", "--model", str(tmp_path / "none.pt"), "--port", "1"])
    err = capsys.readouterr().err
    assert rc == 3 and err.count("\n") == 1 and "train first" in err


def test_service_settings_read_numbers_from_the_environment(monkeypatch) -> None:
    from skin_lesion_classifier.api.protocol import HeaderTimeoutProtocol
    from skin_lesion_classifier.api.settings import ServiceSettings

    monkeypatch.setenv("SLC_MAX_PIXELS", "1000")
    monkeypatch.setenv("SLC_BODY_TIMEOUT_S", "2.5")
    monkeypatch.setenv("SLC_HEADER_TIMEOUT_S", " ")  # blank: the default
    s = ServiceSettings()
    assert s.max_pixels == 1000 and isinstance(s.max_pixels, int)
    assert s.body_timeout_s == 2.5 and s.header_timeout_s == 10.0
    monkeypatch.setenv("SLC_HEADER_TIMEOUT_S", "4")
    assert ServiceSettings().header_timeout_s == 4.0
    protocol = HeaderTimeoutProtocol.__new__(HeaderTimeoutProtocol)
    protocol._init_deadline()  # what the server's connections get
    assert protocol.header_timeout_s == 4.0
    monkeypatch.setenv("SLC_PREDICT_QUEUE", "lots")
    with pytest.raises(ValueError, match="SLC_PREDICT_QUEUE='lots' is not an integer"):
        ServiceSettings()
    monkeypatch.delenv("SLC_PREDICT_QUEUE")
    monkeypatch.setenv("SLC_HEADER_TIMEOUT_S", "soon")
    with pytest.raises(ValueError, match="SLC_HEADER_TIMEOUT_S='soon' is not a number"):
        ServiceSettings()
    monkeypatch.setenv("SLC_HEADER_TIMEOUT_S", "0")
    with pytest.raises(ValueError, match="header_timeout_s must be positive"):
        ServiceSettings()
