"""POST /generate: validate a request and put it on the queue."""

from __future__ import annotations

import hashlib
from typing import Annotated

from fastapi import APIRouter, Header, Request, Response, status
from fastapi.concurrency import run_in_threadpool

from app.api.deps import JobsDep, PrincipalDep, RedisDep, SettingsDep
from app.api.schemas import ERROR_RESPONSES, GenerateRequest, JobView
from app.core.auth import charge, is_limited
from app.core.errors import InvalidRequestError
from app.core.webhooks import WebhookTargetError, check_target

router = APIRouter(tags=["generate"])


def image_url(request: Request):
    return lambda job_id, i: str(request.url_for("get_image", job_id=job_id, index=str(i)))


@router.post(
    "/generate",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobView,
    responses={
        200: {"model": JobView, "description": "Repeat of an Idempotency-Key: the original job"},
        **ERROR_RESPONSES,
    },
    summary="Submit a text-to-image job",
)
async def generate(
    body: GenerateRequest,
    request: Request,
    response: Response,
    jobs: JobsDep,
    settings: SettingsDep,
    principal: PrincipalDep,
    redis: RedisDep,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> JobView:
    """Queue a job and answer at once with 202, a `Location` to poll and the job as JSON.

    With an `Idempotency-Key` header, repeating the same body returns the original job (200)
    for 24 h; the same key with a different body is a 409.
    """
    # The common request (no webhook, idempotency key or rate limit) is one Redis transaction on
    # the asyncio client and never leaves the event loop; the rest runs in worker threads.
    webhook = None
    if body.webhook is not None:
        if not settings.webhook_secret:
            raise InvalidRequestError(
                "webhooks are disabled on this server (no IMAGEGEN_WEBHOOK_SECRET)", code="validation_error"
            )
        try:  # resolves the host name: blocking
            await run_in_threadpool(check_target, body.webhook, allow_private=settings.webhook_allow_private)
        except WebhookTargetError as exc:
            raise InvalidRequestError(f"webhook: {exc}", code="validation_error") from None
        webhook = {"url": body.webhook, "events": [e.value for e in body.webhook_events]}
    job_id, existing = None, None
    if idempotency_key is not None:
        body_hash = hashlib.sha256(body.model_dump_json().encode()).hexdigest()
        job_id, existing = await run_in_threadpool(
            jobs.claim_idempotency_key, idempotency_key, body_hash, principal.owner
        )
    if existing is not None:
        response.headers["Location"] = f"/jobs/{existing.id}"
        response.status_code = status.HTTP_200_OK
        return await run_in_threadpool(jobs.view, existing, image_url(request))
    if is_limited(principal, settings.rate_limit_images):  # else no Redis to ask, so no thread hop
        await run_in_threadpool(charge, redis, principal, "images", body.num_images, settings.rate_limit_images)
    job = await jobs.submit_async(
        body.generation_params(),
        priority=body.priority,
        webhook=webhook,
        job_id=job_id,
        owner=principal.owner,
        model=body.model,
    )
    response.headers["Location"] = f"/jobs/{job.id}"
    return jobs.view(job, image_url(request))  # no Redis reads for a job `submit_async` just placed
