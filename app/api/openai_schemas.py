"""Request, response and error bodies of the OpenAI-compatible `/v1` API.

Only shapes and pure checks live here; the route (`app.api.routes.openai`) does the work.
Imports pydantic and `app.core` only.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from app.core.jobs import MAX_SEED, GenerationParams, Scheduler, not_bool

SIZE_RE = re.compile(r"^\s*([0-9]{1,5})\s*[xX]\s*([0-9]{1,5})\s*$")  # ASCII digits only (\d takes "６")
SIZE_AUTO = "auto"  # OpenAI's own value (gpt-image-1's default): the model's native size, as no size


def null_is_default(*fields: str) -> Any:
    """A validator that takes JSON `null` for these fields as their default: OpenAI's spec marks
    them nullable with a default, and its SDKs send `null` when a wrapper passes `None`."""

    def default_for_null(cls: type[BaseModel], value: Any, info: ValidationInfo) -> Any:
        if value is None and info.field_name is not None:
            return cls.model_fields[info.field_name].get_default(call_default_factory=True)
        return value

    return field_validator(*fields, mode="before")(default_for_null)


class ImagesGenerationRequest(BaseModel):
    """`POST /v1/images/generations`: OpenAI's fields plus our sampling knobs (`extra_body` in the SDK)."""

    model_config = ConfigDict(
        extra="forbid",
        allow_inf_nan=False,
        json_schema_extra={
            "examples": [
                {"prompt": "a red circle on a blue background", "n": 2, "size": "64x64", "response_format": "url"},
                {"prompt": "a yellow triangle", "response_format": "b64_json", "seed": 7, "num_inference_steps": 20},
            ]
        },
    )

    prompt: str = Field(..., min_length=1, max_length=1000, description="What to draw.")
    model: str | None = Field(None, max_length=200, description="A model a live worker serves (GET /v1/models).")
    n: int = Field(1, ge=1, le=10, description="Images to make; image i uses seed + i.")
    size: str | None = Field(
        None, description='"WxH", multiples of 8 within the server\'s bounds; "auto" or none: the model\'s native size.'
    )
    response_format: Literal["url", "b64_json"] = "url"
    user: str | None = Field(None, max_length=256, description="End-user id; accepted and not stored.")
    safety_identifier: str | None = Field(None, max_length=256, description="As `user`: accepted and not stored.")
    # OpenAI's knobs that have no meaning here: accepted so stock clients work, then ignored.
    quality: str | None = Field(None, description="Ignored.")
    style: str | None = Field(None, description="Ignored.")
    moderation: Literal["auto", "low"] | None = Field(None, description="Ignored.")
    output_compression: int | None = Field(None, ge=0, le=100, description="Ignored: PNGs are lossless.")
    # Those with values we cannot honour take the ones we can, so the rest is refused, not ignored.
    output_format: Literal["png"] | None = Field(None, description="PNG only.")
    background: Literal["auto", "opaque"] | None = Field(None, description="Opaque only (no transparency).")
    stream: Literal[False] | None = Field(None, description="No streaming: follow `/jobs/{id}/events`.")
    partial_images: Literal[0] | None = Field(None, description="None: no streaming.")
    # Ours, beyond OpenAI's API.
    negative_prompt: str | None = Field(None, max_length=1000)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    num_inference_steps: int | None = Field(None, ge=1, le=150)
    guidance_scale: float | None = Field(None, ge=0, le=30)
    scheduler: Scheduler | None = None

    _numbers_not_bool = field_validator("n", "seed", "num_inference_steps", "guidance_scale", mode="before")(
        lambda v: not_bool(v)
    )
    _null_is_default = null_is_default("n", "response_format")


class ImageDatum(BaseModel):
    url: str | None = None
    b64_json: str | None = None
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    created: int = Field(..., description="Unix time the job was created.")
    data: list[ImageDatum]


class OpenAIErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorEnvelope(BaseModel):
    """Every `/v1` error has this shape (OpenAI's), unlike the rest of the API."""

    error: OpenAIErrorBody


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "imagegen"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class SizeError(ValueError):
    """`size` is malformed or out of bounds; the message says which."""


def parse_size(size: str, *, min_size: int, max_width: int, max_height: int) -> tuple[int, int]:
    """ "WxH" -> (width, height), checked against the server's bounds and the multiple-of-8 rule."""
    match = SIZE_RE.match(size)
    if match is None:
        raise SizeError(f"size {size!r} is not of the form WIDTHxHEIGHT, e.g. '512x512' (or 'auto')")
    width, height = int(match[1]), int(match[2])
    for name, value, limit in (("width", width, max_width), ("height", height, max_height)):
        if not min_size <= value <= limit:
            raise SizeError(f"size {size!r}: {name} must be between {min_size} and {limit}")
        if value % 8:
            raise SizeError(f"size {size!r}: {name} must be a multiple of 8")
    return width, height


def to_params(body: ImagesGenerationRequest, width: int | None, height: int | None) -> GenerationParams:
    """Our job parameters for an OpenAI request (size already parsed and checked)."""
    fields: dict[str, Any] = {
        "prompt": body.prompt,
        "negative_prompt": body.negative_prompt,
        "num_images": body.n,
        "width": width,
        "height": height,
        "num_inference_steps": body.num_inference_steps,
        "guidance_scale": body.guidance_scale,
        "seed": body.seed,
        "scheduler": body.scheduler,
    }
    return GenerationParams(**fields)
