"""The FastAPI service: predictions, Grad-CAM explanations and an upload page.

Run it with ``uvicorn skin_lesion_classifier.api.app:create_app --factory`` or
``skin-lesion-classifier serve``. The model is loaded once, at start-up, from
``SLC_MODEL`` (a ``.pt`` checkpoint, an ``.onnx`` export, ``runs:/<id>/model`` or
``models:/<name>/<version>``); see :class:`ServiceSettings` for every knob.

``/predict`` and ``/explain`` take the picture (multipart field ``file``) and, optionally,
the patient's ``age`` (years, 0-120), ``sex`` (``male``/``female``/``unknown``) and
``localization`` (free text; sites unseen in training fall into the encoder's ``other``
bucket) as form fields. A model that fuses metadata (a fusion model, or an ensemble with a
fusion member) uses them, any left out counting as unknown; an image-only model ignores
them, and every answer says which (``metadata`` in the JSON, ``X-Metadata`` on
``/explain``). ``GET /model`` says whether the model uses metadata, which fields it accepts
and, for an ensemble, its members and weights.

Every error is JSON ``{"error": <short code>, "detail": <what went wrong>}`` with a 4xx
status for bad input (400 empty upload, 413 too large, 415 wrong content type, 422 not a
decodable image, invalid patient metadata (``error: invalid_metadata``, plus ``field``) or
a malformed request) and 501 for ``/explain`` when only an ONNX model is loaded.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from skin_lesion_classifier import __version__
from skin_lesion_classifier.constants import CLASS_NAMES, CLASSES
from skin_lesion_classifier.data.images import ImageDecodeError, load_rgb

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
DEFAULT_MAX_UPLOAD_BYTES = 10 * 1024 * 1024
#: Content types accepted for an uploaded picture (any ``image/*`` is accepted too).
ACCEPTED_NON_IMAGE_TYPES = ("application/octet-stream",)
#: Room left for multipart boundaries and headers on top of the picture size limit.
MULTIPART_SLACK = 64 * 1024
#: Accepted patient ages (years).
AGE_RANGE = (0.0, 120.0)
#: Accepted values of the ``sex`` form field (blank = unknown).
SEX_VALUES = ("male", "female", "unknown")
#: Longest accepted ``localization`` text.
MAX_LOCALIZATION_CHARS = 64


@dataclass
class ServiceSettings:
    """Service configuration, from keyword arguments or ``SLC_*`` environment variables.

    * ``model`` (``SLC_MODEL``): model reference, default ``data/06_models/model.pt``.
    * ``backend`` (``SLC_BACKEND``): ``auto`` (by suffix), ``torch`` or ``onnx``.
    * ``explain_checkpoint`` (``SLC_EXPLAIN_CHECKPOINT``): a ``.pt`` checkpoint loaded beside
      an ONNX model so ``/explain`` works.
    * ``device`` (``SLC_DEVICE``): ``cpu`` (default), ``cuda``, ``mps`` or ``auto``.
    * ``max_upload_bytes`` (``SLC_MAX_UPLOAD_BYTES``): largest accepted picture, 10 MiB.
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
        default_factory=lambda: int(
            os.environ.get("SLC_MAX_UPLOAD_BYTES", DEFAULT_MAX_UPLOAD_BYTES)
        )
    )
    threads: int = field(
        default_factory=lambda: int(os.environ.get("SLC_THREADS", "0"))
    )
    decision_file: str | None = field(
        default_factory=lambda: os.environ.get("SLC_DECISION") or None
    )
    tracking_uri: str = field(
        default_factory=lambda: os.environ.get(
            "MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"
        )
    )


# ---------------------------------------------------------------- response schemas
class ErrorResponse(BaseModel):
    error: str = Field(description="short error code, e.g. unsupported_media_type")
    detail: Any = Field(description="what went wrong, naming the culprit")


class DecisionInfo(BaseModel):
    rule: str = Field(
        description="class decision rule: argmax, prior_correction or class_weights"
    )
    melanoma_threshold: float | None = Field(
        description="validated p(mel) threshold; null when none"
    )
    note: str | None = Field(
        description="caveat, e.g. when no validated threshold exists"
    )
    source: str = Field(
        description="where the rule came from: checkpoint meta, a decision file, or none"
    )


