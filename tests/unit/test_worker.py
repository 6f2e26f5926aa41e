"""The worker's task and worker class with a deterministic fake runtime (no torch) on a real Redis."""

from __future__ import annotations

import io
import threading
import time
import uuid
from pathlib import Path

import pytest
from PIL import Image
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

from app.core.config import Settings
from app.core.jobs import TASK_GENERATE, GenerationParams, ModelInfo, cancel_key, image_seed
from app.core.storage import LocalImageStore
from worker import tasks
from worker.events import EventSink
from worker.worker import ImagegenWorker


class OutOfMemoryError(RuntimeError):
    """Named like torch.cuda.OutOfMemoryError, which the worker recognises by name (no torch here)."""


class FakeRuntime:
    """Solid-colour images whose colour comes from the seed; can fail or go slowly on request."""

    info = ModelInfo(name="fake", width=16, height=8, num_inference_steps=3, guidance_scale=1.0, scheduler="ddim")

    def __init__(self) -> None:
        self.calls: list[GenerationParams] = []
        self.step_delay = 0.0
        self.freed = 0

    def count_tokens(self, prompt: str) -> int:
        return len(prompt.split()) + 2

    def free_memory(self) -> None:
        self.freed += 1

    def generate(self, params: GenerationParams, on_step) -> list[Image.Image]:
        self.calls.append(params)
        if params.prompt == "explode":
            raise RuntimeError("the UNet fell over")
        if params.prompt.startswith("oom") and (params.num_images > 1 or params.prompt == "oom always"):
            raise OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        steps = params.num_inference_steps or 0
        for step in range(1, steps + 1):
            time.sleep(self.step_delay)
            on_step(step, steps)
        if params.scheduler == "pndm":  # its extra timestep, reported as the runtime does (at the total)
            on_step(steps, steps)
        assert params.seed is not None
        return [
            Image.new("RGB", (params.width or 0, params.height or 0), (image_seed(params.seed, i) % 256, 0, 0))
            for i in range(params.num_images)
        ]


@pytest.fixture
def env(redis_db, tmp_path):
    runtime = FakeRuntime()
    store = LocalImageStore(tmp_path)
    settings = Settings(results_dir=tmp_path)
    sink = EventSink(redis_db, settings, sender=None)
    queue = Queue("imagegen:fake", connection=redis_db, serializer=JSONSerializer)
    worker = ImagegenWorker(
        [queue], connection=redis_db, serializer=JSONSerializer, heartbeat_interval=0.2, events=sink
    )
    tasks.bind(tasks.WorkerContext(runtime, store, settings, redis_db, sink, claim=lambda: worker.claim))
    yield runtime, store, queue, worker
    tasks._context = None


def enqueue(queue: Queue, func: str = TASK_GENERATE, *args, **params) -> Job:
    kwargs = {"params": params} if func == TASK_GENERATE else {}
    return queue.enqueue(func, args=args, kwargs=kwargs, job_id=str(uuid.uuid4()))


def test_success_fills_defaults_stores_pngs_and_records_progress(env) -> None:
    runtime, store, queue, worker = env
    job = enqueue(queue, prompt="a red circle", num_images=2, seed=9)
    worker.work(burst=True)
    job.refresh()
    assert job.get_status() == "finished"
    assert job.return_value() == {
        "images": [
            {"index": 0, "seed": 9, "width": 16, "height": 8},
            {"index": 1, "seed": 10, "width": 16, "height": 8},
        ]
    }
    assert job.meta["progress"] == {"step": 3, "total": 3}
    assert job.meta["params"]["scheduler"] == "ddim" and job.meta["warnings"] == []
    image = Image.open(io.BytesIO(store.get(job.id, 1)))
    assert image.getpixel((0, 0)) == (10, 0, 0) and image.text["seed"] == "10"


