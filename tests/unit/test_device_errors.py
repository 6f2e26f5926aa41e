"""Device faults that break the process's CUDA context (an illegal memory access, a device-side
assert...): recognised, the jobs on the device handed back to their queues (a bounded number of
times), and the worker stopped, on the one-job path and in a batch. No GPU here: the fakes of
test_worker.py and test_batching.py raise torch's messages, on a real Redis."""

from __future__ import annotations

import uuid
from types import SimpleNamespace
from typing import Any

import pytest
from PIL import Image
from rq import Queue, Worker
from rq.job import Job
from rq.serializers import JSONSerializer

from app.core import events
from app.core.config import Settings
from app.core.jobs import TASK_GENERATE, GenerationParams
from app.core.storage import LocalImageStore
from tests.unit.test_batching import FakeEngine, FakeRequest
from tests.unit.test_worker import FakeRuntime
from worker import tasks
from worker.batch_worker import BatchingWorker
from worker.events import EventSink
from worker.worker import ImagegenWorker

ILLEGAL_ACCESS = (
    "CUDA error: an illegal memory access was encountered\n"
    "CUDA kernel errors might be asynchronously reported at some other API call, so the stacktrace below might be "
    "incorrect.\nFor debugging consider passing CUDA_LAUNCH_BLOCKING=1\n"
    "Compile with `TORCH_USE_CUDA_DSA` to enable device-side assertions.\n"
)
# What torch says for each (the CUDA runtime's wording after "CUDA error: ", the libraries' own).
DEVICE_FATAL = [
    ILLEGAL_ACCESS,
    "CUDA error: device-side assert triggered\nCompile with `TORCH_USE_CUDA_DSA` to enable device-side assertions.",
    "CUDA error: unspecified launch failure",
    "CUDA error: misaligned address",
    "CUDA error: an illegal instruction was encountered",
    "CUDA error: the launch timed out and was terminated",
    "CUDA error: hardware stack error",
    "CUDA error: invalid program counter",
    "CUDA error: operation not supported on global/shared address space",
    "CUDA error: uncorrectable ECC error encountered",
    "CUDA error: uncorrectable NVLink error detected during the execution",
    "CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasGemmEx( handle, opa, opb, m, n, k, &falpha, a, "
    "CUDA_R_16F, lda, b, CUDA_R_16F, ldb, &fbeta, c, CUDA_R_16F, ldc, CUDA_R_32F, CUBLAS_GEMM_DEFAULT_TENSOR_OP)`",
    "cuDNN error: CUDNN_STATUS_EXECUTION_FAILED",
    "cuDNN Frontend error: [cudnn_frontend] Error: CUDNN_STATUS_EXECUTION_FAILED_CUDART",
]
OUT_OF_MEMORY = [
    "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.19 GiB total capacity)",
    "CUDA error: out of memory",
    "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
    "cuDNN error: CUDNN_STATUS_ALLOC_FAILED",
    "DefaultCPUAllocator: can't allocate memory: you tried to allocate 8589934592 bytes. Error code 12",
]
ORDINARY = [
    "the UNet fell over",
    "mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)",
    "cuDNN error: CUDNN_STATUS_INTERNAL_ERROR",  # mostly a failed allocation: the probe decides
    "CUDA error: unknown error",
    "CUDA error: CUDA-capable device(s) is/are busy or unavailable",
    "CUDA error: CUDA driver version is insufficient for CUDA runtime version",
    "CUDA error: too many resources requested for launch",
]


# -- recognising them ------------------------------------------------------------------------------


@pytest.mark.parametrize("message", DEVICE_FATAL)
def test_errors_that_break_the_cuda_context_are_device_fatal(message: str) -> None:
    import torch

    assert tasks._is_device_fatal(RuntimeError(message))
    assert tasks._is_device_fatal(torch.AcceleratorError(message))  # what torch >= 2.8 raises
    try:  # a library that re-raises it as its own error
        try:
            raise RuntimeError(message)
        except RuntimeError as exc:
            raise ValueError("the pipeline failed") from exc
    except ValueError as wrapped:
        assert tasks._is_device_fatal(wrapped)
    assert not tasks._is_oom(RuntimeError(message))  # ...and never taken for a lack of memory