class MetadataInfo(BaseModel):
    used: bool = Field(description="whether the model uses patient metadata at all")
    age: float | None = Field(description="age in years as read; null when unknown")
    sex: str = Field(description="male, female or unknown")
    localization: str | None = Field(
        description="anatomical site as read (lower case); null when unknown"
    )
    localization_bucket: str | None = Field(
        description="the encoder's category for the site (the site itself, 'other' for a "
        "site rare or unseen in training, 'unknown'); null for an image-only model"
    )
    unknown: list[str] = Field(description="fields the model saw as unknown")
    note: str = Field(description="how the metadata was used, in words")


class EnsembleMember(BaseModel):
    name: str
    arch: str | None
    weight: float = Field(description="weight in the probability average")
    input_size: list[int]
    uses_metadata: bool
    kept: bool = Field(
        description="false for a zero-weight member left out of the model"
    )


class EnsembleInfo(BaseModel):
    members: list[EnsembleMember]
    objective: str | None = Field(
        description="what the weights were chosen for on validation"
    )


class PredictResponse(BaseModel):
    filename: str | None
    probabilities: dict[str, float] = Field(
        description="softmax probability per class code"
    )
    top_class: str = Field(
        description="the class chosen by the validated decision rule"
    )
    top_class_name: str
    top_probability: float
    melanoma_probability: float
    melanoma_flag: bool = Field(
        description="p(mel) >= validated threshold (or top_class == mel)"
    )
    decision: DecisionInfo
    metadata: MetadataInfo = Field(
        description="the patient metadata as the model saw it"
    )
    model_version: str
    backend: str


class ModelInfo(BaseModel):
    backend: str
    version: str
    source: str
    arch: str | None
    classes: list[str]
    class_names: dict[str, str]
    input_size: list[int]
    mean: list[float]
    std: list[float]
    uses_metadata: bool = Field(
        description="whether the model fuses patient metadata (age, sex, localization)"
    )
    metadata_fields: list[str] = Field(
        description="optional form fields /predict and /explain use (empty: image-only)"
    )
    metadata_sites: list[str] = Field(
        description="localizations with their own category; any other site counts as 'other'"
    )
    ensemble: EnsembleInfo | None = Field(
        description="members and weights when the model is an ensemble"
    )
    decision: DecisionInfo
    metrics: dict[str, Any] = Field(
        description="validation figures stored with the model"
    )
    explainable: bool = Field(description="whether /explain (Grad-CAM) is available")
    max_upload_bytes: int


class Health(BaseModel):
    status: str
    model_loaded: bool
    model_version: str | None
    backend: str | None
    service_version: str


class APIError(Exception):
    """A request error turned into ``{"error", "detail"}`` JSON with ``status`` (and
    ``field`` when one form field is to blame)."""

    def __init__(self, status: int, error: str, detail: Any, field: str | None = None):
        super().__init__(detail)
        self.status, self.error, self.detail, self.field = status, error, detail, field


def _error(
    status: int, error: str, detail: Any, field: str | None = None
) -> JSONResponse:
    content = {"error": error, "detail": detail}
    if field is not None:
        content["field"] = field
    return JSONResponse(status_code=status, content=content)


def parse_patient(
    age: str | None, sex: str | None, localization: str | None
) -> dict[str, Any]:
    """The optional patient form fields, validated: ``{"age": float | None, "sex": str |
    None, "localization": str | None}`` (blank = ``None`` = unknown). Raises
    :class:`APIError` 422 ``invalid_metadata`` naming the field."""
    out: dict[str, Any] = {"age": None, "sex": None, "localization": None}
    if age is not None and age.strip():
        try:
            value = float(age.strip())
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise APIError(
                422,
                "invalid_metadata",
                f"age: {age!r} is not a number; give the age in years "
                f"({AGE_RANGE[0]:g}-{AGE_RANGE[1]:g}) or leave it empty",
                field="age",
            )
        if not AGE_RANGE[0] <= value <= AGE_RANGE[1]:
            raise APIError(
                422,
                "invalid_metadata",
                f"age: {value:g} is outside {AGE_RANGE[0]:g}-{AGE_RANGE[1]:g} years",
                field="age",
            )
        out["age"] = value
    if sex is not None and sex.strip():
        value = sex.strip().lower()
        if value not in SEX_VALUES:
            raise APIError(
                422,
                "invalid_metadata",
                f"sex: {sex!r} is not one of {list(SEX_VALUES)} (or empty)",
                field="sex",
            )
        out["sex"] = value
    if localization is not None and localization.strip():
        value = " ".join(localization.split()).lower()
        if len(value) > MAX_LOCALIZATION_CHARS or not value.isprintable():
            raise APIError(
                422,
                "invalid_metadata",
                f"localization: give a short anatomical site (at most "
                f"{MAX_LOCALIZATION_CHARS} printable characters), e.g. 'back'",
                field="localization",
            )
        out["localization"] = value
    return out