@pytest.mark.parametrize("prompt", ["finishes", "explode"])
def test_a_run_that_lost_its_job_while_stalled_records_no_outcome(env, redis_db, prompt) -> None:
    """A worker stalled past its heartbeats (SIGSTOP) is taken for dead: RQ's maintenance drops its
    execution from the started registry and re-queues the job, which another worker runs. When the
    stalled run ends it must not record a second outcome (the job counted twice, a second terminal
    event after the other run's), whether it succeeded or failed."""
    from app.core import events, metrics

    runtime, store, queue, worker = env
    job = enqueue(queue, prompt=prompt, seed=1)
    original = runtime.generate

    def generate_then_lose_the_job(params, on_step):
        registry = queue.started_job_registry
        for member in redis_db.zrange(registry.key, 0, -1):  # what RQ's maintenance removes
            redis_db.zrem(registry.key, member)
        return original(params, on_step)

    runtime.generate = generate_then_lose_the_job
    worker.work(burst=True)
    job.refresh()
    assert job.get_status() == "started"  # as this run left it: the other run records the end
    assert "error" not in job.meta  # its failure's meta, too, would overwrite the other run's
    assert redis_db.hgetall(metrics.JOBS) == {}
    assert [e.type.value for _, e in events.read(redis_db, job.id)][-1] in ("started", "progress")


def lose_the_job_at_step(at: int, runtime, queue, redis_db) -> list[int]:
    """Have the job's run lose it just before its step `at` is reported, as RQ's maintenance does
    to a worker it takes for dead (its runs leave the started registry); the steps seen, returned,
    fill in as it samples."""
    steps_seen: list[int] = []
    original = runtime.generate

    def generate(params, on_step):
        def watched(step: int, total: int) -> None:
            steps_seen.append(step)
            if step == at:
                registry = queue.started_job_registry
                for member in redis_db.zrange(registry.key, 0, -1):
                    redis_db.zrem(registry.key, member)
            on_step(step, total)

        return original(params, watched)

    runtime.generate = generate
    return steps_seen


def test_a_run_that_lost_its_job_writes_no_progress_after(env, redis_db, monkeypatch) -> None:
    """Its progress went out with the check that found the job lost, in one round trip: a worker
    resuming from a stall wrote a step older than the other run's into that run's meta and stream
    (clients saw progress go backwards). The write now happens only while the run owns the job."""
    from app.core import events

    monkeypatch.setattr(tasks, "PROGRESS_INTERVAL", 0.0)  # every step reports
    runtime, store, queue, worker = env
    runtime.step_delay = tasks.CANCEL_INTERVAL * 1.5  # every step is checked too
    job = enqueue(queue, prompt="long", seed=1, num_inference_steps=20)
    lose_the_job_at_step(5, runtime, queue, redis_db)
    worker.work(burst=True)
    job.refresh()
    progress = [e.progress["step"] for _, e in events.read(redis_db, job.id) if e.type.value == "progress"]
    assert progress == [1, 2, 3, 4], progress
    assert job.meta["progress"] == {"step": 4, "total": 20} and "error" not in job.meta


def test_a_run_that_lost_its_job_stops_sampling_at_its_next_check(env, redis_db) -> None:
    """It sampled on to the end, writing progress into the stream of the run that replaced it: it
    now stops at its next cancel check (at most CANCEL_INTERVAL later) and writes nothing more."""
    from app.core import events

    runtime, store, queue, worker = env
    runtime.step_delay = tasks.CANCEL_INTERVAL * 1.5  # every step is followed by a check
    job = enqueue(queue, prompt="long", seed=1, num_inference_steps=40)
    steps_seen = lose_the_job_at_step(5, runtime, queue, redis_db)
    worker.work(burst=True)
    assert max(steps_seen) <= 7, steps_seen  # was 40: the whole job
    job.refresh()
    assert job.get_status() == "started" and "error" not in job.meta  # nothing of this run recorded
    progress = [e.progress["step"] for _, e in events.read(redis_db, job.id) if e.type.value == "progress"]
    assert not progress or max(progress) <= 6, progress
    assert worker.claim is None


