"""Service configuration: every knob of the HTTP service, each with its one default here.

Values come from keyword arguments or ``SLC_*`` environment variables (the ``serve``
command sets the variables from its flags, so its flags default to "not given").
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from skin_lesion_classifier.data.images import MAX_PIXELS


def _env_number(name: str, default: int | float) -> int | float:
    """``$name`` as a number of ``default``'s type (int or float); ``default`` when unset
    or blank. A value that does not parse raises ``ValueError`` naming the variable."""
    value = os.environ.get(name)
    if value is None or not value.strip():
        return default
    kind = type(default)
    try:
        return kind(value)
    except ValueError as exc:
        what = "an integer" if kind is int else "a number"
        raise ValueError(f"{name}={value!r} is not {what}") from exc


def env_header_timeout_s() -> float:
    """``SLC_HEADER_TIMEOUT_S``: seconds a client has to send a request's line and headers
    (read by the server's connection protocol, :mod:`skin_lesion_classifier.api.protocol`)."""
    return float(_env_number("SLC_HEADER_TIMEOUT_S", 10.0))


def _env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or not value.strip():
        return default
    return value.strip().lower() not in ("0", "false", "no", "off")


@dataclass
class ServiceSettings:
    """Service configuration, from keyword arguments or ``SLC_*`` environment variables.

    * ``model`` (``SLC_MODEL``): model reference, default ``data/06_models/model.pt``.
    * ``backend`` (``SLC_BACKEND``): ``auto`` (by suffix), ``torch`` or ``onnx``.
    * ``explain_checkpoint`` (``SLC_EXPLAIN_CHECKPOINT``): a ``.pt`` checkpoint loaded beside
      an ONNX model so ``/explain`` works.
    * ``device`` (``SLC_DEVICE``): ``cpu`` (default), ``cuda``, ``mps`` or ``auto``.
    * ``max_upload_bytes`` (``SLC_MAX_UPLOAD_BYTES``): largest accepted picture, 10 MiB.
    * ``max_pixels`` (``SLC_MAX_PIXELS``): largest accepted picture in pixels, read from
      its header before decoding (413 above it); default the engine's ``MAX_PIXELS``.
    * ``decode_concurrency`` (``SLC_DECODE_CONCURRENCY``): pictures decoded and resized at
      once for ``/predict``, 2 (peak memory grows with it).
    * ``predict_queue`` (``SLC_PREDICT_QUEUE``): ``/predict`` requests allowed to wait for a
      decode slot, 32; more get 503 with ``Retry-After``.
    * ``explain_queue`` (``SLC_EXPLAIN_QUEUE``): ``/explain`` requests allowed to wait while
      one Grad-CAM runs, 4; more get 503 with ``Retry-After``.
    * ``body_timeout_s`` (``SLC_BODY_TIMEOUT_S``): seconds a client has to send a whole
      request body, 30; a slower upload gets 408.
    * ``header_timeout_s`` (``SLC_HEADER_TIMEOUT_S``): seconds a client has, from the
      moment it connects (or starts its next request), to send the request line and
      headers, 10; a slower client gets 408 and its connection is closed (uvicorn itself
      has no such limit; see :mod:`skin_lesion_classifier.api.protocol`).
    * ``docs`` (``SLC_DOCS``): serve ``/docs`` (Swagger UI from local files) and
      ``/openapi.json``, on by default; ``SLC_DOCS=0`` turns both off.
    * ``threads`` (``SLC_THREADS``): intra-op threads for torch / ONNX Runtime (0 = default).
    * ``decision_file`` (``SLC_DECISION``): evaluation's ``decision_rule.json`` to apply;
      default: the checkpoint meta's rule, else ``decision_rule.json`` beside the model.
    * ``tracking_uri`` (``MLFLOW_TRACKING_URI``): for ``runs:/`` and ``models:/`` references,
      default ``sqlite:///mlflow.db``.
    """

    model: str = field(
        default_factory=lambda: os.environ.get("SLC_MODEL", "data/06_models/model.pt")
    )
    backend: str = field(default_factory=lambda: os.environ.get("SLC_BACKEND", "auto"))
    explain_checkpoint: str | None = field(
        default_factory=lambda: os.environ.get("SLC_EXPLAIN_CHECKPOINT") or None
    )
    device: str = field(default_factory=lambda: os.environ.get("SLC_DEVICE", "cpu"))
    max_upload_bytes: int = field(
        default_factory=lambda: _env_number("SLC_MAX_UPLOAD_BYTES", 10 * 1024 * 1024)
    )
    max_pixels: int = field(
        default_factory=lambda: _env_number("SLC_MAX_PIXELS", MAX_PIXELS)
    )
    decode_concurrency: int = field(
        default_factory=lambda: _env_number("SLC_DECODE_CONCURRENCY", 2)
    )
    predict_queue: int = field(
        default_factory=lambda: _env_number("SLC_PREDICT_QUEUE", 32)
    )
    explain_queue: int = field(
        default_factory=lambda: _env_number("SLC_EXPLAIN_QUEUE", 4)
    )
    body_timeout_s: float = field(
        default_factory=lambda: _env_number("SLC_BODY_TIMEOUT_S", 30.0)
    )
    header_timeout_s: float = field(default_factory=env_header_timeout_s)
    docs: bool = field(default_factory=lambda: _env_flag("SLC_DOCS", True))
    threads: int = field(default_factory=lambda: _env_number("SLC_THREADS", 0))
    decision_file: str | None = field(
        default_factory=lambda: os.environ.get("SLC_DECISION") or None
    )
    tracking_uri: str = field(
        default_factory=lambda: os.environ.get(
            "MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"
        )
    )

    def __post_init__(self) -> None:
        positive = {
            "max_upload_bytes": self.max_upload_bytes,
            "max_pixels": self.max_pixels,
            "decode_concurrency": self.decode_concurrency,
            "body_timeout_s": self.body_timeout_s,
            "header_timeout_s": self.header_timeout_s,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(
                    f"service setting {name} must be positive, got {value}"
                )
        for name in ("predict_queue", "explain_queue", "threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"service setting {name} must be >= 0")