def test_every_marker_is_one_of_the_messages_tested() -> None:
    assert all(any(marker in message for message in DEVICE_FATAL) for marker in tasks.DEVICE_FATAL_MARKERS)


@pytest.mark.parametrize("message", OUT_OF_MEMORY + ORDINARY)
def test_out_of_memory_and_ordinary_errors_are_not_device_fatal(message: str) -> None:
    assert not tasks._is_device_fatal(RuntimeError(message))


def test_only_torchs_errors_count() -> None:
    assert not tasks._is_device_fatal(ValueError(ILLEGAL_ACCESS))
    assert not tasks._is_device_fatal(MemoryError())


class FakeCuda:
    """torch.cuda as a process that uses a GPU sees it: in use, and broken or not."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, used: bool = True) -> None:
        import torch

        self.used = used
        self.broken = False
        self.asked = 0
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: self.used)
        monkeypatch.setattr(torch.cuda, "synchronize", self.synchronize)

    def synchronize(self) -> None:
        import torch

        self.asked += 1
        if self.broken:
            raise torch.AcceleratorError("CUDA error: unknown error")


@pytest.fixture
def cuda(monkeypatch) -> FakeCuda:
    return FakeCuda(monkeypatch)


def test_on_cuda_an_unmarked_error_is_fatal_when_the_device_no_longer_answers(cuda) -> None:
    """An error no marker names (cuDNN's INTERNAL_ERROR after an illegal access, "unknown error"
    once the GPU fell off the bus): a synchronize tells a broken context from a passing error."""
    error = RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR")
    assert not tasks._device_broken(error)
    cuda.broken = True
    assert tasks._device_broken(error)
    assert cuda.asked == 2
    cuda.used = False  # a CPU worker: never asked
    assert not tasks._device_broken(error) and cuda.asked == 2
    assert tasks._device_broken(RuntimeError(ILLEGAL_ACCESS))


def test_a_job_is_handed_back_twice_then_fails() -> None:
    job: Any = SimpleNamespace(meta={"progress": {"step": 3, "total": 4}})
    cause = RuntimeError(ILLEGAL_ACCESS)
    for n in (1, 2):
        outcome = tasks.device_fault(job, cause)
        assert type(outcome) is tasks.DeviceFaultError and job.meta.pop("requeue") is True
        assert job.meta["device_faults"] == n and "error" not in job.meta
        assert outcome.what == "RuntimeError: CUDA error: an illegal memory access was encountered"
    untouched = tasks.device_fault(job, cause, ran=False)  # taken with the others, never on the device
    assert isinstance(untouched, tasks.DeviceFaultError) and job.meta.pop("requeue") and job.meta["device_faults"] == 2
    last = tasks.device_fault(job, cause)
    assert isinstance(last, tasks.DeviceFailedError) and isinstance(last, tasks.JobFailedError)
    assert last.code.value == "sampling_error" and "requeue" not in job.meta
    assert job.meta["error"] == {"code": "sampling_error", "message": last.message}
    assert "3 runs" in last.message and "an illegal memory access was encountered" in last.message


@pytest.mark.parametrize("meta", [{}, {"device_faults": None}, {"device_faults": "x"}, {"device_faults": -4}])
def test_a_missing_or_odd_count_is_none(meta: dict[str, Any]) -> None:
    assert tasks.device_faults(SimpleNamespace(meta=meta)) == 0  # type: ignore[arg-type]


# -- the one-job worker ----------------------------------------------------------------------------


class FaultyRuntime(FakeRuntime):
    """A GPU that breaks under prompts containing "gpu fault"; "explode" is an ordinary error."""

    def generate(self, params: GenerationParams, on_step) -> list[Image.Image]:
        if "gpu fault" in params.prompt:
            on_step(1, params.num_inference_steps or 1)
            raise RuntimeError(ILLEGAL_ACCESS)
        return super().generate(params, on_step)


@pytest.fixture
def one_job(redis_db, tmp_path):
    store = LocalImageStore(tmp_path)
    queue = Queue("imagegen:fake", connection=redis_db, serializer=JSONSerializer)

    def make(runtime: FakeRuntime) -> ImagegenWorker:
        settings = Settings(results_dir=tmp_path)
        sink = EventSink(redis_db, settings, sender=None)
        worker = ImagegenWorker([queue], connection=redis_db, serializer=JSONSerializer, heartbeat_interval=0.2,
                                events=sink)  # fmt: skip
        tasks.bind(tasks.WorkerContext(runtime, store, settings, redis_db, sink, claim=lambda: worker.claim))
        return worker

    yield queue, make
    tasks._context = None


def enqueue(queue: Queue, **params: Any) -> Job:
    return queue.enqueue(TASK_GENERATE, kwargs={"params": params}, job_id=str(uuid.uuid4()))


def nothing_started(redis_db, queue: Queue) -> bool:
    return queue.started_job_registry.count == 0 and redis_db.llen(queue.intermediate_queue_key) == 0


def test_a_device_fault_hands_the_job_back_and_stops_the_worker(one_job, redis_db) -> None:
    """The job failed as `sampling_error` and the worker went on, its CUDA context broken: every
    later job failed too while the worker looked healthy."""
    queue, make = one_job
    victim = enqueue(queue, prompt="a gpu fault", seed=1)
    after = enqueue(queue, prompt="fine", seed=2)
    worker = make(FaultyRuntime())
    worker.work(burst=True)
    victim.refresh()
    assert victim.get_status() == "queued" and "error" not in victim.meta, victim.meta
    assert victim.meta["device_faults"] == 1 and victim.meta["progress"]["step"] == 0
    assert queue.get_job_ids() == [victim.id, after.id]  # back at the front, the next job never taken
    assert worker.device_fault == "RuntimeError: CUDA error: an illegal memory access was encountered"
    assert worker.device_fault_jobs == [victim.id]
    assert nothing_started(redis_db, queue) and Worker.all(connection=redis_db) == []  # unregistered as on a stop
    assert [e.type.value for _, e in events.read(redis_db, victim.id)][-1] == "queued"
    assert redis_db.hgetall("imagegen:metrics:failures") == {}

    healthy = make(FakeRuntime())  # another worker, or this one restarted with a fresh context
    healthy.work(burst=True)
    for job in (victim, after):
        job.refresh()
        assert job.get_status() == "finished"
    assert healthy.device_fault is None


def test_a_job_that_breaks_every_device_fails_after_two_hand_backs(one_job, redis_db) -> None:
    queue, make = one_job
    culprit = enqueue(queue, prompt="gpu fault always", seed=1)
    for run in (1, 2, 3):
        worker = make(FaultyRuntime())
        worker.work(burst=True)
        culprit.refresh()
        assert worker.device_fault is not None  # each worker stops, its context broken all the same
        assert culprit.meta["device_faults"] == run
        assert culprit.get_status() == ("failed" if run == 3 else "queued")
    assert culprit.meta["error"]["code"] == "sampling_error"
    assert culprit.meta["error"]["message"].startswith("the GPU failed on each of this job's 3 runs")
    assert nothing_started(redis_db, queue) and queue.count == 0
    assert redis_db.hgetall("imagegen:metrics:failures") == {b"sampling_error": b"1"}
    assert [e.type.value for _, e in events.read(redis_db, culprit.id)][-1] == "failed"


def test_hand_backs_do_not_spend_the_retries_kept_for_lost_workers(one_job) -> None:
    from rq import Retry

    queue, make = one_job
    job = queue.enqueue(TASK_GENERATE, kwargs={"params": {"prompt": "gpu fault", "seed": 1}}, retry=Retry(max=2))
    make(FaultyRuntime()).work(burst=True)
    job.refresh()
    assert job.get_status() == "queued" and job.retries_left == 2


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_an_ordinary_error_still_fails_only_its_job(one_job, monkeypatch, device: str) -> None:
    gpu = FakeCuda(monkeypatch, used=device == "cuda")  # on CUDA, a device that still answers
    queue, make = one_job
    bad = enqueue(queue, prompt="explode", seed=1)
    good = enqueue(queue, prompt="fine", seed=2)
    worker = make(FaultyRuntime())
    worker.work(burst=True)
    assert gpu.asked == (1 if device == "cuda" else 0)
    bad.refresh()
    good.refresh()
    assert bad.get_status() == "failed" and bad.meta["error"]["code"] == "sampling_error"
    assert "device_faults" not in bad.meta and good.get_status() == "finished" and worker.device_fault is None


def test_on_cuda_an_error_after_which_the_device_no_longer_answers_is_a_device_fault(one_job, cuda) -> None:
    cuda.broken = True
    queue, make = one_job
    job = enqueue(queue, prompt="explode", seed=1)  # "the UNet fell over", on a context that is gone
    worker = make(FaultyRuntime())
    worker.work(burst=True)
    job.refresh()
    assert job.get_status() == "queued" and job.meta["device_faults"] == 1
    assert worker.device_fault == "RuntimeError: the UNet fell over"


# -- the batching worker ---------------------------------------------------------------------------


class FaultyEngine(FakeEngine):
    """A tick with a "gpu fault" job in it breaks the device; so does starting a "start fault" job."""

    def tick(self, requests: list[FakeRequest]) -> None:
        if any("gpu fault" in r.params.prompt for r in requests):
            self.ticks.append([r.params.prompt for r in requests])
            raise RuntimeError(ILLEGAL_ACCESS)
        super().tick(requests)

    def start(self, params: GenerationParams) -> FakeRequest:
        if params.prompt == "start fault":
            raise RuntimeError("CUDA error: device-side assert triggered")
        return super().start(params)


@pytest.fixture
def batching(redis_db, tmp_path):
    store = LocalImageStore(tmp_path)
    queue = Queue("imagegen:fake:normal", connection=redis_db, serializer=JSONSerializer)

    def make(engine: FakeEngine) -> BatchingWorker:
        settings = Settings(results_dir=tmp_path)
        sink = EventSink(redis_db, settings, sender=None)
        tasks.bind(tasks.WorkerContext(engine.runtime, store, settings, redis_db, sink))
        return BatchingWorker([queue], connection=redis_db, serializer=JSONSerializer, heartbeat_interval=0.2,
                              events=sink, engine=engine, max_batch=8, check_interval=0.0,  # type: ignore[arg-type]
                              recheck_interval=0.0)  # fmt: skip

    yield queue, make
    tasks._context = None


def test_a_device_fault_in_a_batch_hands_every_job_on_the_device_back(batching, redis_db) -> None:
    """The batched step was retried job by job on the broken device (the culprit failing as
    `sampling_error`), and the session went on with the others and with every job after them."""
    queue, make = batching
    jobs = [enqueue(queue, prompt=p, seed=i, num_inference_steps=3) for i, p in enumerate(["a", "gpu fault", "b"])]
    engine = FaultyEngine(FakeRuntime())
    worker = make(engine)
    worker.work(burst=True)
    assert engine.ticks == [["a", "gpu fault", "b"]]  # no retry alone on a broken device
    for job in jobs:
        job.refresh()
        assert job.get_status() == "queued" and job.meta["device_faults"] == 1 and "error" not in job.meta
    assert queue.get_job_ids() == [j.id for j in jobs]  # in the order they came
    assert sorted(worker.device_fault_jobs) == sorted(j.id for j in jobs)
    assert nothing_started(redis_db, queue) and Worker.all(connection=redis_db) == []

    # A fresh worker: a job the device failed under runs alone; the others batch as usual.
    new = [enqueue(queue, prompt=f"new{i}", seed=10 + i, num_inference_steps=3) for i in range(2)]
    healthy = FakeEngine(FakeRuntime())
    make(healthy).work(burst=True)
    for job in jobs + new:
        job.refresh()
        assert job.get_status() == "finished"
    assert [t for t in healthy.ticks if len(t) > 1] == [["new0", "new1"]] * 3, healthy.ticks
    assert ["a"] in healthy.ticks and ["gpu fault"] in healthy.ticks and ["b"] in healthy.ticks


def test_a_job_that_breaks_every_device_fails_and_its_batch_mates_do_not(batching, redis_db) -> None:
    queue, make = batching
    mate = enqueue(queue, prompt="mate", seed=1, num_inference_steps=2)
    culprit = enqueue(queue, prompt="gpu fault always", seed=2, num_inference_steps=2)
    for run in (1, 2, 3):  # the first with both in one batch, then each alone
        worker = make(FaultyEngine(FakeRuntime()))
        worker.work(burst=True)
        assert worker.device_fault is not None
        culprit.refresh()
        assert culprit.meta["device_faults"] == run
    mate.refresh()
    assert mate.get_status() == "finished" and mate.meta["device_faults"] == 1  # alone after its one fault
    assert culprit.get_status() == "failed"
    assert culprit.meta["error"]["message"].startswith("the GPU failed on each of this job's 3 runs")
    assert nothing_started(redis_db, queue)


def test_a_device_fault_while_starting_jobs_hands_back_those_taken_with_it(batching, redis_db) -> None:
    """Jobs taken together are started one after the other: the one the device failed under, those
    started before it and those not started yet all go back; only the ones on the device count it."""
    queue, make = batching
    jobs = [enqueue(queue, prompt=p, seed=i, num_inference_steps=3) for i, p in enumerate(["a", "b", "start fault"])]
    later = enqueue(queue, prompt="c", seed=9, num_inference_steps=3)
    first, *others = jobs  # RQ's loop takes the first alone; the batch claims the others together
    worker = make(FaultyEngine(FakeRuntime()))
    worker.work(burst=True)
    for job in (*jobs, later):
        job.refresh()
    assert worker.device_fault == "RuntimeError: CUDA error: device-side assert triggered"
    assert [j.get_status() for j in (*jobs, later)] == ["queued"] * 4
    assert [j.meta.get("device_faults") for j in (*jobs, later)] == [1, 1, 1, 0]
    assert queue.get_job_ids() == [j.id for j in (*jobs, later)]
    assert nothing_started(redis_db, queue)


def test_an_ordinary_error_in_a_batch_on_cuda_still_fails_only_its_job(batching, cuda) -> None:
    queue, make = batching
    good = [enqueue(queue, prompt=f"ok{i}", seed=i, num_inference_steps=3) for i in range(2)]
    bad = enqueue(queue, prompt="explode", seed=5, num_inference_steps=3)
    worker = make(FaultyEngine(FakeRuntime()))
    worker.work(burst=True)
    assert cuda.asked == 2  # after the batched step, and after the culprit's step alone
    bad.refresh()
    assert bad.get_status() == "failed" and bad.meta["error"]["code"] == "sampling_error" and not worker.device_fault
    for job in good:
        job.refresh()
        assert job.get_status() == "finished"


def test_past_the_shutdown_grace_a_batch_goes_back_in_the_order_it_came(batching, redis_db) -> None:
    """Each job handed back goes to the front of its queue: handed back first to last, the batch
    ended up in its queue in reverse, the last to come first to run again."""
    queue, make = batching
    jobs = [enqueue(queue, prompt=p, seed=i, num_inference_steps=5) for i, p in enumerate(["a", "b", "c"])]
    later = enqueue(queue, prompt="later", seed=9, num_inference_steps=5)
    engine = FakeEngine(FakeRuntime())
    worker = make(engine)
    ticks = engine.tick

    def tick(requests: list[FakeRequest]) -> None:  # the grace ends after the first batched step
        ticks(requests)
        tasks._context.should_requeue = lambda: True  # type: ignore[union-attr]

    engine.tick = tick  # type: ignore[method-assign]
    worker.max_batch = 3
    worker.work(burst=True, max_jobs=1)
    for job in jobs:
        job.refresh()
        assert job.get_status() == "queued", job.id
    assert queue.get_job_ids() == [j.id for j in [*jobs, later]]
    assert nothing_started(redis_db, queue)
