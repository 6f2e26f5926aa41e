"""Domain errors raised by routes and services; the HTTP layer maps them to status codes."""

from __future__ import annotations

from typing import Any


class ImagegenError(Exception):
    """Base class: a machine-readable `code` and a message safe to show to clients."""

    code = "error"

    def __init__(self, message: str, *, details: Any = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        if code:
            self.code = code


class UnauthorizedError(ImagegenError):
    code = "unauthorized"


class ForbiddenError(ImagegenError):
    """The caller is known but not allowed this (e.g. a priority its API key was not granted)."""

    code = "forbidden"


class NotFoundError(ImagegenError):
    code = "not_found"


class ConflictError(ImagegenError):
    code = "conflict"


class GoneError(ImagegenError):
    code = "gone"


class InvalidRequestError(ImagegenError):
    code = "invalid_request"


class PayloadTooLargeError(ImagegenError):
    code = "payload_too_large"


class RetryLaterError(ImagegenError):
    """The request may succeed later; clients should wait `retry_after` seconds (sent as Retry-After)."""

    default_retry_after = 1

    def __init__(self, message: str, *, retry_after: int | None = None, details: Any = None) -> None:
        super().__init__(message, details=details)
        self.retry_after = self.default_retry_after if retry_after is None else retry_after


class RateLimitedError(RetryLaterError):
    """Too many requests or a full queue."""

    code = "rate_limited"


class UnavailableError(RetryLaterError):
    """A dependency (Redis, workers) is down."""

    code = "unavailable"
    default_retry_after = 5
