"""FastAPI dependencies: the per-process objects that `create_app`'s lifespan puts on `app.state`."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from redis import Redis
from rq import Queue

from app.api.services import JobService
from app.core.auth import Principal, authenticate, charge
from app.core.config import Settings
from app.core.storage import ImageStore


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_redis(request: Request) -> Redis:
    return request.app.state.redis


def get_queue(request: Request) -> Queue:
    return request.app.state.queue


def get_store(request: Request) -> ImageStore:
    return request.app.state.store


def get_jobs(request: Request) -> JobService:
    return request.app.state.jobs


def get_principal(request: Request) -> Principal:
    """The caller's API key (when keys are required), charged one request against its rate limit."""
    settings: Settings = request.app.state.settings
    principal = authenticate(request.headers.get("authorization"), settings, request.app.state.redis)
    charge(request.app.state.redis, principal, "requests", 1, settings.rate_limit_requests)
    return principal


SettingsDep = Annotated[Settings, Depends(get_settings)]
PrincipalDep = Annotated[Principal, Depends(get_principal)]
RedisDep = Annotated[Redis, Depends(get_redis)]
QueueDep = Annotated[Queue, Depends(get_queue)]
StoreDep = Annotated[ImageStore, Depends(get_store)]
JobsDep = Annotated[JobService, Depends(get_jobs)]
