"""Exception handlers: every error becomes `{"error": {"code", "message", "details"?}}`.

Routes raise domain errors (`app.core.errors`); the status codes are chosen here and only here.
Tracebacks are logged, never sent.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError as RedisOutOfMemoryError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from app.core import errors

log = logging.getLogger(__name__)

STATUS: dict[type[errors.ImagegenError], int] = {
    errors.UnauthorizedError: 401,
    errors.ForbiddenError: 403,
    errors.NotFoundError: 404,
    errors.ConflictError: 409,
    errors.GoneError: 410,
    errors.InvalidRequestError: 422,
    errors.PayloadTooLargeError: 413,
    errors.UnavailableError: 503,
    errors.RateLimitedError: 429,
}
HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "rate_limited",
    503: "unavailable",
}


def envelope(status: int, code: str, message: str, details: Any = None, headers: dict[str, str] | None = None):
    body: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        body["details"] = details
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def _domain(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, errors.ImagegenError)
    status = next((s for cls, s in STATUS.items() if isinstance(exc, cls)), 400)
    retry_after = getattr(exc, "retry_after", None)
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    if isinstance(exc, errors.UnauthorizedError):
        headers = {"WWW-Authenticate": "Bearer"}
    return envelope(status, exc.code, exc.message, exc.details, headers)


def _validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    details: list[dict[str, Any]] = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ())]
        details.append({"loc": loc, "msg": str(err.get("msg", "")), "type": str(err.get("type", ""))})
    invalid = next((d for d in details if d["type"] == "json_invalid"), None)
    if invalid is not None:  # what and where: "number out of range at line 1 column 4400", say
        why = invalid["msg"].removeprefix("Invalid JSON: ").removeprefix("Invalid JSON")
        message = "request body is not valid JSON" + (f": {why}" if why and why != invalid["msg"] else "")
        return envelope(400, "malformed_json", message, details)
    first: dict[str, Any] = details[0] if details else {"loc": [], "msg": "invalid request"}
    where = ".".join(p for p in first["loc"] if p != "body")
    message = f"{where}: {first['msg']}" if where else str(first["msg"])
    return envelope(422, "validation_error", message, details)


def _http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if isinstance(exc.__cause__, ClientDisconnect):  # FastAPI wraps it as "error parsing the body"
        return client_gone(request)
    code = HTTP_CODES.get(exc.status_code, "error")
    message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
    return envelope(exc.status_code, code, message, headers=getattr(exc, "headers", None))


def _redis_down(request: Request, exc: Exception) -> JSONResponse:
    log.warning("redis unavailable on %s %s: %s", request.method, request.url.path, exc)
    return envelope(
        503, "unavailable", "the job store (Redis) is unreachable; retry shortly", headers={"Retry-After": "5"}
    )


def _redis_full(request: Request, exc: Exception) -> JSONResponse:
    message, headers = redis_full(request, exc)
    return envelope(503, "unavailable", message, headers=headers)


def redis_full(request: Request, exc: Exception) -> tuple[str, dict[str, str]]:
    """Redis at `maxmemory` with `noeviction` (as it should run) refuses writes: a 503 for the
    operator to act on, logged as an error, rather than a 500 with a traceback."""
    log.error("redis is out of memory on %s %s: %s", request.method, request.url.path, exc)
    return "the job store (Redis) is out of memory; retry later", {"Retry-After": "30"}


def client_gone(request: Request, exc: Exception | None = None) -> JSONResponse:
    """The client closed the connection before its whole body arrived: nobody reads this answer.
    499, as nginx logs it, keeps such requests out of the server errors in logs and metrics."""
    log.info("client closed the connection during %s %s", request.method, request.url.path)
    return envelope(499, "client_closed_request", "the client closed the connection before sending its body")


def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return envelope(500, "internal_error", "internal server error")


def install(app: FastAPI) -> None:
    app.add_exception_handler(errors.ImagegenError, _domain)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(RedisConnectionError, _redis_down)
    app.add_exception_handler(RedisTimeoutError, _redis_down)
    app.add_exception_handler(RedisOutOfMemoryError, _redis_full)
    app.add_exception_handler(ClientDisconnect, client_gone)
    app.add_exception_handler(Exception, _unexpected)
