"""The RQ task the API enqueues by dotted path (`worker.tasks.generate`).

The worker binds its loaded runtime, image store and event sink here once at start-up (`bind`);
the task then resolves parameters, samples with progress and cancel checks between steps, and
stores the PNGs. Terminal events are written by the worker class once RQ has recorded the outcome.
"""

from __future__ import annotations

import logging
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError
from redis.exceptions import RedisError
from rq import get_current_job
from rq.timeouts import JobTimeoutException

from app.core.events import EventType, make_event, publish, result_ttl
from app.core.jobs import MAX_SEED, ErrorCode, GenerationParams, cancel_key, image_seed, steptime_key
from worker.events import record_progress, record_start
from worker.png import encode_png

if TYPE_CHECKING:
    from redis import Redis
    from rq.job import Job

    from app.core.config import Settings
    from app.core.storage import ImageStore
    from worker.events import EventSink
    from worker.runtime import Runtime

log = logging.getLogger(__name__)
PROGRESS_INTERVAL = 0.1  # seconds between progress writes/events (≤ 10/s); the last step always goes out
CANCEL_INTERVAL = 0.02  # seconds at least between reads of a running job's cancel flag
STEPTIME_WEIGHT = 0.3  # weight of the newest measurement in the moving average used for ETAs


@dataclass
class WorkerContext:
    runtime: Runtime
    store: ImageStore
    settings: Settings
    connection: Redis
    events: EventSink
    should_requeue: Callable[[], bool] = lambda: False
    # (started registry key, execution) of the run in progress: see `LostRunError`.
    claim: Callable[[], tuple[str, str] | None] = lambda: None


_context: WorkerContext | None = None


def bind(context: WorkerContext) -> None:
    """Called once by the worker process after the model is loaded."""
    global _context
    _context = context


class JobFailedError(Exception):
    """Ends a job as `failed` (or `canceled`) with a code and a message that clients may read."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message


class RequeueError(Exception):
    """The worker is shutting down past its grace period: give the job back to the queue."""


class LostRunError(Exception):
    """This run no longer owns its job: the worker stalled past its heartbeats (SIGSTOP, a frozen
    VM, swapping), was taken for dead, and the job was re-queued and run again elsewhere. The run
    stops at once and records nothing more (`ImagegenWorker._taken_from_us` drops its outcome):
    sampling on would waste the worker and mix this run's progress into the other run's."""


class DeviceFaultError(Exception):
    """The device failed in a way that leaves this process's CUDA context unusable (see
    `_is_device_fatal`): every later job would fail too while the worker looked healthy. The job is
    not at fault as far as anyone can tell: it goes back to its queue (`job.meta["requeue"]`, as at
    shutdown) and the worker exits once that is recorded, for its supervisor to start a fresh
    process (`ImagegenWorker.device_fault`, `worker.__main__`)."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what  # the device's error, one line


class DeviceFailedError(JobFailedError):
    """A device fault on a job's last allowed run (`MAX_DEVICE_HANDBACKS`): the job ends failed,
    and the worker still exits, its CUDA context broken all the same."""

    def __init__(self, what: str, message: str) -> None:
        super().__init__(ErrorCode.sampling_error, message)
        self.what = what


class CanceledError(Exception):
    def __init__(self, step: int, total: int) -> None:
        super().__init__(f"canceled at step {step} of {total}")
        self.step = step
        self.total = total


def _fail(job: Job, code: ErrorCode, message: str, **extra: Any) -> JobFailedError:
    """The error that ends `job`, noted in its meta; the meta is saved with the failure, in RQ's
    transaction (`ImagegenWorker.handle_job_failure`), and only if this run still owns the job."""
    job.meta["error"] = {"code": code.value, "message": message}
    job.meta.update(extra)
    return JobFailedError(code, message)


def generate(params: dict[str, Any]) -> dict[str, Any]:
    if _context is None:
        raise RuntimeError("worker.tasks.generate runs only inside `python -m worker`")
    ctx = _context
    job = get_current_job()
    assert job is not None

    prepared = time.perf_counter()
    return run_job(ctx, job, resolve(ctx, job, params), prepared)


def resolve(ctx: WorkerContext, job: Job, params: Any) -> GenerationParams:
    """Step 1 of a task: validate again (the queue may hold jobs from another producer or an older
    API), fill the model's defaults, draw a seed if none was given."""
    try:
        request = GenerationParams.model_validate(params)
    except ValidationError as exc:
        raise _fail(job, ErrorCode.invalid_params, _first_error(exc)) from None
    request = ctx.runtime.info.fill(request)
    problem = ctx.runtime.info.size_problem(request)
    if problem is not None:
        raise _fail(job, ErrorCode.invalid_params, f"{problem[0]}: {problem[1]}")
    if request.seed is None:
        request = request.model_copy(update={"seed": secrets.randbelow(MAX_SEED + 1)})
    return request


