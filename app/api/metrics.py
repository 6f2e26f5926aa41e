"""GET /metrics: Prometheus text from this API process (requests by route and code) plus what every
worker recorded in Redis (jobs by final status, images, latency histograms) and live gauges (queue
depth per priority, workers)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from redis.exceptions import RedisError
from starlette.routing import Match

from app.core import metrics as store
from app.core.catalog import served_models
from app.core.jobs import MODELS_KEY

router = APIRouter(tags=["health"])


class RedisCollector:
    """Reads the shared job metrics and live queue state at scrape time."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def collect(self) -> Iterator[Any]:
        state = self.app.state
        redis = state.redis
        try:
            jobs = CounterMetricFamily("imagegen_jobs", "Jobs by final status", labels=["status"])
            for status, count in sorted((redis.hgetall(store.JOBS) or {}).items()):
                jobs.add_metric([status.decode()], float(count))
            yield jobs
            failures = CounterMetricFamily("imagegen_job_failures", "Failed jobs by error code", labels=["code"])
            for code, count in sorted((redis.hgetall(store.FAILURES) or {}).items()):
                failures.add_metric([code.decode()], float(count))
            yield failures
            yield CounterMetricFamily("imagegen_images", "Images generated", value=float(redis.get(store.IMAGES) or 0))
            for name, doc in store.HISTOGRAMS.items():
                buckets, total = store.read_histogram(redis, name)
                yield HistogramMetricFamily(f"imagegen_job_{name}_seconds", doc, buckets=buckets, sum_value=total)
            buckets, total = store.read_histogram(redis, store.BATCH_JOBS, store.BATCH_BUCKETS)
            doc = "Jobs denoised together per step of a batching worker (IMAGEGEN_MAX_BATCH > 1)"
            yield HistogramMetricFamily("imagegen_batch_jobs", doc, buckets=buckets, sum_value=total)
            # Every model a worker has announced (its queues outlive its workers), this API's own first.
            settings = state.settings
            published = sorted(name.decode() for name in redis.hkeys(MODELS_KEY))  # type: ignore[union-attr]
            models = [settings.model, *(m for m in published if m != settings.model)]
            doc = "Jobs waiting, per model and priority"
            depth = GaugeMetricFamily("imagegen_queue_depth", doc, labels=["model", "priority"])
            doc = "Jobs being sampled (their heartbeat alive), per model and priority"
            running = GaugeMetricFamily("imagegen_jobs_running", doc, labels=["model", "priority"])
            now = time.time()
            queues = [(model, queue) for model in models for queue in state.jobs.model_queues(model)]
            with redis.pipeline(transaction=False) as pipe:  # one round trip, however many models
                for _, queue in queues:
                    pipe.llen(queue.key)
                    # RQ scores each execution by when its heartbeat expires.
                    pipe.zcount(queue.started_job_registry.key, now, "+inf")
                counts = pipe.execute()
            for i, (model, queue) in enumerate(queues):
                priority = queue.name.rsplit(":", 1)[1]
                depth.add_metric([model, priority], float(counts[2 * i]))
                running.add_metric([model, priority], float(counts[2 * i + 1]))
            yield depth
            yield running
            served = served_models(redis, settings.worker_heartbeat)
            workers = GaugeMetricFamily("imagegen_workers", "Live workers, per model", labels=["model"])
            for model in models:
                workers.add_metric([model], float(served.get(model, (None, 0))[1]))
            yield workers
            up = 1.0
        except RedisError:
            up = 0.0
        yield GaugeMetricFamily("imagegen_redis_up", "1 when Redis answered this scrape", value=up)


class Metrics:
    """This process's own registry (not the global default, so tests can build many apps)."""

    def __init__(self, app: Any) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "imagegen_http_requests",
            "HTTP requests by route template, method and status code",
            ["route", "method", "code"],
            registry=self.registry,
        )
        self.registry.register(RedisCollector(app))


def route_template(scope: dict[str, Any], app: Any) -> str:
    """The matched route's path template (bounded label values), never the raw path."""
    route = scope.get("route")  # set by the router on the scope it was given
    if route is None:
        for candidate in app.router.routes:
            if candidate.matches(scope)[0] is Match.FULL:
                route = candidate
                break
    return str(getattr(route, "path_format", None) or getattr(route, "path", None) or "unmatched")


# Methods counted by name; any other is `other`: a client may send any token as a method, and each
# one would be a new series (httptools refuses most, h11 takes them all).
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class RequestCounter:
    """Pure-ASGI middleware counting responses by route template and code."""

    def __init__(self, app: Any, metrics: Metrics, fastapi_app: Any) -> None:
        self.app = app
        self.metrics = metrics
        self.fastapi_app = fastapi_app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        code = 500

        async def capture(message: dict[str, Any]) -> None:
            nonlocal code
            if message["type"] == "http.response.start":
                code = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            route = route_template(scope, self.fastapi_app)
            method = scope["method"] if scope["method"] in METHODS else "other"
            self.metrics.requests.labels(route, method, str(code)).inc()


@router.get("/metrics", response_class=Response, summary="Prometheus metrics")
def metrics(request: Request) -> Response:
    body = generate_latest(request.app.state.metrics.registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
