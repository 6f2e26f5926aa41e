"""The job service: submit, look up and present jobs. Routes stay thin; this owns the logic."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import Any

from redis import Redis
from rq import Queue
from rq.job import Job

from app.api.schemas import ImageRef, JobErrorInfo, JobView, Progress
from app.core.config import Settings
from app.core.errors import GoneError, InvalidRequestError, NotFoundError
from app.core.jobs import MAX_SEED, MODELS_KEY, ErrorCode, GenerationParams, JobStatus, ModelInfo, status_from_rq
from app.core.jobs import parse_job_id as _parse
from app.core.queue import enqueue_generate, fetch_job

SEEN_PREFIX = "imagegen:seen:"  # marks ids we issued, so an expired job answers 410, not 404
SEEN_GRACE = 7 * 86400
MODEL_INFO_TTL = 5.0  # seconds the API trusts its copy of the workers' model defaults


class JobService:
    def __init__(self, settings: Settings, redis: Redis, queue: Queue) -> None:
        self.settings = settings
        self.redis = redis
        self.queue = queue
        self._model: tuple[float, ModelInfo | None] = (0.0, None)

    # -- submit ---------------------------------------------------------------------------
    def model_info(self) -> ModelInfo | None:
        """Defaults of the served model as published by live workers (cached briefly)."""
        fetched_at, info = self._model
        if time.monotonic() - fetched_at > MODEL_INFO_TTL:
            raw = self.redis.hget(MODELS_KEY, self.settings.model)
            info = ModelInfo.model_validate_json(raw) if raw else None  # type: ignore[arg-type]
            self._model = (time.monotonic(), info)
        return info

    def submit(self, params: GenerationParams) -> Job:
        s = self.settings
        for name, limit in (("width", s.max_width), ("height", s.max_height)):
            value = getattr(params, name)
            if value is not None and not (s.min_size <= value <= limit):
                raise InvalidRequestError(
                    f"{name}: must be between {s.min_size} and {limit}",
                    code="validation_error",
                    details=[{"loc": ["body", name], "msg": f"must be between {s.min_size} and {limit}"}],
                )
        if params.seed is None:
            params = params.model_copy(update={"seed": secrets.randbelow(MAX_SEED + 1)})
        info = self.model_info()
        if info is not None:
            params = info.fill(params)
        job = enqueue_generate(self.queue, params, s)
        self.redis.set(SEEN_PREFIX + job.id, 1, ex=max(s.result_ttl, s.failure_ttl) + SEEN_GRACE)
        return job

    # -- look up --------------------------------------------------------------------------
    def get(self, raw_id: str) -> Job:
        job_id = _parse(raw_id)
        if job_id is None:  # never build a Redis key from arbitrary text
            raise NotFoundError(f"no job {raw_id!r}")
        job = fetch_job(self.redis, job_id)
        if job is None:
            if self.redis.exists(SEEN_PREFIX + job_id):
                raise GoneError(f"job {job_id} has expired and its results were deleted")
            raise NotFoundError(f"no job {job_id}")
        return job

    # -- present --------------------------------------------------------------------------
    def view(self, job: Job, image_url: Callable[[str, int], str]) -> JobView:
        meta = job.meta or {}
        status = status_from_rq(job.get_status(refresh=False), meta)
        params: dict[str, Any] = meta.get("params") or (job.kwargs or {}).get("params") or {}
        total = int(params.get("num_inference_steps") or 0)
        progress = meta.get("progress") or {"step": 0, "total": total}
        images: list[ImageRef] = []
        error = None
        if status is JobStatus.succeeded:
            result = job.return_value(refresh=False) or {}
            images = [ImageRef(url=image_url(job.id, img["index"]), **img) for img in result.get("images", [])]
            progress = {"step": progress.get("total", total), "total": progress.get("total", total)}
        elif status in (JobStatus.failed, JobStatus.canceled):
            error = JobErrorInfo(**meta["error"]) if meta.get("error") else self._rq_failure(job)
        return JobView(
            id=job.id,
            status=status,
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.ended_at,
            params=params,
            progress=Progress(**progress),
            images=images,
            warnings=meta.get("warnings") or [],
            error=error,
        )

    @staticmethod
    def _rq_failure(job: Job) -> JobErrorInfo:
        """A failure RQ recorded without our code (worker died, hard timeout): name the cause."""
        result = job.latest_result()
        text = (result.exc_string or "") if result is not None else ""
        if "AbandonedJobError" in text or "terminated unexpectedly" in text:
            return JobErrorInfo(code=ErrorCode.worker_lost.value, message="the worker running this job was lost")
        if "JobTimeoutException" in text:
            return JobErrorInfo(code=ErrorCode.timeout.value, message="the job ran past its time limit")
        return JobErrorInfo(code=ErrorCode.internal_error.value, message="the job failed in the worker")