def note_params(ctx: WorkerContext, job: Job, request: GenerationParams) -> dict[str, int]:
    """Put the resolved parameters, any warnings and step 0 in `job.meta` (written with the start);
    returns that progress."""
    warnings = []
    tokens = ctx.runtime.count_tokens(request.prompt)
    if tokens > ctx.runtime.info.max_tokens:
        warnings.append(
            f"prompt is {tokens} tokens; the text encoder reads only the first {ctx.runtime.info.max_tokens}"
        )
    progress = {"step": 0, "total": request.num_inference_steps or 0}
    job.meta.update(params=request.model_dump(mode="json"), warnings=warnings, progress=progress)
    return progress


def run_job(ctx: WorkerContext, job: Job, request: GenerationParams, prepared: float) -> dict[str, Any]:
    """Steps 2-4 of a task once its request is validated and filled: announce, sample with
    `ctx.runtime.generate` (progress and cancel at every step), store the PNGs. Other tasks
    (worker.variations) reuse it with a context whose runtime samples differently."""
    assert request.seed is not None
    flag = cancel_key(job.id)

    # 2. Record the resolved parameters and any warnings and announce the start, in one call that
    #    also reads the cancel flag (canceled between dequeue and start: nothing is announced).
    progress = note_params(ctx, job, request)
    event = make_event(EventType.started, job.id, "running", progress=progress)
    if record_start(ctx.connection, job, event, ctx.events.ttl):
        raise _fail(job, ErrorCode.canceled, "canceled before it started", canceled_at_step=0)
    ctx.events.deliver(job, event)

    # 3. Sample. The cancel flag is read between steps, at most every CANCEL_INTERVAL (one EXISTS),
    #    progress goes out at most 10/s; both in one round trip when both are due.
    last_write = last_check = time.monotonic()
    redis_away = False  # said once per outage, not at every step

    last_step = -1

    def on_step(step: int, steps: int) -> None:
        nonlocal last_write, last_check, redis_away, last_step
        if ctx.should_requeue():
            raise RequeueError
        if step == last_step == steps:  # a sampler's step beyond those asked for (pndm): said already
            return
        last_step = step
        now = time.monotonic()
        check = step < steps and now - last_check >= CANCEL_INTERVAL  # after the last step: nothing to stop
        report = step == steps or now - last_write >= PROGRESS_INTERVAL
        if not (check or report):
            return
        claim = ctx.claim()
        try:
            with ctx.connection.pipeline(transaction=False) as pipe:
                if check:
                    last_check = now
                    pipe.exists(flag)
                if report:
                    last_write = now
                    job.meta["progress"] = {"step": step, "total": steps}
                    event = make_event(EventType.progress, job.id, "running", progress={"step": step, "total": steps})
                    if claim is not None:  # written only while this run owns the job
                        record_progress(pipe, claim, job, job._serialize_meta(), event, ctx.events.ttl)
                    else:
                        pipe.hset(job.key, "meta", job._serialize_meta())
                        publish(pipe, event, ctx.events.ttl)
                elif claim is not None:
                    pipe.zscore(*claim)
                replies = pipe.execute()
            if redis_away:
                redis_away = False
                log.info("job %s: progress recorded again (Redis is back)", job.id)
            if claim is not None and not replies[1 if check else 0]:  # the run's score, or the script's 0
                raise LostRunError
            if check and replies[0]:
                raise CanceledError(step, steps)
            if report:
                ctx.events.deliver(job, event)
        except RedisError:
            # Redis is away: keep sampling; the result is stored when it returns, or the job is
            # re-run once the worker is found to have lost it.
            if not redis_away:
                redis_away = True
                log.warning("job %s: progress not recorded while Redis is unavailable", job.id)

    started = time.perf_counter()
    load_s = started - prepared
    out_of_memory = False
    try:
        images = _generate_or_split(ctx, job, request, on_step)
    except RequeueError:
        log.info("job %s: shutting down, handing the job back to the queue", job.id)
        job.meta["requeue"] = True
        raise
    except LostRunError:
        log.warning("job %s: run again elsewhere while this worker stalled; this run stops", job.id)
        raise
    except CanceledError as exc:
        log.info("job %s: canceled at step %d/%d", job.id, exc.step, exc.total)
        job.meta["progress"] = {"step": exc.step, "total": exc.total}  # the last write may be older
        raise _fail(job, ErrorCode.canceled, str(exc), canceled_at_step=exc.step) from None
    except JobTimeoutException:
        raise _fail(job, ErrorCode.timeout, f"job ran past its {job.timeout} s limit") from None
    except Exception as exc:
        if _device_broken(exc):
            log.warning("job %s: the device failed while sampling", job.id, exc_info=True)
            raise device_fault(job, exc) from exc
        if not _is_oom(exc):
            log.exception("job %s: sampling failed", job.id)
            raise _fail(job, ErrorCode.sampling_error, f"{type(exc).__name__}: {exc}") from None
        out_of_memory = True
    if out_of_memory:
        # Keep serving: drop cached blocks before the next job. Out of the `except` block, so that
        # the failed run's tensors, which its traceback held, are gone by then (and the error
        # raised here carries no context that would hold them on).
        ctx.runtime.free_memory()
        raise _fail(job, ErrorCode.out_of_memory, "the worker ran out of memory for this request")
    sampling_s = time.perf_counter() - started
    _record_steptime(ctx, request, sampling_s)

    # 4. Encode and store every image; the job's result lists them.
    results = store_images(ctx, job, request, images)
    # Saved with the job's success (`ImagegenWorker.handle_job_success`), in RQ's transaction.
    job.meta["timings"] = timings(load_s, sampling_s, time.perf_counter() - started - sampling_s)
    log.info("job %s: %d image(s) in %.3fs", job.id, len(results), sampling_s)
    return {"images": results}


