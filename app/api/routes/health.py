"""GET /healthz (the process is up) and GET /readyz (Redis reachable and a live worker)."""

from __future__ import annotations

from fastapi import APIRouter
from redis.exceptions import RedisError

from app.api.deps import RedisDep, SettingsDep
from app.api.schemas import ErrorEnvelope, Health, Readiness
from app.core.catalog import live_workers
from app.core.errors import UnavailableError

router = APIRouter(tags=["health"])


@router.api_route("/healthz", methods=["HEAD"], include_in_schema=False)
@router.get("/healthz", response_model=Health, summary="Liveness")
async def healthz() -> Health:
    return Health(status="ok")


@router.api_route("/readyz", methods=["HEAD"], include_in_schema=False)
@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": ErrorEnvelope, "description": "Not ready; the message says why"}},
    summary="Readiness: Redis reachable and at least one live worker",
)
def readyz(redis: RedisDep, settings: SettingsDep) -> Readiness:
    try:
        redis.ping()
        # A worker killed with -9 stays registered until its key expires; only recent beats count.
        live = live_workers(redis, settings.model, settings.worker_heartbeat)
    except RedisError as exc:
        raise UnavailableError(f"redis unreachable: {type(exc).__name__}") from None
    if not live:
        raise UnavailableError("no live worker is serving the queue")
    return Readiness(status="ready", redis="ok", workers=live)
