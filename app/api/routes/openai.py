"""OpenAI-compatible `/v1`: `POST /v1/images/generations` (synchronous) and `GET /v1/models`.

The request is queued like any other job through `JobService.submit`, then this route waits for
the job (bounded by the `openai_timeout` setting) and answers in OpenAI's shape. Every error on
these routes, request validation included, is OpenAI's `{"error": {"message", "type", "param",
"code"}}`; the rest of the API keeps its own envelope. Imports neither torch nor `worker`.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable, Coroutine, Iterator, MutableMapping
from datetime import UTC
from functools import partial
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import ValidationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError as RedisOutOfMemoryError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rq.job import Job
from sse_starlette.sse import AppStatus
from starlette.convertors import Convertor, register_url_convertor
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from app.api.bodies import header, header_parameters, is_json, validation_error, while_connected
from app.api.deps import JobsDep, PrincipalDep, RedisDep, SettingsDep, StoreDep, images_charged
from app.api.errors import HTTP_CODES, STATUS, client_gone, redis_full
from app.api.middleware import BodyTooLarge
from app.api.openai_schemas import (
    SIZE_AUTO,
    ImageDatum,
    ImagesGenerationRequest,
    ImagesResponse,
    ModelCard,
    ModelList,
    OpenAIErrorEnvelope,
    SizeError,
    parse_size,
    to_params,
)
from app.api.routes.generate import image_url
from app.api.services import JobService
from app.core import errors
from app.core.catalog import live_on_queue, served_models
from app.core.config import Settings
from app.core.jobs import ErrorCode, JobStatus, Priority, queue_name
from app.core.storage import ImageStore

log = logging.getLogger(__name__)
NO_WORKER_RETRY = 5  # Retry-After (s) when no worker serves the model
# Sent with every answer given after the job was queued: OpenAI's SDKs retry a 5xx by default,
# and a retry queues a second job while the first goes on (they honour this header).
NO_RETRY = {"x-should-retry": "false"}
# What OpenAI's SDKs send with every request besides the key and body: the JS SDK does from a
# browser page too, so CORS must allow them (a preflight naming one not allowed is refused).
SDK_HEADERS = (
    "x-stainless-arch",
    "x-stainless-lang",
    "x-stainless-os",
    "x-stainless-package-version",
    "x-stainless-runtime",
    "x-stainless-runtime-version",
    "x-stainless-retry-count",
    "x-stainless-timeout",
    "x-stainless-helper-method",  # the SDK's helpers (streaming, polling) add it
    "openai-organization",  # sent when a page's client names an organization or a project
    "openai-project",
)


class OpenAIError(Exception):
    """An error to answer in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.param = param
        self.code = code
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def _from_validation(exc: RequestValidationError) -> OpenAIError:
    errs = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errs):
        return OpenAIError(400, "We could not parse the JSON body of your request.", code="invalid_json")
    if not errs:
        return OpenAIError(400, "invalid request", code="invalid_value")
    first = errs[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "extra_forbidden":
        return OpenAIError(400, f"Unrecognized request argument supplied: {param}", param=param, code="unknown_param")
    if first.get("type") == "missing":
        message = f"Missing required parameter: '{param}'." if param else "The request has no JSON body."
        return OpenAIError(400, message, param=param, code="missing_required_param")
    message = f"Invalid '{param}': {first.get('msg', 'invalid value')}." if param else str(first.get("msg"))
    return OpenAIError(400, message, param=param, code="invalid_value")


def _from_domain(exc: errors.ImagegenError) -> OpenAIError:
    status = next((s for cls, s in STATUS.items() if isinstance(exc, cls)), 400)
    if status == 422:  # OpenAI answers bad parameters with 400
        status = 400
    param = None
    if isinstance(exc.details, list) and exc.details and isinstance(exc.details[0], dict):
        loc = [str(p) for p in exc.details[0].get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
    code = exc.code
    if param in ("width", "height"):  # /v1 asks for both as `size`, and a size we cannot make is one
        param, code = "size", "invalid_size"  # code whichever check refused it (ours or the model's)
    headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, errors.RetryLaterError) else None
    if isinstance(exc, errors.UnauthorizedError):
        headers = {"WWW-Authenticate": "Bearer"}
    return OpenAIError(status, exc.message, param=param, code=code, headers=headers)


class OpenAIRoute(APIRoute):
    """Turns every error raised while handling a `/v1` request into OpenAI's error shape."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        expects_json = self.body_field is not None  # a JSON body FastAPI parses (the variations read their own)

        async def handle(request: Request) -> Response:
            try:
                if expects_json and request.method == "POST" and not is_json(request.headers.get("content-type")):
                    message = "send the body as JSON (Content-Type: application/json)"
                    raise OpenAIError(415, message, code="unsupported_media_type")
                return await handler(request)
            except OpenAIError as exc:
                return exc.response()
            except RequestValidationError as exc:
                return _from_validation(exc).response()
            except errors.ImagegenError as exc:
                return _from_domain(exc).response()
            except ClientDisconnect:
                return client_gone(request)
            except StarletteHTTPException as exc:  # FastAPI's own, e.g. a body it could not read
                if isinstance(exc.__cause__, ClientDisconnect):
                    return client_gone(request)
                if isinstance(exc.__cause__, BodyTooLarge):  # a chunked body past the limit: the
                    raise exc.__cause__ from None  # size limit answers 413 (FastAPI made it a 400)
                code = HTTP_CODES.get(exc.status_code, "invalid_request")
                return OpenAIError(exc.status_code, str(exc.detail), code=code).response()
            except (RedisConnectionError, RedisTimeoutError) as exc:
                log.warning("redis unavailable on %s %s: %s", request.method, request.url.path, exc)
                message = "the job store (Redis) is unreachable; retry shortly"
                return OpenAIError(503, message, code="unavailable", headers={"Retry-After": "5"}).response()
            except RedisOutOfMemoryError as exc:
                message, headers = redis_full(request, exc)
                return OpenAIError(503, message, code="unavailable", headers=headers).response()
            except BodyTooLarge:  # an upload over the limit, read by the route itself: the size limit answers 413
                raise
            except Exception as exc:
                log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
                return OpenAIError(500, "internal server error", code="internal_error").response()

        return handle


router = APIRouter(prefix="/v1", tags=["openai"], route_class=OpenAIRoute)

# "default" also keeps FastAPI from documenting its own 422, which these routes never answer.
_ERROR_TEXT: dict[int | str, str] = {
    400: "Invalid request, including validation errors and malformed JSON",
    409: "The job was canceled",
    415: "Body not sent as application/json",
    500: "The job failed",
    503: "Redis unavailable, no worker serving the model, or the server shutting down while the job was pending",
    504: "The job did not finish within the server's time limit; it goes on (x-should-retry: false)",
    "default": "Any other error, in OpenAI's shape",
}
OPENAI_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": OpenAIErrorEnvelope, "description": text} for code, text in _ERROR_TEXT.items()
}

# How a failed job's error code maps to an HTTP status for a synchronous caller; any other is a 500.
# A job that ran past IMAGEGEN_JOB_TIMEOUT failed (500, code `timeout`): 504 is kept for a job
# still running at this route's own wait limit, which goes on.
_FAILURE_STATUS = {
    ErrorCode.invalid_params.value: 400,
    ErrorCode.refused.value: 400,
    ErrorCode.canceled.value: 409,
}


async def _wait(jobs: JobService, job_id: str, timeout: float, request: Request) -> Job:
    """The job once terminal, or as it stands when `timeout` runs out (or its client has gone)."""
    # Blocks on the job's end stream without holding a thread.
    await while_connected(request, jobs.wait_async(job_id, timeout))
    return await run_in_threadpool(jobs.get, job_id)


def _created(job: Job) -> int:
    created = job.created_at
    if created is None:
        return int(time.time())
    return int((created if created.tzinfo else created.replace(tzinfo=UTC)).timestamp())


@router.post(
    "/images/generations",
    response_model=ImagesResponse,
    response_model_exclude_none=True,
    responses=OPENAI_ERRORS,
    summary="OpenAI-compatible image generation (waits for the result)",
    openapi_extra={
        "parameters": header_parameters(
            idempotency_key="Repeating a body with the same key waits for the original job instead of queueing "
            "another (for 24 h)",
        )
    },
)
async def create_images(
    body: ImagesGenerationRequest,
    request: Request,
    response: Response,
    jobs: JobsDep,
    store: StoreDep,
    settings: SettingsDep,
    principal: PrincipalDep,
    redis: RedisDep,
) -> ImagesResponse:
    """Queue a job, wait for it and answer with URLs of the PNGs or the PNGs themselves (base64).

    Works with OpenAI's SDKs: point `base_url` at `<server>/v1`; any API key is accepted unless
    keys are required. Our own parameters (`seed`, `negative_prompt`, `num_inference_steps`,
    `guidance_scale`, `scheduler`) go in the SDK's `extra_body`.

    With an `Idempotency-Key` header (the SDK's `extra_headers`), a repeat of the same body waits
    for the job the first request queued: OpenAI's SDKs send a call again when its connection
    broke (an API restarted mid-wait), which would otherwise queue a second job.
    """
    idempotency_key = header(request, "idempotency-key")
    width, height = await check_model_and_size(body.model, body.size, settings, redis)
    try:
        params = to_params(body, width, height)
    except ValidationError as exc:  # a check of ours OpenAI's schema lacks (e.g. a blank prompt): 400, not 500
        raise validation_error(exc) from None
    body_hash = lambda: hashlib.sha256(b"/v1/images/generations:" + body.model_dump_json().encode()).hexdigest()  # noqa: E731
    async with jobs.idempotent(idempotency_key, body_hash, principal.owner) as (job_id, existing):
        if existing is not None:
            placed_id = existing.id
        else:
            submit = partial(jobs.submit, params, job_id=job_id, owner=principal.owner,
                             max_queued=principal.max_queued, model=body.model)  # fmt: skip
            async with images_charged(redis, principal, params.num_images, settings):
                await require_worker(body.model, settings, redis)
                placed_id = (await run_in_threadpool(submit)).id
    return await answer_with_images(placed_id, body.response_format, request, response, jobs, store, settings)


async def check_model_and_size(
    model: str | None, size: str | None, settings: Settings, redis: Any
) -> tuple[int | None, int | None]:
    """OpenAI-style 400s for a model no live worker serves and for a size outside our bounds;
    returns the requested (width, height), or (None, None) for the model's native size (no size,
    or OpenAI's "auto")."""
    if model is not None and model != settings.model:
        # Another model a live worker serves.
        served = await run_in_threadpool(served_models, redis, settings.worker_heartbeat)
        if model not in served:
            names = ", ".join(sorted({settings.model, *served}))
            message = f"The model `{model}` does not exist; this server serves {names}."
            raise OpenAIError(400, message, param="model", code="model_not_found")
    if size is None or size.strip().lower() == SIZE_AUTO:
        return None, None
    try:
        return parse_size(
            size, min_size=settings.min_size, max_width=settings.max_width, max_height=settings.max_height
        )
    except SizeError as exc:
        raise OpenAIError(400, str(exc), param="size", code="invalid_size") from None


async def require_worker(model: str | None, settings: Settings, redis: Any) -> None:
    """503 when no live worker serves the API's own model: a synchronous caller would wait its
    whole time-out for a job nobody takes (another model was checked by `check_model_and_size`)."""
    if model is None or model == settings.model:
        queue = queue_name(settings.model, Priority.normal)
        if not await run_in_threadpool(live_on_queue, redis, queue, settings.worker_heartbeat):
            message = f"no worker is serving the model `{settings.model}` right now; retry later"
            raise OpenAIError(503, message, code="unavailable", headers={"Retry-After": str(NO_WORKER_RETRY)})


@contextlib.contextmanager
def _after_queueing(job_id: str, request: Request) -> Iterator[None]:
    """Every error answered once the job is queued names it and carries `x-should-retry: false`:
    the job exists (it ran, or goes on), and OpenAI's SDKs would otherwise retry a 409 or 5xx by
    queueing another one."""
    try:
        yield
    except OpenAIError as exc:
        exc.headers = {**(exc.headers or {}), "X-Imagegen-Job-Id": job_id, **NO_RETRY}
        raise
    except Exception as exc:
        headers = {"X-Imagegen-Job-Id": job_id, **NO_RETRY}
        if isinstance(exc, RedisOutOfMemoryError):
            message, full = redis_full(request, exc)
            raise OpenAIError(503, message, code="unavailable", headers={**full, **headers}) from None
        log.exception("unhandled error answering for job %s", job_id, exc_info=exc)
        message = f"internal server error while waiting for job {job_id}"
        raise OpenAIError(500, message, code="internal_error", headers=headers) from None


async def answer_with_images(
    job_id: str,
    response_format: str | None,
    request: Request,
    response: Response,
    jobs: JobService,
    store: ImageStore,
    settings: Settings,
) -> ImagesResponse:
    """Wait (bounded by IMAGEGEN_OPENAI_TIMEOUT) for a submitted job and answer in OpenAI's shape:
    URLs of our image endpoint or the PNGs in base64; failures and time-outs as OpenAI errors
    (see `_after_queueing`)."""
    with _after_queueing(job_id, request):
        job_header = {"X-Imagegen-Job-Id": job_id}
        timeout = settings.openai_timeout
        follow = f"follow it at GET {request.scope.get('root_path', '')}/jobs/{job_id}"
        try:
            job = await _wait(jobs, job_id, timeout, request)
            view = await run_in_threadpool(jobs.view, job, image_url(request))
        except (RedisConnectionError, RedisTimeoutError) as exc:
            log.warning("redis unavailable while waiting for job %s: %s", job_id, exc)
            message = f"the job store (Redis) became unreachable while job {job_id} was pending; it is kept: {follow}"
            raise OpenAIError(503, message, code="unavailable", headers={"Retry-After": "5"}) from None
        if not view.status.is_terminal():
            if AppStatus.should_exit:
                message = f"this server is shutting down; job {job_id} goes on: {follow}"
                raise OpenAIError(503, message, code="unavailable", headers={"Retry-After": "1"})
            where = (
                f"still waiting in the queue (position {view.queue_position})"
                if view.status is JobStatus.queued
                else f"still running (step {view.progress.step} of {view.progress.total})"
            )
            message = f"job {job_id} did not finish within {timeout:g} s: it is {where} and goes on; {follow}"
            raise OpenAIError(504, message, code="timeout")
        if view.status is not JobStatus.succeeded:
            code = view.error.code if view.error else ErrorCode.internal_error.value
            message = view.error.message if view.error else f"job {job.id} ended {view.status.value}"
            raise OpenAIError(_FAILURE_STATUS.get(code, 500), message, code=code)
        data: list[ImageDatum] = []
        for ref in sorted(view.images, key=lambda r: r.index):
            if response_format == "b64_json":
                png = await run_in_threadpool(store.get, job.id, ref.index)
                if png is None:
                    raise OpenAIError(410, f"image {ref.index} of job {job.id} has expired", code="gone")
                data.append(ImageDatum(b64_json=base64.b64encode(png).decode("ascii")))
            else:
                data.append(ImageDatum(url=ref.url))
        response.headers.update(job_header)
        return ImagesResponse(created=_created(job), data=data)


@router.get("/models", response_model=ModelList, summary="The served model (OpenAI-compatible list)")
def list_models(settings: SettingsDep, redis: RedisDep) -> ModelList:
    # Ours first (jobs that name no model go there), then any other model a live worker serves.
    others = sorted(set(served_models(redis, settings.worker_heartbeat)) - {settings.model})
    return ModelList(data=[ModelCard(id=name) for name in [settings.model, *others]])


class _AnyText(Convertor[str]):
    """A path parameter that takes any text, slashes and newlines included (Starlette's `path`
    stops at a newline, and the request then missed the route: a 404 in the wrong shape)."""

    regex = r"[\s\S]+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("anytext", _AnyText())


@router.get(
    "/models/{model:anytext}",  # hub ids and folders have slashes: `org/name`, `org%2Fname` alike
    response_model=ModelCard,
    responses={404: {"model": OpenAIErrorEnvelope}},
    summary="One served model (OpenAI-compatible)",
)
def retrieve_model(model: str, settings: SettingsDep, redis: RedisDep) -> ModelCard:
    """`client.models.retrieve(name)`: this API's own model, or one a live worker serves."""
    if model != settings.model and model not in served_models(redis, settings.worker_heartbeat, only=model):
        raise OpenAIError(404, f"The model '{model}' does not exist or no worker serves it", code="model_not_found")
    return ModelCard(id=model)


def _below_root(scope: MutableMapping[str, Any]) -> str:
    """The request's path below the prefix the server is mounted at (`--root-path`), which the
    routes match (Starlette's router does the same)."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
        return path[len(root) :]
    return path


@router.api_route(
    "/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False, name="openai_unknown"
)
def unknown(path: str, request: Request) -> Response:
    # Unknown /v1 paths answer in OpenAI's shape too, so SDK users see a readable error; a known
    # path asked with another method is a 405 naming the methods it takes.
    from app.api.routes import openai_variations  # it builds on this module

    # The messages show the path the client asked for, prefix included.
    route_path = _below_root(request.scope)
    allowed = sorted(
        method
        for route in (*router.routes, *openai_variations.router.routes)
        if isinstance(route, APIRoute) and route.name != "openai_unknown" and route.path_regex.match(route_path)
        for method in route.methods or ()
    )
    if allowed:
        message = f"{request.method} is not allowed on {request.url.path}; use {', '.join(allowed)}"
        raise OpenAIError(405, message, code="method_not_allowed", headers={"Allow": ", ".join(allowed)})
    raise OpenAIError(404, f"Invalid URL ({request.method} {request.url.path})", code="unknown_url")
