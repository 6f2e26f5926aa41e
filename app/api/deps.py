"""FastAPI dependencies: the per-process objects that `create_app`'s lifespan puts on `app.state`.

They are `async def` because they do no I/O: FastAPI would run a plain `def` dependency in a
worker thread, one thread hop per dependency per request.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from redis import Redis
from rq import Queue

from app.api.services import JobService
from app.core.auth import ANONYMOUS, Principal, authenticate, charge, is_limited, refund
from app.core.config import Settings
from app.core.storage import ImageStore


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_redis(request: Request) -> Redis:
    return request.app.state.redis


async def get_queue(request: Request) -> Queue:
    return request.app.state.queue


async def get_store(request: Request) -> ImageStore:
    return request.app.state.store


async def get_jobs(request: Request) -> JobService:
    return request.app.state.jobs


async def get_principal(request: Request) -> Principal:
    """The caller's API key (when keys are required), charged one request against its rate limit."""
    settings: Settings = request.app.state.settings
    if not settings.auth_enabled:
        return ANONYMOUS  # no Redis to ask, so no hop to a worker thread
    return await run_in_threadpool(check_key, request.headers.get("authorization"), settings, request.app.state.redis)


def check_key(authorization: str | None, settings: Settings, redis: Redis) -> Principal:
    principal = authenticate(authorization, settings, redis)
    charge(redis, principal, "requests", 1, settings.rate_limit_requests)
    return principal


def images_charged(
    redis: Redis, principal: Principal, amount: int, settings: Settings
) -> contextlib.AbstractAsyncContextManager[None]:
    """Around a job's submission: charge its images against the key's per-minute limit (429 past
    it), and give them back if the submission is refused after all (a full queue, no worker).
    With nothing to count, a bare `nullcontext` (no Redis to ask; the common POST's fast path)."""
    limit = settings.rate_limit_images
    if not is_limited(principal, limit):
        return contextlib.nullcontext()
    return _charged(redis, principal, amount, limit)


@contextlib.asynccontextmanager
async def _charged(redis: Redis, principal: Principal, amount: int, limit: int) -> AsyncIterator[None]:
    window = await run_in_threadpool(charge, redis, principal, "images", amount, limit)
    try:
        yield
    except Exception:
        if window is not None:
            await run_in_threadpool(refund, redis, window, amount)
        raise


SettingsDep = Annotated[Settings, Depends(get_settings)]
PrincipalDep = Annotated[Principal, Depends(get_principal)]
RedisDep = Annotated[Redis, Depends(get_redis)]
QueueDep = Annotated[Queue, Depends(get_queue)]
StoreDep = Annotated[ImageStore, Depends(get_store)]
JobsDep = Annotated[JobService, Depends(get_jobs)]
