"""How `imagegen_client` submits a job through trouble: every POST carries an Idempotency-Key, and
one that meets a refused or cut connection, a timeout, or a 429, 502, 503 or 504 is sent again with
the same key and body (the server answers a repeat with the job the first one made, never a second
one); any other refusal ends the submission at once. Scripted servers (httpx.MockTransport)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

import imagegen_client.client as client_module
from imagegen_client import AsyncClient, Client, ImagegenError, cli

PNG = b"\x89PNG\r\n\x1a\nfake"
JOB = str(uuid.uuid4())


def view(job_id: str = JOB, status: str = "queued") -> dict[str, Any]:
    images = [{"index": 0, "url": "", "seed": 1, "width": 8, "height": 8}] if status == "succeeded" else []
    return {"id": job_id, "status": status, "params": {}, "progress": {"step": 0, "total": 4}, "images": images}


def refusal(status: int, code: str, retry_after: str | None = None) -> httpx.Response:
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    return httpx.Response(status, json={"error": {"code": code, "message": f"{code} ({status})"}}, headers=headers)


class Script:
    """Answers each POST with the next of `answers` (an exception is raised, as a transport that
    fails would) and keeps the Idempotency-Key, body, `Prefer`, httpx timeouts and send time (on
    the monotonic clock) of every one; other requests get JOB, succeeded."""

    def __init__(self, *answers: httpx.Response | Exception) -> None:
        self.answers = list(answers)
        self.posts: list[tuple[str | None, bytes]] = []
        self.prefer: list[str | None] = []
        self.timeouts: list[dict[str, float | None]] = []
        self.sent: list[float] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.method != "POST":
            return httpx.Response(200, json=view(JOB, "succeeded"))
        assert request.url.path == "/generate"
        self.sent.append(time.monotonic())
        self.posts.append((request.headers.get("idempotency-key"), request.content))
        self.prefer.append(request.headers.get("prefer"))
        self.timeouts.append(dict(request.extensions["timeout"]))
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    @property
    def keys(self) -> list[str | None]:
        return [key for key, _ in self.posts]


def call(kind: str, script: Script, method: str, *args: Any, **kwargs: Any) -> Any:
    """`method` of a Client (kind "sync") or an AsyncClient ("async") on `script`."""
    transport = httpx.MockTransport(script)
    if kind == "sync":
        with Client("http://scripted", transport=transport) as client:
            return getattr(client, method)(*args, **kwargs)

    async def run() -> Any:
        async with AsyncClient("http://scripted", transport=transport) as client:
            return await getattr(client, method)(*args, **kwargs)

    return asyncio.run(run())


@pytest.fixture(autouse=True)
def quick_pauses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client_module, "RECONNECT_PAUSE", 0.05)


@pytest.fixture
def slept(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The seconds the blocking client sleeps between tries (it still sleeps them)."""
    seconds: list[float] = []
    sleep = time.sleep

    def recorded(s: float) -> None:
        seconds.append(s)
        sleep(s)

    monkeypatch.setattr(client_module.time, "sleep", recorded)
    return seconds


