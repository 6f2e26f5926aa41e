"""app.api.uploads: a JSON upload body (up to ~5.6 MB) is parsed on a decoding thread, not on the
event loop, and a body of millions of tiny values is refused before it is parsed: `[{},{},…]`
took 0.3 s of the event loop and ~140 MiB per request."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any

import anyio.to_thread
import pytest
from fastapi.exceptions import RequestValidationError
from starlette.requests import Request

from app.api import uploads
from app.core.errors import InvalidRequestError
from app.core.images import DECODING_AT_ONCE
from tests.procs import ROOT

PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 64).decode()


def request(body: bytes, content_type: str = "application/json") -> Request:
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    headers = [(b"content-type", content_type.encode())]
    scope = {"type": "http", "method": "POST", "path": "/variations", "headers": headers, "query_string": b""}
    return Request(scope, receive)


def read(body: bytes) -> uploads.Upload:
    return asyncio.run(uploads.read_upload(request(body)))


def json_error(body: bytes) -> dict[str, Any]:
    with pytest.raises(RequestValidationError) as info:
        read(body)
    (error,) = info.value.errors()
    return error


def test_a_json_body_is_parsed_on_a_decoding_thread(monkeypatch) -> None:
    loop_thread = threading.get_ident()
    parsed_on: list[int] = []
    parsing = 0
    most = 0
    loads = json.loads

    def slow_loads(raw: Any) -> Any:
        nonlocal parsing, most
        parsed_on.append(threading.get_ident())
        parsing += 1
        most = max(most, parsing)
        time.sleep(0.05)
        parsing -= 1
        return loads(raw)

    monkeypatch.setattr(uploads.json, "loads", slow_loads)
    body = json.dumps({"image": PNG, "prompt": "a cat"}).encode()

    async def main() -> list[uploads.Upload]:
        shared = anyio.to_thread.current_default_thread_limiter()
        tasks = [asyncio.create_task(uploads.read_upload(request(body))) for _ in range(8)]
        await asyncio.sleep(0.02)
        assert shared.borrowed_tokens == 0  # waiting bodies hold no thread of the shared pool
        return await asyncio.gather(*tasks)

    done = asyncio.run(main())
    assert parsed_on and loop_thread not in parsed_on
    assert most <= DECODING_AT_ONCE  # the decoding threads' limit: as many bodies held at once
    assert all(u.fields == {"prompt": "a cat"} and u.data.startswith(b"\x89PNG") for u in done)


def test_json_bodies_get_the_answers_they_had() -> None:
    upload = read(json.dumps({"image": f"data:image/png;base64,{PNG}", "prompt": "a, b, " * 160}).encode())
    assert upload.content_type == "image/png" and upload.fields == {"prompt": "a, b, " * 160}
    assert json_error(b"{nope")["msg"] == "request body is not valid JSON"
    assert json_error(b"[" * 100_000 + b"]" * 100_000)["type"] == "json_invalid"  # 400, as before
    assert json_error(b"[" * 5_000 + b"]" * 5_000)["type"] == "json_invalid"  # deeper than the parser goes
    assert json_error(b'{"image": "\xff"}')["type"] == "json_invalid"  # not UTF-8
    with pytest.raises(InvalidRequestError, match="must be a JSON object"):
        read(b"[1, 2]")
    with pytest.raises(InvalidRequestError, match="must be a JSON object"):
        read(b'"' + b"A" * 1_000_000 + b'"')
    with pytest.raises(InvalidRequestError, match="not valid base64"):
        read(b'{"image": "@@@"}')


def test_an_integer_python_will_not_convert_is_a_400_not_a_500() -> None:
    """json.loads raises a plain ValueError for an integer of more than 4,300 digits."""
    error = json_error(b'{"image": "x", "seed": 1' + b"0" * 5_000 + b"}")
    assert error["type"] == "json_invalid"


@pytest.mark.parametrize(
    "body",
    [
        "b'[' + b'{},' * 1_850_000 + b'{}]'",
        "b'{\"prompt\": [' + b'{},' * 1_850_000 + b'{}]}'",
        "b'{\"prompt\": [' + b'0,' * 2_750_000 + b'0]}'",
    ],
    ids=["array of objects", "objects in a field", "numbers in a field"],
)
def test_millions_of_tiny_values_are_refused_unparsed(body: str) -> None:
    """In a process of its own, for its peak resident memory: ~140 MiB for each such body."""
    # Its peak from /proc (VmHWM), not `ru_maxrss`: Linux carries that over from the parent (this
    # pytest process), so a child's growth past it read as less than it was.
    script = textwrap.dedent(f"""
        import asyncio
        from fastapi.exceptions import RequestValidationError
        from tests.unit.test_upload_json import request
        from app.api import uploads

        def peak():
            with open("/proc/self/status") as status:
                return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))

        body = {body}
        assert len(body) > 5_000_000
        before = peak()
        try:
            asyncio.run(uploads.read_upload(request(body)))
            answer = "parsed"
        except RequestValidationError as exc:
            answer = exc.errors()[0]["type"]
        except Exception as exc:
            answer = type(exc).__name__
        grown = (peak() - before) / 1024
        print(answer, grown)
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    answer, grown = out.stdout.split()[-2:]
    assert float(grown) < 32 and answer == "json_invalid", out.stdout  # MiB; a 400, as a body nested too deeply
