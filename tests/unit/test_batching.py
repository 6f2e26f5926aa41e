"""The batching worker with a fake engine (no torch) on a real Redis: claiming, per-job lifecycle,
isolation of failures and cancels, order and batch limits."""

from __future__ import annotations

import io
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from PIL import Image
from rq import Queue, Retry
from rq.job import Job
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer

import worker.worker as worker_module
from app.core import events, metrics
from app.core.config import Settings
from app.core.jobs import TASK_GENERATE, TASK_VARIATIONS, GenerationParams, cancel_key, image_seed
from app.core.storage import LocalImageStore
from tests.unit.test_worker import FakeRuntime, OutOfMemoryError
from worker import tasks
from worker.batch_worker import BatchingWorker
from worker.events import EventSink


@dataclass
class FakeRequest:
    params: GenerationParams
    total: int
    step: int = 0
    work_s: float = 0.0
    chunk_rows: int | None = None

    @property
    def done(self) -> bool:
        return self.step >= self.total

    @property
    def image_rows(self) -> int:
        return 1

    @property
    def rows(self) -> int:
        return self.params.num_images


@dataclass
class FakeEngine:
    """Records which jobs (by prompt) shared each tick; a prompt "explode" fails any tick it is in."""

    runtime: FakeRuntime
    ticks: list[list[str]] = field(default_factory=list)
    decodes: list[list[str]] = field(default_factory=list)  # prompts decoded together by decode_many
    on_tick: Callable[[int, list[FakeRequest]], None] | None = None
    memory_rows: int | None = None  # a UNet call of more rows runs out of memory

    def shape(self, params: GenerationParams) -> tuple[int | None, int | None]:
        return params.width, params.height

    def start(self, params: GenerationParams) -> FakeRequest:
        return FakeRequest(params, params.num_inference_steps or 1)

    def tick(self, requests: list[FakeRequest]) -> None:
        self.ticks.append([r.params.prompt for r in requests])
        if self.on_tick is not None:
            self.on_tick(len(self.ticks), requests)
        if any(r.params.prompt == "explode" for r in requests):
            raise RuntimeError("the UNet fell over")
        per_call = min((r.chunk_rows for r in requests if r.chunk_rows), default=sum(r.rows for r in requests))
        if self.memory_rows is not None and per_call > self.memory_rows:
            raise OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        for r in requests:
            r.step += 1
            r.work_s += 0.001

    def decode(self, request: FakeRequest) -> list[Image.Image]:
        p = request.params
        assert p.seed is not None
        if p.prompt == "undecodable":
            raise RuntimeError("the VAE fell over")
        return [
            Image.new("RGB", (p.width or 0, p.height or 0), (image_seed(p.seed, i) % 256, 0, 0))
            for i in range(p.num_images)
        ]

    def decode_many(self, requests: list[FakeRequest]) -> list[list[Image.Image]]:
        self.decodes.append([r.params.prompt for r in requests])
        return [self.decode(r) for r in requests]


@pytest.fixture
def env(redis_db, tmp_path):
    runtime = FakeRuntime()
    engine = FakeEngine(runtime)
    store = LocalImageStore(tmp_path)
    settings = Settings(results_dir=tmp_path)
    sink = EventSink(redis_db, settings, sender=None)
    tasks.bind(tasks.WorkerContext(runtime, store, settings, redis_db, sink))
    high = Queue("imagegen:fake:high", connection=redis_db, serializer=JSONSerializer)
    normal = Queue("imagegen:fake:normal", connection=redis_db, serializer=JSONSerializer)

    def make(max_batch: int = 8, check_interval: float = 0.0, recheck_interval: float = 0.0) -> BatchingWorker:
        return BatchingWorker(
            [high, normal],
            connection=redis_db,
            serializer=JSONSerializer,
            heartbeat_interval=0.2,
            events=sink,
            engine=engine,  # type: ignore[arg-type]
            max_batch=max_batch,
            check_interval=check_interval,  # the fake's steps take no time: by default, check at every one
            recheck_interval=recheck_interval,  # ...whether or not the wake stream moved
        )

    yield engine, store, normal, high, make
    tasks._context = None