def test_sampling_error_fails_only_that_job(env) -> None:
    runtime, store, queue, worker = env
    bad = enqueue(queue, prompt="explode", seed=1)
    good = enqueue(queue, prompt="fine", seed=2)
    worker.work(burst=True)
    bad.refresh()
    good.refresh()
    assert bad.get_status() == "failed"
    assert bad.meta["error"] == {"code": "sampling_error", "message": "RuntimeError: the UNet fell over"}
    assert good.get_status() == "finished"
    # Counted by its code for /metrics (imagegen_job_failures_total{code}), the success by status only.
    assert queue.connection.hgetall("imagegen:metrics:failures") == {b"sampling_error": b"1"}
    assert queue.connection.hgetall("imagegen:metrics:jobs") == {b"failed": b"1", b"succeeded": b"1"}


def test_invalid_params_from_a_rogue_producer(env) -> None:
    runtime, store, queue, worker = env
    job = enqueue(queue, prompt="x", num_images=99)
    worker.work(burst=True)
    job.refresh()
    assert job.get_status() == "failed" and job.meta["error"]["code"] == "invalid_params"
    assert runtime.calls == []
    assert queue.connection.hgetall("imagegen:metrics:failures") == {b"invalid_params": b"1"}


def test_jobs_naming_other_functions_are_refused_and_never_run(env, redis_db, tmp_path: Path) -> None:
    runtime, store, queue, worker = env
    marker = tmp_path / "pwned"
    planted = enqueue(queue, "os.system", f"touch {marker}")
    after = enqueue(queue, prompt="still serving", seed=3)
    worker.work(burst=True)
    planted.refresh()
    after.refresh()
    assert not marker.exists()
    assert planted.get_status() == "failed" and planted.meta["error"]["code"] == "refused"
    assert after.get_status() == "finished"
    assert redis_db.llen(queue.intermediate_queue_key) == 0  # nothing left for RQ to fail a second time


def test_heartbeats_continue_while_a_job_samples(env) -> None:
    runtime, store, queue, worker = env
    runtime.step_delay = 0.4
    job = enqueue(queue, prompt="slow", num_inference_steps=4)
    beats: list[float] = []

    def watch() -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(set(beats)) < 3:
            hb = Job.fetch(job.id, connection=queue.connection, serializer=JSONSerializer).last_heartbeat
            if hb is not None:
                beats.append(hb.timestamp())
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    worker.work(burst=True)
    watcher.join()
    # Without the heartbeat thread the job's heartbeat is written once, when it starts.
    assert len(set(beats)) >= 3


def _events(redis_db, job_id: str) -> list[str]:
    from app.core import events

    return [e.type.value for _, e in events.read(redis_db, job_id)]


def test_cancel_flag_stops_sampling_at_the_next_step(env, redis_db, monkeypatch) -> None:
    runtime, store, queue, worker = env
    monkeypatch.setattr(tasks, "CANCEL_INTERVAL", 0.0)  # the fake's steps take no time: read it at every one
    job = enqueue(queue, prompt="to cancel", num_inference_steps=50, seed=1)
    original = runtime.generate

    def generate_and_cancel_at_step_3(params, on_step):
        def step(i: int, n: int) -> None:
            if i == 3:
                redis_db.set(cancel_key(job.id), 1)
            on_step(i, n)

        return original(params, step)

    runtime.generate = generate_and_cancel_at_step_3
    after = enqueue(queue, prompt="next", seed=2)
    worker.work(burst=True)
    job.refresh()
    assert job.meta["error"]["code"] == "canceled" and job.meta["canceled_at_step"] == 3
    assert store.get(job.id, 0) is None  # nothing stored for a canceled job
    assert _events(redis_db, job.id)[0] == "started" and _events(redis_db, job.id)[-1] == "canceled"
    after.refresh()
    assert after.get_status() == "finished"


