"""Image uploads: the larger body limit of the upload routes, reading an upload from multipart
form data or from JSON with base64, and turning the image checks into HTTP errors."""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import json
import re
import weakref
from typing import Any

import anyio
import anyio.to_thread
from fastapi.exceptions import RequestValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request

from app.api.middleware import BodySizeLimit, BodyTooLarge
from app.core.errors import InvalidRequestError, PayloadTooLargeError
from app.core.images import DECODING_AT_ONCE, MAX_INPUT_BYTES, InputImageError, normalize_image

UPLOAD_PATHS = frozenset({"/variations", "/v1/images/variations"})
# Base64 in JSON grows an image by 4/3; leave room for the other fields and multipart framing.
UPLOAD_BODY_BYTES = MAX_INPUT_BYTES * 4 // 3 + 256 * 1024
DATA_URL = re.compile(r"^data:(?P<type>[\w.+-]+/[\w.+-]+)?(;[\w=.-]+)*;base64,", re.IGNORECASE)
MAX_FORM_FIELDS = 32
# `{`, `[` and `,` in a JSON body (strings included): its fields' values are short (prompts of at
# most 1,000 characters) and the image's base64 has none, so a request needs a few thousand at most.
MAX_JSON_STRUCTURE = 10_000


class UploadAwareBodySizeLimit:
    """The usual body limit everywhere, a larger one on the routes that take an image."""

    def __init__(self, app: Any, max_bytes: int, upload_max_bytes: int = UPLOAD_BODY_BYTES) -> None:
        self.default = BodySizeLimit(app, max_bytes)
        self.uploads = BodySizeLimit(app, max(max_bytes, upload_max_bytes))

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = str(scope.get("path", "")).removeprefix(str(scope.get("root_path", "")))  # behind a path prefix too
        limit = self.uploads if scope["type"] == "http" and path in UPLOAD_PATHS else self.default
        await limit(scope, receive, send)


class Upload:
    """One parsed upload request: the image bytes, their declared type, and the other fields."""

    def __init__(self, data: bytes, content_type: str | None, fields: dict[str, Any]) -> None:
        self.data = data
        self.content_type = content_type
        self.fields = fields


def _invalid(field: str, message: str) -> InvalidRequestError:
    loc = ["body"] if field == "body" else ["body", field]
    return InvalidRequestError(f"{field}: {message}", code="validation_error", details=[{"loc": loc, "msg": message}])