def enqueue(queue: Queue, func: str = TASK_GENERATE, **params) -> Job:
    kwargs = {"params": params} if func == TASK_GENERATE else {}
    return queue.enqueue(func, kwargs=kwargs, job_id=str(uuid.uuid4()))


def kinds(redis_db, job_id: str) -> list[str]:
    return [e.type.value for _, e in events.read(redis_db, job_id)]


def test_waiting_jobs_share_ticks_and_each_keeps_its_own_lifecycle(env, redis_db) -> None:
    engine, store, queue, _, make = env
    jobs = [enqueue(queue, prompt=f"p{i}", seed=10 * i, num_inference_steps=2 + i) for i in range(4)]
    make().work(burst=True)
    # All four sampled together; each left as soon as its own steps were done.
    assert engine.ticks[0] == ["p0", "p1", "p2", "p3"]
    assert [len(t) for t in engine.ticks] == [4, 4, 3, 2, 1]
    for i, job in enumerate(jobs):
        job.refresh()
        assert job.get_status() == "finished"
        assert job.return_value() == {"images": [{"index": 0, "seed": 10 * i, "width": 16, "height": 8}]}
        assert job.meta["progress"] == {"step": 2 + i, "total": 2 + i}
        image = Image.open(io.BytesIO(store.get(job.id, 0)))
        assert image.getpixel((0, 0)) == (10 * i, 0, 0)
        seen = kinds(redis_db, job.id)
        assert seen[0] == "started" and seen[-1] == "succeeded" and set(seen[1:-1]) == {"progress"}
        timings = job.meta["timings"]  # as the one-job path records them
        assert set(timings) == {"load_ms", "sampling_ms", "encode_ms"} and min(timings.values()) >= 0
        assert timings["sampling_ms"] > 0 and timings["encode_ms"] > 0
    # ...and the sampling histogram counts every one of them.
    assert dict(metrics.read_histogram(redis_db, "sampling")[0])["+Inf"] == 4
    assert StartedJobRegistry(queue=queue).get_job_ids() == []
    assert redis_db.llen(queue.intermediate_queue_key) == 0  # each claimed job left it when it started


def test_every_batched_step_is_counted_by_how_many_jobs_it_held(env, redis_db) -> None:
    """The `imagegen_batch_jobs` histogram: one observation per batched step, written with the
    progress, and at the end of a session for steps after the last progress write."""
    engine, _, queue, _, make = env
    for i in range(4):
        enqueue(queue, prompt=f"p{i}", num_inference_steps=2 + i)
    make().work(burst=True)
    assert [len(t) for t in engine.ticks] == [4, 4, 3, 2, 1]
    buckets, total = metrics.read_histogram(redis_db, metrics.BATCH_JOBS, metrics.BATCH_BUCKETS)
    assert dict(buckets) == {"1.0": 1, "2.0": 2, "4.0": 5, "8.0": 5, "16.0": 5, "32.0": 5, "64.0": 5,
                             "128.0": 5, "+Inf": 5} and total == 14  # fmt: skip
    # A lone job canceled at its 3rd step: no progress is due after its first (one write per
    # PROGRESS_INTERVAL), so its later steps are written when the session ends.
    drop = enqueue(queue, prompt="drop", num_inference_steps=50)
    engine.ticks.clear()
    engine.on_tick = lambda tick, requests: redis_db.set(cancel_key(drop.id), 1) if tick == 3 else None
    make().work(burst=True)
    assert kinds(redis_db, drop.id) == ["started", "progress", "canceled"]
    buckets, total = metrics.read_histogram(redis_db, metrics.BATCH_JOBS, metrics.BATCH_BUCKETS)
    assert dict(buckets)["1.0"] == 1 + len(engine.ticks) == 4 and dict(buckets)["+Inf"] == 8 and total == 17


