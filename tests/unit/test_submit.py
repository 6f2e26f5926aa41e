"""JobService.submit / submit_async on a real redis-server: what a queued job looks like, where the
202 body places it, the bounded queue, and how many Redis round trips a submission costs."""

from __future__ import annotations

import asyncio
import datetime
import time
import zlib
from typing import Any

import pytest
from rq.job import Job, JobStatus
from rq.utils import utcformat

from app.api.services import JobService, Placed
from app.core.config import Settings
from app.core.errors import RateLimitedError
from app.core.jobs import TASK_VARIATIONS, GenerationParams, Priority
from app.core.queue import SERIALIZER, connect_async, enqueue_task
from tests.procs import RedisServer

# Fields RQ stamps with the time or the id, so two equal submissions differ there.
VOLATILE = {b"created_at", b"enqueued_at", b"last_heard_at", b"data"}


def make_service(redis_db, redis_server: RedisServer, **settings) -> JobService:
    url = f"redis://127.0.0.1:{redis_server.port}/15"
    return JobService(Settings(redis_url=url, model="main", **settings), redis_db, connect_async(url))


async def submit_async(service: JobService, params: GenerationParams, **kw) -> Placed:
    try:
        return await service.submit_async(params, **kw)
    finally:
        assert service.aredis is not None
        await service.aredis.aclose()


def command_calls(redis_db, name: str) -> int:
    """Server-wide: only for `quiet_db`, which no running stack polls."""
    stats = redis_db.info("commandstats").get(f"cmdstat_{name}")
    return int(stats["calls"]) if stats else 0


def same_hash(redis_db, ours: str, rqs: str) -> None:
    a, b = redis_db.hgetall(Job.key_for(rqs)), redis_db.hgetall(Job.key_for(ours))
    assert set(a) == set(b)
    assert {k: v for k, v in a.items() if k not in VOLATILE} == {k: v for k, v in b.items() if k not in VOLATILE}
    assert SERIALIZER.loads(zlib.decompress(b[b"data"])) == SERIALIZER.loads(zlib.decompress(a[b"data"]))
    fetched = Job.fetch(ours, connection=redis_db, serializer=SERIALIZER)
    rq_written = Job.fetch(rqs, connection=redis_db, serializer=SERIALIZER)
    assert fetched.get_status() == JobStatus.QUEUED and fetched.kwargs == rq_written.kwargs
    assert fetched.func_name == rq_written.func_name and fetched.meta == rq_written.meta


@pytest.mark.parametrize("owner", [None, "key-1"])
def test_a_submission_writes_what_rqs_own_enqueue_writes(redis_db, redis_server: RedisServer, owner) -> None:
    params = GenerationParams(prompt="a red circle", seed=3, width=32, height=32, num_inference_steps=4)
    webhook = {"url": "https://example.com/hook", "events": ["succeeded"]}
    service = make_service(redis_db, redis_server)
    placed = asyncio.run(submit_async(service, params, owner=owner, webhook=webhook))
    meta: dict[str, Any] = {"webhook": webhook} | ({"owner": owner} if owner else {})
    queue = service.queues[1]
    rqs = enqueue_task(queue, GenerationParams(**placed.params), service.settings, meta=meta)
    same_hash(redis_db, placed.id, rqs.id)
    assert redis_db.lrange(queue.key, 0, -1) == [placed.id.encode(), rqs.id.encode()]
    assert redis_db.sismember("rq:queues", queue.key)
    # Our own keys went in the same script call: the seen marker, listing index and `queued` event.
    assert 0 < redis_db.ttl(f"imagegen:seen:{placed.id}") <= service._seen_ttl
    index = "imagegen:index" if owner is None else f"imagegen:index:{owner}"
    assert redis_db.zscore(index, placed.id) is not None
    assert 0 < redis_db.ttl(index) <= service._seen_ttl  # a key no longer used leaves no index behind
    stream = f"imagegen:events:{placed.id}"
    assert redis_db.xlen(stream) == 1 and 0 < redis_db.ttl(stream) <= service.event_ttl
    assert redis_db.xlen("imagegen:wake:main") == 1  # an idle worker's wake-up
    # The 202 body shows what GET /jobs/{id} shows for the job once read back.
    url = lambda i, n: ""  # noqa: E731
    fetched = Job.fetch(placed.id, connection=redis_db, serializer=SERIALIZER)
    assert service.view_placed(placed) == service.view(fetched, url).model_copy(update={"eta_seconds": placed.eta})


