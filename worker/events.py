"""Publishing job events from the worker, and delivering webhooks off the sampling thread.

A worker's `WebhookSender` threads deliver each URL's events in order (so a receiver sees start →
progress → completed), retrying with backoff, without ever holding up the denoising loop or one
receiver holding up another.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from app.core import events, webhooks
from app.core.events import EventType, JobEvent
from app.core.jobs import cancel_key

if TYPE_CHECKING:
    from redis import Redis
    from rq.job import Job

    from app.core.config import Settings

log = logging.getLogger(__name__)
SUBSCRIPTION = {
    EventType.started: "start",
    EventType.progress: "progress",
    EventType.succeeded: "completed",
    EventType.failed: "completed",
    EventType.canceled: "completed",
}


def wants(job_meta: dict[str, Any], event: JobEvent) -> str | None:
    """The webhook URL that subscribed to this event, if any."""
    hook = job_meta.get("webhook") or {}
    if hook.get("url") and SUBSCRIPTION.get(event.type) in hook.get("events", ()):
        return str(hook["url"])
    return None


class _Pending(NamedTuple):
    job_id: str
    progress: bool
    body: bytes
    secret: str  # the job's key's own, or the server's (see app.core.webhooks)


@dataclass
class _Target:
    """One webhook URL's deliveries: in order, one at a time, with its own backoff."""

    pending: deque[_Pending] = field(default_factory=deque)
    busy: bool = False
    failures: int = 0  # failed tries of the delivery at the head
    not_before: float = 0.0  # monotonic time of its next try


class WebhookSender:
    """Delivers webhooks on `threads` threads, off the sampling thread.

    Each URL gets its events in order (start → progress → completed), one delivery at a time, and
    waits out its own retries: a slow or failing receiver holds back only its own events, never
    other URLs' (one thread for all made every receiver wait behind one that answered 503 for a
    minute per event). A job's progress event that is still waiting when a newer one comes is
    replaced by it, and a URL keeps at most `MAX_PENDING` events, dropping the oldest progress first.
    """

    THREADS = 4
    MAX_PENDING = 100

    def __init__(self, settings: Settings, threads: int = THREADS) -> None:
        self.settings = settings
        self._targets: dict[str, _Target] = {}
        self._ready = threading.Condition()
        self._closing = False
        self._stopped = False
        self._threads = [threading.Thread(target=self._run, name=f"webhooks-{i}", daemon=True) for i in range(threads)]
        for thread in self._threads:
            thread.start()

    def submit(self, url: str, event: JobEvent, secret: str | None = None) -> None:
        """Queue `event` for `url`, signed with `secret` (default: the server's)."""
        body = event.model_dump_json(exclude_none=True).encode()
        progress = event.type is EventType.progress
        with self._ready:
            target = self._targets.setdefault(url, _Target())
            pending = target.pending
            first = 1 if target.busy else 0  # the head is being sent: it stays
            if progress:  # the newest progress of a job replaces a waiting one
                for i in range(len(pending) - 1, first - 1, -1):
                    if pending[i].job_id == event.job_id and pending[i].progress:
                        del pending[i]
            pending.append(_Pending(event.job_id, progress, body, secret or self.settings.webhook_secret))
            if len(pending) > self.MAX_PENDING:
                drop = next((i for i in range(first, len(pending)) if pending[i].progress), first)
                del pending[drop]
                log.warning("webhook %r: %d events waiting; one dropped", url, self.MAX_PENDING)
            self._ready.notify()

    def close(self, timeout: float = 10) -> None:
        """Deliver what is waiting (tries due within `timeout`), then stop the threads."""
        with self._ready:
            self._closing = True
            self._ready.notify_all()
        end = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, end - time.monotonic()))
        with self._ready:  # past the timeout: what still waits is dropped
            self._stopped = True
            self._ready.notify_all()

    def _next(self) -> tuple[str, _Target] | None:
        """The next URL whose head delivery is due (marked busy), waiting for one; None to stop."""
        with self._ready:
            while not self._stopped:
                now = time.monotonic()
                due = [(t.not_before, u) for u, t in self._targets.items() if t.pending and not t.busy]
                ready = [u for when, u in due if when <= now]
                if ready:
                    url = min(ready, key=lambda u: self._targets[u].not_before)
                    self._targets[url].busy = True
                    return url, self._targets[url]
                if self._closing and not due:
                    return None
                self._ready.wait(min((when for when, _ in due), default=now + 1.0) - now)
            return None

    def _run(self) -> None:
        while (item := self._next()) is not None:
            url, target = item
            head = target.pending[0]
            try:
                outcome = webhooks.attempt(
                    url,
                    head.body,
                    secret=head.secret,
                    allow_private=self.settings.webhook_allow_private,
                )
            except Exception:
                log.exception("webhook delivery to %r crashed", url)
                outcome = False
            with self._ready:
                target.busy = False
                if outcome is None:
                    target.failures += 1
                    if target.failures < self.settings.webhook_max_attempts:
                        target.not_before = time.monotonic() + webhooks.backoff(target.failures)
                        self._ready.notify_all()
                        continue
                    log.warning("webhook %r gave up after %d attempts", url, target.failures)
                target.pending.popleft()
                target.failures, target.not_before = 0, 0.0
                if not target.pending:
                    del self._targets[url]
                self._ready.notify_all()


