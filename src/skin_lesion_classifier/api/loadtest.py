"""A bounded load test of the running service: fixed request count, time cap, loopback only.

``concurrency`` worker threads share one ``httpx.Client`` and POST pictures to
``/predict`` until ``n_requests`` have been sent or ``time_cap_s`` has passed, whichever
comes first. Only loopback URLs are accepted.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx

from skin_lesion_classifier.inference.bench import summarize_ms

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def load_test(
    base_url: str,
    images: Sequence[str | Path],
    n_requests: int = 200,
    concurrency: int = 4,
    time_cap_s: float = 60.0,
    endpoint: str = "/predict",
) -> dict[str, Any]:
    """Requests per second, latency summary and error count of ``POST endpoint``."""
    host = urlparse(base_url).hostname
    if host not in LOOPBACK_HOSTS:
        raise ValueError(f"load tests only target loopback addresses, not {host!r}")
    if not images:
        raise ValueError("no images to send")
    payloads = [(Path(p).name, Path(p).read_bytes()) for p in images]
    lock = threading.Lock()
    counter = {"next": 0}
    latencies: list[float] = []
    errors: dict[str, int] = {}
    deadline = time.monotonic() + time_cap_s

    def worker(client: httpx.Client) -> None:
        while time.monotonic() < deadline:
            with lock:
                i = counter["next"]
                if i >= n_requests:
                    return
                counter["next"] += 1
            name, data = payloads[i % len(payloads)]
            t0 = time.perf_counter()
            try:
                r = client.post(endpoint, files={"file": (name, data, "image/jpeg")})
                ok, key = r.status_code == 200, str(r.status_code)
            except httpx.HTTPError as exc:
                ok, key = False, type(exc).__name__
            dt = time.perf_counter() - t0
            with lock:
                if ok:
                    latencies.append(dt)
                else:
                    errors[key] = errors.get(key, 0) + 1

    limits = httpx.Limits(
        max_connections=concurrency, max_keepalive_connections=concurrency
    )
    with httpx.Client(base_url=base_url, timeout=60.0, limits=limits) as client:
        t0 = time.perf_counter()
        threads = [
            threading.Thread(target=worker, args=(client,)) for _ in range(concurrency)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - t0
    done = len(latencies)
    return {
        "requests_ok": done,
        "errors": errors,
        "elapsed_s": elapsed,
        "requests_per_s": done / elapsed if elapsed > 0 else 0.0,
        "concurrency": concurrency,
        "capped_by_time": counter["next"] < n_requests,
        "latency": summarize_ms(latencies) if latencies else None,
    }
