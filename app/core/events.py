"""Job events: one schema for SSE, long-polling and webhooks, kept in a Redis stream per job.

The API writes `queued` (and `canceled` for jobs that never started); the worker writes `started`,
`progress` and the terminal event after RQ has recorded the outcome.
"""

from __future__ import annotations

import enum
import json
import time
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel
from redis.client import Pipeline

if TYPE_CHECKING:
    from redis import Redis

    from app.core.config import Settings

STREAM_MAXLEN = 1000


class EventType(enum.StrEnum):
    queued = "queued"
    started = "started"
    progress = "progress"
    succeeded = "succeeded"
    failed = "failed"
    canceled = "canceled"

    def is_terminal(self) -> bool:
        return self in (EventType.succeeded, EventType.failed, EventType.canceled)


class JobEvent(BaseModel):
    type: EventType
    job_id: str
    status: str
    progress: dict[str, int] | None = None
    timestamp: float
    images: list[dict[str, Any]] | None = None
    error: dict[str, str] | None = None


def job_progress(job: Any) -> dict[str, int]:
    """A job's progress as its events carry it: what a worker last recorded, else step 0 of its
    steps (a job canceled, refused or lost before it started). Every event has `progress`."""
    recorded = (job.meta or {}).get("progress")
    if isinstance(recorded, dict) and isinstance(recorded.get("step"), int) and isinstance(recorded.get("total"), int):
        return recorded
    try:
        params = (job.kwargs or {}).get("params") or {}
        total = int(params.get("num_inference_steps") or 0)
    except Exception:  # arguments that cannot be read (a planted job): no step count to give
        total = 0
    return {"step": 0, "total": max(total, 0)}


def stream_key(job_id: str) -> str:
    return f"imagegen:events:{job_id}"


def make_event(type_: EventType, job_id: str, status: str, **fields: Any) -> JobEvent:
    return JobEvent(type=type_, job_id=job_id, status=status, timestamp=time.time(), **fields)


def end_key(job_id: str) -> str:
    """A stream that holds only the job's terminal event: what waiters for the end read, so that
    no progress event wakes them (or costs the sampling worker their CPU time)."""
    return f"imagegen:ended:{job_id}"


def result_ttl(job_ttl: int | None, settings: Settings) -> int:
    """Seconds a succeeded job (its images, its streams) is kept: the result TTL the API gave it
    when it queued the job, else the setting (a worker's own setting may differ from the API's)."""
    return job_ttl if isinstance(job_ttl, int) and job_ttl > 0 else settings.result_ttl


def stream_ttl(settings: Settings, event: JobEvent, job_ttl: int | None = None) -> int:
    """Seconds a job's streams are kept once `event` is written: an end shortens them to what is
    left of the job (its result TTL on success, IMAGEGEN_FAILURE_TTL otherwise), where they
    outlived it by up to a day (~5 KB per job)."""
    if event.type is EventType.succeeded:
        return result_ttl(job_ttl, settings)
    return settings.failure_ttl if event.type.is_terminal() else settings.event_ttl


def publish(conn: Redis | Pipeline, event: JobEvent, ttl: int) -> None:
    """Append to the job's stream (bounded), and a terminal event to its end stream too; both are
    kept as long as the job. On a client (not a pipeline) this is one round trip."""
    if not isinstance(conn, Pipeline):
        with conn.pipeline(transaction=False) as pipe:
            publish(pipe, event, ttl)
            pipe.execute()
        return
    data = {"data": event.model_dump_json(exclude_none=True)}
    key = stream_key(event.job_id)
    conn.xadd(key, data, maxlen=STREAM_MAXLEN, approximate=True)  # type: ignore[arg-type]
    conn.expire(key, ttl)
    if event.type.is_terminal():
        conn.xadd(end_key(event.job_id), data)  # type: ignore[arg-type]
        conn.expire(end_key(event.job_id), ttl)


def decode(entries: list[Any]) -> list[tuple[str, JobEvent]]:
    out = []
    for entry_id, fields in entries:
        raw = fields.get(b"data") or fields.get("data")
        ident = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
        out.append((ident, JobEvent.model_validate(json.loads(raw))))
    return out


def read(conn: Redis, job_id: str, after: str = "0", block_ms: int | None = None) -> list[tuple[str, JobEvent]]:
    """Events after stream id `after`; with `block_ms`, wait up to that long for the first one."""
    result: Any = conn.xread({stream_key(job_id): after}, count=500, block=block_ms)
    if not result:
        return []
    _, entries = result[0]
    return decode(entries)


def last_id(conn: Redis, job_id: str) -> str:
    entries = conn.xrevrange(stream_key(job_id), count=1)
    return decode(entries)[0][0] if entries else "0"
