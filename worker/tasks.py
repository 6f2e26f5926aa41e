"""The RQ task the API enqueues by dotted path (`worker.tasks.generate`).

The worker binds its loaded runtime, image store and event sink here once at start-up (`bind`);
the task then resolves parameters, samples with progress and cancel checks between steps, and
stores the PNGs. Terminal events are written by the worker class once RQ has recorded the outcome.
"""

from __future__ import annotations

import logging
import secrets
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
