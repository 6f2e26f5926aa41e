"""Waiting for a job's end (`JobService.wait_async`, behind `Prefer: wait`, `?wait=` and the OpenAI
route) on a real redis-server: only the terminal event wakes the wait, and a job that ends without
one (a lost worker's, failed by maintenance) is still noticed by its status."""

from __future__ import annotations

import asyncio
from typing import Any

from rq.job import Job

from app.core import events
from app.core.events import EventType
from app.core.jobs import GenerationParams
from tests.unit.test_submit import make_service


def test_the_end_stream_holds_only_the_terminal_event(redis_db) -> None:
    for step in (1, 2):
        events.publish(redis_db, events.make_event(EventType.progress, "j", "running", progress={"step": step}), 60)
    events.publish(redis_db, events.make_event(EventType.failed, "j", "failed", error={"code": "x"}), 60)
    assert [e.type for _, e in events.read(redis_db, "j")] == [EventType.progress, EventType.progress, EventType.failed]
    ended = events.decode(redis_db.xrange(events.end_key("j")))
    assert [e.type for _, e in ended] == [EventType.failed]
    assert 0 < redis_db.ttl(events.end_key("j")) <= 60 and 0 < redis_db.ttl(events.stream_key("j")) <= 60


def test_progress_never_wakes_a_waiter_and_the_terminal_event_ends_the_wait(redis_db, redis_server) -> None:
    service = make_service(redis_db, redis_server)
    job_id = service.submit(GenerationParams(prompt="p")).id
    redis_db.hset(Job.key_for(job_id), "status", "started")

    async def scenario() -> tuple[int, Any, bool]:
        assert service.aredis is not None
        blocking_reads = 0
        xread = service.aredis.xread

        async def counted(*args: Any, **kwargs: Any) -> Any:
            nonlocal blocking_reads
            blocking_reads += 1
            return await xread(*args, **kwargs)

        service.aredis.xread = counted  # type: ignore[method-assign]
        try:
            waiter = asyncio.create_task(service.wait_async(job_id, 10))
            await asyncio.sleep(0.1)
            for step in range(1, 4):
                progress = events.make_event(EventType.progress, job_id, "running", progress={"step": step})
                events.publish(redis_db, progress, 60)
                await asyncio.sleep(0.05)
            pending = not waiter.done()
            events.publish(redis_db, events.make_event(EventType.succeeded, job_id, "succeeded"), 60)
            return blocking_reads, await asyncio.wait_for(waiter, 5), pending
        finally:
            await service.aredis.aclose()

    reads, ended, pending_through_progress = asyncio.run(scenario())
    assert pending_through_progress and ended is not None and ended.type is EventType.succeeded
    assert reads == 1  # the one block that the terminal event answered


def test_a_job_that_ends_without_an_event_is_noticed_by_its_status(redis_db, redis_server) -> None:
    service = make_service(redis_db, redis_server)
    job_id = service.submit(GenerationParams(prompt="p")).id
    redis_db.hset(Job.key_for(job_id), "status", "started")

    async def scenario() -> Any:
        assert service.aredis is not None
        try:
            waiter = asyncio.create_task(service.wait_async(job_id, 10))
            await asyncio.sleep(0.1)
            redis_db.hset(Job.key_for(job_id), "status", "failed")  # as maintenance fails a lost job
            return await asyncio.wait_for(waiter, 5)  # seen after the next quiet block (2 s)
        finally:
            await service.aredis.aclose()

    assert asyncio.run(scenario()) is None


def test_canceling_a_running_job_flags_it_and_moves_its_models_wake_stream(redis_db, redis_server) -> None:
    """A batching worker reads cancel flags between steps only after the wake stream moved."""
    from app.core.jobs import cancel_key, wake_key

    service = make_service(redis_db, redis_server)
    job_id = service.submit(GenerationParams(prompt="p")).id
    redis_db.hset(Job.key_for(job_id), "status", "started")
    before = redis_db.xlen(wake_key("main"))
    _, event = service.cancel(service.get(job_id))
    assert event is None and redis_db.get(cancel_key(job_id)) == b"1"  # a running job stops at its next step
    assert redis_db.xlen(wake_key("main")) == before + 1
    assert redis_db.xrevrange(wake_key("main"), count=1)[0][1] == {b"cancel": job_id.encode()}