def test_a_claimed_job_waits_in_the_intermediate_list_until_it_starts(env, redis_db, monkeypatch) -> None:
    """If the worker or Redis dies between the claim and RQ's registration, maintenance still
    finds the job there and puts it back; a bare pop would leave it `queued` in no list at all."""
    engine, store, queue, _, make = env
    params = {"prompt": "p", "num_inference_steps": 2}
    job = queue.enqueue(TASK_GENERATE, kwargs={"params": params}, job_id=str(uuid.uuid4()), retry=Retry(max=1))
    worker = make()
    monkeypatch.setattr(worker, "_admit", lambda *args, **kwargs: None)  # dies right after the claim
    worker._fill([[], [job.id.encode()]], room=8)
    assert queue.get_job_ids() == []
    assert redis_db.lrange(queue.intermediate_queue_key, 0, -1) == [job.id.encode()]
    worker.clean_registries()  # the first sighting
    monkeypatch.setattr(worker_module, "STUCK_AFTER", 0.0)  # ...and one a minute later
    worker.clean_registries()
    assert queue.get_job_ids() == [job.id] and redis_db.llen(queue.intermediate_queue_key) == 0


def test_jobs_taken_together_start_in_one_round_trip_as_rq_would_start_them(env, redis_db, round_trips) -> None:
    """Registration, resolved parameters and `started` events for every job admitted together go
    out in one transaction, and leave the same records as RQ's own two preparation steps."""
    engine, store, queue, _, make = env
    jobs = [enqueue(queue, prompt=f"p{i}", num_inference_steps=2) for i in range(3)]
    reference = enqueue(queue, prompt="ref", num_inference_steps=2)
    worker = make()
    for _ in range(4):  # as the claim does: each job waits in the intermediate list until it starts
        redis_db.lmove(queue.key, queue.intermediate_queue_key, "LEFT", "RIGHT")
    taken = [(Job.fetch(j.id, connection=redis_db, serializer=JSONSerializer), queue) for j in jobs]
    with round_trips.record() as sent:
        worker._admit(taken)
    assert len(sent) == 1 and b"MULTI" in sent[0] and b"EXEC" in sent[0]
    ref = Job.fetch(reference.id, connection=redis_db, serializer=JSONSerializer)
    ref_execution = worker.prepare_execution(ref)
    worker.prepare_job_execution(ref)  # RQ's way, for comparison
    assert [s.job.id for s in worker.slots] == [j.id for j in jobs]
    started = StartedJobRegistry(queue=queue)
    ref_hash = redis_db.hgetall(ref.key)
    ref_ttl = redis_db.ttl(ref.key)
    for job, slot in zip(jobs, worker.slots, strict=True):
        stored = redis_db.hgetall(job.key)
        assert stored.keys() == ref_hash.keys() | {b"meta"} and redis_db.ttl(job.key) == ref_ttl == -1
        assert stored[b"status"] == b"started" and stored[b"worker_name"] == worker.name.encode()
        assert redis_db.hgetall(slot.execution.key).keys() == redis_db.hgetall(ref_execution.key).keys()
        assert job.id in started.get_job_ids()
        job.refresh()
        assert job.meta["params"]["prompt"] == slot.params.prompt and job.meta["progress"] == {"step": 0, "total": 2}
        assert kinds(redis_db, job.id) == ["started"]
    assert redis_db.llen(queue.intermediate_queue_key) == 0
    assert redis_db.hget(worker.key, "state") == b"busy"


def test_a_job_canceled_before_it_starts_ends_canceled_without_starting(env, redis_db) -> None:
    """The cancel flag is read in the registration transaction: the job is never announced as
    started, records a cancel at step 0, and the jobs around it run as usual."""
    engine, store, queue, _, make = env
    lone = enqueue(queue, prompt="lone", num_inference_steps=2)  # the first job, taken by RQ's loop
    first = enqueue(queue, prompt="first", num_inference_steps=2)
    joining = enqueue(queue, prompt="joining", num_inference_steps=2)  # claimed between steps
    redis_db.set(cancel_key(lone.id), 1)
    redis_db.set(cancel_key(joining.id), 1)
    make().work(burst=True)
    for job in (lone, joining):
        job.refresh()
        assert job.get_status() == "failed" and job.meta["error"]["code"] == "canceled"
        assert job.meta["canceled_at_step"] == 0 and kinds(redis_db, job.id) == ["canceled"]
    assert first.get_status(refresh=True) == "finished"
    assert engine.ticks == [["first"], ["first"]]
    assert StartedJobRegistry(queue=queue).get_job_ids() == []


