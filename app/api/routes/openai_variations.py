"""OpenAI-compatible `POST /v1/images/variations` (synchronous, multipart like OpenAI's SDKs send).

The job is an ordinary variations job (see app.api.routes.variations); this route waits for it
like `POST /v1/images/generations` does and answers in OpenAI's shape, errors included.
"""

from __future__ import annotations

import hashlib
import uuid
from functools import partial
from typing import Any, Literal

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException

from app.api.bodies import header, header_parameters, validation_error
from app.api.deps import JobsDep, PrincipalDep, RedisDep, SettingsDep, StoreDep, images_charged
from app.api.errors import HTTP_CODES
from app.api.openai_schemas import ImagesResponse, null_is_default
from app.api.routes.openai import (
    OPENAI_ERRORS,
    OpenAIError,
    OpenAIRoute,
    answer_with_images,
    check_model_and_size,
    require_worker,
)
from app.api.routes.variations import store_input
from app.api.uploads import normalized_png, read_upload
from app.core import errors
from app.core.images import MAX_INPUT_BYTES
from app.core.jobs import MAX_SEED, TASK_VARIATIONS, Scheduler
from app.core.variations import VariationParams

router = APIRouter(prefix="/v1", tags=["openai"], route_class=OpenAIRoute)


class ImagesVariationRequest(BaseModel):
    """The form fields besides `image`: OpenAI's, then ours."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str | None = Field(None, max_length=200)
    n: int = Field(1, ge=1, le=10)
    size: str | None = None
    response_format: Literal["url", "b64_json"] = "url"
    user: str | None = Field(None, max_length=256)
    prompt: str = Field("", max_length=1000)
    strength: float = Field(0.75, ge=0.001, le=1)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    num_inference_steps: int | None = Field(None, ge=1, le=150)
    guidance_scale: float | None = Field(None, ge=0, le=30)
    scheduler: Scheduler | None = None

    _null_is_default = null_is_default("n", "response_format")  # as on /v1/images/generations


_FORM = {
    "type": "object",
    "required": ["image"],
    "properties": {
        "image": {"type": "string", "format": "binary", "description": f"PNG, JPEG or WebP, ≤ {MAX_INPUT_BYTES} bytes"},
        "model": {"type": "string"},
        "n": {"type": "integer", "minimum": 1, "maximum": 10},
        "size": {"type": "string", "description": '"WxH", or "auto" (the model\'s native size, as when left out)'},
        "response_format": {"type": "string", "enum": ["url", "b64_json"]},
        "user": {"type": "string"},
        "prompt": {"type": "string"},
        "strength": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "seed": {"type": "integer", "minimum": 0, "maximum": MAX_SEED},
        "num_inference_steps": {"type": "integer", "minimum": 1, "maximum": 150},
        "guidance_scale": {"type": "number", "minimum": 0, "maximum": 30},
        "scheduler": {"type": "string", "enum": [s.value for s in Scheduler]},
    },
    "additionalProperties": False,
}


def _fields(raw: dict[str, Any]) -> ImagesVariationRequest:
    try:
        return ImagesVariationRequest.model_validate(raw)
    except ValidationError as exc:  # OpenAIRoute answers it in OpenAI's shape
        raise validation_error(exc) from None


def _field_of(exc: Exception) -> str | None:
    """The request field an error of ours is about (its `details` location), else None."""
    details = getattr(exc, "details", None)
    loc = details[0].get("loc") if isinstance(details, list) and details and isinstance(details[0], dict) else None
    return str(loc[1]) if isinstance(loc, list) and len(loc) > 1 else None


def _openai_error(exc: HTTPException | errors.ImagegenError, param: str | None) -> OpenAIError:
    """Our error in OpenAI's shape (OpenAIRoute maps only our own errors, not these)."""
    if isinstance(exc, HTTPException):
        code = HTTP_CODES.get(exc.status_code, "invalid_request")  # e.g. unsupported_media_type
        return OpenAIError(exc.status_code, str(exc.detail), param=param, code=code)
    status = 413 if isinstance(exc, errors.PayloadTooLargeError) else 400
    return OpenAIError(status, exc.message, param=param, code=exc.code)


@router.post(
    "/images/variations",
    response_model=ImagesResponse,
    response_model_exclude_none=True,
    responses={**OPENAI_ERRORS, 413: OPENAI_ERRORS["default"], 415: OPENAI_ERRORS["default"]},
    openapi_extra={
        "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": _FORM}}},
        "parameters": header_parameters(
            idempotency_key="Repeating an upload with the same key waits for the original job instead of queueing "
            "another (for 24 h)",
        ),
    },
    summary="OpenAI-compatible image variations (waits for the result)",
)
async def create_variations(
    request: Request,
    response: Response,
    jobs: JobsDep,
    store: StoreDep,
    settings: SettingsDep,
    principal: PrincipalDep,
    redis: RedisDep,
) -> ImagesResponse:
    """`client.images.create_variation(image=open("in.png", "rb"), n=2, size="512x512")` works
    against this route; the variations are made as in `POST /variations`. An `Idempotency-Key`
    makes the SDK's retry of a call whose connection broke wait for the first job, as on
    `/v1/images/generations`."""
    idempotency_key = header(request, "idempotency-key")
    try:  # the body: `param` names the field at fault, if any (a body that is not an object has none)
        upload = await read_upload(request)
        fields = _fields(upload.fields)
    except (HTTPException, errors.ImagegenError) as exc:
        raise _openai_error(exc, _field_of(exc)) from None
    try:  # the image itself
        png = await normalized_png(upload, fit=max(settings.max_width, settings.max_height))
    except (HTTPException, errors.ImagegenError) as exc:
        raise _openai_error(exc, "image") from None
    width, height = await check_model_and_size(fields.model, fields.size, settings, redis)
    params = VariationParams(
        prompt=fields.prompt,
        num_images=fields.n,
        width=width,
        height=height,
        strength=fields.strength,
        seed=fields.seed,
        num_inference_steps=fields.num_inference_steps,
        guidance_scale=fields.guidance_scale,
        scheduler=fields.scheduler,
    )

    def body_hash() -> str:
        digest = hashlib.sha256(b"/v1/images/variations:" + png)
        digest.update(fields.model_dump_json().encode())
        return digest.hexdigest()

    async with jobs.idempotent(idempotency_key, body_hash, principal.owner, TASK_VARIATIONS) as (job_id, existing):
        if existing is not None:
            placed_id = existing.id
        else:
            submit = partial(
                jobs.submit,
                params,
                job_id=job_id or str(uuid.uuid4()),
                owner=principal.owner,
                max_queued=principal.max_queued,
                model=fields.model,
                task=TASK_VARIATIONS,
                before=store_input(png, jobs.event_ttl),
            )
            async with images_charged(redis, principal, params.num_images, settings):
                await require_worker(fields.model, settings, redis)
                placed_id = (await run_in_threadpool(submit)).id
    return await answer_with_images(placed_id, fields.response_format, request, response, jobs, store, settings)
