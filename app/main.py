"""`create_app()` builds the FastAPI application; `uvicorn app.main:app` serves it.

Settings are read and Redis is connected when the app is created / started, never at import.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from redis import Redis
from redis.exceptions import RedisError

from app import __version__
from app.api import errors
from app.api import openapi as openapi_doc
from app.api.deps import get_principal
from app.api.metrics import Metrics, RequestCounter
from app.api.metrics import router as metrics_route_router
from app.api.middleware import RequestGuard
from app.api.routes import generate, health, jobs, models, openai, openai_variations, variations, web
from app.api.services import JobService
from app.api.uploads import UploadAwareBodySizeLimit
from app.core import logs
from app.core.auth import KEYS_HASH, ImageLinks
from app.core.config import Settings, load_settings
from app.core.process import tune_gc
from app.core.queue import connect, connect_async
from app.core.storage import make_store
from app.core.webhooks import WebhookSender

log = logging.getLogger(__name__)
WEBHOOK_DRAIN = 5.0  # seconds a stopping API gives its pending webhook deliveries
DESCRIPTION = """Text-to-image over HTTP: a CLIP text encoder conditions a diffusion model that
denoises random noise into an image. Submit with `POST /generate`, poll `GET /jobs/{id}`, then
download `GET /jobs/{id}/images/{index}`."""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or load_settings("api")
    logs.configure(settings.log_level, settings.log_format, "api")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        redis = connect(settings.redis_url)
        aredis = connect_async(settings.redis_url)
        watch = connect_async(settings.redis_url, max_connections=settings.max_streams)
        app.state.settings = settings
        app.state.redis = redis
        app.state.store = make_store(settings, redis)
        app.state.jobs = JobService(settings, redis, aredis, watch)
        app.state.queue = app.state.jobs.queues[1]
        app.state.links = ImageLinks(redis, settings.result_ttl) if settings.auth_enabled else None
        # The webhooks of jobs canceled before they started (the API announces those): on threads
        # of their own, so a slow receiver holds up no request (see app.api.routes.jobs).
        app.state.webhooks = WebhookSender(settings, threads=2, connection=redis) if settings.webhook_secret else None
        _warn_unchecked_keys(settings, redis)
        tune_gc()
        try:
            yield
        finally:
            if app.state.webhooks is not None:  # what is due within a few seconds still goes out
                await asyncio.to_thread(app.state.webhooks.close, WEBHOOK_DRAIN)
            redis.close()
            await aredis.aclose()
            await watch.aclose()

    app = FastAPI(title="imagegen", version=__version__, description=DESCRIPTION, lifespan=lifespan)
    errors.install(app)
    authenticated = [Depends(get_principal)]  # every route but health, docs and the static page
    app.include_router(generate.router)  # checks the key itself, first (a DirectRoute solves no dependencies)
    app.include_router(jobs.router, dependencies=authenticated)
    app.include_router(jobs.images)  # a signed link or an API key, checked by the route itself
    app.include_router(health.router)
    app.include_router(models.router, dependencies=authenticated)
    app.include_router(variations.router, dependencies=authenticated)
    # Before the OpenAI router: its catch-all answers every other /v1 path.
    app.include_router(openai_variations.router, dependencies=authenticated)
    app.include_router(openai.router, dependencies=authenticated)
    app.include_router(web.router)
    app.add_middleware(UploadAwareBodySizeLimit, max_bytes=settings.max_body_bytes)  # image routes allow more
    # CORS outside the body limit: a page allowed to call us reads its 413 (else an opaque failure).
    if _csv(settings.cors_origins):
        app.add_middleware(
            CORSMiddleware,
            allow_origins=_csv(settings.cors_origins),
            allow_methods=["GET", "POST", "DELETE"],
            # OpenAI's JS SDK sends its x-stainless-* headers with every request from a page too.
            allow_headers=[
                *("Authorization", "Content-Type", "Idempotency-Key", "Last-Event-ID", "Prefer"),
                *openai.SDK_HEADERS,
            ],
            # What a browser page may read of our answers besides the body (x-should-retry: that
            # SDK obeys it only if it can read it, else it retries a 504 and queues the job again).
            expose_headers=[
                *("Location", "Content-Location", "Preference-Applied", "Retry-After", "X-Imagegen-Job-Id"),
                *openai.NO_RETRY,
            ],
        )
    app.add_middleware(
        RequestGuard,
        cors_origins=_csv(settings.cors_origins),
        public_url=settings.public_url,
        allowed_hosts=_csv(settings.allowed_hosts),
    )
    app.state.metrics = Metrics(app)
    app.include_router(metrics_route_router)
    app.add_middleware(RequestCounter, metrics=app.state.metrics, fastapi_app=app)
    openapi_doc.install(app, settings)  # the server's own size bounds, and its keys when they are on
    return app


def __getattr__(name: str) -> FastAPI:
    # `uvicorn app.main:app` looks the attribute up; building it lazily keeps imports side-effect free.
    if name == "app":
        application = create_app()
        globals()["app"] = application
        return application
    raise AttributeError(name)


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _warn_unchecked_keys(settings: Settings, redis: Redis) -> None:
    """Keys stored with `python -m app.keys` protect nothing while auth is off: say so at start."""
    if settings.auth_enabled:
        return
    try:
        stored = int(redis.hlen(KEYS_HASH))  # type: ignore[arg-type]
    except RedisError:
        return  # /readyz reports Redis
    if stored:
        log.warning(
            "%d API key(s) are stored in Redis but IMAGEGEN_AUTH is off: requests are accepted without a key",
            stored,
        )
