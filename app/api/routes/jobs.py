"""Jobs: list, status (with long-poll), cancel, live events (SSE) and images."""

from __future__ import annotations

from typing import Annotated

import anyio
from fastapi import APIRouter, Header, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from sse_starlette import EventSourceResponse, ServerSentEvent

from app.api.deps import JobsDep, PrincipalDep, SettingsDep, StoreDep, check_key
from app.api.routes.generate import MAX_WAIT, etag_matches, image_headers, image_url, view_after_wait
from app.api.schemas import ERROR_RESPONSES, ErrorEnvelope, JobList, JobView
from app.api.services import BLOCK_MS
from app.core.errors import ConflictError, GoneError, InvalidRequestError, NotFoundError, UnauthorizedError
from app.core.events import JobEvent, result_ttl
from app.core.jobs import JobStatus
from app.core.webhooks import WebhookSender, secret_for

router = APIRouter(prefix="/jobs", tags=["jobs"])
images = APIRouter(prefix="/jobs", tags=["jobs"])


@router.api_route("", methods=["HEAD"], include_in_schema=False)
@router.get("", response_model=JobList, responses=ERROR_RESPONSES, summary="Recent jobs, newest first")
def list_jobs(
    request: Request,
    jobs: JobsDep,
    principal: PrincipalDep,
    status_filter: Annotated[JobStatus | None, Query(alias="status")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=64)] = None,
) -> JobList:
    return jobs.list_jobs(image_url(request), status_filter, limit, cursor, principal.owner)


@router.api_route("/{job_id}", methods=["HEAD"], include_in_schema=False)
@router.get("/{job_id}", response_model=JobView, responses=ERROR_RESPONSES, summary="Job status and results")
async def get_job(
    job_id: str,
    request: Request,
    jobs: JobsDep,
    principal: PrincipalDep,
    wait: Annotated[float, Query(ge=0, le=MAX_WAIT, description="Long-poll: wait up to N s for the end")] = 0,
) -> JobView:
    job = await run_in_threadpool(jobs.get, job_id, principal.owner)
    if wait > 0 and not jobs.status(job).is_terminal():
        return await view_after_wait(jobs, job.id, wait, request)
    return await run_in_threadpool(jobs.view, job, image_url(request))


@router.delete(
    "/{job_id}",
    response_model=JobView,
    responses={202: {"model": JobView, "description": "Running: it stops at its next step"}, **ERROR_RESPONSES},
    summary="Cancel a job",
)
def cancel_job(
    job_id: str,
    request: Request,
    response: Response,
    jobs: JobsDep,
    settings: SettingsDep,
    principal: PrincipalDep,
) -> JobView:
    """A queued job never starts (200); a running one stops at its next denoising step (202)."""
    job, event = jobs.cancel(jobs.get(job_id, principal.owner))
    if event is None:
        response.status_code = status.HTTP_202_ACCEPTED
    else:
        _webhook_after_cancel(job.meta or {}, event, settings, request.app.state.webhooks, jobs.redis)
    return jobs.view(job, image_url(request))


def _webhook_after_cancel(meta: dict, event: JobEvent, settings, sender: WebhookSender | None, redis) -> None:
    """A job canceled before it started never reaches a worker, so its webhook is sent from here:
    by the API's own sender threads, in order and with retries per URL as a worker's. (As a
    background task it held one of the threads that run every plain route, for up to ~3 minutes
    of retries: 40 such cancels to a receiver that hangs stalled `/healthz` for 75 s.)"""
    hook = meta.get("webhook") or {}
    if hook.get("url") and "completed" in hook.get("events", ()) and sender is not None:
        owner = meta.get("owner")
        sender.submit(hook["url"], event, secret_for(redis, owner, settings.webhook_secret), owner=owner)


