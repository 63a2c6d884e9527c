"""The service under hostile-but-fair input, started for real with uvicorn: pictures that
are small in bytes and huge in pixels, formats outside the allow-list, stalled uploads,
bursts on /explain, and what every answer carries (security headers, no local paths)."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from skin_lesion_classifier.api.server import LocalServer
from skin_lesion_classifier.data.images import MAX_PIXELS
from tests.service_helpers import (
    encode,
    grey16_bomb,
    memory_mib,
    reset_peak,
    rgb_bomb,
    tiny_checkpoint,
)

pytestmark = pytest.mark.slow

BODY_TIMEOUT_S = 3
HEADER_TIMEOUT_S = 2
#: Peak resident memory the server may add while refusing 4 adversarial uploads at once
#: (before: +7 GB; refusing from the header: +2 MiB).
ADVERSARIAL_PEAK_MIB = 150
#: Resident memory an /explain burst may leave behind (before: +273 MiB).
EXPLAIN_FLOOR_MIB = 64


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hardening-model")
    tiny_checkpoint(folder)
    return folder


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    env = {
        "SLC_MODEL": str(model_dir / "model.pt"),
        "SLC_MAX_UPLOAD_BYTES": "2000000",
        "SLC_EXPLAIN_QUEUE": "1",
        "SLC_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
        "SLC_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
        "SLC_THREADS": "1",
    }
    log = tmp_path_factory.mktemp("logs") / "serve.log"
    with LocalServer(env, log_path=log) as s:
        yield s


@pytest.fixture(scope="module")
def sample(samples_dir: Path) -> bytes:
    return sorted((samples_dir / "images").glob("*.jpg"))[0].read_bytes()


def _post(url: str, name: str, data: bytes, endpoint: str = "/predict", **kw):
    files = {"file": (name, data, kw.pop("ctype", "image/png"))}
    return httpx.post(url + endpoint, files=files, timeout=120, **kw)


def test_security_headers_docs_offline_and_allow(server) -> None:
    for path in ("/", "/health", "/docs", "/openapi.json", "/nothing-here"):
        r = httpx.get(server.url + path)
        assert r.headers["x-content-type-options"] == "nosniff", path
        assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
        assert "server" not in r.headers, (path, r.headers.get("server"))
    docs = httpx.get(server.url + "/docs")
    assert docs.status_code == 200 and "cdn" not in docs.text.lower()
    for asset in ("/docs-assets/swagger-ui-bundle.js", "/docs-assets/swagger-ui.css"):
        assert httpx.get(server.url + asset).status_code == 200, asset
    assert "<script>" not in docs.text  # no inline script: the CSP allows 'self' only
    r = httpx.delete(server.url + "/predict")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert r.json()["error"] == "method_not_allowed"


def test_openapi_schema_states_what_the_server_enforces(server) -> None:
    schema = httpx.get(server.url + "/openapi.json").json()
    ref = schema["paths"]["/predict"]["post"]["requestBody"]["content"]
    name = ref["multipart/form-data"]["schema"]["$ref"].rsplit("/", 1)[-1]
    props = schema["components"]["schemas"][name]["properties"]
    assert props["sex"]["enum"] == ["male", "female", "unknown"]
    assert (props["age"]["minimum"], props["age"]["maximum"]) == (0, 120)
    assert props["file"]["minLength"] == 1
    assert props["localization"]["maxLength"] == 64
    explain = schema["paths"]["/explain"]["post"]
    assert "mel" in explain["parameters"][0]["schema"]["enum"]
    for status in ("408", "413", "415", "503"):
        assert status in explain["responses"], status


def test_answers_name_the_model_without_local_paths(server, model_dir, sample) -> None:
    info = httpx.get(server.url + "/model").json()
    assert info["source"] == "model.pt" and info["version"].startswith("model.pt@")
    r = _post(server.url, "a.jpg", sample, ctype="image/jpeg")
    assert r.status_code == 200, r.text
    for text in (json.dumps(info), r.text):
        assert str(model_dir) not in text and str(model_dir.parent) not in text


def test_adversarial_uploads_are_refused_from_the_header_with_bounded_memory(
    server, sample
) -> None:
    pid = server.proc.pid
    _post(server.url, "warm.jpg", sample, ctype="image/jpeg")
    reset_peak(pid)
    before = memory_mib(pid)
    bombs = [("g16a.png", grey16_bomb()), ("g16b.png", grey16_bomb())]
    bombs += [("rgba.png", rgb_bomb()), ("rgbb.png", rgb_bomb())]
    answers: dict[str, httpx.Response] = {}

    def send(name: str, data: bytes) -> None:
        answers[name] = _post(server.url, name, data)

    threads = [threading.Thread(target=send, args=bomb) for bomb in bombs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    peak = memory_mib(pid, "VmHWM")
    for name, r in answers.items():
        assert r.status_code == 413, (name, r.text)
        body = r.json()
        assert body["error"] == "image_too_large" and name in body["detail"]
        assert f"limit of {MAX_PIXELS} pixels" in body["detail"]
    assert peak - before < ADVERSARIAL_PEAK_MIB, (before, peak)
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


@pytest.mark.parametrize("fmt", ["EPS", "PCX", "ICO"])
def test_formats_outside_the_allow_list_get_415_naming_them(server, fmt) -> None:
    data = encode(Image.new("RGB", (64, 48), (200, 120, 90)), fmt)
    for endpoint in ("/predict", "/explain"):
        r = _post(server.url, f"lesion.{fmt.lower()}", data, endpoint)
        assert r.status_code == 415, r.text
        body = r.json()
        assert body["error"] == "unsupported_image_format"
        assert f"format {fmt}" in body["detail"] and "lesion." in body["detail"]


def test_a_stalled_upload_is_timed_out(server) -> None:
    host, port = server.url.removeprefix("http://").split(":")
    t0 = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
            b"Content-Type: multipart/form-data; boundary=xyz\r\n\r\n--xyz\r\n"
        )
        first = sock.recv(65536)  # then nothing more is sent
        waited = time.monotonic() - t0
        chunks = [first]
        while chunks[-1]:  # the answer says "connection: close": read to its end
            chunks.append(sock.recv(65536))
    reply = b"".join(chunks).decode("latin-1")
    assert reply.startswith("HTTP/1.1 408"), reply
    assert "request_timeout" in reply and "SLC_BODY_TIMEOUT_S" in reply
    assert BODY_TIMEOUT_S - 0.5 <= waited < BODY_TIMEOUT_S + 10
    assert httpx.get(server.url + "/health").status_code == 200


def _stalled_head(url: str, first: bytes, trickle: bytes = b"", keep_alive=False):
    """Open a connection (after one whole request on it when ``keep_alive``), send
    ``first``, then ``trickle`` one byte every 0.2 s; return the seconds until the server
    closed the connection (from the first byte of the stalled head) and what it answered."""
    import select

    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        if keep_alive:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = sock.recv(65536)
            head, _, body = answer.partition(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            while len(body) < length:  # the whole first answer
                body += sock.recv(65536)
            assert head.startswith(b"HTTP/1.1 200")
        t0 = time.monotonic()
        sock.sendall(first)
        reply, pending = b"", list(trickle)
        while time.monotonic() - t0 < HEADER_TIMEOUT_S + 20:
            if select.select([sock], [], [], 0.2)[0]:
                chunk = sock.recv(65536)
                if not chunk:  # closed by the server
                    return time.monotonic() - t0, reply.decode("latin-1")
                reply += chunk
            elif pending:
                try:
                    sock.sendall(bytes([pending.pop(0)]))
                except OSError:  # reset: closed too
                    return time.monotonic() - t0, reply.decode("latin-1")
    raise AssertionError(
        f"the connection was still open after {HEADER_TIMEOUT_S + 20} s"
    )


@pytest.fixture(params=["auto", "h11"])
def head_server(request, server, model_dir, tmp_path):
    """The service with the request-head deadline on uvicorn's httptools protocol (what
    ``auto`` picks where httptools is installed) and on its h11 one."""
    if request.param == "auto":
        yield server
        return
    with LocalServer(
        server.env,
        log_path=tmp_path / "serve.log",
        http="skin_lesion_classifier.api.protocol:HeaderTimeoutH11Protocol",
    ) as s:
        yield s


def test_a_stalled_or_trickled_request_head_is_cut_off(head_server) -> None:
    server = head_server
    partial = b"GET /health HTTP/1.1\r\nHost: x\r\n"
    clients = {
        "connects, sends nothing": dict(first=b""),
        "sends part of the head, then stops": dict(first=partial),
        "trickles the head byte by byte": dict(first=b"G", trickle=partial[1:] * 40),
        "stalls its next request on a kept-alive connection": dict(
            first=partial, keep_alive=True
        ),
    }
    results: dict[str, tuple[float, str]] = {}

    def run(name: str) -> None:
        results[name] = _stalled_head(server.url, **clients[name])

    threads = [threading.Thread(target=run, args=(n,)) for n in clients]
    for t in threads:
        t.start()
    time.sleep(0.5)  # while they stall, the service answers everyone else at once
    for _ in range(5):
        t0 = time.monotonic()
        assert httpx.get(server.url + "/health", timeout=5).status_code == 200
        assert time.monotonic() - t0 < 1.0
    for t in threads:
        t.join(timeout=HEADER_TIMEOUT_S + 30)
    assert set(results) == set(clients)
    for name, (waited, reply) in results.items():
        assert HEADER_TIMEOUT_S - 0.5 <= waited < HEADER_TIMEOUT_S + 3, (name, waited)
        assert reply.startswith("HTTP/1.1 408"), (name, reply)
        assert "SLC_HEADER_TIMEOUT_S" in reply and "nosniff" in reply, name
    assert httpx.get(server.url + "/health").status_code == 200


def test_explain_queue_is_bounded_and_memory_returns_after_bursts(
    server, samples_dir
) -> None:
    picture = Image.open(sorted((samples_dir / "images").glob("*.jpg"))[1])
    big = encode(picture.resize((2400, 1800)), "JPEG", quality=85)  # slow to explain
    pid = server.proc.pid
    assert _post(server.url, "warm.jpg", big, "/explain").status_code == 200
    before = memory_mib(pid)
    codes: list[int] = []
    retry: set[str] = set()

    def send() -> None:
        r = _post(server.url, "burst.jpg", big, "/explain", ctype="image/jpeg")
        codes.append(r.status_code)
        if r.status_code == 503:
            assert (
                r.json()["error"] == "busy"
                and "SLC_EXPLAIN_QUEUE" in r.json()["detail"]
            )
            retry.add(r.headers.get("retry-after", ""))

    for _ in range(2):
        threads = [threading.Thread(target=send) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert set(codes) <= {200, 503}, codes
    assert codes.count(200) >= 4 and codes.count(503) >= 1, codes
    assert retry == {"2"}
    time.sleep(0.5)
    after = memory_mib(pid)
    assert after - before < EXPLAIN_FLOOR_MIB, (before, after)