@pytest.mark.parametrize("submit", ["sync", "async"])
def test_an_expired_job_is_gone_for_its_owner_and_unknown_to_other_keys(redis_db, redis_server, submit) -> None:
    """Another key got 410 for an expired job (404 while it existed): it learnt the job had been."""
    from app.core.errors import GoneError, NotFoundError

    service = make_service(redis_db, redis_server)
    params = GenerationParams(prompt="x")
    if submit == "sync":
        placed = service.submit(params, owner="alice")
        anonymous = service.submit(params)
    else:
        placed = asyncio.run(submit_async(service, params, owner="alice"))
        anonymous = asyncio.run(submit_async(make_service(redis_db, redis_server), params))
    redis_db.delete(Job.key_for(placed.id), Job.key_for(anonymous.id))  # as once they expire
    with pytest.raises(GoneError):
        service.get(placed.id, owner="alice")
    with pytest.raises(NotFoundError):
        service.get(placed.id, owner="bob")
    with pytest.raises(GoneError):
        service.get(placed.id)  # keys off: every job is everyone's
    with pytest.raises(NotFoundError):
        service.get(anonymous.id, owner="bob")  # made with keys off, asked for with one
    with pytest.raises(GoneError):
        service.get(anonymous.id)
    legacy = "0b0e4c1e-3f4a-4b8e-9a3c-2d6f1e7a9b10"  # a marker from before markers held the owner
    redis_db.set(f"imagegen:seen:{legacy}", 1)
    with pytest.raises(GoneError):
        service.get(legacy, owner="alice")


def test_a_variations_submission_writes_its_input_then_rqs_hash(redis_db, redis_server: RedisServer) -> None:
    from app.api.routes.variations import store_input
    from app.core.variations import VariationParams, input_key

    service = make_service(redis_db, redis_server)
    params = VariationParams(prompt="like this", strength=0.5, seed=1, width=32, height=32, num_inference_steps=4)
    placed = service.submit(params, task=TASK_VARIATIONS, before=store_input(b"png bytes", 60))
    assert redis_db.get(input_key(placed.id)) == b"png bytes" and 0 < redis_db.ttl(input_key(placed.id)) <= 60
    rqs = enqueue_task(service.queues[1], VariationParams(**placed.params), service.settings, task=TASK_VARIATIONS)
    same_hash(redis_db, placed.id, rqs.id)
    assert Job.fetch(placed.id, connection=redis_db, serializer=SERIALIZER).description == "variations"


def test_async_submit_reloads_its_script_after_a_flush(redis_db, redis_server: RedisServer) -> None:
    service = make_service(redis_db, redis_server)

    async def twice() -> list[Placed]:
        try:
            first = await service.submit_async(GenerationParams(prompt="one"))
            redis_db.script_flush()  # as after a Redis restart
            return [first, await service.submit_async(GenerationParams(prompt="two"))]
        finally:
            assert service.aredis is not None
            await service.aredis.aclose()

    jobs = asyncio.run(twice())
    assert redis_db.lrange("rq:queue:imagegen:main:normal", 0, -1) == [j.id.encode() for j in jobs]


def resend_every_write(service: JobService) -> None:
    """Make each of `service`'s submission writes run twice, as when the reply to the first was lost
    with its connection and the client sent the command again (`app.core.queue.connect`)."""
    assert service._writes is not None
    write = service._writes.write

    async def twice(*command: Any) -> Any:
        await write(*command)  # ran, but its reply was lost with the connection
        return await write(*command)

    service._writes.write = twice  # type: ignore[method-assign]