# -- retried: the same key and body again -----------------------------------------------------------
@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize(
    "trouble",
    [
        httpx.ConnectError("connection refused"),  # the API restarting
        httpx.RemoteProtocolError("peer closed connection without sending a response"),  # cut: the job may exist
        httpx.ReadError("connection reset by peer"),
        httpx.ReadTimeout("timed out"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_a_failed_connection_sends_the_same_request_again(kind: str, trouble: Exception) -> None:
    """The submission raised at once: during an API restart, or when the connection dropped after
    the request went out (the job made or not, nobody knew)."""
    script = Script(trouble, httpx.Response(202, json=view()))
    job = call(kind, script, "submit", "a red circle", seed=7, num_images=2)
    assert job.id == JOB and job.status == "queued"
    assert len(script.posts) == 2 and script.posts[0] == script.posts[1]  # same key, same body
    key, body = script.posts[0]
    assert key is not None and uuid.UUID(key)
    assert json.loads(body) == {"prompt": "a red circle", "seed": 7, "num_images": 2}


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_503_is_retried_after_its_retry_after(kind: str, slept: list[float]) -> None:
    """The server answers 503 (Retry-After: 1) to a repeat whose first request is still writing its
    job, and while Redis is down; a proxy's 502 and 504 are retried the same way."""
    script = Script(
        refusal(503, "unavailable", retry_after="1"),
        httpx.Response(502, text="<html><title>502 Bad Gateway</title></html>", headers={"content-type": "text/html"}),
        httpx.Response(504, text="upstream timed out"),
        httpx.Response(202, json=view()),
    )
    assert call(kind, script, "submit", "x").id == JOB
    assert len(set(script.posts)) == 1 and len(script.posts) == 4
    if kind == "sync":
        assert slept[0] == 1.0  # the 503's Retry-After; then the default pause
        assert slept[1:] == [client_module.RECONNECT_PAUSE] * 2


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_429_then_the_original_job(kind: str) -> None:
    """A repeat that finds the job the first request made is answered 200 with it: that job is
    the submission's, as a 202's would be."""
    script = Script(refusal(429, "rate_limited", retry_after="0.2"), httpx.Response(200, json=view(JOB, "running")))
    job = call(kind, script, "submit", "x")
    assert (job.id, job.status) == (JOB, "running")
    assert len(script.posts) == 2 and script.posts[0] == script.posts[1]


@pytest.mark.parametrize(
    "answer",
    [
        refusal(422, "validation_error"),
        refusal(409, "idempotency_conflict"),  # the key was used with another body
        refusal(410, "gone"),  # the key's job has expired
        refusal(400, "bad_request"),
        refusal(500, "internal_error"),
    ],
    ids=lambda r: str(r.status_code),
)
def test_other_refusals_are_raised_at_once(answer: httpx.Response) -> None:
    script = Script(answer)
    with pytest.raises(ImagegenError) as info:
        call("sync", script, "submit", "x")
    assert info.value.status == answer.status_code and len(script.posts) == 1


def test_the_window_ends_with_the_last_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client_module, "RECONNECT_WINDOW", 1.0)
    tries: list[str | None] = []

    def server(request: httpx.Request) -> httpx.Response:
        tries.append(request.headers.get("idempotency-key"))
        body = {"error": {"code": "unavailable", "message": f"try {len(tries)}"}}
        return httpx.Response(503, json=body, headers={"Retry-After": "0.2"})

    with (
        Client("http://scripted", transport=httpx.MockTransport(server)) as client,
        pytest.raises(ImagegenError) as info,
    ):
        client.submit("x")
    assert len(tries) >= 2 and len(set(tries)) == 1
    assert (info.value.status, info.value.message) == (503, f"try {len(tries)}")  # the last answer, not the first


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_generate_retries_within_its_timeout(kind: str) -> None:
    """A held POST (`Prefer: wait`) that is retried is held for what is left of the caller's
    timeout, and the retries end with it, not RECONNECT_WINDOW later: no try goes out at or past
    the deadline (it would be sent unheld, under the client's whole request timeout)."""
    timeout = 2.0
    script = Script(*[refusal(503, "unavailable", retry_after="0.5") for _ in range(200)])
    started = time.monotonic()
    with pytest.raises(ImagegenError) as info:
        call(kind, script, "generate", "x", timeout=timeout)
    assert info.value.status == 503
    assert 2 <= len(script.posts) < 20 and len(set(script.keys)) == 1
    sent = [t - started for t in script.sent]
    assert max(sent) < timeout - client_module.RETRY_MIN_LEFT / 2, sent
    assert all(script.prefer), script.prefer  # every try held
    held = [float(str(p).removeprefix("wait=")) for p in script.prefer]
    assert held[0] <= timeout and held == sorted(held, reverse=True) and held[-1] < held[0]


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_no_retry_starts_too_close_to_the_deadline(kind: str) -> None:
    """A Retry-After that leaves less than RETRY_MIN_LEFT of the caller's timeout ends the
    submission with that answer at once, instead of sleeping into the deadline for a try that
    could not be answered in time."""
    script = Script(refusal(503, "unavailable", retry_after="1"), httpx.Response(200, json=view(JOB, "succeeded")))
    started = time.monotonic()
    with pytest.raises(ImagegenError) as info:
        call(kind, script, "generate", "x", timeout=1.2)
    assert info.value.status == 503 and len(script.posts) == 1
    assert time.monotonic() - started < 0.5  # raised, not slept


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize(
    ("method", "on_progress"),
    [("generate", False), ("generate", True), ("image", False)],
    ids=["held", "unheld", "image"],
)
def test_each_try_times_out_by_the_callers_deadline(kind: str, method: str, on_progress: bool) -> None:
    """Each try's httpx timeout ends at most DEADLINE_GRACE past what is left of `timeout`, held
    or not (with a progress callback generate's POST is not held), the first try and each retry."""
    timeout = 3.0
    done = httpx.Response(200, content=PNG, headers={"content-type": "image/png"})
    if method == "generate":
        done = httpx.Response(200, json=view(JOB, "succeeded"))
    script = Script(refusal(503, "unavailable", retry_after="0.5"), done)
    kwargs: dict[str, Any] = {"on_progress": lambda event: None} if on_progress else {}
    started = time.monotonic()
    call(kind, script, method, "x", timeout=timeout, **kwargs)
    assert len(script.posts) == 2
    for sent, limits in zip(script.sent, script.timeouts, strict=True):
        cap = timeout - (sent - started) + client_module.DEADLINE_GRACE + 0.2  # what was left, the grace, slack
        assert all(v is not None and v <= cap for v in limits.values()), (cap, limits)
    assert max(script.timeouts[1].values()) < max(script.timeouts[0].values())  # the retry: what is left


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_submission_without_a_deadline_keeps_its_timeouts(kind: str) -> None:
    """`submit` has no deadline: its POST keeps the client's timeout, a held one the hold plus that."""
    script = Script(httpx.Response(202, json=view()), httpx.Response(202, json=view()))
    call(kind, script, "submit", "x")
    call(kind, script, "submit", "x", wait=10)
    assert set(script.timeouts[0].values()) == {client_module.REQUEST_TIMEOUT}
    assert set(script.timeouts[1].values()) == {10 + client_module.REQUEST_TIMEOUT}


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_held_post_cut_and_sent_again_returns_the_finished_job(kind: str) -> None:
    """generate's POST is held until the job ends; cut mid-way (an API restart), the repeat is held
    again and its 200 is the finished job: no second job, no wait."""
    script = Script(
        httpx.RemoteProtocolError("peer closed connection"), httpx.Response(200, json=view(JOB, "succeeded"))
    )
    job = call(kind, script, "generate", "x", timeout=30)
    assert job.succeeded and job.id == JOB
    assert script.prefer[0] is not None and script.prefer[1] is not None  # both held
    assert len(set(script.posts)) == 1


# -- the key ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["sync", "async"])
def test_the_callers_key_is_sent(kind: str) -> None:
    script = Script(
        httpx.ConnectError("refused"),
        httpx.Response(202, json=view()),
        httpx.Response(200, json=view(JOB, "succeeded")),
        httpx.ReadError("reset"),
        httpx.Response(200, content=PNG, headers={"content-type": "image/png"}),
    )
    call(kind, script, "submit", "x", idempotency_key="order-1234")
    call(kind, script, "generate", "x", idempotency_key="order-1235", timeout=30)
    assert call(kind, script, "image", "x", idempotency_key="order-1236", timeout=30) == PNG
    assert script.keys == ["order-1234", "order-1234", "order-1235", "order-1236", "order-1236"]
    assert all(b"idempotency" not in body for _, body in script.posts)  # a header, not a field


def test_each_submission_has_a_key_of_its_own() -> None:
    script = Script(*[httpx.Response(202, json=view()) for _ in range(3)])
    for _ in range(3):
        call("sync", script, "submit", "same body")
    assert len({key for key in script.keys if key}) == 3


def test_the_cli_option_reaches_the_header(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    script = Script(httpx.ConnectError("refused"), httpx.Response(202, json=view()))

    def server(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/events"):
            data = json.dumps({"type": "succeeded", "job_id": JOB, "status": "succeeded"})
            return httpx.Response(200, headers={"content-type": "text/event-stream"}, text=f"data: {data}\n\n")
        if request.url.path.endswith("/images/0"):
            return httpx.Response(200, content=PNG, headers={"content-type": "image/png"})
        return script(request)

    class Scripted(Client):
        def __init__(self, base_url: str | None = None, *, api_key: str | None = None) -> None:
            super().__init__(base_url, api_key=api_key, transport=httpx.MockTransport(server))

    monkeypatch.setattr(cli, "Client", Scripted)
    argv = ["--url", "http://scripted", "generate", "x", "-q", "-o", str(tmp_path), "--idempotency-key", "run-42"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert script.keys == ["run-42", "run-42"]
    # The retry is said once on stderr (a wrong port would otherwise look like a hang for 60 s).
    notices = [line for line in capsys.readouterr().err.splitlines() if "sending it again" in line]
    assert len(notices) == 1 and notices[0].startswith("imagegen: POST http://scripted/generate"), notices
    assert (tmp_path / f"{JOB}-0.png").read_bytes() == PNG


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize(
    "message", ["[Errno -2] Name or service not known", "[Errno 8] nodename nor servname provided, or not known"]
)
def test_a_host_name_that_does_not_resolve_is_not_retried(kind: str, message: str) -> None:
    """A mistyped host is a wrong URL, not a restarting server: the error comes at once, not after
    the whole retry window."""
    script = Script(httpx.ConnectError(message), httpx.Response(202, json=view()))
    with pytest.raises(ImagegenError) as info:
        call(kind, script, "submit", "x")
    assert info.value.code == "connection_error" and len(script.posts) == 1


def test_retries_are_logged_once_per_submission(caplog: pytest.LogCaptureFixture) -> None:
    script = Script(httpx.ConnectError("refused"), refusal(503, "unavailable", "0"), httpx.Response(202, json=view()))
    with caplog.at_level("WARNING", logger="imagegen_client"):
        call("sync", script, "submit", "x")
    assert len(script.posts) == 3
    assert [r.getMessage() for r in caplog.records if "sending it again" in r.getMessage()] == [
        "POST http://scripted/generate: cannot connect to http://scripted: refused (connection_error); "
        "sending it again (same Idempotency-Key) for up to 60 s"
    ]
