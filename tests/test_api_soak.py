"""A bounded soak test of the real service: 300 requests, 8 at a time, one in five broken
in a different way each time. No answer may be 5xx, every broken upload gets a 4xx with
its JSON error, every good one a 200, and the resident memory after warm-up may not grow
past a stated bound."""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from PIL import Image

from skin_lesion_classifier.api.server import LocalServer
from tests.service_helpers import encode, grey16_bomb, memory_mib, tiny_checkpoint

pytestmark = pytest.mark.slow

REQUESTS = 300
CONCURRENCY = 8
WARMUP = 80
#: Resident memory the server may gain over the soak after its warm-up.
RSS_GROWTH_MIB = 32
#: Wall-clock bound of the 300 requests (a minute on a loaded 2-core machine).
TIME_BOUND_S = 90


def _broken(sample: bytes) -> list[tuple[str, bytes, str, dict, int]]:
    """(name, data, content type, form fields, expected status) of broken uploads."""
    eps = encode(Image.new("RGB", (32, 24)), "EPS")
    return [
        ("truncated.jpg", sample[: len(sample) // 3], "image/jpeg", {}, 422),
        ("notes.txt", b"not a picture\n", "text/plain", {}, 415),
        ("empty.jpg", b"", "image/jpeg", {}, 400),
        ("fake.jpg", b"\x89PNG\r\n\x1a\n" + b"\0" * 200, "image/png", {}, 422),
        ("drawing.eps", eps, "image/jpeg", {}, 415),
        ("bomb.png", grey16_bomb(), "image/png", {}, 413),
        ("lesion.jpg", sample, "image/jpeg", {"age": "300"}, 422),
        ("lesion.jpg", sample, "image/jpeg", {"sex": "yes"}, 422),
    ]


def _run(client: httpx.Client, jobs: list) -> list[tuple[int, int, str]]:
    """POST every job, ``CONCURRENCY`` at a time: (job index, status, error code)."""
    results: list[tuple[int, int, str]] = []
    lock = threading.Lock()
    cursor = iter(range(len(jobs)))

    def worker() -> None:
        while True:
            with lock:
                i = next(cursor, None)
            if i is None:
                return
            name, data, ctype, fields, _ = jobs[i]
            r = client.post(
                "/predict", files={"file": (name, data, ctype)}, data=fields
            )
            error = r.json().get("error", "") if r.status_code != 200 else ""
            with lock:
                results.append((i, r.status_code, error))

    threads = [threading.Thread(target=worker) for _ in range(CONCURRENCY)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_soak_300_requests_8_concurrent_20_percent_broken(
    tmp_path, samples_dir: Path
) -> None:
    good = [p.read_bytes() for p in sorted((samples_dir / "images").glob("*.jpg"))]
    broken = _broken(good[0])
    env = {"SLC_MODEL": str(tiny_checkpoint(tmp_path)), "SLC_THREADS": "1"}
    jobs = []
    for i in range(REQUESTS):
        if i % 5 == 4:
            jobs.append(broken[(i // 5) % len(broken)])
        else:
            jobs.append(("ok.jpg", good[i % len(good)], "image/jpeg", {}, 200))
    with LocalServer(env, log_path=tmp_path / "serve.log") as server:
        pid = server.proc.pid
        limits = httpx.Limits(max_connections=CONCURRENCY)
        with httpx.Client(base_url=server.url, timeout=60, limits=limits) as client:
            warm = _run(client, jobs[:WARMUP])  # the same mix, as concurrent
            assert len(warm) == WARMUP
            time.sleep(0.5)
            before = memory_mib(pid)
            t0 = time.perf_counter()
            results = _run(client, jobs)
            elapsed = time.perf_counter() - t0
            time.sleep(0.5)
            after = memory_mib(pid)
    statuses = Counter(status for _, status, _ in results)
    print(  # noqa: T201 - the figures, for the record (pytest -s)
        f"soak: {len(results)} requests in {elapsed:.1f} s, statuses {dict(statuses)}, "
        f"RSS {before:.0f} -> {after:.0f} MiB"
    )
    assert len(results) == REQUESTS
    assert not [s for s in statuses if s >= 500], statuses
    for i, status, error in results:
        expected = jobs[i][4]
        assert status == expected, (jobs[i][0], jobs[i][3], status, error)
        if expected != 200:
            assert error, jobs[i][0]  # a JSON error code, not a bare status
    assert elapsed < TIME_BOUND_S
    assert after - before < RSS_GROWTH_MIB, (before, after)
