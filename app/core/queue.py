"""Redis connections and the RQ queue, always with RQ's JSON serializer (never pickle)."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

from redis import Redis
from redis.asyncio import BlockingConnectionPool as AsyncBlockingConnectionPool
from redis.asyncio import Connection as AsyncConnection
from redis.asyncio import Redis as AsyncRedis
from redis.asyncio.retry import Retry as AsyncRedisRetry
from redis.backoff import NoBackoff
from redis.client import Pipeline
from redis.connection import HiredisRespSerializer
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.retry import Retry as RedisRetry
from rq import Queue, Retry
from rq.job import Job
from rq.serializers import JSONSerializer

from app.core.jobs import TASK_GENERATE, TASK_VARIATIONS, GenerationParams, Priority, queue_name

if TYPE_CHECKING:
    from app.core.config import Settings

SERIALIZER = JSONSerializer
DESCRIPTIONS = {TASK_GENERATE: "generate", TASK_VARIATIONS: "variations"}


# A command on a connection that failed (closed by a Redis restart while it sat in the pool) is
# sent once more on a new connection; `from_url` alone never retries. Timeouts are not retried,
# so a hung Redis still fails a request after `timeout`. Resending is safe for what the services
# send: reads, and writes that are idempotent (the submission script writes a job only once).
RETRY_ERRORS = (RedisConnectionError,)


def connect(url: str, *, timeout: float = 5.0) -> Redis:
    """A Redis client that fails fast (no hanging requests when Redis is down)."""
    return Redis.from_url(
        url,
        socket_connect_timeout=timeout,
        socket_timeout=timeout,
        health_check_interval=30,
        retry=RedisRetry(NoBackoff(), 1, supported_errors=RETRY_ERRORS),
    )


class PackingConnection(AsyncConnection):
    """redis-py's asyncio connection with commands packed by hiredis, in C, as its blocking client
    already does: redis-py packs asyncio commands in Python, ~17 µs for a submission's script call
    against ~2.5 µs (bench/README.md, "Ingress")."""

    _packer = HiredisRespSerializer()

    def pack_command(self, *args: Any) -> list[bytes]:
        return self._packer.pack(*args)


def connect_async(url: str, *, timeout: float = 5.0, max_connections: int = 100) -> AsyncRedis:
    """The asyncio twin of `connect`, for async routes (submissions, SSE, long-poll). Over TCP its
    connections pack commands with hiredis (TLS and Unix sockets keep redis-py's own classes).

    With all `max_connections` in use, a command waits (up to `timeout`) for one to come free;
    redis-py's default pool fails it at once ("Too many connections"). Blocking stream reads get a
    client of their own (`JobService`), so they cannot take every connection from submissions."""
    pool = AsyncBlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout,
        socket_connect_timeout=timeout,
        socket_timeout=timeout,
        health_check_interval=30,
        retry=AsyncRedisRetry(NoBackoff(), 1, supported_errors=RETRY_ERRORS),
    )
    if pool.connection_class is AsyncConnection:  # plain TCP (not TLS, not a Unix socket)
        pool.connection_class = PackingConnection
    return AsyncRedis(connection_pool=pool)


def get_queue(connection: Redis, model: str, priority: Priority = Priority.normal) -> Queue:
    """The queue that workers serving `model` take `priority` jobs from."""
    return Queue(queue_name(model, priority), connection=connection, serializer=SERIALIZER)


def get_queues(connection: Redis, model: str) -> list[Queue]:
    """All queues of a model, highest priority first (the order a worker drains them)."""
    return [get_queue(connection, model, p) for p in Priority]


def enqueue_task(
    queue: Queue,
    params: GenerationParams,
    settings: Settings,
    *,
    job_id: str | None = None,
    meta: dict[str, Any] | None = None,
    pipeline: Pipeline | None = None,
    task: str = TASK_GENERATE,
) -> Job:
    """Put one job of `task` on the queue: JSON arguments, a random UUID, explicit TTLs, and the
    task's short name as its description (what `rq info` shows).

    With `pipeline`, RQ only records its commands there (the RPUSH onto the queue comes last) and
    nothing is written until the caller executes it.
    """
    return queue.enqueue_call(
        task,
        # Retries are for lost workers only: the worker turns them off for failures it reports itself.
        retry=Retry(max=settings.max_retries) if settings.max_retries else None,
        kwargs={"params": params.model_dump(mode="json")},
        job_id=job_id or str(uuid.uuid4()),
        meta=meta or {},
        timeout=settings.job_timeout,
        result_ttl=settings.result_ttl,
        failure_ttl=settings.failure_ttl,
        ttl=None,
        description=DESCRIPTIONS[task],
        pipeline=pipeline,
    )


def fetch_job(connection: Redis, job_id: str) -> Job | None:
    """The RQ job, or None when it does not exist (never created, or expired)."""
    from rq.exceptions import NoSuchJobError

    try:
        return Job.fetch(job_id, connection=connection, serializer=SERIALIZER)
    except NoSuchJobError:
        return None