def test_a_wait_rides_out_a_short_redis_outage_and_reports_a_long_one(redis_db, redis_server) -> None:
    """A Redis restart mid-wait cost the caller its answer (a 503 on /v1, which OpenAI's SDKs then
    resubmit); the job survives it, so the wait now tries again until its own deadline."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    service = make_service(redis_db, redis_server)
    job_id = service.submit(GenerationParams(prompt="p")).id
    redis_db.hset(Job.key_for(job_id), "status", "started")

    async def scenario(failures: int, timeout: float) -> Any:
        assert service.aredis is not None
        hget = service.aredis.hget
        left = failures

        async def flaky(*args: Any, **kwargs: Any) -> Any:
            nonlocal left
            if left:
                left -= 1
                raise RedisConnectionError("Connection refused")
            return await hget(*args, **kwargs)

        service.aredis.hget = flaky  # type: ignore[method-assign]
        try:
            waiter = asyncio.create_task(service.wait_async(job_id, timeout))
            await asyncio.sleep(0.1)
            events.publish(redis_db, events.make_event(EventType.succeeded, job_id, "succeeded"), 60)
            return await asyncio.wait_for(waiter, timeout + 5)
        finally:
            service.aredis.hget = hget  # type: ignore[method-assign]

    async def both() -> tuple[Any, BaseException | None]:
        try:
            ended = await scenario(failures=3, timeout=10)  # down for ~1.5 s of a 10 s wait
            try:
                await scenario(failures=100, timeout=1.2)  # down past the wait's end
            except RedisConnectionError as exc:
                return ended, exc
            return ended, None
        finally:
            assert service.aredis is not None
            await service.aredis.aclose()

    ended, error = asyncio.run(both())
    assert ended is not None and ended.type is EventType.succeeded
    assert isinstance(error, RedisConnectionError)


def test_rqs_canceled_registry_keeps_only_jobs_that_still_exist(redis_db, redis_server) -> None:
    """RQ adds every job canceled while queued to its canceled registry and nothing in RQ cleans
    it: a soak left one entry per canceled job for good. Each cancel now drops entries older than
    the failure TTL (their jobs have expired)."""
    from rq.registry import CanceledJobRegistry

    service = make_service(redis_db, redis_server, failure_ttl=60)
    first = service.submit(GenerationParams(prompt="a"))
    service.cancel(service.get(first.id))
    registry = CanceledJobRegistry("imagegen:main:normal", connection=redis_db)
    assert redis_db.zrange(registry.key, 0, -1) == [first.id.encode()]
    redis_db.zadd(registry.key, {first.id: redis_db.zscore(registry.key, first.id) - 61})  # as 61 s ago
    second = service.submit(GenerationParams(prompt="b"))
    service.cancel(service.get(second.id))
    assert redis_db.zrange(registry.key, 0, -1) == [second.id.encode()]


def test_canceling_a_queued_variations_job_deletes_its_upload(redis_db, redis_server) -> None:
    """Only the worker deleted a variations job's input image: canceled while queued, its
    megabytes stayed in Redis for a day, and cancel-and-resubmit filled Redis past any bound."""
    from app.api.routes.variations import store_input
    from app.core.jobs import TASK_VARIATIONS
    from app.core.variations import VariationParams, input_key

    service = make_service(redis_db, redis_server)
    params = VariationParams(prompt="like this", strength=0.5, seed=1, width=32, height=32, num_inference_steps=4)
    placed = service.submit(params, task=TASK_VARIATIONS, before=store_input(b"png bytes" * 1000, 86400))
    assert redis_db.exists(input_key(placed.id))
    _, event = service.cancel(service.get(placed.id))
    assert event is not None and event.type is EventType.canceled
    assert not redis_db.exists(input_key(placed.id))


def test_a_job_a_worker_has_just_taken_is_not_also_canceled_here(redis_db, redis_server) -> None:
    """A worker moves a job from its queue to its own list before starting it, the job still
    `queued`: a cancel then ended it here (event, webhook, metric) and again in the worker, which
    saw the flag as it started it. Now only the one that takes it out of the queue ends it."""
    from rq import Queue

    from app.core.jobs import cancel_key

    service = make_service(redis_db, redis_server)
    taken = service.submit(GenerationParams(prompt="taken")).id
    queue = Queue("imagegen:main:normal", connection=redis_db)
    redis_db.lmove(queue.key, queue.intermediate_queue_key, "LEFT", "RIGHT")  # the worker's claim
    job, event = service.cancel(service.get(taken))
    assert event is None and redis_db.get(cancel_key(taken)) == b"1"  # the worker ends it, once
    assert service.status(service.get(taken)).value == "queued"  # until the worker starts it
    assert [e.type for _, e in events.read(redis_db, taken)].count(EventType.canceled) == 0
    waiting = service.submit(GenerationParams(prompt="waiting")).id
    _, event = service.cancel(service.get(waiting))  # still in its queue: canceled here
    assert event is not None and event.type is EventType.canceled
    assert redis_db.lrange(queue.key, 0, -1) == []