def store_images(ctx: WorkerContext, job: Job, params: GenerationParams, images: list[Any]) -> list[dict[str, int]]:
    """Encode and store a job's images (kept as long as the job); what its result lists of them."""
    assert params.seed is not None
    ttl = result_ttl(job.result_ttl, ctx.settings)
    results = []
    for index, image in enumerate(images):
        seed = image_seed(params.seed, index)
        ctx.store.put(job.id, index, encode_png(image, params, seed), ttl=ttl)
        results.append({"index": index, "seed": seed, "width": image.width, "height": image.height})
    return results


def timings(load_s: float, sampling_s: float, encode_s: float) -> dict[str, float]:
    """A job's `timings` meta (milliseconds), as `GET /jobs/<id>` shows it."""
    return {"load_ms": round(load_s * 1000, 3), "sampling_ms": round(sampling_s * 1000, 3),
            "encode_ms": round(encode_s * 1000, 3)}  # fmt: skip


# What torch's other allocation failures say (all RuntimeErrors): the CPU allocator, and the CUDA
# libraries failing to allocate their workspaces (`CUDA error: out of memory` among others).
OOM_MARKERS = ("DefaultCPUAllocator: can't allocate memory", "CUBLAS_STATUS_ALLOC_FAILED",
               "CUDNN_STATUS_ALLOC_FAILED", "out of memory")  # fmt: skip
GPU_OOM_MARKERS = ("CUDA", "CUBLAS", "CUDNN")


