"""POST /generate: validate a request and put it on the queue."""

from __future__ import annotations

import hashlib
import math
import re
import time

from fastapi import APIRouter, Request, Response, status
from fastapi.concurrency import run_in_threadpool

from app.api.bodies import DirectRoute, header, header_parameters, json_request_body, read_json, while_connected
from app.api.deps import get_principal, images_charged
from app.api.schemas import SUBMIT_RESPONSES, ErrorEnvelope, GenerateRequest, JobView
from app.api.services import JobService
from app.core.errors import ConflictError, GoneError, InvalidRequestError, UnavailableError
from app.core.events import EventType, result_ttl
from app.core.jobs import JobStatus
from app.core.storage import ImageStore
from app.core.webhooks import LookupUnavailableError, WebhookTargetError, check_target

router = APIRouter(tags=["generate"], route_class=DirectRoute)  # called with the request alone
MAX_WAIT = 60.0  # seconds a request may be held open for a job to end (long-poll, `Prefer: wait`)


def jobs_url(request: Request) -> str:
    """Where clients find jobs (`Location` headers): under `IMAGEGEN_PUBLIC_URL` when set, else
    under the app's root path (uvicorn's `--root-path`, for a proxy serving it under a path)."""
    base = request.app.state.settings.public_url.rstrip("/")
    return f"{base or request.scope.get('root_path', '')}/jobs"


def image_url(request: Request):
    """Links to a job's images: under `IMAGEGEN_PUBLIC_URL` when set, else the request's own scheme
    and host; with API keys on, signed (see `app.core.auth.ImageLinks`)."""
    links = request.app.state.links
    base = request.app.state.settings.public_url.rstrip("/")

    def url(job_id: str, i: int) -> str:
        if base:
            plain = base + request.app.url_path_for("get_image", job_id=job_id, index=str(i))
        else:
            plain = str(request.url_for("get_image", job_id=job_id, index=str(i)))
        return plain if links is None else f"{plain}?{links.query(job_id, i)}"

    return url


@router.post(
    "/generate",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobView,
    responses={
        200: {
            "model": JobView,
            "description": "Repeat of an Idempotency-Key (the original job), or with `Prefer: wait` a job that "
            "ended; with `Accept: image/png` too, the PNG of a one-image job that succeeded",
            "content": {"image/png": {}},
        },
        **SUBMIT_RESPONSES,
        415: {"model": ErrorEnvelope, "description": "Body not sent as application/json"},
    },
    summary="Submit a text-to-image job",
    openapi_extra={
        "requestBody": json_request_body(GenerateRequest),
        "parameters": header_parameters(
            idempotency_key="Repeating a body with the same key returns the original job (for 24 h)",
            prefer=f"`wait=N` (RFC 7240): answer when the job ends (200), or after N s (at most {MAX_WAIT:g}) "
            "with its state then (202)",
        ),
    },
)
async def generate(request: Request) -> Response:
    """Queue a job and answer at once with 202, a `Location` to poll and the job as JSON.

    With an `Idempotency-Key` header, repeating the same body returns the original job (200)
    for 24 h; the same key with a different body is a 409.

    With `Prefer: wait=N` the answer waits for the job to end, up to N seconds: 200 and the
    finished job (image URLs, or the error) when it ended in time, else 202 and its state then.
    `Preference-Applied` says the wait was honoured. Add `Accept: image/png` (one image) and a job
    that succeeded in time is answered with the PNG itself (`Location` names the job): prompt to
    image in one request. One that failed or was canceled is then a 409.
    """
    # The body and headers are read here rather than declared (app.api.bodies: one pydantic-core
    # pass instead of FastAPI's parameter solving), and the app's objects taken from app.state.
    principal = await get_principal(request)
    body = await read_json(request, GenerateRequest)
    idempotency_key = header(request, "idempotency-key")
    prefer = request.headers.get("prefer")  # never refused: preferences a server cannot honour are ignored (RFC 7240)
    jobs: JobService = request.app.state.jobs
    # The common request (no webhook, idempotency key or rate limit) is one Redis script call on
    # the asyncio client and never leaves the event loop; the rest runs in worker threads.
    settings, redis = jobs.settings, jobs.redis
    webhook = None
    if body.webhook is not None:
        if not settings.webhook_secret:
            raise InvalidRequestError(
                "webhooks are disabled on this server (no IMAGEGEN_WEBHOOK_SECRET)", code="validation_error"
            )
        try:  # resolves the host name: blocking
            await run_in_threadpool(
                check_target, body.webhook, allow_private=settings.webhook_allow_private, owner=principal.owner
            )
        except LookupUnavailableError as exc:  # the lookup, not the URL: a retry may pass
            raise UnavailableError(f"webhook: {exc}", retry_after=2) from None
        except WebhookTargetError as exc:
            raise InvalidRequestError(f"webhook: {exc}", code="validation_error") from None
        webhook = {"url": body.webhook, "events": [e.value for e in body.webhook_events]}
    principal.check_priority(body.priority)
    wait = prefer_wait(prefer)
    # The request as it is served: naming the server's default model asks for what leaving it out does.
    same = body.model_copy(update={"model": None}) if body.model == settings.model else body
    body_hash = lambda: hashlib.sha256(same.model_dump_json().encode()).hexdigest()  # noqa: E731
    async with jobs.idempotent(idempotency_key, body_hash, principal.owner) as (job_id, existing):
        if existing is not None:
            if wait:  # 200 once it has ended (as any replay), else 202 as for any slow job
                return await finished_response(jobs, existing.id, wait, request)
            view = await run_in_threadpool(jobs.view, existing, image_url(request))
            return job_response(view, status.HTTP_200_OK, jobs=jobs_url(request))
        async with images_charged(redis, principal, body.num_images, settings):
            job = await jobs.submit_async(
                body.generation_params(),
                priority=body.priority,
                webhook=webhook,
                job_id=job_id,
                owner=principal.owner,
                max_queued=principal.max_queued,
                model=body.model,
            )
    if wait:
        return await finished_response(jobs, job.id, wait, request)
    # No Redis reads for a job just placed.
    return job_response(jobs.view_placed(job), status.HTTP_202_ACCEPTED, jobs=jobs_url(request))


