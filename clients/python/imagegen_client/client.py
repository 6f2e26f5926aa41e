"""HTTP clients for the imagegen API: `Client` (sync) and `AsyncClient` (asyncio), on httpx.

Owns the wire format as a client sees it (job views, events, error envelopes) and how to wait for
a job: Server-Sent Events from `GET /jobs/{id}/events`, else long-polling `GET /jobs/{id}?wait=N`,
else plain polling, chosen by what the server answers. Must not import the server (`app`,
`worker`): it is installed and used on its own.
"""

from __future__ import annotations

import asyncio
import html
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, Self
from urllib.parse import quote

import httpx
from httpx_sse import ServerSentEvent, aconnect_sse, connect_sse

DEFAULT_URL = "http://127.0.0.1:8000"
URL_ENV = "IMAGEGEN_URL"
KEY_ENV = "IMAGEGEN_API_KEY"
TERMINAL = frozenset({"succeeded", "failed", "canceled"})
REQUEST_TIMEOUT = 30.0  # seconds for one ordinary request
KEEPALIVE_GAP = 10.0  # seconds between the server's keep-alives (`keepalive` events) on a quiet event stream
# A stream that sends nothing, not even a keep-alive, for this long is buffered by a proxy or dead:
# the wait goes on with long-polls.
SSE_SILENCE = 2 * KEEPALIVE_GAP
EMPTY_STREAMS = 3  # streams in a row that end without an event before the wait long-polls instead
LONGPOLL_MAX = 25.0  # seconds per long-poll request (the server allows up to 60)
LONGPOLL_PROGRESS = 1.0  # shorter long-polls when a progress callback wants to see each step
POLL_INTERVAL = 0.25  # seconds between plain polls
RETRY_PAUSE = 0.2  # after a dropped event stream, before reconnecting
RECONNECT_PAUSE = 0.5  # between tries while a wait cannot reach the server
RECONNECT_WINDOW = 60.0  # seconds a wait keeps trying an unreachable server before it raises
RETRY_STATUSES = frozenset({429, 502, 503, 504})  # answers a wait rides out like an unreachable server
RETRY_AFTER_MAX = 30.0  # the longest a wait sleeps for one Retry-After
RETRY_MIN_LEFT = 0.5  # seconds of the caller's timeout a resubmission needs left, else the last error is raised
DEADLINE_GRACE = 0.5  # seconds past the caller's deadline a POST may still take to be answered
IDEMPOTENCY_HEADER = "Idempotency-Key"  # a repeat with the same key and body returns the original job
# How the system resolver says a host name does not exist (glibc, musl, macOS, Windows): a wrong
# URL, not a server restarting, so a submission is not retried for it.
UNKNOWN_HOST_MARKERS = (
    "Name or service not known",
    "No address associated with hostname",
    "nodename nor servname provided",
    "getaddrinfo failed",
    "Name does not resolve",
)

log = logging.getLogger("imagegen_client")
log.addHandler(logging.NullHandler())  # the application decides where (the CLI: stderr)

WaitMode = Literal["sse", "longpoll", "poll"]