async def read_upload(request: Request, image_field: str = "image") -> Upload:
    """Parse multipart/form-data (the image as a file part) or JSON (the image as base64, a data:
    URL allowed). Raises 400 for malformed JSON, 415 for other content types, 422 for a missing
    or undecodable image or repeated fields."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        return await _read_multipart(request, image_field)
    if ctype == "application/json" or ctype.endswith("+json"):
        return await _read_json(request, image_field)
    raise HTTPException(415, detail="send multipart/form-data (image as a file) or application/json (base64 image)")


async def _read_multipart(request: Request, image_field: str) -> Upload:
    try:
        form = await request.form(max_files=1, max_fields=MAX_FORM_FIELDS)
    except (HTTPException, BodyTooLarge):  # the size limit answers 413 itself
        raise
    except Exception as exc:  # malformed multipart framing
        raise HTTPException(400, detail=f"malformed multipart body ({type(exc).__name__})") from None
    try:
        fields: dict[str, Any] = {}
        data: bytes | None = None
        declared: str | None = None
        for key in form:
            values = form.getlist(key)
            if len(values) != 1:
                raise _invalid(key, "given more than once")
            value = values[0]
            if key == image_field:
                if not isinstance(value, UploadFile):
                    raise _invalid(key, "must be a file part")
                data = await value.read(MAX_INPUT_BYTES + 1)  # one byte over is enough to say "too large"
                declared = value.content_type
            elif isinstance(value, UploadFile):
                raise _invalid(key, "unexpected file part")
            else:
                fields[key] = value
    finally:
        await form.close()
    if data is None:
        raise _invalid(image_field, "field required (a file part)")
    return Upload(data, declared, fields)


async def _read_json(request: Request, image_field: str) -> Upload:
    raw = await request.body()
    # Parsed on a decoding thread (see `_decoder_threads`): a body of up to ~5.6 MB took the event
    # loop for tens of ms (`/healthz` and every other request waited), and with a few at once
    # the memory of as many parsed bodies.
    return await anyio.to_thread.run_sync(_parse_json, raw, image_field, limiter=_decoder_threads())


def _parse_json(raw: bytes, image_field: str) -> Upload:
    """The upload in a JSON body: 400 if it is not JSON (or more than MAX_JSON_STRUCTURE), 422 if
    it is not an object or its image is missing or not base64."""
    # A request is one object of a few short fields and the image, whose base64 has no brackets
    # or commas. A body of millions of tiny values (`[{},{},…]`) parsed to ~140 MiB of Python
    # objects; one past this bound is refused before it is parsed, as a body nested too deeply is.
    structure = len(raw) - len(raw.translate(None, b"{[,"))
    if structure > MAX_JSON_STRUCTURE:
        raise _malformed(f"more than {MAX_JSON_STRUCTURE} brackets and commas; a request is one object of its fields")
    try:
        body = json.loads(raw)
    except RecursionError:  # nesting past the stack: invalid too
        raise _malformed("nested too deeply") from None
    except ValueError:  # not JSON, not UTF-8, or an integer of more digits than Python converts
        # The same answer as a malformed JSON body on any other route (400 malformed_json / invalid_json).
        raise _malformed(None) from None
    if not isinstance(body, dict):
        raise _invalid("body", "must be a JSON object")
    encoded = body.pop(image_field, None)
    if not isinstance(encoded, str) or not encoded:
        raise _invalid(image_field, "field required (base64 of a PNG, JPEG or WebP file)")
    declared = None
    match = DATA_URL.match(encoded)
    if match is not None:
        declared = match["type"]
        encoded = encoded[match.end() :]
    try:
        data = base64.b64decode("".join(encoded.split()), validate=True)  # line breaks as `base64` wraps them
    except (binascii.Error, ValueError):
        raise _invalid(image_field, "not valid base64") from None
    return Upload(data, declared, body)


def _malformed(why: str | None) -> RequestValidationError:
    """400 malformed_json (invalid_json on /v1), with the reason when there is one."""
    msg = f"Invalid JSON: {why}" if why else "request body is not valid JSON"
    return RequestValidationError([{"type": "json_invalid", "loc": ("body",), "msg": msg, "input": None}])


_decoders: weakref.WeakKeyDictionary[Any, anyio.CapacityLimiter] = weakref.WeakKeyDictionary()


def _decoder_threads() -> anyio.CapacityLimiter:
    """Threads that decode uploads: as many as decode at once (app.core.images), so that uploads
    waiting their turn wait on the event loop. In the shared pool (40 threads) they each held a
    thread while they waited, and ~40 large uploads left none for `/healthz` or `GET /jobs`.
    One limiter per event loop (an app's; tests run several)."""
    loop = asyncio.get_running_loop()
    if loop not in _decoders:
        _decoders[loop] = anyio.CapacityLimiter(DECODING_AT_ONCE)
    return _decoders[loop]


async def normalized_png(upload: Upload, fit: int) -> bytes:
    """The upload checked and re-encoded as PNG (see app.core.images), or the matching HTTP error."""
    try:
        work = functools.partial(normalize_image, upload.data, upload.content_type, fit=fit)
        return await anyio.to_thread.run_sync(work, limiter=_decoder_threads())
    except InputImageError as exc:
        if exc.status == 413:
            raise PayloadTooLargeError(exc.message) from None
        if exc.status == 415:
            raise HTTPException(415, detail=exc.message) from None
        raise InvalidRequestError(
            exc.message, code=exc.code, details=[{"loc": ["body", "image"], "msg": exc.message}]
        ) from None
