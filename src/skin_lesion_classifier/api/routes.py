"""The service's endpoints: ``/health``, ``/model``, ``/predict`` and ``/explain``.

Decoding and resizing an upload runs in a worker thread behind a :class:`Gate` (a bounded
number at once, a bounded queue, 503 beyond); the torch model runs one forward pass at a
time. ``/explain`` runs one Grad-CAM at a time behind its own bounded queue.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from skin_lesion_classifier import __version__
from skin_lesion_classifier.api.model_source import is_mlflow_uri
from skin_lesion_classifier.api.schemas import (
    APIError,
    ClassCode,
    DecisionInfo,
    ErrorResponse,
    Health,
    MetadataInfo,
    ModelInfo,
    PredictResponse,
    Sex,
    age_form,
    class_query,
    patient_fields,
    sex_form,
    site_form,
    upload_file,
)
from skin_lesion_classifier.constants import CLASS_NAMES
from skin_lesion_classifier.data.images import (
    ImageDecodeError,
    ImageTooLarge,
    UnsupportedImageFormat,
    load_rgb,
    resize_rgb,
)

#: Content types accepted for an uploaded picture (any ``image/*`` is accepted too).
ACCEPTED_NON_IMAGE_TYPES = ("application/octet-stream",)
#: Labels of a decision rule's origin that are not file paths.
DECISION_LABELS = ("checkpoint meta", "none")

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "empty upload"},
    408: {"model": ErrorResponse, "description": "request body too slow"},
    413: {
        "model": ErrorResponse,
        "description": "upload too large (bytes, or pixels read from the header)",
    },
    415: {
        "model": ErrorResponse,
        "description": "not an image content type, or an image format outside the "
        "allow-list (the detected format is named)",
    },
    422: {
        "model": ErrorResponse,
        "description": "not a decodable image / invalid patient metadata (the field "
        "is named) / malformed request",
    },
    503: {
        "model": ErrorResponse,
        "description": "model not loaded yet, or the queue is full (see Retry-After)",
    },
}

router = APIRouter()


@router.get("/health", response_model=Health, tags=["service"])
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


@router.get("/model", response_model=ModelInfo, tags=["service"])
def model_info(request: Request) -> ModelInfo:
    """The served model: architecture, classes, input size, decision rule and the
    validation metrics it was stored with."""
    info = _predictor(request).describe()
    settings = request.app.state.settings
    info["source"] = public_source(info["source"])
    info["decision"] = public_decision(info["decision"])
    return ModelInfo(
        **info,
        class_names=CLASS_NAMES,
        max_upload_bytes=settings.max_upload_bytes,
        max_pixels=settings.max_pixels,
    )


@router.post(
    "/predict", response_model=PredictResponse, responses=ERRORS, tags=["model"]
)
async def predict(
    request: Request,
    file: UploadFile = upload_file(),
    age: float | None = age_form(),
    sex: Sex | None = sex_form(),
    localization: str | None = site_form(),
) -> PredictResponse:
    """Class probabilities, the decided class and the melanoma flag for one picture,
    with the patient's optional age, sex and localization for models that fuse them."""
    p = _predictor(request)
    patient = patient_fields(age, sex, localization)
    state = request.app.state
    data = await _read_upload(file, state.settings.max_upload_bytes)
    async with state.decode_gate.enter():
        image = await run_in_threadpool(
            _prepare, data, file.filename, p.input_size, state.settings.max_pixels
        )
    extra = _encoded_patient(p, patient)
    probs = await run_in_threadpool(_forward, state, image, extra)
    return _predict_response(p, probs, file.filename, patient)


@router.post(
    "/explain",
    responses={
        200: {"content": {"image/png": {}}, "description": "Grad-CAM overlay (PNG)"},
        501: {
            "model": ErrorResponse,
            "description": "no PyTorch model loaded (ONNX only)",
        },
        **ERRORS,
    },
    response_class=Response,
    tags=["model"],
)
async def explain(
    request: Request,
    file: UploadFile = upload_file(),
    class_name: ClassCode | None = class_query(),
    age: float | None = age_form(),
    sex: Sex | None = sex_form(),
    localization: str | None = site_form(),
) -> Response:
    """Grad-CAM heat map of the top class (or ``class_name``) over the picture, as PNG.
    Headers ``X-Explained-Class``, ``X-Class-Probability``, ``X-Target-Layer`` say what
    it shows; ``X-Metadata`` the patient metadata held fixed (fusion models); for an
    ensemble the map is the weight-averaged Grad-CAM of its members (``X-Target-Layer``
    lists them with their weights, ``X-Gradcam-Members`` which were used)."""
    p = _predictor(request)
    patient = patient_fields(age, sex, localization)
    if p.torch_model is None:
        raise APIError(
            501,
            "explain_unavailable",
            "Grad-CAM needs the PyTorch model; this service runs an ONNX model only. "
            "Start it with SLC_EXPLAIN_CHECKPOINT=<checkpoint.pt> to enable /explain.",
        )
    state = request.app.state
    data = await _read_upload(file, state.settings.max_upload_bytes)
    extra = _encoded_patient(p, patient)
    async with state.explain_gate.enter():
        exp = await run_in_threadpool(
            _explain, state, data, file.filename, class_name, extra
        )
    return Response(
        content=exp.png,
        media_type="image/png",
        headers=_explain_headers(p, exp, patient),
    )