def test_a_resent_submission_queues_its_job_once(redis_db, redis_server: RedisServer) -> None:
    """The clients resend a command once when its connection fails (`app.core.queue.connect`); if
    Redis ran the script before the connection broke, the second call must not queue it again."""
    service = make_service(redis_db, redis_server)
    resend_every_write(service)
    placed = asyncio.run(submit_async(service, GenerationParams(prompt="once")))
    assert redis_db.lrange("rq:queue:imagegen:main:normal", 0, -1) == [placed.id.encode()]
    assert redis_db.xlen(f"imagegen:events:{placed.id}") == 1 and redis_db.xlen("imagegen:wake:main") == 1
    assert placed.position == 0  # first in line, as the first call answered


def test_a_submission_drops_listing_entries_of_jobs_gone_for_certain(redis_db, redis_server: RedisServer) -> None:
    """Listing drops expired entries only for an owner who lists; each submission now drops those
    older than the seen marker's TTL, so an index no one reads stops growing."""
    import time

    service = make_service(redis_db, redis_server)
    now = time.time()
    redis_db.zadd("imagegen:index:k1", {"ancient": now - service._seen_ttl - 60, "recent": now - 3600})
    placed = asyncio.run(submit_async(service, GenerationParams(prompt="new"), owner="k1"))
    assert set(redis_db.zrange("imagegen:index:k1", 0, -1)) == {b"recent", placed.id.encode()}


def test_the_202_placement_counts_higher_priorities_first(redis_db, redis_server: RedisServer) -> None:
    service = make_service(redis_db, redis_server)
    url = lambda i, n: ""  # noqa: E731
    low = service.submit(GenerationParams(prompt="l"), priority=Priority.low)
    normal = service.submit(GenerationParams(prompt="n"))
    high = service.submit(GenerationParams(prompt="h"), priority=Priority.high)
    later = service.submit(GenerationParams(prompt="n2"))
    got = [p.position for p in (low, normal, high, later)]
    assert got == [0, 0, 0, 2]  # each one's position at the moment it was queued
    # A fresh read gives today's positions.
    again = [service.get(p.id) for p in (low, normal, high, later)]
    assert [service.view(j, url).queue_position for j in again] == [3, 1, 0, 2]


def test_a_submission_is_one_round_trip_while_the_queue_state_is_fresh(
    quiet_db, quiet_redis_server: RedisServer
) -> None:
    service = make_service(quiet_db, quiet_redis_server)
    service.submit(GenerationParams(prompt="first"))  # reads the queue state, then writes
    quiet_db.config_resetstat()
    for i in range(5):
        service.submit(GenerationParams(prompt=f"p{i}"))
    # Per job: one script call, with the three queue lengths read back inside it; no separate read.
    assert command_calls(quiet_db, "evalsha") == 5 and command_calls(quiet_db, "multi") == 0
    assert command_calls(quiet_db, "llen") == 5 * 3
    assert command_calls(quiet_db, "hgetall") == 0 and command_calls(quiet_db, "scard") == 0


def test_a_sync_submission_reloads_its_script_after_a_flush(redis_db, redis_server: RedisServer) -> None:
    service = make_service(redis_db, redis_server)
    first = service.submit(GenerationParams(prompt="one"))
    redis_db.script_flush()  # as after a Redis restart
    second = service.submit(GenerationParams(prompt="two"))
    assert redis_db.lrange("rq:queue:imagegen:main:normal", 0, -1) == [first.id.encode(), second.id.encode()]


def test_the_queue_bound_holds_with_the_cached_state(redis_db, redis_server: RedisServer) -> None:
    service = make_service(redis_db, redis_server, max_queue=5)
    for i in range(5):
        service.submit(GenerationParams(prompt=f"p{i}"), priority=list(Priority)[i % 3])
    with pytest.raises(RateLimitedError, match="5 jobs waiting"):
        service.submit(GenerationParams(prompt="one too many"))
    # Another API process (or a worker) changed the queue meanwhile: near the bound we re-read.
    redis_db.delete("rq:queue:imagegen:main:high", "rq:queue:imagegen:main:low")
    assert service.get(service.submit(GenerationParams(prompt="fits again")).id).origin == "imagegen:main:normal"
    service.submit(GenerationParams(prompt="fourth"))
    service.submit(GenerationParams(prompt="fifth"))
    assert redis_db.llen("rq:queue:imagegen:main:normal") == 5
    with pytest.raises(RateLimitedError):
        asyncio.run(submit_async(service, GenerationParams(prompt="full again")))