# ---------------------------------------------------------------- upload size limit
class BodyTooLarge(Exception):
    """Raised while reading a request body that grows past the limit."""


class BodySizeLimit:
    """ASGI middleware: refuse request bodies over ``limit`` bytes with 413 JSON.

    A ``Content-Length`` above the limit is refused before the body is read; a body without
    one (chunked) is counted as it arrives and :class:`BodyTooLarge` stops the read (the
    app's error handler turns it into the same 413), so a huge upload is never buffered.
    """

    def __init__(self, app: Any, limit: int, upload_limit: int):
        self.app, self.limit, self.upload_limit = app, limit, upload_limit

    def detail(self, length: int | None = None) -> str:
        size = f"of {length} bytes " if length is not None else ""
        return f"request body {size}exceeds the upload limit of {self.upload_limit} bytes (SLC_MAX_UPLOAD_BYTES)"

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            await _error(413, "payload_too_large", self.detail(int(length)))(
                scope, receive, send
            )
            return
        received = 0
        started = False

        async def counting_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.detail())
            return message

        async def tracking_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge as exc:  # raised outside FastAPI's body parsing
            if not started:
                await _error(413, "payload_too_large", str(exc))(scope, receive, send)


# ---------------------------------------------------------------- the app
def create_app(
    settings: ServiceSettings | None = None, predictor: Any = None
) -> FastAPI:
    """Build the service. The model is loaded in the lifespan (once, at start-up) unless a
    ready ``predictor`` is given."""
    settings = settings or ServiceSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if predictor is not None:
            app.state.predictor = predictor
        else:
            app.state.predictor = _load(settings)
        app.state.lock = threading.Lock()
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
    )
    app.state.settings = settings
    app.add_middleware(
        BodySizeLimit,
        limit=settings.max_upload_bytes + MULTIPART_SLACK,
        upload_limit=settings.max_upload_bytes,
    )
    app.state.predictor = None

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return _error(exc.status, exc.error, exc.detail, exc.field)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(
        request: Request, exc: RequestValidationError
    ) -> JSONResponse:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if request.method == "POST" and ctype != "multipart/form-data":
            return _error(
                415,
                "unsupported_media_type",
                f"request content type {ctype or 'none'!r}: send the picture as "
                "multipart/form-data in a field named 'file'",
            )
        details = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")}
            for e in exc.errors()
        ]
        return _error(422, "invalid_request", details)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(
        request: Request, exc: StarletteHTTPException
    ) -> JSONResponse:
        if isinstance(
            exc.__cause__, BodyTooLarge
        ):  # FastAPI wraps errors of body parsing
            return _error(413, "payload_too_large", str(exc.__cause__))
        return _error(exc.status_code, _code(exc.status_code), exc.detail)

    errors = {
        400: {"model": ErrorResponse, "description": "empty upload"},
        413: {"model": ErrorResponse, "description": "upload too large"},
        415: {"model": ErrorResponse, "description": "not an image content type"},
        422: {
            "model": ErrorResponse,
            "description": "not a decodable image / invalid patient metadata (the field "
            "is named) / malformed request",
        },
    }
    age_form = Form(
        None,
        description="patient age in years (0-120); empty = unknown",
        examples=["45"],
    )
    sex_form = Form(
        None,
        description="male, female or unknown; empty = unknown",
        examples=["female"],
    )
    site_form = Form(
        None,
        description="anatomical site, e.g. back, face, lower extremity; empty = unknown",
        examples=["back"],
    )

    @app.get("/health", response_model=Health, tags=["service"])
    def health(request: Request) -> Health:
        """Liveness and readiness: whether the model is loaded."""
        p = request.app.state.predictor
        return Health(
            status="ok" if p is not None else "loading",
            model_loaded=p is not None,
            model_version=getattr(p, "version", None),
            backend=getattr(p, "backend", None),
            service_version=__version__,
        )

    @app.get("/model", response_model=ModelInfo, tags=["service"])
    def model_info(request: Request) -> ModelInfo:
        """The served model: architecture, classes, input size, decision rule and the
        validation metrics it was stored with."""
        info = _predictor(request).describe()
        return ModelInfo(
            **info, class_names=CLASS_NAMES, max_upload_bytes=settings.max_upload_bytes
        )

    @app.post(
        "/predict", response_model=PredictResponse, responses=errors, tags=["model"]
    )
    async def predict(
        request: Request,
        file: UploadFile = File(description="a dermoscopy picture"),
        age: str | None = age_form,
        sex: str | None = sex_form,
        localization: str | None = site_form,
    ) -> PredictResponse:
        """Class probabilities, the decided class and the melanoma flag for one picture,
        with the patient's optional age, sex and localization for models that fuse them."""
        p = _predictor(request)
        patient = parse_patient(age, sex, localization)
        data = await _read_upload(file, settings.max_upload_bytes)
        probs = await run_in_threadpool(
            _predict_bytes, request.app, data, file.filename, patient
        )
        return _predict_response(p, probs, file.filename, patient)

    @app.post(
        "/explain",
        responses={
            200: {
                "content": {"image/png": {}},
                "description": "Grad-CAM overlay (PNG)",
            },
            501: {
                "model": ErrorResponse,
                "description": "no PyTorch model loaded (ONNX only)",
            },
            **errors,
        },
        response_class=Response,
        tags=["model"],
    )
    async def explain(
        request: Request,
        file: UploadFile = File(description="a dermoscopy picture"),
        class_name: str | None = Query(
            None, description="class to explain; default: the top class"
        ),
        age: str | None = age_form,
        sex: str | None = sex_form,
        localization: str | None = site_form,
    ) -> Response:
        """Grad-CAM heat map of the top class (or ``class_name``) over the picture, as PNG.
        Headers ``X-Explained-Class``, ``X-Class-Probability``, ``X-Target-Layer`` say what
        it shows; ``X-Metadata`` the patient metadata held fixed (fusion models); for an
        ensemble the map is the weight-averaged Grad-CAM of its members (``X-Target-Layer``
        lists them with their weights, ``X-Gradcam-Members`` which were used)."""
        p = _predictor(request)
        patient = parse_patient(age, sex, localization)
        if p.torch_model is None:
            raise APIError(
                501,
                "explain_unavailable",
                "Grad-CAM needs the PyTorch model; this service runs an ONNX model only. "
                "Start it with SLC_EXPLAIN_CHECKPOINT=<checkpoint.pt> to enable /explain.",
            )
        if class_name is not None and class_name not in CLASSES:
            raise APIError(
                422,
                "invalid_request",
                f"unknown class_name {class_name!r}; choose from {list(CLASSES)}",
            )
        data = await _read_upload(file, settings.max_upload_bytes)
        exp = await run_in_threadpool(
            _explain_bytes, request.app, data, file.filename, class_name, patient
        )
        headers = {
            "X-Explained-Class": exp.class_name,
            "X-Class-Probability": f"{exp.probability:.6f}",
            "X-Target-Layer": exp.target_layer,
            "X-Model-Version": p.version,
            "X-Metadata": _metadata_header(p.describe_metadata(patient)),
        }
        if exp.members:
            headers["X-Gradcam-Members"] = "; ".join(
                f"{m['name']} w={m['weight']:.3f} "
                + ("used" if m["used"] else f"not used ({m['reason']})")
                for m in exp.members
            )
        return Response(content=exp.png, media_type="image/png", headers=headers)

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def _code(status: int) -> str:
    return {
        400: "bad_request",
        404: "not_found",
        405: "method_not_allowed",
        413: "payload_too_large",
        415: "unsupported_media_type",
        422: "invalid_request",
        501: "not_implemented",
        503: "unavailable",
    }.get(status, "error")