def prefer_wait(prefer: str | None) -> float:
    """Seconds asked for by a `wait=N` preference (capped at MAX_WAIT); 0 when there is none. Like
    any preference (RFC 7240) one that cannot be understood is ignored.

    Preferences are comma-separated, each `token[=value]` followed by `;`-parameters: in
    `foo; wait=5`, `wait` is a parameter of `foo`, not a preference. The first `wait` counts."""
    for preference in _split_quoted(prefer or "", ","):
        head = _split_quoted(preference, ";")[0]
        name, _, value = head.partition("=")
        if name.strip().lower() == "wait":
            try:
                seconds = float(_unquote(value.strip()))
            except ValueError:
                return 0.0
            return min(seconds, MAX_WAIT) if seconds > 0 and math.isfinite(seconds) else 0.0
    return 0.0


def _split_quoted(text: str, separator: str) -> list[str]:
    """`text` split at `separator`, except inside quoted strings (with their `\\` escapes)."""
    parts, start, quoted, escaped = [], 0, False, False
    for i, char in enumerate(text):
        if escaped:
            escaped = False
        elif quoted and char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == separator and not quoted:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def _unquote(word: str) -> str:
    if len(word) >= 2 and word[0] == word[-1] == '"':
        return re.sub(r"\\(.)", r"\1", word[1:-1])
    return word


async def finished_response(jobs: JobService, job_id: str, wait: float, request: Request) -> Response:
    """The job once it has ended, or after `wait` seconds: 200 when it ended, else 202. A client
    that asks for `image/png` (and made one image) gets the PNG itself when the job succeeded."""
    store = request.app.state.store if wants_png(request.headers.get("accept")) else None
    ended = await while_connected(request, jobs.wait_async(job_id, wait))
    applied = {"Preference-Applied": f"wait={wait:g}"}
    settings = jobs.settings
    if store is not None and ended is not None and ended.type is EventType.succeeded and len(ended.images or []) == 1:
        # The `succeeded` event follows RQ's success record and the stored PNG: the bytes need no
        # read of the job itself.
        png = await run_in_threadpool(store.get, job_id, 0)
        if png is not None:
            cache = image_headers(job_id, 0, ended.timestamp, result_ttl(None, settings))
            return png_bytes(job_id, png, {**applied, **cache}, jobs_url(request))
    view, png = await read_view(jobs, job_id, request, store)
    if store is not None and view.status.is_terminal() and int(view.params.get("num_images") or 1) == 1:
        ended_at = view.finished_at.timestamp() if view.finished_at is not None else None
        cache = image_headers(view.id, 0, ended_at, result_ttl(None, settings))
        return png_response(view, png, {**applied, **cache}, jobs_url(request))
    status_code = status.HTTP_200_OK if view.status.is_terminal() else status.HTTP_202_ACCEPTED
    return job_response(view, status_code, applied, jobs_url(request))


