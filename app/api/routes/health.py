"""GET /healthz (the process is up) and GET /readyz (Redis reachable and a live worker)."""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi import APIRouter
from redis.exceptions import RedisError
from rq import Worker

from app.api.deps import QueueDep, RedisDep, SettingsDep
from app.api.schemas import ErrorEnvelope, Health, Readiness
from app.core.errors import UnavailableError

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="Liveness")
def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": ErrorEnvelope, "description": "Not ready; the message says why"}},
    summary="Readiness: Redis reachable and at least one live worker",
)
def readyz(redis: RedisDep, queue: QueueDep, settings: SettingsDep) -> Readiness:
    try:
        redis.ping()
        workers = Worker.all(connection=redis, queue=queue)
    except RedisError as exc:
        raise UnavailableError(f"redis unreachable: {type(exc).__name__}") from None
    # A worker killed with -9 stays registered until its key expires; trust only recent heartbeats.
    limit = settings.worker_heartbeat * 4 + 15
    now = datetime.now(UTC)
    live = [w for w in workers if w.last_heartbeat and (now - _aware(w.last_heartbeat)).total_seconds() <= limit]
    if not live:
        raise UnavailableError("no live worker is serving the queue")
    return Readiness(status="ready", redis="ok", workers=len(live))


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)