def test_jobs_finishing_together_are_decoded_together(env) -> None:
    engine, store, queue, _, make = env
    jobs = [enqueue(queue, prompt=f"p{i}", num_inference_steps=2 if i < 3 else 3) for i in range(4)]
    make().work(burst=True)
    # Three finished on the second step and went through one VAE call; the last one was alone.
    assert engine.decodes == [["p0", "p1", "p2"]]
    for job in jobs:
        assert job.get_status(refresh=True) == "finished" and store.get(job.id, 0) is not None


def test_a_job_that_fails_to_decode_fails_alone(env, redis_db) -> None:
    engine, store, queue, _, make = env
    good = [enqueue(queue, prompt=f"ok{i}", num_inference_steps=2) for i in range(2)]
    bad = enqueue(queue, prompt="undecodable", num_inference_steps=2)
    make().work(burst=True)
    assert engine.decodes == [["ok0", "ok1", "undecodable"]]  # tried together, then one by one
    bad.refresh()
    assert bad.get_status() == "failed"
    assert bad.meta["error"] == {"code": "sampling_error", "message": "RuntimeError: the VAE fell over"}
    assert kinds(redis_db, bad.id) == ["started", "progress", "progress", "failed"]
    for job in good:
        assert job.get_status(refresh=True) == "finished" and store.get(job.id, 0) is not None


def test_every_batched_job_is_started_in_rq_with_heartbeats(env) -> None:
    engine, store, queue, _, make = env
    jobs = [enqueue(queue, prompt=f"p{i}", num_inference_steps=3) for i in range(3)]
    seen: dict[str, object] = {}

    def look(tick: int, requests) -> None:
        if tick == 2:
            seen["started"] = sorted(StartedJobRegistry(queue=queue).get_job_ids())
            seen["status"] = [Job.fetch(j.id, connection=queue.connection).get_status() for j in jobs]
            seen["beat"] = all(Job.fetch(j.id, connection=queue.connection).last_heartbeat for j in jobs)

    engine.on_tick = look
    make().work(burst=True)
    assert seen["started"] == sorted(j.id for j in jobs)
    assert seen["status"] == ["started"] * 3 and seen["beat"]


def test_a_failing_job_fails_alone(env, redis_db) -> None:
    engine, store, queue, _, make = env
    good = [enqueue(queue, prompt=f"ok{i}", num_inference_steps=3) for i in range(2)]
    bad = enqueue(queue, prompt="explode", num_inference_steps=3)
    make().work(burst=True)
    bad.refresh()
    assert bad.get_status() == "failed"
    assert bad.meta["error"] == {"code": "sampling_error", "message": "RuntimeError: the UNet fell over"}
    assert kinds(redis_db, bad.id) == ["started", "failed"]
    assert engine.ticks[0] == ["ok0", "ok1", "explode"]  # it really was in the batch
    for job in good:
        job.refresh()
        assert job.get_status() == "finished"