def test_the_cancel_flag_is_read_at_most_every_cancel_interval(env, redis_db, round_trips) -> None:
    """Short steps do not each wait for Redis: the flag is read at most every CANCEL_INTERVAL, and
    a cancel still stops the job within that interval of steps."""
    runtime, store, queue, worker = env
    runtime.step_delay = 0.004
    job = enqueue(queue, prompt="to cancel", num_inference_steps=60, seed=1)
    original = runtime.generate
    timing: dict[str, float] = {}

    def generate_and_cancel_at_step_20(params, on_step):
        def step(i: int, n: int) -> None:
            if i == 1:
                timing["start"] = time.monotonic()
            if i == 20:
                redis_db.set(cancel_key(job.id), 1)
            on_step(i, n)
            timing["end"] = time.monotonic()

        return original(params, step)

    runtime.generate = generate_and_cancel_at_step_20
    with round_trips.record() as sent:
        worker.work(burst=True)
    job.refresh()
    assert job.meta["error"]["code"] == "canceled" and job.meta["canceled_at_step"] >= 20
    flag = f"{cancel_key(job.id)}".encode()
    reads = sum(1 for batch in sent if b"$6\r\nEXISTS\r\n" in batch and flag in batch)
    # While sampling, at most one read per interval: fewer reads than steps.
    assert 1 <= reads <= (timing["end"] - timing["start"]) / tasks.CANCEL_INTERVAL + 1
    assert reads < job.meta["canceled_at_step"]
    # The job and its last event show the step it stopped at, not the last progress write's.
    stopped = {"step": job.meta["canceled_at_step"], "total": 60}
    from app.core import events

    assert job.meta["progress"] == stopped and list(events.read(redis_db, job.id))[-1][1].progress == stopped


def test_events_are_written_in_order_and_terminal_last(env, redis_db) -> None:
    runtime, store, queue, worker = env
    ok = enqueue(queue, prompt="fine", num_inference_steps=3)
    bad = enqueue(queue, prompt="explode")
    worker.work(burst=True)
    kinds = _events(redis_db, ok.id)
    assert kinds[0] == "started" and kinds[-1] == "succeeded" and set(kinds[1:-1]) == {"progress"}
    assert _events(redis_db, bad.id) == ["started", "failed"]
    from app.core import events

    last = events.read(redis_db, ok.id)[-1][1]
    assert last.images and last.images[0]["url"] == f"/jobs/{ok.id}/images/0"
    assert last.progress == {"step": 3, "total": 3}
    # A sampler's extra step (pndm) is not announced as a second last step.
    extra = enqueue(queue, prompt="fine", num_inference_steps=3, scheduler="pndm")
    worker.work(burst=True)
    steps = [e.progress for _, e in events.read(redis_db, extra.id) if e.type.value == "progress"]
    assert steps.count({"step": 3, "total": 3}) == 1, steps


