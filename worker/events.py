"""Publishing job events from the worker, and delivering webhooks off the sampling thread.

One `WebhookSender` thread per worker delivers in order (so a receiver sees start → progress →
completed), retrying with backoff without ever holding up the denoising loop.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import TYPE_CHECKING, Any

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


class WebhookSender:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._queue: queue.Queue[tuple[str, bytes] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="webhooks", daemon=True)
        self._thread.start()

    def submit(self, url: str, event: JobEvent) -> None:
        self._queue.put((url, event.model_dump_json(exclude_none=True).encode()))

    def close(self, timeout: float = 10) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            url, body = item
            try:
                webhooks.deliver(
                    url,
                    body,
                    secret=self.settings.webhook_secret,
                    max_attempts=self.settings.webhook_max_attempts,
                    allow_private=self.settings.webhook_allow_private,
                )
            except Exception:
                log.exception("webhook delivery to %s crashed", url)


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

    @property
    def ttl(self) -> int:
        """Seconds a job's event stream is kept: as long as the job itself."""
        return self.settings.event_ttl

    def emit(self, job: Job, type_: EventType, status: str, **fields: Any) -> JobEvent:
        event = events.make_event(type_, job.id, status, **fields)
        try:
            events.publish(self.connection, event, self.ttl)
        except Exception:  # losing one event must not fail the job; status still lives in RQ
            log.warning("job %s: could not publish %s event", job.id, type_, exc_info=True)
        self.deliver(job, event)
        return event

    def deliver(self, job: Job, event: JobEvent) -> None:
        """Hand an event (already in the job's stream) to the webhook sender, if the job subscribed."""
        url = wants(job.meta or {}, event)
        if url and self.sender is not None:
            self.sender.submit(url, event)