def test_a_multi_image_job_out_of_memory_alone_is_split_image_by_image(env, redis_db) -> None:
    """As the one-job path splits a job that runs out of memory into its images: on the batch
    path it failed `out_of_memory` once its retry alone ran out too, where `MAX_BATCH=1` made it."""
    engine, store, queue, _, make = env
    engine.memory_rows = 2  # a UNet call of more than two rows runs out of (GPU) memory
    big = enqueue(queue, prompt="big", num_images=3, num_inference_steps=3, seed=5)
    small = enqueue(queue, prompt="small", num_inference_steps=3, seed=9)
    alone = enqueue(queue, prompt="alone", num_images=3, num_inference_steps=3, seed=1, width=32)
    make().work(burst=True)
    big.refresh(), small.refresh(), alone.refresh()
    assert big.get_status() == small.get_status() == "finished"
    assert [i["seed"] for i in big.result["images"]] == [5, 6, 7]
    assert all(store.get(big.id, i) for i in range(3))
    # The batch ran out, each alone: `big` ran out again and went on one image per call.
    assert engine.ticks[:4] == [["big", "small"], ["big"], ["big"], ["small"]]
    assert engine.ticks[4:6] == [["big", "small"]] * 2  # still in one tick, in calls of one row
    # Another size, in a batch of its own: it ran out alone on its first step and was split there.
    assert engine.ticks[6:] == [["alone"]] * 4
    assert alone.get_status() == "finished" and kinds(redis_db, alone.id)[-1] == "succeeded"
    engine.memory_rows = 0  # not even one image fits: that job fails, as the one-job path's would
    doomed = enqueue(queue, prompt="doomed", num_images=2, num_inference_steps=3, seed=3)
    make().work(burst=True)
    doomed.refresh()
    assert doomed.get_status() == "failed" and doomed.meta["error"]["code"] == "out_of_memory"


def test_cancel_of_one_job_leaves_the_others(env, redis_db) -> None:
    engine, store, queue, _, make = env
    keep = enqueue(queue, prompt="keep", num_inference_steps=6)
    drop = enqueue(queue, prompt="drop", num_inference_steps=6)

    def cancel_at_3(tick: int, requests) -> None:
        if tick == 3:
            redis_db.set(cancel_key(drop.id), 1)

    engine.on_tick = cancel_at_3
    make().work(burst=True)
    drop.refresh()
    keep.refresh()
    assert drop.meta["error"]["code"] == "canceled" and drop.meta["canceled_at_step"] == 3
    assert drop.meta["progress"] == {"step": 3, "total": 6}  # where it stopped, not its last progress write
    assert list(events.read(redis_db, drop.id))[-1][1].progress == {"step": 3, "total": 6}
    assert store.get(drop.id, 0) is None
    assert kinds(redis_db, drop.id)[-1] == "canceled"
    assert keep.get_status() == "finished" and store.get(keep.id, 0) is not None
    assert [t for t in engine.ticks if "drop" in t] == [["keep", "drop"]] * 3


def test_a_job_run_again_elsewhere_leaves_the_batch_and_records_nothing(env, redis_db, monkeypatch) -> None:
    """This worker stalled past its heartbeats and one job was re-queued and run by another: at the
    next check it leaves the batch with nothing saved (no meta, no event, no outcome); the others go on.
    Its progress is written only while it owns the job: it went back in time in the other run's."""
    monkeypatch.setattr(tasks, "PROGRESS_INTERVAL", 0.0)  # every step reports
    engine, store, queue, _, make = env
    keep = enqueue(queue, prompt="keep", num_inference_steps=8)
    lost = enqueue(queue, prompt="lost", num_inference_steps=8)

    def lose_at_3(tick: int, requests) -> None:
        if tick == 3:  # what RQ's maintenance does to the runs of a worker it takes for dead
            registry = queue.started_job_registry
            for member in redis_db.zrange(registry.key, 0, -1):
                if member.decode().startswith(lost.id):
                    redis_db.zrem(registry.key, member)

    engine.on_tick = lose_at_3
    make().work(burst=True)
    lost.refresh()
    keep.refresh()
    assert [t for t in engine.ticks if "lost" in t] == [["keep", "lost"]] * 3  # was 8: to its end
    assert lost.get_status() == "started" and "error" not in lost.meta
    assert kinds(redis_db, lost.id)[-1] in ("started", "progress") and store.get(lost.id, 0) is None
    progress = [e.progress["step"] for _, e in events.read(redis_db, lost.id) if e.type.value == "progress"]
    # Steps 1 and 2 were due before the loss (their writes, on the finisher thread, may land after it).
    assert progress in ([], [1], [1, 2]) and lost.meta["progress"]["step"] <= 2, (progress, lost.meta)
    assert [e.progress["step"] for _, e in events.read(redis_db, keep.id) if e.type.value == "progress"] == list(
        range(1, 9)
    )
    assert keep.get_status() == "finished" and store.get(keep.id, 0) is not None