def test_a_full_queue_asks_to_retry_once_a_job_has_drained(redis_db, redis_server: RedisServer) -> None:
    service = make_service(redis_db, redis_server, max_queue=3)
    redis_db.hset("imagegen:steptime:main", "64x64", 0.5)  # 25 steps (no worker's defaults): 12.5 s a job
    for i in range(3):
        service.submit(GenerationParams(prompt=f"p{i}"))
    with pytest.raises(RateLimitedError) as info:
        service.submit(GenerationParams(prompt="one too many"))
    assert info.value.retry_after == 13  # was 4 (a tenth of the backlog: 0.3 jobs)


def test_concurrent_async_submissions_share_one_round_trip(quiet_db, quiet_redis_server: RedisServer) -> None:
    service = make_service(quiet_db, quiet_redis_server)
    assert service.aredis is not None
    pipelines = 0
    make_pipeline = service.aredis.pipeline

    def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal pipelines
        pipelines += 1
        return make_pipeline(*args, **kwargs)

    async def burst() -> list[Placed]:
        try:
            await service.submit_async(GenerationParams(prompt="first"))  # reads the queue state
            quiet_db.config_resetstat()
            service.aredis.pipeline = counted  # type: ignore[method-assign,union-attr]
            return await asyncio.gather(*(service.submit_async(GenerationParams(prompt=f"p{i}")) for i in range(8)))
        finally:
            assert service.aredis is not None
            await service.aredis.aclose()

    jobs = asyncio.run(burst())
    # Eight requests that were ready together: one pipeline between them, one script call per job.
    assert pipelines == 1 and command_calls(quiet_db, "evalsha") == 8
    assert command_calls(quiet_db, "rpush") == 8 and command_calls(quiet_db, "llen") == 8 * 3
    assert quiet_db.lrange("rq:queue:imagegen:main:normal", 1, -1) == [j.id.encode() for j in jobs]
    # Each one's 202 placement comes from its own reply.
    assert [j.position for j in jobs] == list(range(1, 9))


def test_a_failing_write_fails_only_its_own_submission(redis_db, redis_server: RedisServer) -> None:
    from redis.exceptions import ResponseError

    service = make_service(redis_db, redis_server)
    redis_db.set("a-string", "x")

    async def both() -> list[Any]:
        try:
            assert service._writes is not None
            bad = service._writes.write("LPUSH", "a-string", "y")  # WRONGTYPE
            good = service._writes.write("SET", "fine", "1")
            return await asyncio.gather(bad, good, return_exceptions=True)
        finally:
            assert service.aredis is not None
            await service.aredis.aclose()

    bad, good = asyncio.run(both())
    assert isinstance(bad, ResponseError) and "WRONGTYPE" in str(bad)
    assert good is True and redis_db.get("fine") == b"1"


def test_the_async_client_packs_commands_as_redis_py_does() -> None:
    from redis.asyncio.connection import Connection

    from app.core.queue import PackingConnection

    ours, theirs = PackingConnection(), Connection()
    for command in [
        ("EVALSHA", "f" * 40, 2, "rq:queue:a", "ключ", b"\x00\xff", 7, 1764625000.123456, -3, 2**40),
        ("SET", b"x" * 100_000, "y"),  # over redis-py's chunking cut-off
        ("CLIENT SETNAME", "api"),  # a two-word command name
    ]:
        assert b"".join(ours.pack_command(*command)) == b"".join(theirs.pack_command(*command)), command
    assert connect_async("redis://127.0.0.1:1/0").connection_pool.connection_class is PackingConnection


def _register_worker(redis_db, name: str, beat: datetime.datetime, model: str = "main") -> None:
    """A worker as RQ registers it on the model's queues, last heard from at `beat`."""
    key = f"rq:worker:{name}"
    redis_db.hset(key, "last_heartbeat", utcformat(beat))
    for priority in Priority:
        redis_db.sadd(f"rq:workers:imagegen:{model}:{priority.value}", key)


