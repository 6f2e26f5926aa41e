"""Redis connections and the RQ queue, always with RQ's JSON serializer (never pickle)."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

from redis import Redis
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

from app.core.jobs import TASK_GENERATE, GenerationParams, queue_name

if TYPE_CHECKING:
    from app.core.config import Settings

SERIALIZER = JSONSerializer


def connect(url: str, *, timeout: float = 5.0) -> Redis:
    """A Redis client that fails fast (no hanging requests when Redis is down)."""
    return Redis.from_url(
        url,
        socket_connect_timeout=timeout,
        socket_timeout=timeout,
        health_check_interval=30,
    )


def get_queue(connection: Redis, model: str) -> Queue:
    """The queue that workers serving `model` listen on."""
    return Queue(queue_name(model), connection=connection, serializer=SERIALIZER)


def enqueue_generate(queue: Queue, params: GenerationParams, settings: Settings) -> Job:
    """Put one generation job on the queue: JSON arguments, a random UUID, explicit TTLs."""
    return queue.enqueue(
        TASK_GENERATE,
        kwargs={"params": params.model_dump(mode="json")},
        job_id=str(uuid.uuid4()),
        job_timeout=settings.job_timeout,
        result_ttl=settings.result_ttl,
        failure_ttl=settings.failure_ttl,
        ttl=None,
        description="generate",
    )


def fetch_job(connection: Redis, job_id: str) -> Job | None:
    """The RQ job, or None when it does not exist (never created, or expired)."""
    from rq.exceptions import NoSuchJobError

    try:
        return Job.fetch(job_id, connection=connection, serializer=SERIALIZER)
    except NoSuchJobError:
        return None
