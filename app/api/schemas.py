"""Request and response bodies of the HTTP API (what /docs shows)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from app.core.jobs import GenerationParams, JobStatus, Priority, WebhookEvents


class GenerateRequest(GenerationParams):
    """Generation parameters plus how the job is queued and reported."""

    priority: Priority = Field(Priority.normal, description="Queue: high, normal or low (strictly ordered).")
    model: str | None = Field(
        None, max_length=200, description="A model some live worker serves (GET /models); default: the server's."
    )
    webhook: str | None = Field(None, max_length=2000, description="URL that receives signed event POSTs.")
    webhook_events: list[WebhookEvents] = Field(
        default_factory=lambda: [WebhookEvents.completed], description="Which events to send to the webhook."
    )

    def generation_params(self) -> GenerationParams:
        return GenerationParams.model_validate(self.model_dump(include=set(GenerationParams.model_fields)))

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"prompt": "a red circle on a blue background", "seed": 7},
                {
                    "prompt": "a yellow triangle on a black background",
                    "negative_prompt": "blurry",
                    "num_images": 4,
                    "num_inference_steps": 20,
                    "guidance_scale": 3.0,
                    "scheduler": "ddim",
                },
            ]
        },
    )


class Progress(BaseModel):
    step: int = Field(..., ge=0)
    total: int = Field(..., ge=0)


class ImageRef(BaseModel):
    index: int
    url: str
    seed: int
    width: int
    height: int


class Timings(BaseModel):
    queue_wait_ms: float | None = Field(None, description="Submission to start of work.")
    load_ms: float | None = Field(None, description="Preparing the job on the worker (the model is resident).")
    sampling_ms: float | None = Field(None, description="Text encoding, denoising and decoding.")
    encode_ms: float | None = Field(None, description="PNG encoding and storing.")


class JobErrorInfo(BaseModel):
    code: str
    message: str


class JobView(BaseModel):
    id: str
    status: JobStatus
    priority: Priority = Priority.normal
    created_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    params: dict[str, Any]
    progress: Progress
    queue_position: int | None = Field(None, description="0 = next to run; null once running or finished.")
    eta_seconds: float | None = Field(None, description="Estimated seconds until done, from measured step times.")
    images: list[ImageRef]
    warnings: list[str] = []
    timings: Timings = Field(default_factory=Timings)
    error: JobErrorInfo | None


class JobList(BaseModel):
    jobs: list[JobView]
    next_cursor: str | None = Field(None, description="Pass as `cursor` for the next page; null on the last.")


class ErrorDetail(BaseModel):
    code: str
    message: str
    details: Any | None = None


class ErrorEnvelope(BaseModel):
    """Every error response has this shape."""

    error: ErrorDetail


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str
    redis: str
    workers: int


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorEnvelope, "description": text}
    for code, text in {
        400: "Malformed request",
        404: "Unknown job or image",
        409: "Job not in a state that allows this",
        410: "Job or image expired",
        413: "Request body too large",
        429: "Queue full or rate limited; see Retry-After",
        422: "Invalid parameters",
        503: "Redis or workers unavailable",
    }.items()
}
# Submissions: an API key may not have been granted priority `high` (only with API keys on).
SUBMIT_RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERROR_RESPONSES,
    403: {"model": ErrorEnvelope, "description": "API keys on: priority high not granted to this key"},
}
