"""Pure-ASGI middleware: refuse request bodies over the size limit with 413 before reading them,
and requests a browser was made to send from another site (or to a host name not ours)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

Scope = dict[str, Any]
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class BodyTooLarge(Exception):
    pass


class BodySizeLimit:
    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.max_bytes
                except ValueError:
                    too_big = False
                if too_big:
                    await self._reject(send, scope)
                    return
        seen = 0
        started = False

        async def limited_receive() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge
            return message

        async def tracking_send(message: dict[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await self._reject(send, scope)

    async def _reject(self, send: Any, scope: Scope) -> None:
        await send_error(send, scope, 413, "payload_too_large", f"request body over {self.max_bytes} bytes")


async def send_error(send: Any, scope: Scope, status: int, code: str, message: str) -> None:
    """Answer with our error envelope from outside FastAPI (OpenAI's error shape under /v1)."""
    error: dict[str, Any] = {"code": code, "message": message}
    path = str(scope.get("path", "")).removeprefix(str(scope.get("root_path", "")))
    if path.startswith("/v1/"):  # OpenAI's error shape there, as for every /v1 error
        error |= {"type": "invalid_request_error", "param": None}
    body = json.dumps({"error": error}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _host_name(authority: str) -> str:
    """`Example.com.:8000` -> `example.com`; `[::1]:8000` -> `::1`; `*.Example.com:443` -> `*.example.com`."""
    authority = authority.strip().lower()
    if authority.startswith("["):
        return authority[1 : authority.find("]")] if "]" in authority else authority
    name = authority.rsplit(":", 1)[0] if authority.count(":") == 1 else authority
    return name.rstrip(".")


def _authority(value: str, scheme: str | None = None) -> str:
    """A host[:port] as an origin has it: lower case, no trailing dot, no default port (80, 443)."""
    value = value.strip().lower()
    host, port = value, ""
    if value.startswith("["):
        end = value.find("]")
        host, port = value[: end + 1], value[end + 2 :] if value[end + 1 : end + 2] == ":" else ""
    elif value.count(":") == 1:
        host, port = value.split(":")
    host = host.rstrip(".")
    if port in ("", "80" if scheme in (None, "http") else "", "443" if scheme in (None, "https") else ""):
        return host
    return f"{host}:{port}"


def _origin_authority(url: str) -> str:
    parts = urlsplit(url.strip())
    return _authority(parts.netloc, parts.scheme.lower())


def _origin(url: str) -> str:
    return f"{urlsplit(url.strip()).scheme.lower()}://{_origin_authority(url)}"


# What a page on another site can make a browser send without asking the server first (no CORS
# preflight): a POST with one of these types, or none. Anything else (JSON, DELETE) is preflighted,
# and CORS, off unless IMAGEGEN_CORS_ORIGINS allows the page, refuses it before it is sent.
SIMPLE_TYPES = frozenset({"multipart/form-data", "application/x-www-form-urlencoded", "text/plain", ""})


class RequestGuard:
    """Two checks a browser cannot be trusted to make for a service that runs without keys.

    - **Cross-site form posts.** A page on another site can make a visitor's browser POST to this
      API without asking first, as long as the body is a form or plain text (a plain HTML form
      sends `multipart/form-data`, which `/variations` takes): with keys off, that queues jobs on
      the visitor's machine. Such a POST is refused with 403 when the browser says it comes from
      another site: by `Sec-Fetch-Site` (which browsers send to HTTPS and loopback addresses), else
      by an `Origin` that names neither this host (as the request or a proxy's `X-Forwarded-Host`
      or `Forwarded` header gives it) nor `IMAGEGEN_PUBLIC_URL`'s; unless `IMAGEGEN_CORS_ORIGINS`
      allows that origin. JSON bodies and DELETEs need no such check: browsers ask first (CORS).
      Clients that are not browsers send neither header.
    - **Host names** (`IMAGEGEN_ALLOWED_HOSTS`, off when empty). DNS rebinding points a site's name
      at 127.0.0.1, and its pages then read this API as their own origin; a request naming a host
      not on the list gets 400. `make run` sets it to the loopback names when it listens on loopback.
    """

    def __init__(
        self, app: Any, cors_origins: list[str], public_url: str = "", allowed_hosts: Sequence[str] = ()
    ) -> None:
        self.app = app
        self.trusted_origins = {_origin(o) for o in cors_origins if o != "*"}
        self.any_origin = "*" in cors_origins
        self.public_authority = _origin_authority(public_url) if public_url else None
        names = [h.strip().lower() for h in allowed_hosts if h.strip()]
        self.any_host = not names or "*" in names
        self.hosts = {_host_name(h) for h in names}

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            problem = self._problem(scope)
            if problem is not None:
                await send_error(send, scope, *problem)
                return
        await self.app(scope, receive, send)

    def _problem(self, scope: Scope) -> tuple[int, str, str] | None:
        host = origin = fetch_site = None
        content_type = ""
        forwarded: list[str] = []
        for name, value in scope.get("headers", ()):
            if name == b"host":
                host = value.decode("latin-1")
            elif name == b"origin":
                origin = value.decode("latin-1")
            elif name == b"sec-fetch-site":
                fetch_site = value.decode("latin-1").strip().lower()
            elif name == b"content-type":
                content_type = value.decode("latin-1").split(";")[0].strip().lower()
            elif name in (b"x-forwarded-host", b"forwarded"):
                forwarded.append(value.decode("latin-1"))
        if not self.any_host and not self._host_allowed(host):
            return 400, "bad_request", "this server does not answer to that host name (see IMAGEGEN_ALLOWED_HOSTS)"
        if scope.get("method") != "POST" or content_type not in SIMPLE_TYPES or self.any_origin:
            return None
        if origin is not None and _origin(origin) in self.trusted_origins:
            return None
        if fetch_site is not None:
            cross = fetch_site in ("cross-site", "same-site")
        elif origin is not None and origin != "null":
            mine = {self.public_authority, *(_authority(h) for h in _hosts_named(host, forwarded))}
            cross = _origin_authority(origin) not in mine
        else:
            cross = origin == "null"  # a sandboxed frame or a page from a file
        if cross:
            return 403, "forbidden", "cross-site request refused: allow its origin with IMAGEGEN_CORS_ORIGINS"
        return None

    def _host_allowed(self, host: str | None) -> bool:
        if host is None:
            return False
        name = _host_name(host)
        return name in self.hosts or any(h.startswith("*.") and name.endswith(h[1:]) for h in self.hosts)


def _hosts_named(host: str | None, forwarded: list[str]) -> list[str]:
    """This request's host as the client named it: its `Host`, and what a proxy in front passed on
    in `X-Forwarded-Host` or `Forwarded: host=` (a page cannot add those to a request without a
    CORS preflight, so a cross-site form post cannot claim them)."""
    names = [host] if host else []
    for value in forwarded:
        for part in value.replace(";", ",").split(","):
            key, _, named = part.strip().partition("=")
            if not _:  # X-Forwarded-Host: host[:port], a list when several proxies added theirs
                names.append(part.strip())
            elif key.strip().lower() == "host":
                names.append(named.strip().strip('"'))
    return names
