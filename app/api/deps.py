"""FastAPI dependencies: the per-process objects that `create_app`'s lifespan puts on `app.state`."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from redis import Redis
from rq import Queue

from app.api.services import JobService
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


SettingsDep = Annotated[Settings, Depends(get_settings)]
RedisDep = Annotated[Redis, Depends(get_redis)]
QueueDep = Annotated[Queue, Depends(get_queue)]
StoreDep = Annotated[ImageStore, Depends(get_store)]
JobsDep = Annotated[JobService, Depends(get_jobs)]