def public_source(source: str) -> str:
    """A model reference fit to show: an MLflow URI as given, a local path's file name."""
    return source if is_mlflow_uri(source) else Path(source).name


def public_decision(decision: dict[str, Any]) -> dict[str, Any]:
    """The decision rule with its ``source`` reduced to a label or a file name."""
    source = decision["source"]
    if source not in DECISION_LABELS:
        source = public_source(source)
    return {**decision, "source": source}


def _predictor(request: Request) -> Any:
    p = request.app.state.predictor
    if p is None:
        raise APIError(503, "unavailable", "the model is not loaded yet")
    return p


async def _read_upload(file: UploadFile, limit: int) -> bytes:
    """The upload's bytes after content-type, size and emptiness checks."""
    name = file.filename or "upload"
    ctype = (file.content_type or "application/octet-stream").split(";")[0]
    ctype = ctype.strip().lower()
    if not (ctype.startswith("image/") or ctype in ACCEPTED_NON_IMAGE_TYPES):
        raise APIError(
            415,
            "unsupported_media_type",
            f"{name}: content type {ctype!r} is not an image; send image/* "
            "(e.g. image/jpeg, image/png)",
        )
    data = await file.read(limit + 1)
    if len(data) > limit:
        raise APIError(
            413, "payload_too_large", f"{name}: larger than the {limit} byte limit"
        )
    if not data:
        raise APIError(400, "empty_upload", f"{name}: empty file (0 bytes)")
    return data


def decode_upload(data: bytes, filename: str | None, max_pixels: int):
    """The upload decoded (allow-listed formats, pixel limit before decoding), or the
    matching 413 / 415 / 422 :class:`APIError` naming the culprit."""
    try:
        return load_rgb(data, name=filename or "upload", max_pixels=max_pixels)
    except ImageTooLarge as exc:
        raise APIError(413, "image_too_large", f"{exc} (SLC_MAX_PIXELS)") from exc
    except UnsupportedImageFormat as exc:
        raise APIError(415, "unsupported_image_format", str(exc)) from exc
    except ImageDecodeError as exc:
        raise APIError(422, "invalid_image", str(exc)) from exc


def _prepare(
    data: bytes, filename: str | None, size: tuple[int, int], max_pixels: int
) -> np.ndarray:
    return resize_rgb(decode_upload(data, filename, max_pixels), size)


def _encoded_patient(p: Any, patient: dict[str, Any]) -> np.ndarray | None:
    try:
        return p.encode_metadata(patient, 1)
    except ValueError as exc:  # the schema already bounds the values
        raise APIError(422, "invalid_metadata", str(exc)) from exc


def _forward(state: Any, image: np.ndarray, extra: np.ndarray | None) -> np.ndarray:
    p = state.predictor
    if p.backend == "torch":
        with state.lock:  # one forward pass at a time through the shared torch model
            return p.predict(image[None], extra)[0]
    return p.predict(image[None], extra)[0]


def _explain(
    state: Any,
    data: bytes,
    filename: str | None,
    class_name: str | None,
    extra: np.ndarray | None,
):
    from skin_lesion_classifier.inference.gradcam import explain

    p = state.predictor
    picture = decode_upload(data, filename, state.settings.max_pixels)
    with state.lock:  # Grad-CAM hooks the shared torch model
        return explain(
            p.torch_model, picture, p.meta, class_name=class_name, metadata=extra
        )


def _explain_headers(p: Any, exp: Any, patient: dict[str, Any]) -> dict[str, str]:
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
    return headers


def _metadata_header(info: dict[str, Any]) -> str:
    """``X-Metadata``: the patient fields as the model read them (ASCII only)."""
    if not info["used"]:
        return "not used (image-only model)"
    age = "unknown" if info["age"] is None else f"{info['age']:g}"
    site = info["localization_bucket"] or "unknown"
    text = f"age={age}; sex={info['sex']}; localization={site}"
    return text.encode("ascii", "replace").decode("ascii")


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
        decision=DecisionInfo(**public_decision(p.decision.as_dict())),
        metadata=MetadataInfo(**p.describe_metadata(patient)),
        model_version=p.version,
        backend=p.backend,
    )
