"""The FastAPI service: predictions, Grad-CAM explanations and an upload page.

Run it with ``skin-lesion-classifier serve`` (or ``uvicorn
skin_lesion_classifier.api.app:create_app --factory --no-server-header``). The model is
loaded once, at start-up, from ``SLC_MODEL`` (a ``.pt`` checkpoint, an ``.onnx`` export,
``runs:/<id>/model`` or ``models:/<name>/<version>``); see :class:`ServiceSettings` for
every knob. The app is built here from its parts: :mod:`.routes` (the endpoints),
:mod:`.schemas` (requests, answers, errors), :mod:`.page` (upload page and docs),
:mod:`.middleware` (body limits, security headers) and :mod:`.gates` (bounded queues).

``/predict`` and ``/explain`` take the picture (multipart field ``file``; JPEG, PNG, TIFF,
BMP, WebP or the first frame of a GIF, at most ``SLC_MAX_PIXELS`` pixels) and, optionally,
the patient's ``age`` (years, 0-120), ``sex`` (``male``/``female``/``unknown``) and
``localization`` (free text; sites unseen in training fall into the encoder's ``other``
bucket) as form fields. A model that fuses metadata (a fusion model, or an ensemble with a
fusion member) uses them, any left out counting as unknown; an image-only model ignores
them, and every answer says which (``metadata`` in the JSON, ``X-Metadata`` on
``/explain``). ``GET /model`` says whether the model uses metadata, which fields it accepts
and, for an ensemble, its members and weights. Answers name the model by its id and file
name, never by a local path.

Every error is JSON ``{"error": <short code>, "detail": <what went wrong>}`` with a 4xx
status for bad input (400 empty upload, 408 body too slow, 413 too many bytes or pixels,
415 wrong content type or an image format outside the allow-list, 422 not a decodable
image, invalid patient metadata (``error: invalid_metadata``, plus ``field``) or a
malformed request), 503 with ``Retry-After`` when a queue is full, and 501 for
``/explain`` when only an ONNX model is loaded.
"""

from __future__ import annotations

import logging
import threading
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from skin_lesion_classifier import __version__
from skin_lesion_classifier.api.gates import Gate
from skin_lesion_classifier.api.middleware import BodyError, BodyGuard, SecurityHeaders
from skin_lesion_classifier.api.page import add_docs, add_page
from skin_lesion_classifier.api.routes import router
from skin_lesion_classifier.api.schemas import PATIENT_FIELDS, APIError, error_response
from skin_lesion_classifier.api.settings import ServiceSettings
from skin_lesion_classifier.constants import CLASS_NAMES, CLASSES

__all__ = ["ServiceSettings", "create_app", "load_predictor_for"]

logger = logging.getLogger(__name__)

#: Room left for multipart boundaries and headers on top of the picture size limit.
MULTIPART_SLACK = 64 * 1024
#: Characters of an offending value quoted in a validation error.
QUOTE_CHARS = 60


def create_app(
    settings: ServiceSettings | None = None, predictor: Any = None
) -> FastAPI:
    """Build the service. The model is loaded in the lifespan (once, at start-up) unless a
    ready ``predictor`` is given."""
    settings = settings or ServiceSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.predictor = (
            predictor if predictor is not None else load_predictor_for(settings)
        )
        app.state.lock = threading.Lock()
        app.state.decode_gate = Gate(
            "/predict", settings.decode_concurrency, settings.predict_queue,
            "SLC_PREDICT_QUEUE",
        )  # fmt: skip
        app.state.explain_gate = Gate(
            "/explain", 1, settings.explain_queue, "SLC_EXPLAIN_QUEUE", retry_after_s=2
        )
        logger.info(
            "Serving %s (%s)", app.state.predictor.version, app.state.predictor.backend
        )
        yield
        app.state.predictor = None

    app = FastAPI(
        title="skin-lesion-classifier",
        version=__version__,
        summary="7-class dermoscopy classifier (HAM10000): predictions and Grad-CAM explanations.",
        description=(
            "Research software, not a medical device. Classes: "
            + ", ".join(f"`{c}` {CLASS_NAMES[c]}" for c in CLASSES)
            + ". Errors are JSON `{error, detail}`."
        ),
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json" if settings.docs else None,
    )
    app.state.settings = settings
    app.state.predictor = None
    app.add_middleware(
        BodyGuard,
        limit=settings.max_upload_bytes + MULTIPART_SLACK,
        upload_limit=settings.max_upload_bytes,
        timeout_s=settings.body_timeout_s,
    )
    app.add_middleware(SecurityHeaders)
    _add_error_handlers(app)
    app.include_router(router)
    app.openapi = lambda: _openapi(app)
    add_page(app)
    if settings.docs:
        add_docs(app)
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema, with optional form fields and query parameters stated as their
    type alone: they are optional by not being required, and a form or a query string
    cannot carry a JSON ``null``, so ``anyOf [type, null]`` would promise what no client
    can send."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(
            title=app.title,
            version=app.version,
            summary=app.summary,
            description=app.description,
            routes=app.routes,
        )
        for name, body in schema.get("components", {}).get("schemas", {}).items():
            if name.startswith("Body_"):
                for field, prop in body.get("properties", {}).items():
                    body["properties"][field] = _without_null(prop)
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                for param in operation.get("parameters", []):
                    param["schema"] = _without_null(param["schema"])
        app.openapi_schema = schema
    return app.openapi_schema