@router.get(
    "/{job_id}/events",
    response_class=EventSourceResponse,
    responses={
        200: {
            "content": {"text/event-stream": {}},
            "description": "queued, started, progress, then "
            "succeeded|failed|canceled; the stream closes after the terminal event",
        },
        204: {"description": "`Last-Event-ID` is the job's terminal event or later: nothing more will come"},
        **ERROR_RESPONSES,
    },
    summary="Live job events (Server-Sent Events)",
)
async def job_events(
    job_id: str,
    jobs: JobsDep,
    principal: PrincipalDep,
    last_event_id: Annotated[str | None, Header(max_length=64)] = None,
) -> Response:
    job = await run_in_threadpool(jobs.get, job_id, principal.owner)
    after = last_event_id or "0"
    if not _valid_stream_id(after):
        raise InvalidRequestError("Last-Event-ID: not an id sent by this stream", code="validation_error")
    if await jobs.seen_the_end(job.id, after):
        # An EventSource reconnects whenever a stream closes, the normal end after the terminal
        # event included; 204 is what makes it stop (an empty 200 had it back every 3 s).
        return Response(status_code=204)

    # On shutdown the stream ends cleanly (a complete response) within one blocking read, and the
    # client resumes from its Last-Event-ID on the next server; it was cut mid-response.
    shutdown = anyio.Event()

    async def messages():
        async for ident, event in jobs.stream(job.id, after, stop=shutdown.is_set):
            yield {"event": event.type.value, "id": ident, "data": event.model_dump_json(exclude_none=True)}

    # Keep-alives are `keepalive` events without data, not comments: browsers skip them (no data),
    # while clients that read every event see them and can keep a deadline while nothing happens.
    return EventSourceResponse(
        messages(),
        ping=KEEPALIVE_S,
        send_timeout=30,
        ping_message_factory=_keepalive,
        shutdown_event=shutdown,
        shutdown_grace_period=BLOCK_MS / 1000 + 1,
    )


KEEPALIVE_S = 10


def _keepalive() -> ServerSentEvent:
    return ServerSentEvent(event="keepalive")


def _valid_stream_id(value: str) -> bool:
    """A Redis stream id Redis itself accepts: `ms` or `ms-seq`, each a 64-bit unsigned integer."""
    head, dash, tail = value.partition("-")
    return all(_u64(part) for part in ((head, tail) if dash else (head,)))


def _u64(part: str) -> bool:
    return 0 < len(part) <= 20 and part.isascii() and part.isdigit() and int(part) < 2**64


@images.api_route("/{job_id}/images/{index}", methods=["HEAD"], include_in_schema=False)
@images.get(
    "/{job_id}/images/{index}",
    response_class=Response,
    responses={
        200: {"content": {"image/png": {}}, "description": "The PNG"},
        304: {"description": "`If-None-Match` names its `ETag`: the copy the client has is current"},
        401: {"model": ErrorEnvelope, "description": "API keys on: no valid key, and no valid signed link"},
        **ERROR_RESPONSES,
    },
    summary="One generated image (PNG with the parameters in text chunks)",
    name="get_image",
)
def get_image(
    job_id: str,
    index: str,
    request: Request,
    jobs: JobsDep,
    store: StoreDep,
    exp: Annotated[str | None, Query(max_length=16, description="Signed link: expiry (Unix time)")] = None,
    sig: Annotated[str | None, Query(max_length=64, description="Signed link: signature")] = None,
) -> Response:
    """With API keys on, the links in a job's `images` are signed (`exp`, `sig`) and need no key
    until `exp`; a link without them (or past `exp`) needs the job's own key, like every route."""
    links = request.app.state.links
    signed = links is not None and exp is not None and sig is not None and links.valid(job_id, index, exp, sig)
    owner = None
    if not signed:  # the key, as every other route checks it (rate limit included)
        try:
            owner = check_key(request.headers.get("authorization"), jobs.settings, jobs.redis).owner
        except UnauthorizedError as exc:
            if exp is None and sig is None:
                raise
            raise UnauthorizedError(
                "this image link has expired or is not valid, and no API key was sent: read the job again "
                "for a fresh link"
            ) from exc
    job = jobs.get(job_id, owner)
    number = int(index) if index.isascii() and index.isdigit() and len(index) <= 3 else None  # never a path part
    succeeded = jobs.status(job) is JobStatus.succeeded
    png = store.get(job.id, number) if succeeded and number is not None else None  # no result read
    if png is None or number is None:  # say why there is no image
        view = jobs.view(job, image_url(request))
        if view.status is not JobStatus.succeeded:
            if view.status.is_terminal():
                raise ConflictError(
                    f"job {job.id} ended {view.status.value}; it has no images", code="job_not_succeeded"
                )
            raise ConflictError(
                f"job {job.id} is {view.status.value}; images are ready when it succeeds", code="not_ready"
            )
        if number is None or number >= len(view.images):
            raise NotFoundError(f"job {job.id} has {len(view.images)} image(s); no index {index[:20]!r}")
        raise GoneError(f"image {index} of job {job.id} has expired")
    ended_at = job.ended_at.timestamp() if job.ended_at is not None else None
    headers = image_headers(job.id, number, ended_at, result_ttl(job.result_ttl, jobs.settings))
    if etag_matches(request.headers.get("if-none-match"), headers["ETag"]):
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers=headers)
    return Response(png, media_type="image/png", headers=headers)
