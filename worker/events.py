"""Publishing job events from the worker, and delivering webhooks off the sampling thread.

A worker's `WebhookSender` (app.core.webhooks) threads deliver each URL's events in order (so a
receiver sees start → progress → completed), retrying with backoff, without ever holding up the
denoising loop or one receiver holding up another. Its outbox in Redis keeps the events it has not
delivered yet (progress aside) for another sender to deliver if this worker dies or stops.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from app.core import events, webhooks
from app.core.events import EventType, JobEvent
from app.core.jobs import cancel_key
from app.core.webhooks import WebhookSender

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


# A running job's progress, written only while this run still owns the job: its execution (ARGV[1])
# is still in the started registry (KEYS[1]). A worker that stalled past its heartbeats lost the job
# to a run elsewhere, whose meta and stream its late progress would take back in time. Then the
# job's meta (KEYS[2]) and the event on its stream (KEYS[3]), as `events.publish` writes a progress
# event (ARGV: meta, stream length, event JSON, stream TTL). Answers 1 when written, 0 when the run
# lost the job (nothing written).
PROGRESS_SCRIPT = """
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  return 0
end
redis.call('HSET', KEYS[2], 'meta', ARGV[2])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], '*', 'data', ARGV[4])
redis.call('EXPIRE', KEYS[3], ARGV[5])
return 1
"""


def record_progress(pipe: Any, claim: tuple[str, str], job: Job, meta: Any, event: JobEvent, ttl: int) -> None:
    """Queue PROGRESS_SCRIPT on `pipe` for the run `claim` (started registry key, execution's
    composite key) of `job`, with `meta` (serialized) and a progress `event`; its answer (1: written,
    0: the run lost the job) comes with the pipeline's."""
    keys = (claim[0], job.key, events.stream_key(job.id))
    data = event.model_dump_json(exclude_none=True)
    # EVAL, not a registered script's EVALSHA: redis-py's pipeline asks SCRIPT EXISTS before each
    # execute that holds one, a round trip more per write than the script's few hundred bytes cost.
    pipe.eval(PROGRESS_SCRIPT, 3, *keys, claim[1], meta, events.STREAM_MAXLEN, data, ttl)


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
        if fields.get("progress") is None:
            fields["progress"] = events.job_progress(job)
        event = events.make_event(type_, job.id, status, **fields)
        try:
            events.publish(self.connection, event, events.stream_ttl(self.settings, event))
        except Exception:  # losing one event must not fail the job; status still lives in RQ
            log.warning("job %s: could not publish %s event", job.id, type_, exc_info=True, extra={"job_id": job.id})
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
                log.warning("job %s: no webhook secret could be read; %s not delivered", job.id, event.type,
                            extra={"job_id": job.id})  # fmt: skip
                return
            self.sender.submit(url, event, secret, owner=meta.get("owner"))