def test_other_sizes_wait_their_turn_and_order_is_kept(env) -> None:
    engine, store, queue, _, make = env
    enqueue(queue, prompt="a1", width=16, height=16, num_inference_steps=2)
    enqueue(queue, prompt="a2", width=16, height=16, num_inference_steps=2)
    enqueue(queue, prompt="b", width=32, height=16, num_inference_steps=2)
    enqueue(queue, prompt="a3", width=16, height=16, num_inference_steps=2)
    make().work(burst=True)
    # a3 fits the first batch but never overtakes b, which does not.
    assert engine.ticks == [["a1", "a2"], ["a1", "a2"], ["b"], ["b"], ["a3"], ["a3"]]


def test_max_batch_counts_images_and_high_priority_joins_first(env) -> None:
    engine, store, normal, high, make = env
    enqueue(normal, prompt="n1", num_images=2, num_inference_steps=2)
    enqueue(normal, prompt="n2", num_inference_steps=2)
    enqueue(high, prompt="h1", num_inference_steps=2)
    make(max_batch=3).work(burst=True)
    # h1 is dequeued first; n1 (2 images) fills the batch; n2 waits for room.
    assert engine.ticks[:2] == [["h1", "n1"], ["h1", "n1"]]
    assert all(len(t) <= 2 for t in engine.ticks)


def test_refused_and_invalid_jobs_fail_without_stopping_the_batch(env, redis_db) -> None:
    engine, store, queue, _, make = env
    first = enqueue(queue, prompt="first", num_inference_steps=3)
    planted = enqueue(queue, "os.system")
    invalid = enqueue(queue, prompt="x", num_images=99)
    after = enqueue(queue, prompt="after", num_inference_steps=2)
    make().work(burst=True)
    for job, status, code in [(planted, "failed", "refused"), (invalid, "failed", "invalid_params")]:
        job.refresh()
        assert job.get_status() == status and job.meta["error"]["code"] == code
    first.refresh()
    after.refresh()
    assert first.get_status() == after.get_status() == "finished"
    assert engine.ticks[0] == ["first", "after"]
    assert redis_db.llen(queue.intermediate_queue_key) == 0  # nothing left for RQ to fail a second time


def test_requeue_on_shutdown_hands_every_job_back(env, redis_db) -> None:
    engine, store, queue, _, make = env
    jobs = [enqueue(queue, prompt=f"p{i}", num_inference_steps=50) for i in range(2)]
    worker = make()
    tasks._context = tasks.WorkerContext(
        tasks._context.runtime,  # type: ignore[union-attr]
        store,
        tasks._context.settings,  # type: ignore[union-attr]
        redis_db,
        tasks._context.events,  # type: ignore[union-attr]
        worker.requeue_requested.is_set,
    )
    engine.on_tick = lambda tick, requests: worker.requeue_requested.set() if tick == 2 else None
    worker.work(burst=True, max_jobs=1)
    for job in jobs:
        job.refresh()
        assert job.get_status() == "queued"
    assert sorted(queue.get_job_ids()) == sorted(j.id for j in jobs)


def test_variations_jobs_are_never_batched_but_run_alone(env, redis_db) -> None:
    engine, store, queue, _, make = env
    first = enqueue(queue, prompt="first", num_inference_steps=3)
    vary = queue.enqueue(
        TASK_VARIATIONS, kwargs={"params": {"num_images": 1, "strength": 0.5, "seed": 1}}, job_id=str(uuid.uuid4())
    )
    after = enqueue(queue, prompt="after", num_inference_steps=2)
    make().work(burst=True)
    assert ["first"] in engine.ticks and not any("after" in t and "first" in t for t in engine.ticks)
    vary.refresh()
    # It went down the one-job path: the variations task itself answered (no input image was
    # stored here), not the batch engine's text-to-image validation ("strength: extra input").
    assert vary.get_status() == "failed"
    assert vary.meta["error"]["message"] != "" and "strength" not in vary.meta["error"]["message"]
    first.refresh()
    after.refresh()
    assert first.get_status() == after.get_status() == "finished"


