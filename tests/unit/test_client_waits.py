"""How `imagegen_client` waits for a job when the server or what stands between behaves oddly: a
proxy that buffers the event stream, 429/5xx answers and cut requests during a restart, a reconnect
after an outage, answers that are not our JSON. Scripted servers (httpx.MockTransport, or a tiny
HTTP server where a real read timeout matters); each test takes a few seconds at most."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

import imagegen_client.client as client_module
from imagegen_client import AsyncClient, Client, ImagegenError, Job, JobEvent
from imagegen_client.client import error_from_response

SSE = {"content-type": "text/event-stream"}


def view(job_id: str, status: str, step: int = 0) -> dict[str, Any]:
    return {"id": job_id, "status": status, "params": {}, "progress": {"step": step, "total": 4}}


def event(ident: str, status: str, step: int) -> bytes:
    data = json.dumps({"status": status, "progress": {"step": step, "total": 4}})
    return f"event: progress\r\nid: {ident}\r\ndata: {data}\r\n\r\n".encode()


# -- 1. a stream that delivers nothing ------------------------------------------------------------
class BufferingProxy(ThreadingHTTPServer):
    """Answers the event stream's headers and then nothing (as a proxy that buffers it would);
    long-polls get the finished job."""

    daemon_threads = True

    def __init__(self) -> None:
        self.job_id = str(uuid.uuid4())
        self.calls: list[str] = []
        self.stop = threading.Event()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                proxy.calls.append(self.path)
                if self.path.endswith("/events"):
                    self.send_response(200)
                    self.send_header("content-type", "text/event-stream")
                    self.end_headers()
                    self.wfile.flush()
                    proxy.stop.wait(10)  # holds the stream open, silent
                    return
                body = json.dumps(view(proxy.job_id, "succeeded", 4)).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        super().__init__(("127.0.0.1", 0), Handler)

    def __enter__(self) -> BufferingProxy:
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.shutdown()
        self.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_silent_stream_hands_the_wait_to_long_polls(monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """Behind a proxy that buffers the stream nothing arrives, not even the keep-alives: the wait
    read that as a dead link and reconnected until its timeout, then reported a job that had
    succeeded long before as a WaitTimeout. Now, after SSE_SILENCE of nothing, it long-polls."""
    monkeypatch.setattr(client_module, "SSE_SILENCE", 0.5, raising=False)
    with BufferingProxy() as proxy:
        started = time.monotonic()
        if kind == "sync":
            with Client(proxy.url) as client:
                job = client.wait(proxy.job_id, timeout=3)
                mode = client.mode
        else:

            async def wait() -> tuple[Job, str]:
                async with AsyncClient(proxy.url) as client:
                    return await client.wait(proxy.job_id, timeout=3), client.mode

            job, mode = asyncio.run(wait())
        assert job.succeeded and time.monotonic() - started < 2.5
        assert mode == "longpoll"  # nothing ever came through this stream: later waits long-poll at once
        assert any("wait=" in call for call in proxy.calls), proxy.calls


def test_past_the_deadline_a_job_that_finished_is_returned(monkeypatch: pytest.MonkeyPatch) -> None:
    """At the deadline the wait fetched the job and raised WaitTimeout even when it had ended."""
    monkeypatch.setattr(client_module, "EMPTY_STREAMS", 1000, raising=False)  # reconnect until the deadline
    job_id = str(uuid.uuid4())
    fetched: list[float] = []

    def server(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/events"):  # a stream that ends before the terminal event, again and again
            return httpx.Response(200, headers=SSE, content=b"")
        fetched.append(time.monotonic())
        return httpx.Response(200, json=view(job_id, "succeeded", 4))

    events: list[JobEvent] = []
    with Client("http://scripted", transport=httpx.MockTransport(server)) as client:
        started = time.monotonic()
        assert client.wait(job_id, timeout=0.5, on_progress=events.append).succeeded
    assert [e.status for e in events] == ["succeeded"]
    assert len(fetched) == 1 and fetched[0] - started >= 0.5  # fetched once, at the deadline


# -- 2. transient errors within the outage window -------------------------------------------------
def test_the_wait_rides_out_429_and_5xx_answers_on_the_stream() -> None:
    job_id = str(uuid.uuid4())
    answers = [
        httpx.Response(
            503, json={"error": {"code": "unavailable", "message": "Redis down"}}, headers={"Retry-After": "1"}
        ),
        httpx.Response(502, text="<html><title>502 Bad Gateway</title></html>", headers={"content-type": "text/html"}),
        httpx.Response(429, json={"error": {"code": "rate_limited", "message": "slow down"}}),
        httpx.Response(504, text="upstream timed out"),
        httpx.Response(200, headers=SSE, content=event("1-0", "succeeded", 4)),
    ]

    def server(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/events"):
            return answers.pop(0)
        return httpx.Response(200, json=view(job_id, "succeeded", 4))

    with Client("http://scripted", transport=httpx.MockTransport(server)) as client:
        started = time.monotonic()
        assert client.wait(job_id, timeout=20).succeeded
        assert time.monotonic() - started >= 1  # slept the 503's Retry-After
    assert answers == []


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_long_poll_cut_by_a_restart_is_tried_again(kind: str) -> None:
    job_id = str(uuid.uuid4())
    cuts: list[Exception] = [httpx.RemoteProtocolError("peer closed connection"), httpx.ReadError("reset")]

    def server(request: httpx.Request) -> httpx.Response:
        if cuts:
            raise cuts.pop(0)
        return httpx.Response(200, json=view(job_id, "succeeded", 4))

    if kind == "sync":
        with Client("http://scripted", transport=httpx.MockTransport(server)) as client:
            client.mode = "longpoll"
            job = client.wait(job_id, timeout=20)
    else:

        async def wait() -> Job:
            async with AsyncClient("http://scripted", transport=httpx.MockTransport(server)) as client:
                client.mode = "longpoll"
                return await client.wait(job_id, timeout=20)

        job = asyncio.run(wait())
    assert job.succeeded and cuts == []


def test_other_errors_still_end_the_wait_at_once() -> None:
    def server(request: httpx.Request) -> httpx.Response:
        return httpx.Response(500, json={"error": {"code": "internal_error", "message": "boom"}})

    with Client("http://scripted", transport=httpx.MockTransport(server)) as client:
        started = time.monotonic()
        with pytest.raises(ImagegenError) as info:
            client.wait(str(uuid.uuid4()), timeout=20)
    assert info.value.status == 500 and time.monotonic() - started < 1


# -- 3. Last-Event-ID across an outage ------------------------------------------------------------
@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_reconnect_after_an_outage_resumes_after_the_last_event(kind: str) -> None:
    """The stream ends (the API shuts down), the next connection is refused (it is restarting),
    then the API is back: the client asked again without Last-Event-ID, the stream replayed from
    the start and the progress went back to step 1."""
    job_id = str(uuid.uuid4())
    asked: list[str | None] = []

    def server(request: httpx.Request) -> httpx.Response:
        if not request.url.path.endswith("/events"):
            return httpx.Response(200, json=view(job_id, "succeeded", 4))
        asked.append(request.headers.get("last-event-id"))
        if len(asked) == 1:
            return httpx.Response(200, headers=SSE, content=event("1-0", "running", 1) + event("2-0", "running", 2))
        if len(asked) == 2:
            raise httpx.ConnectError("connection refused")
        after = request.headers.get("last-event-id")
        replay = b"" if after == "2-0" else event("1-0", "running", 1) + event("2-0", "running", 2)
        return httpx.Response(200, headers=SSE, content=replay + event("3-0", "succeeded", 4))

    steps: list[int] = []
    if kind == "sync":
        with Client("http://scripted", transport=httpx.MockTransport(server)) as client:
            job = client.wait(job_id, timeout=20, on_progress=lambda e: steps.append(e.progress.step))
    else:

        async def wait() -> Job:
            async with AsyncClient("http://scripted", transport=httpx.MockTransport(server)) as client:
                return await client.wait(job_id, timeout=20, on_progress=lambda e: steps.append(e.progress.step))

        job = asyncio.run(wait())
    assert job.succeeded
    assert asked == [None, "2-0", "2-0"]
    assert steps == sorted(steps), steps  # the bar never jumps back


# -- 4. error bodies that are not our JSON --------------------------------------------------------
def test_errors_without_our_envelope_say_what_the_status_means() -> None:
    page = "<!DOCTYPE html>\n<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>"
    err = error_from_response(httpx.Response(502, text=page, headers={"content-type": "text/html"}))
    assert (err.message, str(err)) == ("Bad Gateway", "Bad Gateway (HTTP 502, http_502)")
    page = "<html>\n<head><title>Upstream &amp; friends are down</title></head></html>"
    err = error_from_response(httpx.Response(503, text=page, headers={"content-type": "text/html; charset=utf-8"}))
    assert err.message == "Service Unavailable: Upstream & friends are down"
    assert error_from_response(httpx.Response(500, text="<html>\n<body>x")).message == "Internal Server Error"
    assert error_from_response(httpx.Response(504, content=b"")).message == "Gateway Timeout"
    # A plain-text body says what went wrong in its first line (Envoy, a framework's plain 500).
    plain = httpx.Response(503, text="\nno healthy upstream\nmore", headers={"content-type": "text/plain"})
    assert error_from_response(plain).message == "Service Unavailable: no healthy upstream"


# -- 6. smaller ones ------------------------------------------------------------------------------
def test_event_data_that_is_not_json_is_a_protocol_error() -> None:
    job_id = str(uuid.uuid4())

    def server(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/events"):
            return httpx.Response(200, headers=SSE, content=b"data: <html>hello</html>\r\n\r\n")
        return httpx.Response(200, json=view(job_id, "running", 1))

    client = Client("http://scripted", transport=httpx.MockTransport(server))
    with client, pytest.raises(ImagegenError) as info:
        client.wait(job_id, timeout=5)
    assert info.value.code == "protocol_error" and "not a JSON object" in info.value.message


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_generate_takes_a_wait(kind: str) -> None:
    """`generate(..., wait=5)` was a TypeError (its own `wait=` and the caller's went to submit)."""
    job_id = str(uuid.uuid4())
    prefer: list[str | None] = []

    def server(request: httpx.Request) -> httpx.Response:
        prefer.append(request.headers.get("prefer"))
        assert "wait" not in json.loads(request.content or b"{}")
        return httpx.Response(200, json=view(job_id, "succeeded", 4))

    if kind == "sync":
        with Client("http://scripted", transport=httpx.MockTransport(server)) as client:
            assert client.generate("x", wait=5, timeout=60).succeeded
            assert client.generate("x", wait=0).succeeded  # 0: the POST is not held
    else:

        async def run() -> None:
            async with AsyncClient("http://scripted", transport=httpx.MockTransport(server)) as client:
                assert (await client.generate("x", wait=5, timeout=60)).succeeded
                assert (await client.generate("x", wait=0)).succeeded

        asyncio.run(run())
    assert prefer == ["wait=5", None]
