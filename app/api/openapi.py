"""The OpenAPI document as this server's settings make it.

FastAPI builds it from the routes and models alone, so it told clients (and SDKs generated from it)
what no server here does: sizes up to the models' field bounds (4096) where the server takes at
most `IMAGEGEN_MAX_WIDTH`/`_HEIGHT` in multiples of 8, and, with API keys on, no authentication at
all. Here the built document gets the server's own size bounds, a bearer scheme with the routes
that need it (and their 401) when keys are on, and the `Location` header of a queued job's 202.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import FastAPI

    from app.core.config import Settings

SCHEME = "apiKey"
OPEN = frozenset({"/healthz", "/readyz", "/metrics"})  # never need a key
SIGNED = frozenset({"/jobs/{job_id}/images/{index}"})  # a key, or a signed link without one
QUEUED = ("/generate", "/variations")  # their 202 names the job's URL in `Location`


def install(app: FastAPI, settings: Settings) -> None:
    """Have `app.openapi()` (and `/openapi.json`, `/docs`) serve the document fitted to `settings`."""
    build: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:  # built once, then FastAPI's cached copy is served
            spec = build()
            size_bounds(spec, settings)
            if settings.auth_enabled:
                bearer(spec)
            locations(spec)
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]


def _dicts(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _dicts(value)
    elif isinstance(node, list):
        for value in node:
            yield from _dicts(value)


def size_bounds(spec: dict[str, Any], settings: Settings) -> None:
    """Every request's `width` and `height` (integers with bounds; answers' have none) get the
    server's: at least `IMAGEGEN_MIN_SIZE`, at most its maximum width or height, multiples of 8."""
    limits = {"width": settings.max_width, "height": settings.max_height}
    for node in list(_dicts(spec)):
        properties = node.get("properties")
        if not isinstance(properties, dict):
            continue
        for name, limit in limits.items():
            field = properties.get(name)
            if not isinstance(field, dict):
                continue
            for choice in field.get("anyOf", [field]):  # optional fields: the integer of int | None
                if choice.get("type") == "integer" and "maximum" in choice:
                    choice.update(minimum=settings.min_size, maximum=limit, multipleOf=8)


def bearer(spec: dict[str, Any]) -> None:
    """API keys on: an HTTP bearer scheme, required by every operation but the health checks and
    metrics (images take a key or a signed link), each of those documenting its 401."""
    components = spec.setdefault("components", {})
    components.setdefault("securitySchemes", {})[SCHEME] = {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key: `Authorization: Bearer <key>` (`python -m app.keys create NAME`).",
    }
    for path, operations in spec.get("paths", {}).items():
        for operation in operations.values():
            if path in OPEN:
                operation["security"] = []
                continue
            operation["security"] = [{SCHEME: []}, {}] if path in SIGNED else [{SCHEME: []}]
            envelope = "OpenAIErrorEnvelope" if path.startswith("/v1/") else "ErrorEnvelope"
            if envelope not in components.get("schemas", {}):
                envelope = "ErrorEnvelope"
            operation.setdefault("responses", {}).setdefault(
                "401",
                {
                    "description": "No API key, or one this server does not know",
                    "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{envelope}"}}},
                },
            )


def locations(spec: dict[str, Any]) -> None:
    """The 202 of a queued job names its URL in `Location`, which clients poll."""
    for path in QUEUED:
        accepted = spec.get("paths", {}).get(path, {}).get("post", {}).get("responses", {}).get("202")
        if accepted is not None:
            accepted.setdefault("headers", {})["Location"] = {
                "description": "The job's URL (`…/jobs/<id>`): poll it, or follow `/events` under it",
                "schema": {"type": "string"},
            }