def test_queues_and_cancel_flags_are_read_at_most_every_check_interval(env, redis_db) -> None:
    engine, store, queue, _, make = env
    first = enqueue(queue, prompt="first", num_inference_steps=6)
    late: list[Job] = []
    clock = {"now": 1000.0}

    def step(tick: int, requests) -> None:
        clock["now"] += 0.01  # every step takes 10 ms
        if tick == 1:
            late.append(enqueue(queue, prompt="late", num_inference_steps=2))
            redis_db.set(cancel_key(first.id), 1)

    engine.on_tick = step
    worker = make(check_interval=0.025)
    worker.clock = lambda: clock["now"]
    worker.work(burst=True)
    # Checked before steps 1 and 4 (30 ms later), not before 2 and 3: the cancel and the late job
    # were both seen before step 4.
    assert engine.ticks == [["first"]] * 3 + [["late"]] * 2
    first.refresh()
    assert first.meta["error"]["code"] == "canceled" and first.meta["canceled_at_step"] == 3


def test_between_steps_queues_and_flags_are_read_only_after_the_wake_stream_moves(env, redis_db, round_trips) -> None:
    """A lone job is not slowed by a Redis read before every step: after the session's first read,
    the worker reads its queues and cancel flags again only once a job was queued or a cancel asked
    for (both append to the model's wake stream, as the API does), or after `recheck_interval`."""
    from app.core.jobs import wake, wake_key

    engine, store, queue, _, make = env
    keep = enqueue(queue, prompt="keep", num_inference_steps=16)
    drop = enqueue(queue, prompt="drop", num_inference_steps=8)
    worker = make(recheck_interval=60.0)
    late: list[Job] = []

    def stir(**fields: str) -> None:  # ...and wait until the worker's watcher has seen it
        wake(redis_db, "fake", **fields)
        ms, seq = redis_db.xinfo_stream(wake_key("fake"))["last-generated-id"].decode().split("-")
        deadline = time.monotonic() + 5
        while worker._wake_seen < (int(ms), int(seq)) and time.monotonic() < deadline:
            time.sleep(0.002)

    def step(tick: int, requests) -> None:
        if tick == 3:  # what DELETE /jobs/{id} does for a running job
            redis_db.set(cancel_key(drop.id), 1)
            stir(cancel=drop.id)
        if tick == 5:  # what POST /generate does
            late.append(enqueue(queue, prompt="late", num_inference_steps=2))
            stir()

    engine.on_tick = step
    with round_trips.record() as sent:  # this process's commands only (the session's stacks share the server)
        worker.work(burst=True)
    reads = sum(trip.count(b"\r\nXREVRANGE\r\n") for trip in sent)  # each read between steps starts with one
    drop.refresh()
    assert drop.meta["error"]["code"] == "canceled" and drop.meta["canceled_at_step"] == 3
    assert ["keep", "late"] in engine.ticks  # joined the running batch, not after it
    assert late[0].get_status(refresh=True) == "finished" and keep.get_status(refresh=True) == "finished"
    # The first step's read (which admitted `drop`), one more while it might have left jobs
    # waiting, one after each wake-up, and one more after `late` was seen: not one per step.
    assert len(engine.ticks) == 16 and reads == 5


