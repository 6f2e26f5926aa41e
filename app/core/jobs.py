"""The job contract: request parameters, our status names, queue and task names, meta fields.

Shared by the API and the worker; imports pydantic only.
"""

from __future__ import annotations

import enum
import unicodedata
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

QUEUE_PREFIX = "imagegen:"  # one queue per served model: a job only reaches workers of its model
TASK_GENERATE = "worker.tasks.generate"
TASK_VARIATIONS = "worker.variations.vary"  # image variations (input image in Redis, see app.core.variations)
# The only functions a worker will run; anything else found on the queue is refused.
ALLOWED_TASKS = frozenset({TASK_GENERATE, TASK_VARIATIONS})
MAX_SEED = 2**32 - 1
MODELS_KEY = "imagegen:models"  # hash: model name -> JSON ModelInfo, written by live workers
# Invisible characters that str.strip() keeps: a prompt of these, control characters and
# whitespace alone is blank.
ZERO_WIDTH = frozenset("\u200b\u200c\u200d\u2060\ufeff")


class Scheduler(enum.StrEnum):
    """Samplers a request may pick; the worker maps each to a diffusers scheduler class."""

    ddim = "ddim"
    euler = "euler"
    euler_a = "euler_a"
    dpmpp_2m = "dpmpp_2m"
    unipc = "unipc"
    pndm = "pndm"
    native = "native"  # the sampler the model was saved with, whatever its class (LCM, LMS, Heun, DDPM, …)


class JobStatus(enum.StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    canceled = "canceled"

    def is_terminal(self) -> bool:
        return self in (JobStatus.succeeded, JobStatus.failed, JobStatus.canceled)


class ErrorCode(enum.StrEnum):
    """Machine-readable reasons a job ends `failed` (or `canceled`)."""

    invalid_params = "invalid_params"
    sampling_error = "sampling_error"
    out_of_memory = "out_of_memory"
    timeout = "timeout"
    worker_lost = "worker_lost"
    refused = "refused"
    canceled = "canceled"
    internal_error = "internal_error"


def not_bool(value: Any) -> Any:
    """Refuse `true`/`false` for a number (pydantic's lax mode, which form fields need, takes them as 1/0)."""
    if isinstance(value, bool):
        raise ValueError("must be a number, not true or false")
    return value


class GenerationParams(BaseModel):
    """What a client may ask for. Names follow diffusers' pipeline arguments.

    Optional fields left as None are filled from the served model's defaults.
    """

    # NaN and infinity (which Python's JSON reader takes) are refused as such, not as "over 30".
    model_config = ConfigDict(extra="forbid", use_enum_values=False, allow_inf_nan=False)

    prompt: str = Field(..., min_length=1, max_length=1000, description="What to draw.")
    negative_prompt: str | None = Field(None, max_length=1000, description="What to steer away from.")
    num_images: int = Field(1, ge=1, le=10, description="Images to make; image i uses seed + i.")
    width: int | None = Field(None, ge=8, le=4096, description="Multiple of 8; default: the model's native size.")
    height: int | None = Field(None, ge=8, le=4096, description="Multiple of 8; default: the model's native size.")
    num_inference_steps: int | None = Field(None, ge=1, le=150, description="Denoising steps.")
    guidance_scale: float | None = Field(None, ge=0, le=30, description="Classifier-free guidance strength.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Random seed; picked by the server if missing.")
    scheduler: Scheduler | None = Field(None, description="Sampler; default: the model's own.")

    @field_validator("num_images", "width", "height", "num_inference_steps", "guidance_scale", "seed", mode="before")
    @classmethod
    def _not_bool(cls, v: Any) -> Any:
        return not_bool(v)

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, v: int | None) -> int | None:
        if v is not None and v % 8:
            raise ValueError("must be a multiple of 8")
        return v

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        # Control characters draw nothing either; inside visible text they are kept (and harmless).
        if all(c.isspace() or c in ZERO_WIDTH or unicodedata.category(c) == "Cc" for c in v):
            raise ValueError("must not be blank")
        return v


