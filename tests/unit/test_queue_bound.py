"""`IMAGEGEN_MAX_QUEUE` under concurrency, on a real redis-server: the bound on a model's waiting
jobs is checked inside the submission's script call, so no number of concurrent submissions (one
process's batch of async ones, blocking ones on threads, several API processes) gets past it.
Checked by the API against a count read earlier, 200 concurrent requests against a bound of 10
queued 130 jobs."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from app.api.services import JobService, Placed
from app.core.config import Settings
from app.core.errors import RateLimitedError
from app.core.jobs import GenerationParams, Priority
from app.core.queue import connect_async
from tests.procs import RedisServer
from tests.unit.test_submit import resend_every_write

QUEUES = [f"rq:queue:imagegen:main:{p.value}" for p in Priority]


def make_service(redis_server: RedisServer, redis_db: Any, **settings: Any) -> JobService:
    url = f"redis://127.0.0.1:{redis_server.port}/15"
    return JobService(Settings(redis_url=url, model="main", **settings), redis_db, connect_async(url))


def waiting(redis_db: Any) -> int:
    return sum(redis_db.llen(q) for q in QUEUES)


def test_concurrent_async_submissions_never_pass_the_bound(redis_db, redis_server: RedisServer) -> None:
    """One API process: 200 submissions ready at once, on every priority, share their round trips
    (see `_Writes`); exactly the bound's worth go in, the rest get the full queue's 429."""
    service = make_service(redis_server, redis_db, max_queue=10)
    redis_db.rpush(QUEUES[2], "someone-elses-job")  # already waiting: counts against the bound

    async def burst() -> list[Placed | BaseException]:
        try:
            jobs = (
                service.submit_async(GenerationParams(prompt=f"p{i}"), priority=list(Priority)[i % 3])
                for i in range(200)
            )
            return await asyncio.gather(*jobs, return_exceptions=True)
        finally:
            assert service.aredis is not None
            await service.aredis.aclose()

    results = asyncio.run(burst())
    placed = [r for r in results if isinstance(r, Placed)]
    refused = [r for r in results if isinstance(r, RateLimitedError)]
    assert len(placed) == 9 and len(refused) == 191, [r for r in results if not isinstance(r, Placed)][:3]
    assert waiting(redis_db) == 10
    assert all(str(r) == "the queue is full (10 jobs waiting); retry later" for r in refused)
    assert all(r.retry_after >= 1 for r in refused)
    # A refused job left nothing: no hash, seen marker, listing entry or event stream.
    assert len(redis_db.keys("rq:job:*")) == 9 and len(redis_db.keys("imagegen:seen:*")) == 9
    assert redis_db.zcard("imagegen:index") == 9 and len(redis_db.keys("imagegen:events:*")) == 9


def test_several_api_processes_on_threads_never_pass_the_bound(redis_db, redis_server: RedisServer) -> None:
    """Blocking submissions (variations, the OpenAI routes) from four services, as four API
    processes would, all at once; a second wave after a worker took some jobs fills only the room."""
    services = [make_service(redis_server, redis_db, max_queue=10) for _ in range(4)]

    def wave() -> list[Placed | RateLimitedError]:
        start = threading.Barrier(32)  # the pool's first 32 submissions set off together

        def one(i: int) -> Placed | RateLimitedError:
            if i < 32:
                start.wait()
            try:
                return services[i % 4].submit(GenerationParams(prompt=f"p{i}"), priority=list(Priority)[i % 3])
            except RateLimitedError as exc:
                return exc

        with ThreadPoolExecutor(32) as pool:
            return list(pool.map(one, range(120)))

    first = wave()
    assert sum(isinstance(r, Placed) for r in first) == 10 and waiting(redis_db) == 10
    taken: list[bytes] = []  # a worker started three, from whichever priorities hold them
    for queue in QUEUES:
        while len(taken) < 3 and (job_id := redis_db.lpop(queue)) is not None:
            taken.append(job_id)
    assert len(taken) == 3
    second = wave()
    assert sum(isinstance(r, Placed) for r in second) == 3 and waiting(redis_db) == 10
    for service in services:
        assert service.aredis is not None
        asyncio.run(service.aredis.aclose())


def test_a_resent_submission_is_answered_even_when_it_filled_the_queue(redis_db, redis_server: RedisServer) -> None:
    """A call resent after a lost connection (see `app.core.queue.connect`) whose job went in the
    first time gets its placement, not a 429 for the place its own job now takes."""
    service = make_service(redis_server, redis_db, max_queue=1)
    resend_every_write(service)

    async def run() -> Placed:
        try:
            return await service.submit_async(GenerationParams(prompt="once"))
        finally:
            assert service.aredis is not None
            await service.aredis.aclose()

    placed = asyncio.run(run())
    assert placed.position == 0 and redis_db.lrange(QUEUES[1], 0, -1) == [placed.id.encode()]


def test_a_variations_job_refused_by_the_full_queue_leaves_no_input(redis_db, redis_server: RedisServer) -> None:
    """Its input image goes in the same round trip as the script call; the refusal deletes it."""
    service = make_service(redis_server, redis_db, max_queue=1)

    def upload(pipe: Any, job_id: str) -> None:
        pipe.set(f"imagegen:input:{job_id}", b"png bytes", ex=60)

    service.submit(GenerationParams(prompt="fits"), before=upload)
    with pytest.raises(RateLimitedError, match=r"the queue is full \(1 jobs waiting\)"):
        service.submit(GenerationParams(prompt="refused"), before=upload)
    assert len(redis_db.keys("imagegen:input:*")) == 1 and waiting(redis_db) == 1


def test_the_bound_counts_only_the_models_own_queues(redis_db, redis_server: RedisServer) -> None:
    service = make_service(redis_server, redis_db, max_queue=2)
    redis_db.rpush("rq:queue:imagegen:other:normal", "a", "b", "c")  # another model's backlog
    service.submit(GenerationParams(prompt="one"))
    service.submit(GenerationParams(prompt="two"), priority=Priority.low)
    with pytest.raises(RateLimitedError, match="2 jobs waiting"):
        service.submit(GenerationParams(prompt="three"), priority=Priority.high)