def _load(settings: ServiceSettings) -> Any:
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


def _predictor(request: Request) -> Any:
    p = request.app.state.predictor
    if p is None:
        raise APIError(503, "unavailable", "the model is not loaded yet")
    return p


async def _read_upload(file: UploadFile, limit: int) -> bytes:
    """The upload's bytes after content-type, size and emptiness checks."""
    ctype = (
        (file.content_type or "application/octet-stream").split(";")[0].strip().lower()
    )
    if not (ctype.startswith("image/") or ctype in ACCEPTED_NON_IMAGE_TYPES):
        raise APIError(
            415,
            "unsupported_media_type",
            f"{file.filename or 'upload'}: content type {ctype!r} is not an image; send image/* "
            "(e.g. image/jpeg, image/png)",
        )
    data = await file.read(limit + 1)
    if len(data) > limit:
        raise APIError(
            413,
            "payload_too_large",
            f"{file.filename or 'upload'}: larger than the {limit} byte limit",
        )
    if not data:
        raise APIError(
            400, "empty_upload", f"{file.filename or 'upload'}: empty file (0 bytes)"
        )
    return data


def _decode(data: bytes, filename: str | None):
    try:
        return load_rgb(data, name=filename or "upload")
    except ImageDecodeError as exc:
        raise APIError(422, "invalid_image", str(exc)) from exc