class ModelInfo(BaseModel):
    """What a worker publishes about the model it serves (defaults used to fill requests)."""

    name: str
    family: str = "stable-diffusion"
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    scheduler: Scheduler
    max_tokens: int = 77
    # Width and height must be multiples of this (Kandinsky's MoVQ needs 64 on real checkpoints).
    size_multiple: int = 8
    # The largest width and height this model takes (None: only the API's bounds). Work grows with
    # the square of the pixel count in attention, so a tiny model asked for 1024 px would hold its
    # worker for many minutes inside single native calls that no time limit can interrupt.
    max_width: int | None = None
    max_height: int | None = None

    def fill(self, params: GenerationParams) -> GenerationParams:
        """Return params with every unset default taken from this model."""
        updates: dict[str, Any] = {}
        for name in ("width", "height", "num_inference_steps", "guidance_scale", "scheduler"):
            if getattr(params, name) is None:
                updates[name] = getattr(self, name)
        return params.model_copy(update=updates)

    def size_problem(self, params: GenerationParams) -> tuple[str, str] | None:
        """(field, message) for a width or height this model cannot take, else None; checked by
        the API at submission and again by the worker (jobs may come from other producers)."""
        for name, limit in (("width", self.max_width), ("height", self.max_height)):
            value = getattr(params, name)
            if value is None:
                continue
            if value % self.size_multiple:
                return name, f"must be a multiple of {self.size_multiple} for model {self.name}"
            if limit is not None and value > limit:
                return name, f"must be at most {limit} for model {self.name}"
        return None


class Priority(enum.StrEnum):
    """Workers drain the queues of a model strictly in this order."""

    high = "high"
    normal = "normal"
    low = "low"


class WebhookEvents(enum.StrEnum):
    """What a webhook subscribes to: `completed` covers succeeded, failed and canceled."""

    start = "start"
    progress = "progress"
    completed = "completed"


def queue_name(model: str, priority: Priority = Priority.normal) -> str:
    """The RQ queue of a model and priority (`IMAGEGEN_MODEL` names it for API and worker alike)."""
    return f"{QUEUE_PREFIX}{model}:{Priority(priority).value}"


WAKE_MAXLEN = 100  # entries kept in a wake stream (workers only wait for the next one)


def wake_key(model: str) -> str:
    """A stream the API appends to with every job it queues for `model` and every cancel of one of
    its running jobs: idle workers block on it (see `worker.worker.ClaimingQueue`) instead of
    popping the queues themselves, and batching workers read their queues and cancel flags between
    steps only after it moved (see `worker.batch_worker`)."""
    return f"imagegen:wake:{model}"


def wake(conn: Any, model: str, **fields: str) -> None:
    """Append to the model's wake stream (on a client or a pipeline)."""
    conn.xadd(wake_key(model), fields or {"wake": "1"}, maxlen=WAKE_MAXLEN, approximate=True)


def cancel_key(job_id: str) -> str:
    """Set by `DELETE /jobs/{id}`; the worker reads it between denoising steps (see `worker.tasks` and
    `worker.batch_worker` for how often)."""
    return f"imagegen:cancel:{job_id}"


def steptime_key(model: str) -> str:
    """Hash `WxH` -> measured seconds per image per denoising step (for ETAs)."""
    return f"imagegen:steptime:{model}"


def image_seed(seed: int, index: int) -> int:
    """Seed of image `index` in a job: consecutive seeds so any image can be remade alone."""
    return (seed + index) % (MAX_SEED + 1)


def parse_job_id(value: str) -> str | None:
    """Canonical job id, or None when `value` is not a UUID (then no Redis key is ever built)."""
    try:
        return str(uuid.UUID(value))
    except (ValueError, AttributeError, TypeError):
        return None


def status_from_rq(rq_status: str | None, meta: dict[str, Any]) -> JobStatus:
    """The one place RQ's statuses become ours. `meta["error"]["code"] == "canceled"` wins."""
    error = meta.get("error") or {}
    if error.get("code") == ErrorCode.canceled.value:
        return JobStatus.canceled
    match rq_status:
        case "finished":
            return JobStatus.succeeded
        case "started":
            return JobStatus.running
        case "failed":
            return JobStatus.failed
        case "stopped" | "canceled":
            return JobStatus.canceled
        case _:  # queued, deferred, scheduled, or not yet written
            return JobStatus.queued