class ImagegenError(Exception):
    """An error answer from the server (`status` is its HTTP status) or a transport failure
    (`status` is None). `code` and `message` come from the API's error envelope; `retry_after` is
    the seconds the server asked to wait before trying again (429 and 503 answers), else None."""

    def __init__(
        self, status: int | None, code: str, message: str, details: Any = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.retry_after = retry_after

    def __str__(self) -> str:
        where = f"HTTP {self.status}, " if self.status is not None else ""
        return f"{self.message} ({where}{self.code})"

    def __repr__(self) -> str:
        return f"ImagegenError(status={self.status!r}, code={self.code!r}, message={self.message!r})"


class WaitTimeout(ImagegenError, TimeoutError):
    """`wait` ran out of time; the job goes on running on the server."""

    def __init__(self, job_id: str, timeout: float, job: Job | None = None) -> None:
        status = job.status if job else "unfinished"
        super().__init__(None, "wait_timeout", f"job {job_id} still {status} after {timeout:g} s")
        self.job_id = job_id
        self.job = job


@dataclass(frozen=True, slots=True)
class Progress:
    step: int = 0
    total: int = 0


@dataclass(frozen=True, slots=True)
class ImageRef:
    index: int
    url: str
    seed: int
    width: int
    height: int

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ImageRef:
        return cls(
            int(data["index"]), str(data.get("url", "")), int(data["seed"]), int(data["width"]), int(data["height"])
        )


@dataclass(frozen=True, slots=True)
class JobErrorInfo:
    code: str
    message: str


def _progress(data: Mapping[str, Any] | None) -> Progress:
    data = data or {}
    return Progress(int(data.get("step") or 0), int(data.get("total") or 0))


def _error_info(data: Mapping[str, Any] | None) -> JobErrorInfo | None:
    return JobErrorInfo(str(data.get("code", "error")), str(data.get("message", ""))) if data else None


@dataclass(frozen=True, slots=True)
class Job:
    """A job as `GET /jobs/{id}` shows it; `raw` is the JSON as received."""

    id: str
    status: str
    params: dict[str, Any]
    progress: Progress
    images: list[ImageRef]
    warnings: list[str]
    error: JobErrorInfo | None
    created_at: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Job:
        return cls(
            id=str(data["id"]),
            status=str(data["status"]),
            params=dict(data.get("params") or {}),
            progress=_progress(data.get("progress")),
            images=[ImageRef.from_json(i) for i in data.get("images") or []],
            warnings=list(data.get("warnings") or []),
            error=_error_info(data.get("error")),
            created_at=data.get("created_at"),
            started_at=data.get("started_at"),
            finished_at=data.get("finished_at"),
            raw=dict(data),
        )

    @property
    def done(self) -> bool:
        return self.status in TERMINAL

    @property
    def succeeded(self) -> bool:
        return self.status == "succeeded"

    def raise_for_status(self) -> Job:
        """This job if it succeeded; else an `ImagegenError` carrying the job's error code and message."""
        if self.succeeded:
            return self
        if self.error is not None:
            raise ImagegenError(None, self.error.code, f"job {self.id} {self.status}: {self.error.message}")
        raise ImagegenError(None, self.status, f"job {self.id} is {self.status}")


@dataclass(frozen=True, slots=True)
class JobEvent:
    """One update about a job, as `GET /jobs/{id}/events` sends it (or as made up from polling)."""

    type: str  # queued, started, progress, succeeded, failed, canceled
    job_id: str
    status: str
    progress: Progress
    timestamp: float
    images: list[ImageRef] = field(default_factory=list)
    error: JobErrorInfo | None = None
    id: str | None = None  # the stream id (resumes with Last-Event-ID); None when polled

    @classmethod
    def from_json(cls, data: Mapping[str, Any], event: str = "", ident: str | None = None) -> JobEvent:
        return cls(
            type=str(data.get("type") or event or "progress"),
            job_id=str(data.get("job_id", "")),
            status=str(data.get("status", "")),
            progress=_progress(data.get("progress")),
            timestamp=float(data.get("timestamp") or time.time()),
            images=[ImageRef.from_json(i) for i in data.get("images") or []],
            error=_error_info(data.get("error")),
            id=ident or None,
        )

    @classmethod
    def from_job(cls, job: Job) -> JobEvent:
        kind = {"running": "progress"}.get(job.status, job.status)
        return cls(kind, job.id, job.status, job.progress, time.time(), job.images, job.error)


ProgressCallback = Callable[[JobEvent], None]


class _Outage:
    """How a wait rides out a server it cannot reach or that is briefly unavailable (an API restart,
    a proxy reloading, a full queue): refused connections, requests cut mid-way (a long-poll or
    stream dropped by a restart) and 429, 502, 503 and 504 answers are tried again, after the
    answer's Retry-After (at most RETRY_AFTER_MAX s) or else every RECONNECT_PAUSE seconds, until
    the deadline; the wait gives up (raising the last error) once they have gone on for
    RECONNECT_WINDOW seconds. A server this wait never reached (a wrong URL), and any other error,
    end the wait at once."""

    def __init__(self, report: _Reporter) -> None:
        self.report = report
        self.since: float | None = None  # when the current run of failures began

    def retryable(self, exc: ImagegenError) -> bool:
        if isinstance(exc, WaitTimeout):
            return False
        if exc.status in RETRY_STATUSES:
            return True
        if exc.code == "connection_error":
            return self.report.heard
        return exc.code == "transport_error"  # it connected, then the request was cut

    def began(self, now: float, attempt_started: float) -> float:
        """When the current run of failures began; a try that lasted had got through and starts a new one."""
        if self.since is None or now - attempt_started > RECONNECT_PAUSE * 2:
            self.since = now
        return self.since

    def pause(self, exc: ImagegenError, attempt_started: float, deadline: float | None) -> float:
        """Seconds to sleep before trying again; raises `exc` when the wait should end."""
        if not self.retryable(exc):
            raise exc
        now = time.monotonic()
        left = min(RECONNECT_WINDOW - (now - self.began(now, attempt_started)), _remaining(deadline))
        if left <= 0:
            raise exc
        wanted = RECONNECT_PAUSE if exc.retry_after is None else max(RETRY_PAUSE, exc.retry_after)
        return min(wanted, RETRY_AFTER_MAX, left)


class _Resubmission(_Outage):
    """How a submission rides out the same trouble: its POST is sent again as it was, with the same
    Idempotency-Key, so that when an answer was lost after the job was made (a request cut or timed
    out, a 502 from a proxy) the repeat returns that job instead of making a second one. Unlike a
    wait it also retries a server it never reached (an API starting up: a refused connection made
    no job) and timeouts. The window runs from the first failure, however long each try was held
    (`Prefer: wait`), so that the whole submission stays bounded. Under a deadline (`generate`,
    `image`) a try is not started with less than RETRY_MIN_LEFT s of it left: it could hardly be
    answered, and its hold would be gone; the error that came last is raised instead."""

    def __init__(self, url: str) -> None:
        super().__init__(_Reporter(None))
        self.url = url
        self.told = False

    def retryable(self, exc: ImagegenError) -> bool:
        if exc.code == "connection_error" and any(m in exc.message for m in UNKNOWN_HOST_MARKERS):
            return False  # a mistyped host name fails at once, not after the whole window
        return exc.status in RETRY_STATUSES or exc.code in ("connection_error", "timeout", "transport_error")

    def pause(self, exc: ImagegenError, attempt_started: float, deadline: float | None) -> float:
        seconds = super().pause(exc, attempt_started, deadline)
        if _remaining(deadline) - seconds < RETRY_MIN_LEFT:
            raise exc
        if not self.told:  # once per submission: a wrong port otherwise looks like a hang
            self.told = True
            log.warning("POST %s: %s; sending it again (same Idempotency-Key) for up to %g s",
                        self.url, exc, RECONNECT_WINDOW)  # fmt: skip
        return seconds

    def began(self, now: float, attempt_started: float) -> float:
        if self.since is None:
            self.since = now
        return self.since


class _Reporter:
    """Calls the user's callback once per change of status or step (polling repeats itself)."""

    def __init__(self, callback: ProgressCallback | None) -> None:
        self.callback = callback
        self.last: tuple[str, int, int] | None = None
        self.heard = False  # the server answered this wait at least once
        self.last_id: str | None = None  # the last event stream id seen: reconnects resume after it

    def __call__(self, event: JobEvent) -> None:
        self.heard = True
        key = (event.status, event.progress.step, event.progress.total)
        if self.callback is not None and key != self.last:
            self.last = key
            self.callback(event)


# -- wire helpers shared by both clients ----------------------------------------------------------
def resolve_url(base_url: str | None) -> str:
    """The server URL (argument, else $IMAGEGEN_URL, else the default); ValueError when it is not an
    http(s) URL with a host."""
    url = (base_url or os.environ.get(URL_ENV) or DEFAULT_URL).rstrip("/")
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise ValueError(f"invalid server URL {url!r}: {exc}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"invalid server URL {url!r}: expected http(s)://host[:port]")
    return url


def _auth_headers(api_key: str | None, headers: Mapping[str, str] | None) -> dict[str, str]:
    """`headers` plus `Authorization: Bearer <key>` (the argument, else $IMAGEGEN_API_KEY), unless
    `headers` already carry an Authorization header."""
    out = dict(headers or {})
    key = api_key if api_key is not None else os.environ.get(KEY_ENV)
    if key and not any(name.lower() == "authorization" for name in out):
        out["Authorization"] = f"Bearer {key}"
    return out


def _job_path(job_id: str) -> str:
    # Ids are UUIDs; quoting keeps anything else from walking to another route.
    if not str(job_id).strip():
        raise ValueError("a job id is required")
    return f"/jobs/{quote(str(job_id), safe='')}"


def _submit_body(prompt: str, params: Mapping[str, Any]) -> dict[str, Any]:
    return {"prompt": prompt, **{k: v for k, v in params.items() if v is not None}}


def _submission(request: Mapping[str, Any], key: str, deadline: float | None, timeout: httpx.Timeout) -> dict[str, Any]:
    """One try's request options: `request`'s with its Idempotency-Key added and, under a deadline,
    its timeout (else the client's, `timeout`) cut to end DEADLINE_GRACE s after it at the latest,
    so that no try keeps the caller waiting much past what it asked for."""
    options = {**request, "headers": {**request.get("headers", {}), IDEMPOTENCY_HEADER: key}}
    if deadline is not None:
        cap = max(0.0, _remaining(deadline)) + DEADLINE_GRACE
        limits = httpx.Timeout(request.get("timeout", timeout))
        connect, read, write, pool = (
            cap if t is None else min(t, cap) for t in (limits.connect, limits.read, limits.write, limits.pool)
        )
        options["timeout"] = httpx.Timeout(connect=connect, read=read, write=write, pool=pool)
    return options


def _job_request(prompt: str, params: Mapping[str, Any], wait: float | None, deadline: float | None) -> dict[str, Any]:
    """`submit`'s POST, held up to `wait` seconds but never past the deadline (a retry is held for
    what is left)."""
    return {"json": _submit_body(prompt, params), **_held(_bounded(wait, deadline))}


def _held(wait: float | None) -> dict[str, Any]:
    """Request options for a POST the server may hold up to `wait` seconds (`Prefer: wait`)."""
    if not wait or wait <= 0:
        return {}
    return {"headers": {"Prefer": f"wait={wait:.3g}"}, "timeout": wait + REQUEST_TIMEOUT}


def _image_request(
    prompt: str, params: Mapping[str, Any], deadline: float | None, wait: float | None
) -> dict[str, Any]:
    """`image()`'s POST: held until the job ends, asking for the PNG itself before the job."""
    if params.get("num_images") not in (None, 1):
        raise ValueError("image() makes one image; use generate() and download() for several")
    held = _held(_post_wait(deadline, None, wait))
    headers = {**held.pop("headers", {}), "Accept": "image/png, application/json;q=0.5"}
    return {"json": _submit_body(prompt, params), "headers": headers, **held}


def _png_or_job(response: httpx.Response) -> bytes | Job:
    _checked(response)
    if response.headers.get("content-type", "").startswith("image/png"):
        return response.content
    return Job.from_json(_job_json(response))


def _post_wait(deadline: float | None, callback: ProgressCallback | None, wait: float | None = None) -> float | None:
    """How long `generate` lets the POST wait: the caller's `wait` if given, else not at all when
    progress is wanted (events do that), else up to LONGPOLL_MAX; never past the deadline."""
    if wait is None:
        if callback is not None:
            return None
        wait = LONGPOLL_MAX
    return _bounded(wait, deadline)


def _bounded(wait: float | None, deadline: float | None) -> float | None:
    return min(wait, _remaining(deadline)) if wait is not None and deadline is not None else wait


def error_from_response(response: httpx.Response) -> ImagegenError:
    """Our envelope `{"error": {"code", "message", "details"?}}` (or OpenAI's) as an exception."""
    try:
        body = response.json()
    except ValueError:
        body = None
    err = body.get("error") if isinstance(body, dict) else None
    retry_after = _seconds(response.headers.get("retry-after"))
    if isinstance(err, dict) and err.get("message"):
        code = err.get("code") or err.get("type") or f"http_{response.status_code}"
        return ImagegenError(response.status_code, str(code), str(err["message"]), err.get("details"), retry_after)
    return ImagegenError(
        response.status_code, f"http_{response.status_code}", _plain_message(response), None, retry_after
    )


_TITLE = re.compile(r"<title[^>]*>(.*?)</title\s*>", re.IGNORECASE | re.DOTALL)


def _plain_message(response: httpx.Response) -> str:
    """What an answer without our envelope says: its reason phrase, and what adds to that: an HTML
    page's <title> (a proxy's error page), else the first line of a text body ("no healthy upstream")."""
    reason = response.reason_phrase or "request failed"
    text = response.text[:4096]
    if "html" in response.headers.get("content-type", "") or text.lstrip().startswith("<"):  # markup
        match = _TITLE.search(text)
        detail = html.unescape(match.group(1)) if match else ""
    else:
        detail = next((line for line in text.splitlines() if line.strip()), "")
    detail = " ".join(detail.split())[:200]
    if not detail or detail.lower() in (reason.lower(), f"{response.status_code} {reason}".lower()):
        return reason
    return f"{reason}: {detail}"


def _seconds(value: str | None) -> float | None:
    """A Retry-After given in seconds (the form this API sends); None for none or an HTTP date."""
    try:
        seconds = float(value) if value is not None else None
    except ValueError:
        return None
    return seconds if seconds is not None and seconds >= 0 else None


def _transport_error(base_url: str, exc: httpx.TransportError) -> ImagegenError:
    if isinstance(exc, httpx.ConnectError):
        return ImagegenError(None, "connection_error", f"cannot connect to {base_url}: {exc}")
    if isinstance(exc, httpx.TimeoutException):
        return ImagegenError(None, "timeout", f"{base_url} did not answer in time ({type(exc).__name__})")
    return ImagegenError(None, "transport_error", f"talking to {base_url} failed: {exc}")


def _checked(response: httpx.Response) -> httpx.Response:
    if response.status_code >= 300:  # redirects are not followed: the URL is not one of ours
        raise error_from_response(response)
    return response


def _job_json(response: httpx.Response) -> dict[str, Any]:
    """A job's JSON, or ImagegenError for an answer that is not one (a URL that is not an imagegen server)."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict) or "id" not in body or "status" not in body:
        kind = response.headers.get("content-type", "no content type").partition(";")[0]
        message = f"{response.request.url} answered HTTP {response.status_code} with {kind}, not a job"
        message += ": is it an imagegen server?"
        raise ImagegenError(response.status_code, "unexpected_response", message)
    return body


def _job_or_none(response: httpx.Response) -> Job | None:
    """The job in an answer that may carry one (a cancel's), else None."""
    try:
        return Job.from_json(_job_json(response))
    except ImagegenError:
        return None


def _job_from(response: httpx.Response) -> Job:
    return Job.from_json(_job_json(_checked(response)))


def _event_from_sse(sse: ServerSentEvent, url: httpx.URL) -> JobEvent:
    """The JobEvent an event's data carries; ImagegenError (`protocol_error`) for data that is not a
    JSON object (something other than an imagegen server on the stream's URL)."""
    try:
        data = json.loads(sse.data)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        message = f"{url} sent an event whose data is not a JSON object ({sse.data[:80]!r}): is it an imagegen server?"
        raise ImagegenError(None, "protocol_error", message)
    return JobEvent.from_json(data, sse.event, sse.id)


def _is_event_stream(response: httpx.Response) -> bool:
    return response.headers.get("content-type", "").partition(";")[0].strip() == "text/event-stream"


def _remaining(deadline: float | None) -> float:
    return float("inf") if deadline is None else deadline - time.monotonic()


def _longpoll_seconds(deadline: float | None, callback: ProgressCallback | None) -> float:
    cap = LONGPOLL_PROGRESS if callback is not None else LONGPOLL_MAX
    return max(0.1, min(cap, _remaining(deadline)))


# -- sync -----------------------------------------------------------------------------------------
class Client:
    """Blocking client. Use as a context manager, or call `close()`. On a server that requires API
    keys, pass `api_key=` or set $IMAGEGEN_API_KEY.

    >>> with Client("http://127.0.0.1:8000") as c:
    ...     job = c.wait(c.submit("a red circle on a blue background", seed=7).id, timeout=120)
    ...     png = c.download(job.id, 0)
    """

    def __init__(
        self,
        base_url: str | None = None,
        *,
        timeout: float = REQUEST_TIMEOUT,
        headers: Mapping[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
        api_key: str | None = None,
    ) -> None:
        self.base_url = resolve_url(base_url)
        self.mode: WaitMode = "sse"  # lowered for good the first time the server lacks a way to wait
        headers = _auth_headers(api_key, headers)
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout, headers=headers, transport=transport)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise _transport_error(self.base_url, exc) from None

    # -- the API --------------------------------------------------------------------------------
    def submit(
        self,
        prompt: str,
        *,
        negative_prompt: str | None = None,
        num_images: int | None = None,
        width: int | None = None,
        height: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int | None = None,
        scheduler: str | None = None,
        priority: str | None = None,
        wait: float | None = None,
        idempotency_key: str | None = None,
        **extra: Any,
    ) -> Job:
        """Queue a job (`POST /generate`); returns it as queued, with its seed filled in.

        With `wait` (seconds, the server allows up to 60) the server holds the answer until the job
        ends (`Prefer: wait`): the job returned is then finished if it ended in time. Servers
        without that preference answer at once, as without `wait`.

        The POST carries an `Idempotency-Key` (`idempotency_key`, else a new random one) and is
        sent again with the same key and body through refused connections, requests cut or timed
        out, and 429, 502, 503 and 504 answers, for up to RECONNECT_WINDOW seconds (`_Resubmission`):
        a repeat is answered with the job the first one made, never a second job. Your own key
        makes that hold across calls too (a script started again after a crash), for 24 h.
        """
        params = dict(
            negative_prompt=negative_prompt,
            num_images=num_images,
            width=width,
            height=height,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            seed=seed,
            scheduler=scheduler,
            priority=priority,
            **extra,
        )
        return self._submit(prompt, params, wait, idempotency_key, None)

    def get(self, job_id: str) -> Job:
        return _job_from(self._request("GET", _job_path(job_id)))

    def download(self, job_id: str, index: int = 0) -> bytes:
        """The PNG bytes of image `index` of a succeeded job."""
        return _checked(self._request("GET", f"{_job_path(job_id)}/images/{int(index)}")).content

    def cancel(self, job_id: str) -> Job:
        """Cancel (`DELETE /jobs/{id}`): a queued job ends at once, a running one at its next step."""
        response = _checked(self._request("DELETE", _job_path(job_id)))
        return _job_or_none(response) or self.get(job_id)

    def generate(
        self,
        prompt: str,
        *,
        timeout: float | None = None,
        on_progress: ProgressCallback | None = None,
        wait: float | None = None,
        idempotency_key: str | None = None,
        **params: Any,
    ) -> Job:
        """Submit, wait, and return the succeeded job (raises `ImagegenError` if it failed).

        Without a progress callback the POST itself waits for the end (one request fewer); `wait`
        sets how long it may (seconds, 0: not at all; default up to 25 s, none with `on_progress`).
        The POST is retried as `submit`'s is, with `idempotency_key` or a new one, within `timeout`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        job = self._submit(prompt, params, _post_wait(deadline, on_progress, wait), idempotency_key, deadline)
        if job.done:
            return job.raise_for_status()
        return self._wait_until(job.id, deadline, timeout, on_progress).raise_for_status()

    def image(
        self,
        prompt: str,
        *,
        timeout: float | None = None,
        wait: float | None = None,
        idempotency_key: str | None = None,
        **params: Any,
    ) -> bytes:
        """Make one image and return its PNG bytes (raises `ImagegenError` if the job failed).

        The POST asks for the PNG itself (`Prefer: wait`, `Accept: image/png`): where the server
        answers with it, prompt to image is one request; otherwise (an older server, a job still
        running when the server's wait ends) the job is waited for and its image downloaded. The
        POST is retried as `submit`'s is, with `idempotency_key` or a new one, within `timeout`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        request = lambda: _image_request(prompt, params, deadline, wait)  # noqa: E731
        job = _png_or_job(self._post("/generate", request, idempotency_key, deadline))
        if isinstance(job, bytes):
            return job
        if not job.done:
            job = self._wait_until(job.id, deadline, timeout, None)
        return self.download(job.raise_for_status().id)

    def wait(self, job_id: str, timeout: float | None = None, on_progress: ProgressCallback | None = None) -> Job:
        """Block until the job ends (any terminal status) and return it.

        `on_progress(event)` is called on every change of status or step. Raises `WaitTimeout`
        after `timeout` seconds (None: no limit); the job keeps running on the server.
        """
        return self._wait_until(job_id, None if timeout is None else time.monotonic() + timeout, timeout, on_progress)

    def _submit(
        self, prompt: str, params: Mapping[str, Any], wait: float | None, key: str | None, deadline: float | None
    ) -> Job:
        return _job_from(self._post("/generate", lambda: _job_request(prompt, params, wait, deadline), key, deadline))

    def _post(
        self, path: str, request: Callable[[], dict[str, Any]], key: str | None, deadline: float | None
    ) -> httpx.Response:
        """POST `path` under one Idempotency-Key (`key`, else a new one) until it is answered with
        anything but a passing trouble (see `_Resubmission`): the answer, or the error that ended
        the tries. `request()` gives each try's options: a held POST is held for what is left, and
        each try times out with the deadline (`_submission`)."""
        key = str(uuid.uuid4()) if key is None else key
        resubmission = _Resubmission(f"{self.base_url}{path}")
        while True:
            started = time.monotonic()
            try:
                options = _submission(request(), key, deadline, self._http.timeout)
                return _checked(self._request("POST", path, **options))
            except ImagegenError as exc:
                time.sleep(resubmission.pause(exc, started, deadline))

    def _wait_until(
        self, job_id: str, deadline: float | None, timeout: float | None, on_progress: ProgressCallback | None
    ) -> Job:
        """`wait` until `deadline`; `timeout` is what a WaitTimeout reports (the caller's whole wait).
        While the server cannot be reached (an API restart) the wait goes on (see `_Outage`)."""
        report = _Reporter(on_progress)
        outage = _Outage(report)
        while True:
            started = time.monotonic()
            try:
                return self._wait_once(job_id, deadline, timeout, report)
            except ImagegenError as exc:
                time.sleep(outage.pause(exc, started, deadline))

    def _wait_once(self, job_id: str, deadline: float | None, timeout: float | None, report: _Reporter) -> Job:
        if self.mode == "sse":
            job = self._wait_sse(job_id, deadline, timeout, report)
            if job is not None:
                return job
        if self.mode == "longpoll":
            job = self._wait_longpoll(job_id, deadline, timeout, report)
            if job is not None:
                return job
        return self._wait_poll(job_id, deadline, report, timeout)

    # -- ways to wait ---------------------------------------------------------------------------
    def _past_deadline(
        self, job_id: str, deadline: float | None, timeout: float | None, report: _Reporter
    ) -> Job | None:
        """Past the deadline: the job if it has ended after all, else WaitTimeout. None before it."""
        if _remaining(deadline) > 0:
            return None
        job = self.get(job_id)
        if not job.done:
            raise WaitTimeout(job_id, timeout or 0, job)
        report(JobEvent.from_job(job))
        return job

    def _wait_sse(self, job_id: str, deadline: float | None, timeout: float | None, report: _Reporter) -> Job | None:
        """None when the server has no event stream (the mode is lowered and the caller goes on).
        A stream silent for SSE_SILENCE (not even a keep-alive: a buffering proxy, a dead link), or
        EMPTY_STREAMS in a row that end without an event, hand the rest of the wait to long-polls."""
        empty = 0
        while True:
            if (job := self._past_deadline(job_id, deadline, timeout, report)) is not None:
                return job
            headers = {"Last-Event-ID": report.last_id} if report.last_id else {}
            silence = max(0.1, min(SSE_SILENCE, _remaining(deadline)))
            heard = False
            try:
                with connect_sse(
                    self._http,
                    "GET",
                    f"{_job_path(job_id)}/events",
                    headers=headers,
                    timeout=httpx.Timeout(REQUEST_TIMEOUT, read=silence),
                ) as source:
                    response = source.response
                    if response.status_code == 204:  # resumed after the terminal event: it has ended
                        return self.get(job_id)
                    if response.status_code in (404, 405) or (response.is_success and not _is_event_stream(response)):
                        response.read()
                        self._no_stream(job_id, response, "longpoll")
                        return None
                    if response.status_code >= 400:
                        response.read()
                        raise error_from_response(response)
                    for sse in source.iter_sse():
                        heard = True
                        report.last_id = sse.id or report.last_id
                        if sse.data:
                            event = _event_from_sse(sse, response.url)
                            report(event)
                            if event.status in TERMINAL:
                                return self.get(job_id)
                        # Keep-alives count too: a queued job sends nothing else, and each one
                        # restarts the read timeout.
                        if (job := self._past_deadline(job_id, deadline, timeout, report)) is not None:
                            return job
                        if _remaining(deadline) < KEEPALIVE_GAP:  # the next may come after the deadline
                            return self._wait_longpoll(job_id, deadline, timeout, report)
            except httpx.ConnectError as exc:
                raise _transport_error(self.base_url, exc) from None
            except httpx.ReadTimeout:
                if not heard and silence >= SSE_SILENCE:  # nothing ever comes through: don't try again
                    self.mode = "longpoll"
                return self._wait_longpoll(job_id, deadline, timeout, report)
            except httpx.TransportError:
                pass  # a dropped stream: reconnect below, resuming after `report.last_id`
            empty = 0 if heard else empty + 1
            if empty >= EMPTY_STREAMS:
                return self._wait_longpoll(job_id, deadline, timeout, report)
            time.sleep(min(RETRY_PAUSE, max(0.0, _remaining(deadline))))

    def _no_stream(self, job_id: str, response: httpx.Response, mode: WaitMode) -> None:
        """The route answered 404/405: tell an unknown job (raise) from a server without the route."""
        if response.status_code == 404:
            self.get(job_id)  # raises for an unknown or expired job
        self.mode = mode

    def _wait_longpoll(
        self, job_id: str, deadline: float | None, timeout: float | None, report: _Reporter
    ) -> Job | None:
        while True:
            if (job := self._past_deadline(job_id, deadline, timeout, report)) is not None:
                return job
            seconds = _longpoll_seconds(deadline, report.callback)
            started = time.monotonic()
            response = self._request(
                "GET", _job_path(job_id), params={"wait": f"{seconds:.3g}"}, timeout=seconds + REQUEST_TIMEOUT
            )
            if response.status_code in (400, 405, 422):
                self._no_stream(job_id, response, "poll")
                return None
            job = _job_from(response)
            report(JobEvent.from_job(job))
            if job.done:
                return job
            # A server that ignores `wait` answers at once: pace it like plain polling.
            time.sleep(max(0.0, min(POLL_INTERVAL - (time.monotonic() - started), _remaining(deadline))))

    def _wait_poll(self, job_id: str, deadline: float | None, report: _Reporter, timeout: float | None) -> Job:
        while True:
            job = self.get(job_id)
            report(JobEvent.from_job(job))
            if job.done:
                return job
            if _remaining(deadline) <= 0:
                raise WaitTimeout(job_id, timeout or 0, job)
            time.sleep(max(0.0, min(POLL_INTERVAL, _remaining(deadline))))


# -- async ----------------------------------------------------------------------------------------
class AsyncClient:
    """The same API as `Client`, for asyncio: `async with AsyncClient() as c: await c.submit(...)`."""

    def __init__(
        self,
        base_url: str | None = None,
        *,
        timeout: float = REQUEST_TIMEOUT,
        headers: Mapping[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        api_key: str | None = None,
    ) -> None:
        self.base_url = resolve_url(base_url)
        self.mode: WaitMode = "sse"
        headers = _auth_headers(api_key, headers)
        self._http = httpx.AsyncClient(base_url=self.base_url, timeout=timeout, headers=headers, transport=transport)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return await self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise _transport_error(self.base_url, exc) from None

    async def submit(
        self,
        prompt: str,
        *,
        negative_prompt: str | None = None,
        num_images: int | None = None,
        width: int | None = None,
        height: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int | None = None,
        scheduler: str | None = None,
        priority: str | None = None,
        wait: float | None = None,
        idempotency_key: str | None = None,
        **extra: Any,
    ) -> Job:
        params = dict(
            negative_prompt=negative_prompt,
            num_images=num_images,
            width=width,
            height=height,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            seed=seed,
            scheduler=scheduler,
            priority=priority,
            **extra,
        )
        return await self._submit(prompt, params, wait, idempotency_key, None)

    async def get(self, job_id: str) -> Job:
        return _job_from(await self._request("GET", _job_path(job_id)))

    async def download(self, job_id: str, index: int = 0) -> bytes:
        return _checked(await self._request("GET", f"{_job_path(job_id)}/images/{int(index)}")).content

    async def cancel(self, job_id: str) -> Job:
        response = _checked(await self._request("DELETE", _job_path(job_id)))
        return _job_or_none(response) or await self.get(job_id)

    async def generate(
        self,
        prompt: str,
        *,
        timeout: float | None = None,
        on_progress: ProgressCallback | None = None,
        wait: float | None = None,
        idempotency_key: str | None = None,
        **params: Any,
    ) -> Job:
        deadline = None if timeout is None else time.monotonic() + timeout
        job = await self._submit(prompt, params, _post_wait(deadline, on_progress, wait), idempotency_key, deadline)
        if job.done:
            return job.raise_for_status()
        return (await self._wait_until(job.id, deadline, timeout, on_progress)).raise_for_status()

    async def image(
        self,
        prompt: str,
        *,
        timeout: float | None = None,
        wait: float | None = None,
        idempotency_key: str | None = None,
        **params: Any,
    ) -> bytes:
        deadline = None if timeout is None else time.monotonic() + timeout
        request = lambda: _image_request(prompt, params, deadline, wait)  # noqa: E731
        job = _png_or_job(await self._post("/generate", request, idempotency_key, deadline))
        if isinstance(job, bytes):
            return job
        if not job.done:
            job = await self._wait_until(job.id, deadline, timeout, None)
        return await self.download(job.raise_for_status().id)

    async def wait(self, job_id: str, timeout: float | None = None, on_progress: ProgressCallback | None = None) -> Job:
        deadline = None if timeout is None else time.monotonic() + timeout
        return await self._wait_until(job_id, deadline, timeout, on_progress)

    async def _submit(
        self, prompt: str, params: Mapping[str, Any], wait: float | None, key: str | None, deadline: float | None
    ) -> Job:
        request = lambda: _job_request(prompt, params, wait, deadline)  # noqa: E731
        return _job_from(await self._post("/generate", request, key, deadline))

    async def _post(
        self, path: str, request: Callable[[], dict[str, Any]], key: str | None, deadline: float | None
    ) -> httpx.Response:
        key = str(uuid.uuid4()) if key is None else key  # (see Client._post)
        resubmission = _Resubmission(f"{self.base_url}{path}")
        while True:
            started = time.monotonic()
            try:
                options = _submission(request(), key, deadline, self._http.timeout)
                return _checked(await self._request("POST", path, **options))
            except ImagegenError as exc:
                await asyncio.sleep(resubmission.pause(exc, started, deadline))

    async def _wait_until(
        self, job_id: str, deadline: float | None, timeout: float | None, on_progress: ProgressCallback | None
    ) -> Job:
        report = _Reporter(on_progress)
        outage = _Outage(report)
        while True:
            started = time.monotonic()
            try:
                return await self._wait_once(job_id, deadline, timeout, report)
            except ImagegenError as exc:
                await asyncio.sleep(outage.pause(exc, started, deadline))

    async def _wait_once(self, job_id: str, deadline: float | None, timeout: float | None, report: _Reporter) -> Job:
        if self.mode == "sse":
            job = await self._wait_sse(job_id, deadline, timeout, report)
            if job is not None:
                return job
        if self.mode == "longpoll":
            job = await self._wait_longpoll(job_id, deadline, timeout, report)
            if job is not None:
                return job
        return await self._wait_poll(job_id, deadline, report, timeout)

    async def _past_deadline(
        self, job_id: str, deadline: float | None, timeout: float | None, report: _Reporter
    ) -> Job | None:
        if _remaining(deadline) > 0:
            return None
        job = await self.get(job_id)
        if not job.done:
            raise WaitTimeout(job_id, timeout or 0, job)
        report(JobEvent.from_job(job))
        return job

    async def _wait_sse(
        self, job_id: str, deadline: float | None, timeout: float | None, report: _Reporter
    ) -> Job | None:
        empty = 0  # (see Client._wait_sse)
        while True:
            if (job := await self._past_deadline(job_id, deadline, timeout, report)) is not None:
                return job
            headers = {"Last-Event-ID": report.last_id} if report.last_id else {}
            silence = max(0.1, min(SSE_SILENCE, _remaining(deadline)))
            heard = False
            try:
                async with aconnect_sse(
                    self._http,
                    "GET",
                    f"{_job_path(job_id)}/events",
                    headers=headers,
                    timeout=httpx.Timeout(REQUEST_TIMEOUT, read=silence),
                ) as source:
                    response = source.response
                    if response.status_code == 204:  # resumed after the terminal event: it has ended
                        return await self.get(job_id)
                    if response.status_code in (404, 405) or (response.is_success and not _is_event_stream(response)):
                        await response.aread()
                        await self._no_stream(job_id, response, "longpoll")
                        return None
                    if response.status_code >= 400:
                        await response.aread()
                        raise error_from_response(response)
                    async for sse in source.aiter_sse():
                        heard = True
                        report.last_id = sse.id or report.last_id
                        if sse.data:
                            event = _event_from_sse(sse, response.url)
                            report(event)
                            if event.status in TERMINAL:
                                return await self.get(job_id)
                        if (job := await self._past_deadline(job_id, deadline, timeout, report)) is not None:
                            return job
                        if _remaining(deadline) < KEEPALIVE_GAP:
                            return await self._wait_longpoll(job_id, deadline, timeout, report)
            except httpx.ConnectError as exc:
                raise _transport_error(self.base_url, exc) from None
            except httpx.ReadTimeout:
                if not heard and silence >= SSE_SILENCE:
                    self.mode = "longpoll"
                return await self._wait_longpoll(job_id, deadline, timeout, report)
            except httpx.TransportError:
                pass
            empty = 0 if heard else empty + 1
            if empty >= EMPTY_STREAMS:
                return await self._wait_longpoll(job_id, deadline, timeout, report)
            await asyncio.sleep(min(RETRY_PAUSE, max(0.0, _remaining(deadline))))

    async def _no_stream(self, job_id: str, response: httpx.Response, mode: WaitMode) -> None:
        if response.status_code == 404:
            await self.get(job_id)
        self.mode = mode

    async def _wait_longpoll(
        self, job_id: str, deadline: float | None, timeout: float | None, report: _Reporter
    ) -> Job | None:
        while True:
            if (job := await self._past_deadline(job_id, deadline, timeout, report)) is not None:
                return job
            seconds = _longpoll_seconds(deadline, report.callback)
            started = time.monotonic()
            response = await self._request(
                "GET", _job_path(job_id), params={"wait": f"{seconds:.3g}"}, timeout=seconds + REQUEST_TIMEOUT
            )
            if response.status_code in (400, 405, 422):
                await self._no_stream(job_id, response, "poll")
                return None
            job = _job_from(response)
            report(JobEvent.from_job(job))
            if job.done:
                return job
            await asyncio.sleep(max(0.0, min(POLL_INTERVAL - (time.monotonic() - started), _remaining(deadline))))

    async def _wait_poll(self, job_id: str, deadline: float | None, report: _Reporter, timeout: float | None) -> Job:
        while True:
            job = await self.get(job_id)
            report(JobEvent.from_job(job))
            if job.done:
                return job
            if _remaining(deadline) <= 0:
                raise WaitTimeout(job_id, timeout or 0, job)
            await asyncio.sleep(max(0.0, min(POLL_INTERVAL, _remaining(deadline))))
