"""The RQ task the API enqueues by dotted path (`worker.tasks.generate`).

The worker binds its loaded runtime and image store here once at start-up (`bind`); the task then
resolves parameters, samples with progress written to `job.meta`, and stores the PNGs.
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError
from rq import get_current_job
from rq.timeouts import JobTimeoutException

from app.core.jobs import MAX_SEED, ErrorCode, GenerationParams, image_seed
from worker.png import encode_png

if TYPE_CHECKING:
    from rq.job import Job

    from app.core.config import Settings
    from app.core.storage import ImageStore
    from worker.runtime import Runtime

log = logging.getLogger(__name__)
PROGRESS_INTERVAL = 0.2  # seconds between progress writes; the last step is always written


@dataclass
class WorkerContext:
    runtime: Runtime
    store: ImageStore
    settings: Settings


_context: WorkerContext | None = None


def bind(context: WorkerContext) -> None:
    """Called once by the worker process after the model is loaded."""
    global _context
    _context = context


class JobFailedError(Exception):
    """Ends a job as `failed` with a code and a message that clients may read."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message


def _fail(job: Job, code: ErrorCode, message: str) -> JobFailedError:
    job.meta["error"] = {"code": code.value, "message": message}
    job.save_meta()
    return JobFailedError(code, message)


def generate(params: dict[str, Any]) -> dict[str, Any]:
    if _context is None:
        raise RuntimeError("worker.tasks.generate runs only inside `python -m worker`")
    ctx = _context
    job = get_current_job()
    assert job is not None

    # 1. Validate again: the queue may hold jobs from another producer or an older API.
    try:
        request = GenerationParams.model_validate(params)
    except ValidationError as exc:
        raise _fail(job, ErrorCode.invalid_params, _first_error(exc)) from None
    request = ctx.runtime.info.fill(request)
    if request.seed is None:
        request = request.model_copy(update={"seed": secrets.randbelow(MAX_SEED + 1)})
    assert request.seed is not None

    # 2. Record the resolved parameters and any warnings before sampling starts.
    warnings = []
    tokens = ctx.runtime.count_tokens(request.prompt)
    if tokens > ctx.runtime.info.max_tokens:
        warnings.append(
            f"prompt is {tokens} tokens; the text encoder reads only the first {ctx.runtime.info.max_tokens}"
        )
    total = request.num_inference_steps or 0
    job.meta.update(params=request.model_dump(mode="json"), warnings=warnings, progress={"step": 0, "total": total})
    job.save_meta()

    # 3. Sample, writing progress at most every PROGRESS_INTERVAL seconds.
    last_write = time.monotonic()

    def on_step(step: int, steps: int) -> None:
        nonlocal last_write
        now = time.monotonic()
        if step == steps or now - last_write >= PROGRESS_INTERVAL:
            last_write = now
            job.meta["progress"] = {"step": step, "total": steps}
            job.save_meta()

    started = time.perf_counter()
    try:
        images = ctx.runtime.generate(request, on_step)
    except JobTimeoutException:
        raise _fail(job, ErrorCode.timeout, f"job ran past its {job.timeout} s limit") from None
    except MemoryError:
        raise _fail(job, ErrorCode.out_of_memory, "the worker ran out of memory") from None
    except Exception as exc:
        if type(exc).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError
            raise _fail(job, ErrorCode.out_of_memory, "the GPU ran out of memory") from None
        log.exception("job %s: sampling failed", job.id)
        raise _fail(job, ErrorCode.sampling_error, f"{type(exc).__name__}: {exc}") from None
    sampling_s = time.perf_counter() - started

    # 4. Encode and store every image; the job's result lists them.
    results = []
    for index, image in enumerate(images):
        seed = image_seed(request.seed, index)
        ctx.store.put(job.id, index, encode_png(image, request, seed), ttl=ctx.settings.result_ttl)
        results.append({"index": index, "seed": seed, "width": image.width, "height": image.height})
    log.info("job %s: %d image(s) in %.3fs", job.id, len(results), sampling_s)
    return {"images": results}


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err.get("loc", ()))
    return f"{where}: {err.get('msg', 'invalid')}" if where else str(err.get("msg", "invalid"))
