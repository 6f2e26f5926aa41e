"""POST /variations: variations of an uploaded image, as an ordinary job.

The image comes as a multipart file part or as base64 in JSON; the API decodes it fully,
re-encodes it as PNG and stores it in Redis under a key derived from the job id (with a TTL),
so the job payload itself stays small JSON. How the worker makes variations depends on the model
family (worker.variations): the CLIP image embedding on Kandinsky 2.2, img2img elsewhere.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from pydantic import ConfigDict, Field, ValidationError
from redis.client import Pipeline

from app.api.bodies import inline_schema, validation_error
from app.api.deps import JobsDep, PrincipalDep, RedisDep, SettingsDep, images_charged
from app.api.routes.generate import image_url, jobs_url
from app.api.schemas import SUBMIT_RESPONSES, ErrorEnvelope, JobView
from app.api.uploads import Upload, normalized_png, read_upload
from app.core.config import Settings
from app.core.errors import InvalidRequestError, UnavailableError
from app.core.images import MAX_INPUT_BYTES, MAX_INPUT_SIDE
from app.core.jobs import TASK_VARIATIONS, Priority, WebhookEvents
from app.core.variations import VariationParams, input_key
from app.core.webhooks import LookupUnavailableError, WebhookTargetError, check_target

router = APIRouter(tags=["variations"])


class VariationRequest(VariationParams):
    """The fields besides `image` (form fields in multipart, keys in JSON)."""

    model_config = ConfigDict(extra="forbid")

    priority: Priority = Field(Priority.normal, description="Queue: high, normal or low.")
    model: str | None = Field(None, max_length=200, description="A model some live worker serves; default ours.")
    webhook: str | None = Field(None, max_length=2000, description="URL that receives signed event POSTs.")
    webhook_events: list[WebhookEvents] = Field(
        default_factory=lambda: [WebhookEvents.completed], description="Which events to send to the webhook."
    )

    def variation_params(self) -> VariationParams:
        return VariationParams.model_validate(self.model_dump(include=set(VariationParams.model_fields)))


def _body_schema() -> dict[str, Any]:
    fields = inline_schema(VariationRequest.model_json_schema())
    image = f"PNG, JPEG or WebP, at most {MAX_INPUT_BYTES} bytes and {MAX_INPUT_SIDE}x{MAX_INPUT_SIDE} pixels"
    multipart = {
        "type": "object",
        "required": ["image"],
        "properties": {"image": {"type": "string", "format": "binary", "description": image}, **fields["properties"]},
        "additionalProperties": False,
    }
    as_json = {
        "type": "object",
        "required": ["image"],
        "properties": {"image": {"type": "string", "description": f"base64 (or a data: URL) of a {image}"}}
        | fields["properties"],
        "additionalProperties": False,
    }
    return {
        "required": True,
        "content": {"multipart/form-data": {"schema": multipart}, "application/json": {"schema": as_json}},
    }


def store_input(png: bytes, input_ttl: int) -> Callable[[Pipeline, str], None]:
    """For JobService.submit's `before`: the input image, written ahead of the job in the same
    round trip (a worker may take the job the moment it is queued)."""

    def before(pipe: Pipeline, job_id: str) -> None:
        pipe.set(input_key(job_id), png, ex=input_ttl)

    return before


def parse_fields(upload: Upload) -> VariationRequest:
    fields = dict(upload.fields)
    if isinstance(fields.get("webhook_events"), str):  # a form field: comma-separated
        fields["webhook_events"] = [e.strip() for e in fields["webhook_events"].split(",") if e.strip()]
    try:
        return VariationRequest.model_validate(fields)
    except ValidationError as exc:
        raise validation_error(exc) from None


def _webhook(fields: VariationRequest, settings: Settings, owner: str | None) -> dict[str, Any] | None:
    """The job's webhook, checked as in POST /generate (resolving the host can block: threadpool)."""
    if fields.webhook is None:
        return None
    if not settings.webhook_secret:
        raise InvalidRequestError(
            "webhooks are disabled on this server (no IMAGEGEN_WEBHOOK_SECRET)", code="validation_error"
        )
    try:
        check_target(fields.webhook, allow_private=settings.webhook_allow_private, owner=owner)
    except LookupUnavailableError as exc:  # the lookup, not the URL: a retry may pass
        raise UnavailableError(f"webhook: {exc}", retry_after=2) from None
    except WebhookTargetError as exc:
        raise InvalidRequestError(f"webhook: {exc}", code="validation_error") from None
    return {"url": fields.webhook, "events": [e.value for e in fields.webhook_events]}


@router.post(
    "/variations",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobView,
    responses={
        200: {"model": JobView, "description": "Repeat of an Idempotency-Key: the original job"},
        **SUBMIT_RESPONSES,
        415: {"model": ErrorEnvelope, "description": "Not multipart/JSON, or the image is not PNG, JPEG or WebP"},
    },
    openapi_extra={"requestBody": _body_schema()},
    summary="Submit an image-variations job",
)
async def create_variations(
    request: Request,
    response: Response,
    jobs: JobsDep,
    settings: SettingsDep,
    principal: PrincipalDep,
    redis: RedisDep,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> JobView:
    """Queue `num_images` variations of an uploaded image; answers like `POST /generate` (202, a
    `Location` to poll, the job). The image is multipart field `image` (a file) or, in JSON,
    `image` as base64. Kandinsky models draw from the image's CLIP embedding; Stable Diffusion
    models re-draw it (img2img) with `strength` (0-1, default 0.75) and an optional `prompt`."""
    upload = await read_upload(request)
    fields = parse_fields(upload)
    png = await normalized_png(upload, fit=max(settings.max_width, settings.max_height))
    params = fields.variation_params()
    principal.check_priority(fields.priority)
    webhook = await run_in_threadpool(_webhook, fields, settings, principal.owner)

    def body_hash() -> str:
        digest = hashlib.sha256(png)
        same = fields.model_copy(update={"model": None}) if fields.model == settings.model else fields  # as /generate
        digest.update(same.model_dump_json().encode())
        return digest.hexdigest()

    async with jobs.idempotent(idempotency_key, body_hash, principal.owner, TASK_VARIATIONS) as (job_id, existing):
        if existing is not None:
            response.status_code = status.HTTP_200_OK
            response.headers["Location"] = f"{jobs_url(request)}/{existing.id}"
            return await run_in_threadpool(jobs.view, existing, image_url(request))
        async with images_charged(redis, principal, params.num_images, settings):
            placed = await run_in_threadpool(
                lambda: jobs.submit(
                    params,
                    priority=fields.priority,
                    job_id=job_id,
                    owner=principal.owner,
                    max_queued=principal.max_queued,
                    model=fields.model,
                    webhook=webhook,
                    task=TASK_VARIATIONS,
                    before=store_input(png, jobs.event_ttl),
                )
            )
    response.headers["Location"] = f"{jobs_url(request)}/{placed.id}"
    return jobs.view_placed(placed)  # no Redis reads for a job just placed