# A job's start, written with one call: unless its cancel flag (KEYS[1]) is set, record its resolved
# parameters in the job's hash (KEYS[2]) and announce `started` on its event stream (KEYS[3]) as
# `events.publish` does (ARGV: meta, stream length, event JSON, stream TTL). Answers 1 for a
# canceled job, which then records nothing here and ends as canceled.
START_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 1
end
redis.call('HSET', KEYS[2], 'meta', ARGV[1])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[2], '*', 'data', ARGV[3])
redis.call('EXPIRE', KEYS[3], ARGV[4])
return 0
"""


def record_start(conn: Any, job: Job, event: JobEvent, ttl: int) -> Any:
    """Run START_SCRIPT for `job` (its meta as it stands) on a client (the answer: 1 if canceled)
    or a pipeline (the answer comes with the pipeline's)."""
    keys = (cancel_key(job.id), job.key, events.stream_key(job.id))
    data = event.model_dump_json(exclude_none=True)
    return conn.eval(START_SCRIPT, 3, *keys, job._serialize_meta(), events.STREAM_MAXLEN, data, ttl)


class EventSink:
    """Writes an event to the job's stream and hands it to the webhook sender if subscribed."""

    def __init__(self, connection: Redis, settings: Settings, sender: WebhookSender | None) -> None:
        self.connection = connection
        self.settings = settings
        self.sender = sender
        self.secrets = webhooks.Secrets(connection, settings.webhook_secret)

    @property
    def ttl(self) -> int:
        """Seconds a job's event stream is kept: as long as the job itself."""
        return self.settings.event_ttl

    def emit(self, job: Job, type_: EventType, status: str, **fields: Any) -> JobEvent:
        event = events.make_event(type_, job.id, status, **fields)
        try:
            events.publish(self.connection, event, events.stream_ttl(self.settings, event))
        except Exception:  # losing one event must not fail the job; status still lives in RQ
            log.warning("job %s: could not publish %s event", job.id, type_, exc_info=True)
        self.deliver(job, event)
        return event

    def deliver(self, job: Job, event: JobEvent) -> None:
        """Hand an event (already in the job's stream) to the webhook sender, if the job subscribed."""
        meta = job.meta or {}
        url = wants(meta, event)
        if url and self.sender is not None:
            try:
                secret = self.secrets.for_owner(meta.get("owner"))
            except Exception:  # Redis unreachable: this event is not delivered (as its publish failed)
                log.warning("job %s: no webhook secret could be read; %s not delivered", job.id, event.type)
                return
            self.sender.submit(url, event, secret)