def image_headers(job_id: str, index: int, ended_at: float | None, ttl: int) -> dict[str, str]:
    """Headers of a job's PNG wherever it is sent: its bytes never change, so it is `immutable`
    with a strong `ETag`, fresh (in the client's own cache only) for as long as the job is kept
    (`ttl` seconds from its end, Unix time `ended_at`)."""
    left = ttl if ended_at is None else int(ended_at + ttl - time.time())
    return {
        "ETag": image_etag(job_id, index),
        "Cache-Control": f"private, max-age={max(0, min(left, ttl))}, immutable",
        "Content-Disposition": f'inline; filename="{job_id}-{index}.png"',
        "X-Content-Type-Options": "nosniff",
    }


def image_etag(job_id: str, index: int) -> str:
    return f'"{job_id}-{index}"'


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """Whether `If-None-Match` names `etag` (or is `*`), by the weak comparison RFC 9110 asks for."""
    if not if_none_match:
        return False
    tags = (tag.strip() for tag in _split_quoted(if_none_match, ","))
    return any(tag == "*" or tag.removeprefix("W/") == etag for tag in tags)


async def view_after_wait(jobs: JobService, job_id: str, wait: float, request: Request) -> JobView:
    """The job's view once it has ended, or after `wait` seconds (the long-poll)."""
    await while_connected(request, jobs.wait_async(job_id, wait))
    view, _ = await read_view(jobs, job_id, request)
    return view


async def read_view(
    jobs: JobService, job_id: str, request: Request, store: ImageStore | None = None
) -> tuple[JobView, bytes | None]:
    """The job's view; with `store`, also its first PNG if it succeeded with one image."""
    url = image_url(request)

    def read() -> tuple[JobView, bytes | None]:  # one hop: read, then present
        view = jobs.view(jobs.get(job_id), url)
        single = view.status is JobStatus.succeeded and len(view.images) == 1
        return view, store.get(view.id, 0) if store is not None and single else None

    return await run_in_threadpool(read)


def wants_png(accept: str | None) -> bool:
    """Whether `Accept` ranks `image/png` above JSON. JSON takes the q of `application/json`, else
    `application/*`, else `*/*`; the PNG that of `image/png`, which must be named (wildcards never
    select bytes: only a client that names the PNG gets them instead of the job). At equal q the
    PNG wins over JSON reached by a wildcard, and over a named JSON when listed first."""
    ranges: dict[str, tuple[float, int]] = {}  # media range -> (q, position); the first of each counts
    for position, media_range in enumerate((accept or "").split(",")):
        media, *parameters = (part.strip() for part in media_range.split(";"))
        q = 1.0
        for parameter in parameters:
            name, _, value = parameter.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
                q = q if math.isfinite(q) else 0.0
                break  # what follows q are extensions, not media type parameters
        ranges.setdefault(media.lower(), (q, position))
    png = ranges.get("image/png")
    if png is None or png[0] <= 0:
        return False
    json = ranges.get("application/json")
    if json is None:  # only a wildcard can give JSON a q: it wins on a higher one alone
        wildcard = ranges.get("application/*", ranges.get("*/*"))
        return wildcard is None or png[0] >= wildcard[0]
    return png[0] > json[0] or (png[0] == json[0] and png[1] < json[1])


def png_response(view: JobView, png: bytes | None, headers: dict[str, str], jobs: str = "/jobs") -> Response:
    """An ended job's only image, or why there is none (as `GET /jobs/{id}/images/0` answers)."""
    if view.status is not JobStatus.succeeded:
        why = f": {view.error.message}" if view.error else ""
        raise ConflictError(f"job {view.id} ended {view.status.value}{why}; it has no images", code="job_not_succeeded")
    if png is None:
        raise GoneError(f"image 0 of job {view.id} has expired")
    return png_bytes(view.id, png, headers, jobs)


def png_bytes(job_id: str, png: bytes, headers: dict[str, str], jobs: str = "/jobs") -> Response:
    location = {"Location": f"{jobs}/{job_id}", "Content-Location": f"{jobs}/{job_id}/images/0"}
    return Response(png, media_type="image/png", headers={**location, **headers})


def job_response(
    view: JobView, status_code: int, headers: dict[str, str] | None = None, jobs: str = "/jobs"
) -> Response:
    """The job as JSON, with its `Location` (`jobs`: see `jobs_url`). Serialized here: a returned
    model FastAPI would first validate again against `response_model` (which stays, for the
    OpenAPI schema)."""
    headers = {"Location": f"{jobs}/{view.id}", **(headers or {})}
    return Response(view.model_dump_json(), status_code=status_code, headers=headers, media_type="application/json")