def _is_oom(exc: BaseException) -> bool:
    """Whether sampling failed for want of memory (the job ends `out_of_memory`, memory is freed)."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError
        return True
    return isinstance(exc, RuntimeError) and any(marker in str(exc) for marker in OOM_MARKERS)


def _is_gpu_oom(exc: BaseException) -> bool:
    """An out-of-memory error of the GPU (else of the machine's memory)."""
    if type(exc).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError
        return True
    return _is_oom(exc) and not isinstance(exc, MemoryError) and any(m in str(exc) for m in GPU_OOM_MARKERS)


# Errors after which the process's CUDA context is unusable: the CUDA runtime documents each of
# these as leaving "the process in an inconsistent state", every later CUDA call failing with the
# same error until the process is terminated and relaunched (cudaError_t: cudaErrorIllegalAddress
# 700, LaunchTimeout 702, Assert 710, HardwareStackError 714, IllegalInstruction 715,
# MisalignedAddress 716, InvalidAddressSpace 717, InvalidPc 718, LaunchFailure 719). torch raises
# them as RuntimeError (torch.AcceleratorError since 2.8) with the runtime's own wording.
STICKY_CUDA_MARKERS = (
    "an illegal memory access was encountered",
    "the launch timed out and was terminated",
    "device-side assert triggered",
    "hardware stack error",
    "an illegal instruction was encountered",
    "misaligned address",
    "operation not supported on global/shared address space",
    "invalid program counter",
    "unspecified launch failure",
)
# Uncorrectable memory and NVLink errors (ECCUncorrectable 214, NvlinkUncorrectable 220): not
# documented as sticky, but data on the device may be corrupt, the model's weights included, which
# only a fresh process loads again.
HARDWARE_MARKERS = ("uncorrectable ECC error encountered", "uncorrectable NVLink error")
# cuBLAS and cuDNN report a kernel that failed on the device this way, the same faults as above
# met inside a library call (CUDA reports a kernel's fault at the next call, often a library's).
# Not their INTERNAL_ERROR, which is mostly an allocation failure in disguise: where the context
# really is gone, `_device_answers` finds out.
LIBRARY_MARKERS = ("CUBLAS_STATUS_EXECUTION_FAILED", "CUDNN_STATUS_EXECUTION_FAILED")
DEVICE_FATAL_MARKERS = STICKY_CUDA_MARKERS + HARDWARE_MARKERS + LIBRARY_MARKERS
# Left out: "unknown error" (not documented as fatal; once a GPU fell off the bus every call fails,
# which `_device_answers` sees), "CUDA-capable device(s) is/are busy or unavailable" and "driver
# version is insufficient" (met where the context is created, at start-up, where the worker exits
# anyway), out of memory (memory is freed and the worker goes on).
MAX_DEVICE_HANDBACKS = 2  # times a job goes back to its queue after a device fault; the next fault fails it
DEVICE_FAULTS = "device_faults"  # meta: how many runs of the job ended in a device fault


def _is_device_fatal(exc: BaseException) -> bool:
    """Whether an error says the device failed in a way no later job on this process survives.
    Read through the chain of causes: a library may re-raise it as its own error."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, RuntimeError) and any(m in str(current) for m in DEVICE_FATAL_MARKERS):
            return True
        current = current.__cause__ or current.__context__
    return False


def _device_answers() -> bool:
    """Whether the GPU still runs work, asked after a failure no marker names: a broken context
    fails every call, a synchronize included, while an ordinary error leaves it working. Never
    asked in a process that has not used CUDA (a CPU worker)."""
    torch: Any = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return True
    try:
        torch.cuda.synchronize()
    except RuntimeError:  # torch.AcceleratorError included
        log.warning("the GPU fails every call since the last error", exc_info=True)
        return False
    return True


def _device_broken(exc: BaseException) -> bool:
    """Whether sampling failed because the device is no longer usable by this process."""
    return _is_device_fatal(exc) or not _device_answers()


def one_line(exc: BaseException) -> str:
    """An error as its type and the first line of its message (torch's CUDA errors go on for lines)."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def device_faults(job: Job) -> int:
    """How many runs of the job ended in a device fault."""
    try:
        return max(0, int(job.meta.get(DEVICE_FAULTS) or 0))
    except (TypeError, ValueError):
        return 0


def device_fault(job: Job, exc: BaseException, *, ran: bool = True) -> DeviceFaultError | DeviceFailedError:
    """The outcome of a run of `job` that the device failed under (`ran`; else a job taken with
    others but not yet on the device), noted in its meta: back to its queue, or failed once the
    device failed under it more than MAX_DEVICE_HANDBACKS times. Handing it back costs none of the
    retries kept for lost workers (IMAGEGEN_MAX_RETRIES) and is bounded on its own: a job whose
    input itself makes the kernels fault would otherwise take every worker down in turn, forever."""
    what = one_line(exc)
    faults = device_faults(job) + (1 if ran else 0)
    job.meta[DEVICE_FAULTS] = faults
    if faults > MAX_DEVICE_HANDBACKS:
        message = (
            f"the GPU failed on each of this job's {faults} runs, and took its worker down each time "
            f"({what}); the job itself may cause it, so it is not run again"
        )
        _fail(job, ErrorCode.sampling_error, message)
        return DeviceFailedError(what, message)
    job.meta["requeue"] = True
    return DeviceFaultError(what)


def _generate_or_split(ctx: WorkerContext, job: Job, request: GenerationParams, on_step: Any) -> list[Any]:
    """Sample all images at once; on out-of-memory with several images, free memory and retry
    once image by image (image i keeps seed + i, so the results are the same images)."""
    try:
        return ctx.runtime.generate(request, on_step)
    except Exception as exc:
        if not _is_oom(exc) or request.num_images == 1:
            raise
    assert request.seed is not None
    log.warning("job %s: out of memory with %d images; retrying one at a time", job.id, request.num_images)
    ctx.runtime.free_memory()
    images = []
    for i in range(request.num_images):
        single = request.model_copy(update={"num_images": 1, "seed": image_seed(request.seed, i)})
        images += ctx.runtime.generate(single, on_step)
    return images


def _record_steptime(ctx: WorkerContext, request: GenerationParams, seconds: float) -> None:
    """Keep a moving average of seconds per image per step for this size (shared ETAs)."""
    work = (request.num_inference_steps or 1) * request.num_images
    field = f"{request.width}x{request.height}"
    key = steptime_key(ctx.runtime.info.name)
    try:
        old = ctx.connection.hget(key, field)
        value = seconds / work
        if old is not None:
            value = STEPTIME_WEIGHT * value + (1 - STEPTIME_WEIGHT) * float(old)  # type: ignore[arg-type]
        ctx.connection.hset(key, field, f"{value:.6f}")
    except Exception:
        log.warning("could not record step time", exc_info=True)


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err.get("loc", ()))
    return f"{where}: {err.get('msg', 'invalid')}" if where else str(err.get("msg", "invalid"))