def test_a_job_queued_while_the_last_ones_are_recorded_starts_in_the_same_session(env, redis_db, monkeypatch) -> None:
    """When the batch empties, the worker does not wait for the finisher to record every finished
    job (and for a new session) before it takes the next: a job queued meanwhile, as a client does
    once it has its result, starts while the records are still being written. Otherwise jobs that
    finish together start again together, and a closed loop of clients runs in waves."""
    from app.core.jobs import wake

    engine, _, queue, _, make = env
    first = [enqueue(queue, prompt=f"first {i}", num_inference_steps=3) for i in range(2)]
    sessions, late = [], []
    real_execute, real_finish = BatchingWorker.execute_job, BatchingWorker._finish

    def execute_job(self, job, q) -> None:
        sessions.append(job.id)
        real_execute(self, job, q)

    def slow_finish(self, slot, ctx, images, sampling_s) -> None:
        if not late:  # the first result is out: its client sends the next job, as the API queues it
            late.append(enqueue(queue, prompt="late", num_inference_steps=2))
            wake(redis_db, "fake")
        time.sleep(0.2)  # storing and recording take a while
        real_finish(self, slot, ctx, images, sampling_s)

    monkeypatch.setattr(BatchingWorker, "execute_job", execute_job)
    monkeypatch.setattr(BatchingWorker, "_finish", slow_finish)
    make(check_interval=0.02, recheck_interval=60.0).work(burst=True)
    assert engine.ticks == [["first 0", "first 1"]] * 3 + [["late"]] * 2
    assert sessions == [first[0].id]  # one session: the late job did not wait for a new one
    late[0].refresh()
    first[1].refresh()
    assert late[0].get_status() == "finished"
    assert late[0].started_at < first[1].ended_at  # started before the last record was written


def test_a_job_whose_images_cannot_be_stored_fails_alone(env, redis_db, monkeypatch) -> None:
    engine, store, queue, _, make = env
    good = enqueue(queue, prompt="ok", num_inference_steps=2)
    bad = enqueue(queue, prompt="unstorable", num_inference_steps=2)
    real = store.put

    def put(job_id: str, index: int, data: bytes, ttl: int) -> None:
        if job_id == bad.id:
            raise OSError("disk full")
        real(job_id, index, data, ttl=ttl)

    monkeypatch.setattr(store, "put", put)
    make().work(burst=True)  # stored and recorded on the finisher thread, joined before work() returns
    bad.refresh()
    assert bad.get_status() == "failed"
    # Not the job's own fault: no error of its own (the API reports `internal_error`, no path),
    # RQ's record keeps the cause, and retries are left to RQ as on the one-job path.
    assert "error" not in bad.meta
    result = bad.latest_result()
    assert result is not None and "disk full" in (result.exc_string or "")
    assert good.get_status(refresh=True) == "finished" and store.get(good.id, 0) is not None
    assert StartedJobRegistry(queue=queue).get_job_ids() == []


def test_progress_is_written_off_the_sampling_thread_and_before_each_end(env, redis_db, monkeypatch) -> None:
    """The main loop hands progress writes to the finisher thread, which also records outcomes, so
    the next step never waits for Redis and no job's progress lands after its end."""
    engine, store, queue, _, make = env
    done = enqueue(queue, prompt="done", num_inference_steps=3)
    drop = enqueue(queue, prompt="drop", num_inference_steps=5)
    monkeypatch.setattr(tasks, "PROGRESS_INTERVAL", 0.0)  # every step reports
    writers: set[str] = set()
    real = BatchingWorker._write_progress

    def spy(self, due, ttl, tally) -> None:
        writers.add(threading.current_thread().name)
        time.sleep(0.01)  # a slow Redis: the sampling thread must not wait for it
        real(self, due, ttl, tally)

    monkeypatch.setattr(BatchingWorker, "_write_progress", spy)
    engine.on_tick = lambda tick, requests: redis_db.set(cancel_key(drop.id), 1) if tick == 4 else None
    make().work(burst=True)
    assert writers and all(name.startswith("finish") for name in writers), writers
    assert kinds(redis_db, done.id) == ["started", "progress", "progress", "progress", "succeeded"]
    assert kinds(redis_db, drop.id) == ["started"] + ["progress"] * 4 + ["canceled"]
    drop.refresh()
    assert drop.meta["error"]["code"] == "canceled" and drop.meta["progress"] == {"step": 4, "total": 5}, drop.meta


def test_rqs_no_limit_timeout_is_no_limit(env, redis_db) -> None:
    engine, store, queue, _, make = env
    # RQ's -1 means "no limit"; the batch read it as a limit already passed.
    unlimited = queue.enqueue(
        TASK_GENERATE, kwargs={"params": {"prompt": "no limit", "num_inference_steps": 3}}, job_timeout=-1
    )
    make().work(burst=True)
    unlimited.refresh()
    assert unlimited.get_status() == "finished", unlimited.meta.get("error")
