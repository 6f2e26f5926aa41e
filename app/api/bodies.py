"""Request bodies and headers read by the route itself instead of by FastAPI's parameter solving.

`POST /generate` is the hot path: FastAPI decodes a JSON body to Python objects (after parsing the
content type with the `email` package), then solves every declared parameter and dependency one
by one. Reading the bytes and validating them with `model_validate_json` does the same checks in
one pass in pydantic-core, about a quarter of the request's CPU time less (bench/README.md,
"Ingress"). Errors keep FastAPI's shape: a `RequestValidationError` with `body`/`header` locations,
which the app's handler turns into 400 `malformed_json` or 422 `validation_error`.

Routes that read their own body document it with `openapi_extra` (`json_request_body`,
`header_parameters`), so /docs and the schema-driven tests still see it. A route that also
takes no parameters or dependencies can skip FastAPI's per-request solving altogether
(`DirectRoute`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import fastapi.routing
from fastapi import HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)
MAX_HEADER = 255  # characters in a header a route reads with `header`


def is_json(content_type: str | None) -> bool:
    media = (content_type or "").split(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def validation_error(exc: ValidationError, where: str = "body") -> RequestValidationError:
    """pydantic's errors located under `where`, as FastAPI reports a body it validated itself."""
    return RequestValidationError([{**err, "loc": (where, *err["loc"])} for err in exc.errors()])


async def read_json(request: Request, model: type[M]) -> M:
    """The JSON body validated as `model`: 415 for another content type (a form post from a
    browser, `curl -d` without a JSON `Content-Type`), 400 if it is not JSON, 422 if invalid."""
    if not is_json(request.headers.get("content-type")):
        raise HTTPException(415, detail="send the body as JSON (Content-Type: application/json)")
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as exc:
        raise validation_error(exc) from None


def header(request: Request, name: str, max_length: int = MAX_HEADER) -> str | None:
    """A request header, refused (422) when longer than `max_length` characters."""
    value = request.headers.get(name)
    if value is not None and len(value) > max_length:
        raise RequestValidationError(
            [
                {
                    "type": "string_too_long",
                    "loc": ("header", name),
                    "msg": f"String should have at most {max_length} characters",
                    "input": value,
                }
            ]
        )
    return value


def inline_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A model's JSON schema with its `$defs` inlined (OpenAPI has no `$defs` beside a request body)."""
    defs = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return walk(defs[ref.removeprefix("#/$defs/")])
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(schema)


def json_request_body(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI `requestBody` for a route that reads `model` with `read_json`."""
    return {"required": True, "content": {"application/json": {"schema": inline_schema(model.model_json_schema())}}}


def header_parameters(**headers: str) -> list[dict[str, Any]]:
    """OpenAPI parameters for optional headers read with `header` (name → description)."""
    return [
        {
            "name": name.replace("_", "-"),
            "in": "header",
            "required": False,
            "description": description,
            "schema": {"type": "string", "maxLength": MAX_HEADER},
        }
        for name, description in headers.items()
    ]


class DirectRoute(APIRoute):
    """A route whose endpoint is `async def endpoint(request) -> Response` and is called as it is.

    Even with nothing to solve but the request, FastAPI's handler runs its dependency solver per
    request (a throwaway `Response` for headers that dependencies may set, cache keys, the
    sub-dependencies' recursion) and then inspects what the endpoint returned: about 15 % of
    `POST /generate`'s CPU time under load (bench/README.md, "Ingress"). The endpoint reads its own
    body and headers (`read_json`, `header`) and resolves its caller itself; its exceptions reach the
    app's handlers as any route's do. /docs is unchanged: the schema still comes from the route's
    declaration (`response_model`, `responses`, `openapi_extra`). Dependencies given without a
    parameter (`dependencies=` on the route, its router, the inclusion or the app) still run: such a
    route is served by FastAPI's handler, at FastAPI's cost.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        _check_direct(self.path, self.dependant)  # the endpoint's own declaration: refused at once
        # Included with `dependencies=` (on the router, at `include_router`, on the app), FastAPI builds
        # the handler with the inclusion's view of the route, when the first request comes. Those
        # dependencies must run, so that route is served by FastAPI's own handler, as any route is.
        context = getattr(fastapi.routing, "_effective_route_context_var", None)
        effective: Any = context.get() if context is not None else None
        if effective is not None and effective.original_route is self and effective.dependant is not None:
            if effective.dependant.dependencies:
                return super().get_route_handler()
        elif self.dependant.dependencies:  # a FastAPI that folds them into the route itself
            return super().get_route_handler()
        return self.endpoint


def _check_direct(path: str, dependant: Any) -> None:
    """Refuse an endpoint that declares anything but the request (parameter-less `dependencies=`
    on the route or its router are allowed: the route then runs through FastAPI's handler)."""
    declared = dependant.path_params or dependant.query_params or dependant.header_params
    own = [d for d in dependant.dependencies if d.name is not None]  # a parameter's `Depends`
    if declared or own or dependant.cookie_params or dependant.body_params:
        raise TypeError(f"{path}: a DirectRoute endpoint takes the request alone")
    if dependant.request_param_name is None:
        raise TypeError(f"{path}: a DirectRoute endpoint takes the request as its parameter")


T = TypeVar("T")


async def while_connected(request: Request, waiting: Coroutine[Any, Any, T]) -> T | None:
    """`waiting`'s result, or None once the client has disconnected (the wait is then cancelled).

    Starlette does not cancel a plain route when its client goes: a long-poll or an OpenAI call
    left behind by a client (a proxy's short timeout, then a retry) waited out its 60–120 s and
    kept one of the `max_streams` blocking Redis reads. The request's body must have been read."""
    task = asyncio.ensure_future(waiting)
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        done, _ = await asyncio.wait((task, gone), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # this request itself cancelled (shutdown)
        task.cancel()
        gone.cancel()
        raise
    gone.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):  # nobody is left to tell
        await task
    return None


async def _disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass  # a body's last empty chunk, as a GET may still send one