def _metadata_header(info: dict[str, Any]) -> str:
    """``X-Metadata``: the patient fields as the model read them (ASCII only)."""
    if not info["used"]:
        return "not used (image-only model)"
    age = "unknown" if info["age"] is None else f"{info['age']:g}"
    site = info["localization_bucket"] or "unknown"
    text = f"age={age}; sex={info['sex']}; localization={site}"
    return text.encode("ascii", "replace").decode("ascii")


def _encoded_patient(p: Any, patient: dict[str, Any]) -> np.ndarray | None:
    try:
        return p.encode_metadata(patient, 1)
    except ValueError as exc:  # parse_patient already bounds the values
        raise APIError(422, "invalid_metadata", str(exc)) from exc


def _predict_bytes(
    app: FastAPI, data: bytes, filename: str | None, patient: dict[str, Any]
) -> np.ndarray:
    from skin_lesion_classifier.data.images import resize_rgb

    p = app.state.predictor
    image = resize_rgb(_decode(data, filename), p.input_size)
    extra = _encoded_patient(p, patient)
    if p.backend == "torch":
        with (
            app.state.lock
        ):  # one forward pass at a time through the shared torch model
            return p.predict(image[None], extra)[0]
    return p.predict(image[None], extra)[0]


def _explain_bytes(
    app: FastAPI,
    data: bytes,
    filename: str | None,
    class_name: str | None,
    patient: dict[str, Any],
):
    from skin_lesion_classifier.inference.gradcam import explain

    p = app.state.predictor
    picture = _decode(data, filename)
    extra = _encoded_patient(p, patient)
    with app.state.lock:  # Grad-CAM hooks the shared torch model
        return explain(
            p.torch_model, picture, p.meta, class_name=class_name, metadata=extra
        )


def _predict_response(
    p: Any, probs: np.ndarray, filename: str | None, patient: dict[str, Any]
) -> PredictResponse:
    probs2 = probs[None].astype(np.float64)
    top = int(p.decision.predict(probs2)[0])
    flag = bool(p.decision.flag_melanoma(probs2)[0])
    classes = p.classes
    return PredictResponse(
        filename=filename,
        probabilities={c: float(v) for c, v in zip(classes, probs, strict=True)},
        top_class=classes[top],
        top_class_name=CLASS_NAMES[classes[top]],
        top_probability=float(probs[top]),
        melanoma_probability=float(probs[classes.index("mel")]),
        melanoma_flag=flag,
        decision=DecisionInfo(**p.decision.as_dict()),
        metadata=MetadataInfo(**p.describe_metadata(patient)),
        model_version=p.version,
        backend=p.backend,
    )