def _without_null(prop: dict[str, Any]) -> dict[str, Any]:
    options = prop.get("anyOf")
    if not options:
        return prop
    kept = [o for o in options if o != {"type": "null"}]
    if len(kept) != 1 or len(kept) == len(options):
        return prop
    rest = {k: v for k, v in prop.items() if k != "anyOf"}
    return {**kept[0], **rest}


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.error, exc.detail, exc.field, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(
        request: Request, exc: RequestValidationError
    ) -> JSONResponse:
        return validation_error_response(request, exc.errors())

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(
        request: Request, exc: StarletteHTTPException
    ) -> JSONResponse:
        if isinstance(exc.__cause__, BodyError):  # FastAPI wraps body parsing errors
            cause = exc.__cause__
            return error_response(
                cause.status, cause.error, str(cause), headers={"Connection": "close"}
            )
        return error_response(
            exc.status_code, _code(exc.status_code), exc.detail, headers=exc.headers
        )


def validation_error_response(request: Request, errors: list[dict]) -> JSONResponse:
    """415 for a POST that is not multipart; 422 ``invalid_metadata`` naming the first bad
    patient field; else 422 ``invalid_request`` listing what is wrong."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if request.method == "POST" and ctype != "multipart/form-data":
        return error_response(
            415,
            "unsupported_media_type",
            f"request content type {ctype or 'none'!r}: send the picture as "
            "multipart/form-data in a field named 'file'",
        )
    for e in errors:
        loc = tuple(e.get("loc", ()))
        if len(loc) == 2 and loc[0] == "body" and loc[1] in PATIENT_FIELDS:
            return error_response(
                422, "invalid_metadata", f"{loc[1]}: {_describe(e)}", field=loc[1]
            )
    details = "; ".join(
        f"{'.'.join(str(x) for x in e.get('loc', ()))}: {_describe(e)}" for e in errors
    )
    return error_response(422, "invalid_request", details)


def _describe(error: dict) -> str:
    text = str(error.get("msg", "invalid"))
    value = error.get("input")
    if isinstance(value, str | int | float):
        quoted = repr(value)
        if len(quoted) > QUOTE_CHARS:
            quoted = quoted[:QUOTE_CHARS] + "..."
        text += f" (got {quoted})"
    return text


def _code(status: int) -> str:
    return {
        400: "bad_request",
        404: "not_found",
        405: "method_not_allowed",
        408: "request_timeout",
        413: "payload_too_large",
        415: "unsupported_media_type",
        422: "invalid_request",
        501: "not_implemented",
        503: "unavailable",
    }.get(status, "error")


def load_predictor_for(settings: ServiceSettings) -> Any:
    """The predictor ``settings`` name (raises ``FileNotFoundError`` / ``ValueError``
    naming the model file when it cannot be loaded)."""
    from skin_lesion_classifier.api.model_source import open_predictor
    from skin_lesion_classifier.device import detect_device

    if settings.threads:
        import torch

        torch.set_num_threads(settings.threads)
    return open_predictor(
        settings.model,
        backend=settings.backend,
        device=detect_device(settings.device),
        explain_checkpoint=settings.explain_checkpoint,
        tracking_uri=settings.tracking_uri,
        decision_file=settings.decision_file,
        threads=settings.threads,
    )