def test_success_event_and_metrics_join_rqs_success_transaction(env, redis_db, monkeypatch, round_trips) -> None:
    """Recording a success is a check that this run still owns the job (see
    `test_a_run_that_lost_its_job_while_stalled_records_no_outcome`), RQ's WATCH, its read of the
    dependents, and one MULTI/EXEC that also carries the job's meta, the `succeeded` event and the
    job's metrics: the event cannot be seen before the outcome."""
    from app.core import metrics

    runtime, store, queue, worker = env
    job = enqueue(queue, prompt="fine", num_inference_steps=2)
    succeed, sent = ImagegenWorker.handle_job_success, []

    def recorded(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        with round_trips.record() as trips:
            succeed(self, *args, **kwargs)
        sent.extend(trips)

    monkeypatch.setattr(ImagegenWorker, "handle_job_success", recorded)
    worker.work(burst=True)
    assert len(sent) == 4 and b"ZSCORE" in sent[0] and b"WATCH" in sent[1]
    transaction = sent[-1]
    assert b"MULTI" in transaction and b"EXEC" in transaction and b"XADD" in transaction
    assert metrics.JOBS.encode() in transaction and job.key.encode() in transaction
    assert _events(redis_db, job.id)[-1] == "succeeded" and job.get_status(refresh=True) == "finished"
    assert redis_db.hget(metrics.JOBS, "succeeded") == b"1" and redis_db.get(metrics.IMAGES) == b"1"


def test_the_success_event_is_still_written_if_rq_stops_cleaning_up_in_its_transaction(
    env, redis_db, monkeypatch
) -> None:
    from rq.worker import SimpleWorker

    from app.core import metrics

    runtime, store, queue, worker = env
    monkeypatch.setattr(ImagegenWorker, "cleanup_execution", SimpleWorker.cleanup_execution)
    job = enqueue(queue, prompt="fine", num_inference_steps=2)
    worker.work(burst=True)
    assert job.get_status(refresh=True) == "finished" and _events(redis_db, job.id)[-1] == "succeeded"
    assert redis_db.hget(metrics.JOBS, "succeeded") == b"1"


def test_a_job_dequeued_by_a_worker_that_died_before_starting_it_is_requeued(env, redis_db) -> None:
    runtime, store, queue, worker = env
    job = enqueue(queue, prompt="orphan")
    # What a worker killed between taking the job and starting it leaves behind: the job in no
    # queue, status still `queued`, an expired entry in the started registry.
    redis_db.lmove(queue.key, queue.intermediate_queue_key, "LEFT", "RIGHT")  # its claim
    redis_db.zadd(queue.started_job_registry.key, {f"{job.id}:dead-execution": 1})
    worker.clean_registries()
    assert redis_db.lrange(queue.key, 0, -1) == [job.id.encode()]
    # Not left in the dead worker's list as well: RQ's cleanup of that list recovered it a second
    # time a minute later (failed or re-queued it, after it may have run).
    assert redis_db.lrange(queue.intermediate_queue_key, 0, -1) == []
    worker.work(burst=True)
    job.refresh()
    assert job.get_status() == "finished"


def test_out_of_memory_retries_image_by_image_then_fails_clearly(env) -> None:
    runtime, store, queue, worker = env
    split = enqueue(queue, prompt="oom when batched", num_images=3, seed=40)
    hopeless = enqueue(queue, prompt="oom always", seed=1)
    after = enqueue(queue, prompt="fine", seed=2)
    worker.work(burst=True)
    for job in (split, hopeless, after):
        job.refresh()
    assert split.get_status() == "finished"
    assert [img["seed"] for img in split.return_value()["images"]] == [40, 41, 42]
    assert [(c.num_images, c.seed) for c in runtime.calls[:4]] == [(3, 40), (1, 40), (1, 41), (1, 42)]
    assert hopeless.get_status() == "failed" and hopeless.meta["error"]["code"] == "out_of_memory"
    assert runtime.freed == 2  # once before the split retry, once after the final failure
    assert after.get_status() == "finished"


def test_out_of_memory_frees_memory_once_the_failed_runs_tensors_are_gone(env) -> None:
    """`free_memory()` (gc, then torch.cuda.empty_cache) ran inside the `except` block, while the
    exception's traceback still held the failed run's frames and tensors: nothing was released."""
    import dataclasses
    import gc
    import weakref

    runtime, store, queue, worker = env

    class Activations:  # stands for the UNet's intermediates, referenced from the failed frame
        pass

    class Holding(FakeRuntime):
        def __init__(self) -> None:
            super().__init__()
            self.held: list[weakref.ref[Activations]] = []
            self.alive_at_free: list[bool] = []

        def generate(self, params: GenerationParams, on_step) -> list[Image.Image]:
            activations = Activations()
            self.held.append(weakref.ref(activations))
            raise OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

        def free_memory(self) -> None:
            gc.collect()
            self.alive_at_free.append(any(ref() is not None for ref in self.held))

    holding = Holding()
    assert tasks._context is not None
    tasks.bind(dataclasses.replace(tasks._context, runtime=holding))
    one = enqueue(queue, prompt="one", seed=1)  # fails in run_job
    two = enqueue(queue, prompt="two", seed=1, num_images=2)  # split first, then fails the same way
    worker.work(burst=True)
    for job in (one, two):
        job.refresh()
        assert job.get_status() == "failed" and job.meta["error"]["code"] == "out_of_memory"
    assert holding.alive_at_free == [False, False, False]


@pytest.mark.parametrize(
    ("message", "oom", "gpu"),
    [
        ("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8589934592 bytes. Error code 12", True,
         False),
        ("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`", True, True),
        ("cuDNN error: CUDNN_STATUS_ALLOC_FAILED", True, True),
        ("CUDA error: out of memory", True, True),
        ("the UNet fell over", False, False),
        ("CUBLAS_STATUS_EXECUTION_FAILED", False, False),
    ],
)  # fmt: skip
def test_torch_allocation_failures_count_as_out_of_memory(message: str, oom: bool, gpu: bool) -> None:
    from types import SimpleNamespace

    from worker.batch_worker import _sampling_failure

    assert tasks._is_oom(RuntimeError(message)) is oom
    assert tasks._is_oom(ValueError(message)) is False  # not one of torch's errors
    assert tasks._is_oom(MemoryError()) and tasks._is_oom(OutOfMemoryError("CUDA out of memory"))
    job = SimpleNamespace(meta={})
    failure = _sampling_failure(job, RuntimeError(message))  # type: ignore[arg-type]
    assert failure.code == ("out_of_memory" if oom else "sampling_error")
    if oom:
        assert failure.message == f"the {'GPU' if gpu else 'worker'} ran out of memory"


def test_a_cpu_allocation_failure_ends_the_job_out_of_memory(env) -> None:
    """torch's CPU allocator raises a RuntimeError, not MemoryError: the job ended `sampling_error`,
    with a traceback, and nothing was freed."""
    runtime, store, queue, worker = env
    real = runtime.generate

    def generate(params: GenerationParams, on_step) -> list[Image.Image]:
        if params.num_images > 1:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes.")
        return real(params, on_step)

    runtime.generate = generate  # type: ignore[method-assign]
    job = enqueue(queue, prompt="big", num_images=2, seed=3)
    worker.work(burst=True)
    job.refresh()
    assert job.get_status() == "finished"  # retried image by image, as for a GPU out-of-memory error
    assert [img["seed"] for img in job.return_value()["images"]] == [3, 4] and runtime.freed == 1


def test_images_are_kept_as_long_as_their_job(env, redis_db) -> None:
    """The image TTL comes from the job (the API's IMAGEGEN_RESULT_TTL when it queued it), not from
    the worker's own setting: with a shorter one there, images expired while the job linked them."""
    import dataclasses

    from app.core.storage import RedisImageStore

    runtime, store, queue, worker = env
    assert tasks._context is not None and tasks._context.settings.result_ttl == 3600
    tasks.bind(dataclasses.replace(tasks._context, store=RedisImageStore(redis_db)))
    job = queue.enqueue(TASK_GENERATE, kwargs={"params": {"prompt": "kept", "seed": 1}}, result_ttl=7200)
    worker.work(burst=True)
    assert job.get_status(refresh=True) == "finished"
    assert 7000 < redis_db.ttl(f"imagegen:image:{job.id}:0") <= 7200


def test_a_jobs_streams_expire_with_it(env, redis_db) -> None:
    """A job's event streams were kept max(result TTL, failure TTL) (a day) whatever its end: a
    succeeded job's now go with it."""
    from app.core import events

    runtime, store, queue, worker = env
    job = queue.enqueue(TASK_GENERATE, kwargs={"params": {"prompt": "brief", "seed": 1}}, result_ttl=600)
    worker.work(burst=True)
    assert job.get_status(refresh=True) == "finished"
    for key in (events.stream_key(job.id), events.end_key(job.id)):
        assert 500 < redis_db.ttl(key) <= 600, key


def test_an_outage_mid_job_is_logged_once_not_at_every_step(env, redis_db, monkeypatch, caplog) -> None:
    import dataclasses
    import logging

    from redis.exceptions import ConnectionError as RedisConnectionError

    runtime, store, queue, worker = env
    monkeypatch.setattr(tasks, "CANCEL_INTERVAL", 0.0)  # a round trip at every step

    class Flaky:
        """The task's connection, down for its first 20 progress/cancel round trips."""

        failures = 20

        def __getattr__(self, name: str):
            return getattr(redis_db, name)

        def pipeline(self, *args, **kwargs):
            if Flaky.failures:
                Flaky.failures -= 1
                raise RedisConnectionError("Redis is restarting")
            return redis_db.pipeline(*args, **kwargs)

    assert tasks._context is not None
    tasks.bind(dataclasses.replace(tasks._context, connection=Flaky()))
    job = enqueue(queue, prompt="through an outage", num_inference_steps=40, seed=1)
    with caplog.at_level(logging.INFO, logger="worker.tasks"):
        worker.work(burst=True)
    assert job.get_status(refresh=True) == "finished" and Flaky.failures == 0
    said = [r.getMessage() for r in caplog.records if r.name == "worker.tasks"]
    assert sum("not recorded" in m for m in said) == 1 and sum("recorded again" in m for m in said) == 1, said


def test_an_idle_worker_stops_listening_for_commands_within_seconds(env) -> None:
    """RQ joins its command listener without a limit at shutdown; a listener that had read its
    unsubscribe reply then waited out 60 s for a subscription (an idle worker's SIGTERM took 64 s)."""
    import threading

    _, _, _, worker = env
    worker.subscribe()
    time.sleep(0.2)
    worker.pubsub.unsubscribe()  # the reply is read: the listener now waits for a subscription
    deadline = time.monotonic() + 5
    while worker.pubsub.subscribed and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not worker.pubsub.subscribed
    done = threading.Event()
    threading.Thread(target=lambda: (worker.unsubscribe(), done.set()), daemon=True).start()
    assert done.wait(5), "the listener held the worker's shutdown"


def test_a_requeued_jobs_total_latency_runs_from_its_submission(redis_db) -> None:
    """RQ sets `enqueued_at` anew at each re-queue: the total counted only the last run."""
    from datetime import UTC, datetime, timedelta

    from rq.job import Job as RQJob

    from worker.worker import _timings

    job = RQJob("x", redis_db)
    at = datetime(2026, 1, 1, tzinfo=UTC)
    job.created_at, job.enqueued_at = at, at + timedelta(seconds=40)  # submitted, then re-queued
    job.started_at, job.ended_at = at + timedelta(seconds=45), at + timedelta(seconds=50)
    assert _timings(job) == {"queue_wait": 5.0, "total": 50.0}


def test_a_requeued_job_counts_again_against_its_keys_bound_of_waiting_jobs(env, redis_db) -> None:
    """Its key's set of waiting jobs drops a job once it has started (when the set is full); handed
    back or re-run after a lost worker, it waited again uncounted, past the key's bound."""
    from app.core.enqueue import OWNER_QUEUED_PREFIX

    runtime, store, queue, worker = env
    bounded, unbounded = enqueue(queue, prompt="a"), enqueue(queue, prompt="b")
    bounded.meta["owner"], unbounded.meta["owner"] = "key-a", "key-b"
    redis_db.zadd(OWNER_QUEUED_PREFIX + "key-a", {"another-job": 1.0})  # key-a has a bound; key-b none
    for job in (bounded, unbounded):
        worker._announce_requeued(job)
    assert redis_db.zscore(OWNER_QUEUED_PREFIX + "key-a", bounded.id) == pytest.approx(bounded.created_at.timestamp())
    assert not redis_db.exists(OWNER_QUEUED_PREFIX + "key-b")  # no set made for a key without a bound
