"""Settings for every process, read from `IMAGEGEN_*` environment variables at start-up only.

Nothing here reads the environment at import time; call `Settings()` (or `get_settings()`) in
`create_app()` or the worker's `main()`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL = "tiny-shapes"


class Settings(BaseSettings):
    """Every knob of the service; each one is documented in the README with its default."""

    # An empty variable counts as unset (its default applies): compose passes `IMAGEGEN_X=` from a
    # template `.env` as an empty string, which would not parse as a number or a flag.
    model_config = SettingsConfigDict(env_prefix="IMAGEGEN_", extra="ignore", frozen=True, env_ignore_empty=True)

    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis URL (redis://, rediss://, unix://).")
    model: str = Field(DEFAULT_MODEL, description="Registry name, pipeline folder or hub id the worker serves.")
    device: Literal["cpu", "cuda"] = "cpu"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    channels_last: bool = Field(False, description="UNet and VAE in channels-last layout (faster convs on GPUs).")
    compile: bool = Field(False, description="torch.compile the UNet at start-up (slower start, faster steps on GPUs).")
    storage: Literal["local", "redis"] = "local"
    results_dir: Path = Path(".data/results")
    result_ttl: int = Field(3600, ge=1, description="Seconds that finished jobs and their images are kept.")
    failure_ttl: int = Field(86400, ge=1, description="Seconds that failed jobs are kept.")
    job_timeout: int = Field(600, ge=1, description="Seconds a job may run before it fails with `timeout`.")
    max_width: int = Field(1024, ge=8)
    max_height: int = Field(1024, ge=8)
    min_size: int = Field(8, ge=8)
    max_body_bytes: int = Field(65536, ge=1024, description="Larger request bodies get 413.")
    worker_heartbeat: float = Field(5.0, gt=0, description="Seconds between worker heartbeats.")
    threads: int = Field(0, ge=0, description="torch CPU threads in the worker; 0 keeps torch's default.")
    pin_threads: bool = Field(
        False,
        description="Bind the worker's torch threads to CPU cores, one each (OpenMP's OMP_PROC_BIND / OMP_PLACES): "
        "for one CPU worker per machine (or per cpuset); several on one machine would share the first cores.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "text"] = Field("json", description="One JSON object per line, or plain text.")
    webhook_secret: str = Field("", description="HMAC-SHA256 key for webhook signatures; empty disables webhooks.")
    webhook_allow_private: bool = Field(False, description="Allow webhooks to loopback/private/link-local hosts.")
    webhook_max_attempts: int = Field(6, ge=1, le=20, description="Deliveries tried per event before giving up.")
    sweep_interval: float = Field(60.0, gt=0, description="Seconds between sweeps of expired local images.")
    max_retries: int = Field(2, ge=0, le=10, description="Re-runs of a job whose worker died mid-job.")
    maintenance_interval: int = Field(15, ge=1, description="Seconds between a worker's registry clean-ups.")
    shutdown_grace: float = Field(
        30.0, ge=0, description="Seconds a stopping worker gives its job before requeueing it."
    )
    openai_timeout: float = Field(
        120.0, gt=0, description="Seconds the /v1/images routes wait for their job before answering 504."
    )
    auth: bool = Field(False, description="Require API keys (on by itself when IMAGEGEN_API_KEYS is set).")
    api_keys: str = Field("", description="Comma-separated API keys; more can be stored hashed in Redis.")
    rate_limit_requests: int = Field(0, ge=0, description="Requests per minute per API key (0: unlimited).")
    rate_limit_images: int = Field(0, ge=0, description="Images per minute per API key (0: unlimited).")
    cors_origins: str = Field("", description="Comma-separated origins allowed by CORS; empty: CORS off.")
    allowed_hosts: str = Field(
        "",
        description="Comma-separated host names the API answers to (`*.example.com` for subdomains); empty: any. "
        "Guards a keyless server against DNS rebinding.",
    )
    public_url: str = Field(
        "",
        description="The URL clients reach the API at (scheme, host, any path prefix), for image links; empty: "
        "each request's own scheme and host.",
    )
    max_batch: int = Field(
        1, ge=1, le=64, description="Images a worker denoises together (step-level batching); 1 runs one job at a time."
    )
    max_queue: int = Field(1000, ge=1, description="Waiting jobs per model before POST /generate answers 429.")
    max_queued_per_key: int = Field(
        100,
        ge=0,
        le=10000,
        description="Jobs one API key may have waiting at once, all models together, before its submissions get "
        "429 (0: no bound; a stored key's own `max_queued` overrides it). Only with API keys on.",
    )
    max_streams: int = Field(
        256,
        ge=1,
        description="Event streams and long-polls one API process follows with blocking Redis reads (one "
        "connection each); past it, they poll every half second on the shared connections instead.",
    )
    batch_invariant: bool | None = Field(
        None,
        description="With max_batch > 1 on the CPU: same PNG alone or batched (kernels checked at start; a little "
        "slower). Default: on. Never with CUDA, where the switches cannot give it (see `invariant_batches`).",
    )

    @property
    def event_ttl(self) -> int:
        """Seconds a job's event streams (and cancel flag) are kept: as long as the job itself."""
        return max(self.result_ttl, self.failure_ttl)

    @property
    def invariant_batches(self) -> bool:
        """Whether the batching worker keeps batch invariance: on the CPU unless turned off, never
        with CUDA (the worker warns that `IMAGEGEN_BATCH_INVARIANT=true` is ignored there). On a GPU,
        cuBLAS and cuDNN pick kernels by batch size, which the CPU switches do not cover; they would
        only cost time (a device-to-host copy per per-row layer and UNet call, images finishing
        together decoded one at a time)."""
        return self.device == "cpu" and self.batch_invariant is not False

    @property
    def auth_enabled(self) -> bool:
        return self.auth or bool(self.api_keys.strip())

    @property
    def api_key_list(self) -> list[str]:
        return [k.strip() for k in self.api_keys.split(",") if k.strip()]

    @model_validator(mode="after")
    def _check(self) -> Settings:
        for name in ("max_width", "max_height", "min_size"):
            if getattr(self, name) % 8:
                raise ValueError(f"IMAGEGEN_{name.upper()} must be a multiple of 8")
        if self.min_size > min(self.max_width, self.max_height):
            raise ValueError("IMAGEGEN_MIN_SIZE must not exceed IMAGEGEN_MAX_WIDTH/IMAGEGEN_MAX_HEIGHT")
        if self.public_url and not self.public_url.startswith(("http://", "https://")):
            raise ValueError("IMAGEGEN_PUBLIC_URL must start with http:// or https://")
        if not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("IMAGEGEN_REDIS_URL must start with redis://, rediss:// or unix://")
        from redis.connection import parse_url

        try:
            parse_url(self.redis_url)
        except ValueError as exc:  # a port or database that is not a number, say (the URL is not shown)
            raise ValueError(f"IMAGEGEN_REDIS_URL is not a valid Redis URL ({type(exc).__name__})") from None
        if any(len(k) < 16 for k in self.api_key_list):
            raise ValueError("IMAGEGEN_API_KEYS: every key must be at least 16 characters")
        if self.dtype != "float32" and self.device == "cpu":
            raise ValueError("IMAGEGEN_DTYPE=float16/bfloat16 needs IMAGEGEN_DEVICE=cuda")
        return self


def settings_problems(exc: ValidationError) -> list[str]:
    """One line per problem, naming the variable; never the values, which may hold secrets
    (pydantic's own message quotes every setting read, the Redis password and API keys among them)."""
    lines = []
    for err in exc.errors(include_input=False, include_url=False):
        msg = str(err["msg"]).removeprefix("Value error, ")
        where = "IMAGEGEN_" + str(err["loc"][0]).upper() if err["loc"] else ""
        lines.append(f"{where}: {msg}" if where else msg)
    return lines


def load_settings(process: str) -> Settings:
    """The settings from the environment; nonsense stops the process with the problems listed
    (exit code 2), never a traceback or a value."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = "\n".join(f"  {line}" for line in settings_problems(exc))
        print(f"imagegen {process}: bad settings:\n{problems}", file=sys.stderr)
        raise SystemExit(2) from None