def test_etas_share_the_work_ahead_among_workers_but_not_the_jobs_own(redis_db, redis_server: RedisServer) -> None:
    """A job runs on one worker: its own sampling was divided by the live workers too, so with two
    idle workers the next job's ETA was half its sampling time."""
    service = make_service(redis_db, redis_server, worker_heartbeat=1.0)
    redis_db.hset("imagegen:steptime:main", "64x64", 0.1)
    now = datetime.datetime.now(datetime.UTC)
    for name in ("w1", "w2"):
        _register_worker(redis_db, name, now)
    params = GenerationParams(prompt="p", width=64, height=64, num_inference_steps=10)
    first, second = service.submit(params), service.submit(params)
    assert (first.eta, second.eta) == (pytest.approx(1.0), pytest.approx(1.5))  # were 0.5 and 1.0
    url = lambda i, n: ""  # noqa: E731
    assert [service.view(service.get(p.id), url).eta_seconds for p in (first, second)] == [1.0, 1.5]


def test_a_job_of_another_model_gets_its_eta_from_that_models_step_times(redis_db, redis_server) -> None:
    """They came from the default model's times, though the 202 at submission used the right ones."""
    service = make_service(redis_db, redis_server, worker_heartbeat=1.0)
    redis_db.hset("imagegen:steptime:main", "64x64", 0.1)
    redis_db.hset("imagegen:steptime:other", "64x64", 0.3)
    _register_worker(redis_db, "other-worker", datetime.datetime.now(datetime.UTC), model="other")
    from app.core.queue import get_queues

    params = GenerationParams(prompt="p", width=64, height=64, num_inference_steps=10)
    job = enqueue_task(get_queues(redis_db, "other")[1], params, service.settings)
    view = service.view(service.get(job.id), lambda i, n: "")
    assert view.queue_position == 0 and view.eta_seconds == pytest.approx(3.0)  # was 1.0
    job.set_status(JobStatus.STARTED)
    job.meta["progress"] = {"step": 4, "total": 10}
    job.save_meta()
    assert service.view(service.get(job.id), lambda i, n: "").eta_seconds == pytest.approx(1.8)  # 6 steps left


def test_etas_count_only_live_workers(redis_db, redis_server: RedisServer) -> None:
    """A killed worker stays registered for a minute and more: ETAs divided by it were too short,
    and with no live worker at all there is no honest ETA."""
    service = make_service(redis_db, redis_server, worker_heartbeat=1.0)
    redis_db.hset("imagegen:steptime:main", "64x64", 0.1)
    now = datetime.datetime.now(datetime.UTC)
    _register_worker(redis_db, "dead", now - datetime.timedelta(seconds=30))
    params = GenerationParams(prompt="p", width=64, height=64, num_inference_steps=10)
    placed = service.submit(params)
    assert placed.eta is None  # only a dead worker
    assert service.view(service.get(placed.id), lambda i, n: "").eta_seconds is None
    _register_worker(redis_db, "live", now)
    service._state.clear()  # the next submission reads the state again
    second = service.submit(params)
    assert second.eta == pytest.approx(2.0)  # two 1 s jobs, one live worker (not 1.0: two workers)
    assert service.view(service.get(second.id), lambda i, n: "").eta_seconds == pytest.approx(2.0)


