"""What the service's requests and answers look like: the response models, the form
fields (typed, so the OpenAPI schema states what the server enforces) and the error shape.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import File, Form, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from skin_lesion_classifier.constants import CLASSES

#: Accepted patient ages (years).
AGE_RANGE = (0.0, 120.0)
#: Accepted values of the ``sex`` form field (leave the field out when unknown).
SEX_VALUES = ("male", "female", "unknown")
#: Longest accepted ``localization`` text.
MAX_LOCALIZATION_CHARS = 64
#: The form fields that carry patient metadata, in the order errors name them.
PATIENT_FIELDS = ("age", "sex", "localization")

Sex = Literal["male", "female", "unknown"]
ClassCode = Literal[tuple(CLASSES)]  # type: ignore[valid-type]


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
        description="where the rule came from: checkpoint meta, a decision file's name, "
        "or none"
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
    version: str = Field(
        description="model id: registry name/version, run id or file digest"
    )
    source: str = Field(
        description="the model's file name (or its MLflow URI); never a local path"
    )
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
    max_pixels: int = Field(description="largest accepted picture, width x height")


class Health(BaseModel):
    status: str
    model_loaded: bool
    model_version: str | None
    backend: str | None
    service_version: str


class APIError(Exception):
    """A request error turned into ``{"error", "detail"}`` JSON with ``status`` (and
    ``field`` when one form field is to blame, ``headers`` such as ``Retry-After``)."""

    def __init__(
        self,
        status: int,
        error: str,
        detail: Any,
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(detail)
        self.status, self.error, self.detail, self.field = status, error, detail, field
        self.headers = headers


def error_response(
    status: int,
    error: str,
    detail: Any,
    field: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """``{"error", "detail"}`` (plus ``field``) JSON with ``status``."""
    content = {"error": error, "detail": detail}
    if field is not None:
        content["field"] = field
    return JSONResponse(status_code=status, content=content, headers=headers)


def upload_file():
    return File(
        description="a dermoscopy picture (JPEG, PNG, TIFF, BMP, WebP or GIF), not empty",
        json_schema_extra={"minLength": 1},
    )


def age_form():
    return Form(
        None,
        ge=AGE_RANGE[0],
        le=AGE_RANGE[1],
        allow_inf_nan=False,
        description="patient age in years (0-120); leave out when unknown",
    )


def sex_form():
    return Form(
        None,
        description="male, female or unknown; leave out when unknown",
    )


def site_form():
    return Form(
        None,
        max_length=MAX_LOCALIZATION_CHARS,
        pattern=r"^[^\x00-\x1f\x7f]*$",
        description="anatomical site, e.g. back, face, lower extremity (free text, at most "
        f"{MAX_LOCALIZATION_CHARS} printable characters; sites unseen in training count as "
        "'other'); leave out when unknown",
    )


def class_query():
    return Query(None, description="class to explain; default: the top class")


def patient_fields(
    age: float | None, sex: str | None, localization: str | None
) -> dict[str, Any]:
    """The validated form fields as the predictor takes them (blank = ``None`` = unknown;
    the site lower-cased, runs of white space made one space)."""
    site = " ".join(localization.split()).lower() if localization else None
    return {"age": age, "sex": sex, "localization": site or None}
