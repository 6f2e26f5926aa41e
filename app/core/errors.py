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


class RateLimitedError(ImagegenError):
    """Too many requests or a full queue; retry after `retry_after` seconds."""

    code = "rate_limited"

    def __init__(self, message: str, *, retry_after: int = 1, details: Any = None) -> None:
        super().__init__(message, details=details)
        self.retry_after = retry_after


class UnavailableError(ImagegenError):
    """A dependency (Redis, workers) is down; clients should retry after `retry_after` seconds."""

    code = "unavailable"

    def __init__(self, message: str, *, retry_after: int = 5, details: Any = None) -> None:
        super().__init__(message, details=details)
        self.retry_after = retry_after