def test_a_listing_of_queued_jobs_reads_the_queues_once_per_page(redis_db, redis_server, round_trips) -> None:
    """Each queued job of a page read the queues' heads, the jobs ahead of it and the workers for
    its ETA: a page of 100 took ~100 times one job's reads (12,500 HGETALLs, 2.8 s)."""
    service = make_service(redis_db, redis_server, worker_heartbeat=1.0)
    redis_db.hset("imagegen:steptime:main", "64x64", 0.1)
    _register_worker(redis_db, "live", datetime.datetime.now(datetime.UTC))
    params = GenerationParams(prompt="p", width=64, height=64, num_inference_steps=10)
    placed = [service.submit(params, priority=Priority.high if i % 5 == 0 else Priority.normal) for i in range(40)]
    url = lambda i, n: ""  # noqa: E731
    alone = {p.id: service.view(service.get(p.id), url) for p in placed}
    with round_trips.record() as sent:
        page = service.list_jobs(url, None, 40, None)
    assert len(page.jobs) == 40
    for view in page.jobs:  # the same figures as each job's own view
        assert (view.queue_position, view.eta_seconds) == (alone[view.id].queue_position, alone[view.id].eta_seconds)
    assert sorted(v.queue_position for v in page.jobs) == list(range(40))
    assert page.jobs[-1].eta_seconds == pytest.approx(1.0 * (1 + page.jobs[-1].queue_position))
    hgetalls = sum(c.count(b"HGETALL") for c in sent)
    assert len(sent) < 60 and hgetalls < 200, (len(sent), hgetalls)  # before: 387 and 860 (13 and 80 now)


def test_an_owners_waiting_bound_frees_the_places_of_jobs_that_left_the_queue(
    redis_db, redis_server: RedisServer
) -> None:
    service = make_service(redis_db, redis_server)
    jobs = [service.submit(GenerationParams(prompt=f"p{i}"), owner="k1", max_queued=3) for i in range(3)]
    with pytest.raises(RateLimitedError, match="3 jobs waiting"):
        service.submit(GenerationParams(prompt="fourth"), owner="k1", max_queued=3)
    with pytest.raises(RateLimitedError):
        asyncio.run(submit_async(service, GenerationParams(prompt="fourth"), owner="k1", max_queued=3))
    assert redis_db.llen("rq:queue:imagegen:main:normal") == 3  # nothing refused was written
    service.submit(GenerationParams(prompt="other"), owner="k2", max_queued=3)  # bounds are per owner
    redis_db.hset(Job.key_for(jobs[1].id), "status", "started")  # a worker took one
    redis_db.delete(Job.key_for(jobs[2].id))  # one expired
    service.submit(GenerationParams(prompt="fourth"), owner="k1", max_queued=3)
    service.submit(GenerationParams(prompt="fifth"), owner="k1", max_queued=3)
    with pytest.raises(RateLimitedError):
        service.submit(GenerationParams(prompt="sixth"), owner="k1", max_queued=3)
    service.submit(GenerationParams(prompt="no bound"), owner="k1", max_queued=0)


def test_a_refused_submission_leaves_nothing_of_its_own(redis_db, redis_server: RedisServer) -> None:
    """A variations request refused by its key's bound left its upload (up to a few MB) for a day."""
    service = make_service(redis_db, redis_server)

    def upload(pipe: Any, job_id: str) -> None:
        pipe.set(f"imagegen:input:{job_id}", b"png bytes", ex=86400)

    service.submit(GenerationParams(prompt="p"), owner="k1", max_queued=1, before=upload)
    assert len(redis_db.keys("imagegen:input:*")) == 1
    with pytest.raises(RateLimitedError):
        service.submit(GenerationParams(prompt="refused"), owner="k1", max_queued=1, before=upload)
    assert len(redis_db.keys("imagegen:input:*")) == 1  # only the accepted job's input
    redis_db.script_flush()  # as after a Redis restart: the reload writes the input again, once
    service.submit(GenerationParams(prompt="again"), owner="k2", max_queued=1, before=upload)
    assert len(redis_db.keys("imagegen:input:*")) == 2


def test_a_repeat_arriving_while_the_first_request_writes_its_job_gets_that_job(
    redis_db, redis_server: RedisServer, monkeypatch
) -> None:
    """Two requests with one Idempotency-Key at once: the second read the job (not written yet),
    then the marker the first request's write had just set, and answered 410 "expired"."""
    from app.api import services

    service = make_service(redis_db, redis_server)
    job_id, existing = service.claim_idempotency_key("k", "body-hash")
    assert existing is None
    real_fetch = services.fetch_job
    calls = 0

    def fetch_while_the_first_request_writes(redis, ident):
        nonlocal calls
        calls += 1
        if calls == 1:  # the first request's script runs right after this read
            service.submit(GenerationParams(prompt="p"), job_id=job_id)
            return None
        return real_fetch(redis, ident)

    monkeypatch.setattr(services, "fetch_job", fetch_while_the_first_request_writes)
    again_id, job = service.claim_idempotency_key("k", "body-hash")
    assert again_id == job_id and job is not None and job.id == job_id


