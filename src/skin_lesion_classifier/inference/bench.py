"""CPU latency and throughput of predictors (PyTorch, ONNX Runtime fp32 / int8).

Latency is one picture per call (``predict`` on a ``(1, H, W, 3)`` batch, normalisation
included); throughput is pictures per second over full batches. Timings use
``time.perf_counter`` after warm-up calls; percentiles are ``numpy.percentile`` (linear).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from skin_lesion_classifier.inference.predictor import Predictor


def summarize_ms(seconds: list[float]) -> dict[str, float]:
    """Median, p95, mean, min (milliseconds) of per-call durations in seconds."""
    ms = np.asarray(seconds, dtype=np.float64) * 1000.0
    return {
        "median_ms": float(np.median(ms)),
        "p95_ms": float(np.percentile(ms, 95)),
        "mean_ms": float(ms.mean()),
        "min_ms": float(ms.min()),
        "n": int(ms.size),
    }


def single_image_latency(
    predictor: Predictor, images: np.ndarray, n: int = 50, warmup: int = 5
) -> dict[str, float]:
    """Per-call latency of ``predictor.predict`` on one picture, cycling through ``images``."""
    if len(images) == 0:
        raise ValueError("no images to benchmark with")
    for i in range(warmup):
        predictor.predict(images[i % len(images)][None])
    times = []
    for i in range(n):
        x = images[i % len(images)][None]
        t0 = time.perf_counter()
        predictor.predict(x)
        times.append(time.perf_counter() - t0)
    return summarize_ms(times)


def throughput(
    predictor: Predictor, images: np.ndarray, batch_size: int = 16, n_batches: int = 5
) -> dict[str, float]:
    """Pictures per second over ``n_batches`` batches of ``batch_size`` (after one warm-up)."""
    reps = int(np.ceil(batch_size / len(images)))
    batch = np.concatenate([images] * reps)[:batch_size]
    predictor.predict(batch)
    t0 = time.perf_counter()
    for _ in range(n_batches):
        predictor.predict(batch)
    elapsed = time.perf_counter() - t0
    return {
        "images_per_s": float(batch_size * n_batches / elapsed),
        "batch_size": batch_size,
        "n_batches": n_batches,
    }


def bench_predictor(
    predictor: Predictor,
    images: np.ndarray,
    n: int = 50,
    batch_size: int = 16,
    n_batches: int = 5,
) -> dict[str, Any]:
    """:func:`single_image_latency` and :func:`throughput` of one predictor."""
    return {
        "backend": predictor.backend,
        "version": predictor.version,
        "latency": single_image_latency(predictor, images, n=n),
        "throughput": throughput(
            predictor, images, batch_size=batch_size, n_batches=n_batches
        ),
    }