def test_listing_pages_through_jobs_created_in_the_same_microsecond(redis_db, redis_server) -> None:
    """Several API processes can create jobs with equal index scores; a cursor holding only the time
    resumed strictly below it, so a page ending among them skipped the rest of them."""
    from app.api.services import index_key

    service = make_service(redis_db, redis_server, max_queue=100)
    ids = [service.submit(GenerationParams(prompt=f"tie {i}")).id for i in range(7)]
    key = index_key(None)
    redis_db.zadd(key, {ids[1]: 1000.5, ids[2]: 1000.5, ids[3]: 1000.5, ids[4]: 1000.5})  # four ties
    redis_db.zadd(key, {ids[5]: 999.0, ids[6]: 998.0})  # and two older ones
    url = lambda job_id, n: f"/jobs/{job_id}/images/{n}"  # noqa: E731
    for limit in (1, 2, 3):
        seen: list[str] = []
        cursor = None
        for _ in range(20):
            page = service.list_jobs(url, None, limit, cursor)
            seen += [view.id for view in page.jobs]
            cursor = page.next_cursor
            if cursor is None:
                break
        assert sorted(seen) == sorted(ids) and len(seen) == len(ids), (limit, seen)
    # A cursor from before (the time alone) still works: it resumes below that time.
    assert [v.id for v in service.list_jobs(url, None, 10, "1000.5").jobs] == [ids[5], ids[6]]
    # The same position however the id is spelled (UUID's other forms sort apart as bytes).
    last_of_first_two = sorted(ids[1:5], reverse=True)[1]
    for spelled in (last_of_first_two, "{" + last_of_first_two.upper() + "}", "urn:uuid:" + last_of_first_two):
        rest = [v.id for v in service.list_jobs(url, None, 10, f"1000.5:{spelled}").jobs]
        assert rest == sorted(ids[1:5], reverse=True)[2:] + [ids[5], ids[6]], spelled
    for bad in ("1000.5:not-a-job-id", "nan:" + ids[0], "x:y"):
        with pytest.raises(Exception, match="cursor"):
            service.list_jobs(url, None, 10, bad)


def test_a_claim_its_request_never_used_is_taken_over(redis_db, redis_server: RedisServer) -> None:
    """A request that died between claiming its Idempotency-Key and writing its job (the API
    killed) left the key claimed for a day: every retry waited 2 s, then got 503."""
    from app.api import services
    from app.core.errors import UnavailableError

    service = make_service(redis_db, redis_server)
    dead_id, _ = service.claim_idempotency_key("k", "body-hash")  # and never submits
    with pytest.raises(UnavailableError):  # a fresh claim: its request may still be writing
        service.claim_idempotency_key("k", "body-hash")
    key = services._idempotency_key("k", None)
    redis_db.set(key, f"body-hash:{dead_id}:{time.time() - services.STALE_CLAIM - 1:.3f}", ex=100)
    new_id, existing = service.claim_idempotency_key("k", "body-hash")
    assert existing is None and new_id != dead_id
    assert redis_db.ttl(key) > 100  # a day again
    service.submit(GenerationParams(prompt="p"), job_id=new_id)
    again_id, job = service.claim_idempotency_key("k", "body-hash")
    assert again_id == new_id and job is not None and job.id == new_id


def test_a_bad_cursor_is_a_422_that_names_the_parameter(redis_db, redis_server: RedisServer) -> None:
    from app.core.errors import InvalidRequestError

    service = make_service(redis_db, redis_server)
    with pytest.raises(InvalidRequestError) as refused:
        service.list_jobs(lambda i, n: "", None, 10, "not-a-cursor")
    assert refused.value.details == [
        {"loc": ["query", "cursor"], "msg": "not a cursor returned by this endpoint", "type": "value_error"}
    ]
