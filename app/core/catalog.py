"""Which models live workers serve right now.

Each worker writes its `ModelInfo` into the `MODELS_KEY` hash when it starts; an entry counts
only while some registered worker with a recent heartbeat listens on that model's queues (the
worker heartbeats from a thread even mid-job), so a killed worker drops out three missed beats
after it died, and a stopped one at once (it unregisters). `/readyz`, `/models`, routing and
the `imagegen_workers` gauge all count workers this way.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import ValidationError
from redis import Redis
from rq.utils import utcformat, utcparse
from rq.worker_registration import WORKERS_BY_QUEUE_KEY

from app.core.jobs import MODELS_KEY, QUEUE_PREFIX, ModelInfo, Priority, queue_name


def heartbeat_limit(heartbeat: float) -> float:
    """Seconds after its last heartbeat that a worker still counts as alive: three missed beats
    and some slack. Workers beat every `IMAGEGEN_WORKER_HEARTBEAT` seconds, idle or busy."""
    return heartbeat * 3 + 5


def _alive(last_heartbeat: bytes | None, now: datetime, limit: float) -> bool:
    """RQ keeps a killed worker's key for a minute and more after its last beat, and nothing
    removes it while no worker lives to clean the registry: only a recent beat counts."""
    if not last_heartbeat:
        return False
    try:
        beat = utcparse(last_heartbeat.decode())
    except ValueError:
        return False
    beat = beat if beat.tzinfo else beat.replace(tzinfo=UTC)
    return (now - beat).total_seconds() <= limit


# Counts, in one call, the workers on a queue whose last heartbeat is at or after ARGV[1]: RQ writes
# it with one fixed format (`rq.utils.utcformat`), so its text sorts as its time does.
LIVE_SCRIPT = """
local live = 0
for _, key in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local beat = redis.call('HGET', key, 'last_heartbeat')
  if beat and beat >= ARGV[1] then live = live + 1 end
end
return live
"""


def count_live(pipe: Any, queue: str, heartbeat: float) -> None:
    """Queue on `pipe` a command that answers how many workers of `queue` are alive (as `_alive`
    judges them): one round trip shared with the pipe's other commands."""
    since = datetime.now(UTC) - timedelta(seconds=heartbeat_limit(heartbeat))
    pipe.eval(LIVE_SCRIPT, 1, WORKERS_BY_QUEUE_KEY % queue, utcformat(since))


def live_on_queue(redis: Redis, queue: str, heartbeat: float) -> int:
    """Workers listening on `queue` that are alive (see `count_live`)."""
    with redis.pipeline(transaction=False) as pipe:
        count_live(pipe, queue, heartbeat)
        return int(pipe.execute()[0])


def live_workers(redis: Redis, model: str, heartbeat: float) -> int:
    """Workers of `model` whose last heartbeat is recent (see `heartbeat_limit`)."""
    return served_models(redis, heartbeat, only=model).get(model, (None, 0))[1]


def served_models(redis: Redis, heartbeat: float, only: str | None = None) -> dict[str, tuple[ModelInfo, int]]:
    """Model name -> (its published info, live workers), for models with at least one live worker
    (all published models, or `only` that one)."""
    raw: dict[Any, Any] = redis.hgetall(MODELS_KEY)  # type: ignore[assignment]
    infos: dict[str, ModelInfo] = {}
    for name, data in raw.items():
        try:
            infos[name.decode()] = ModelInfo.model_validate_json(data)
        except ValidationError:  # written by an incompatible worker version: not servable here
            continue
    names = sorted(infos) if only is None else [only] if only in infos else []
    with redis.pipeline(transaction=False) as pipe:
        for name in names:  # every worker of a model listens on all its priorities; normal suffices
            pipe.smembers(WORKERS_BY_QUEUE_KEY % queue_name(name, Priority.normal))
        members: list[set[bytes]] = pipe.execute()
    registered = [(name, key) for name, keys in zip(names, members, strict=True) for key in keys]
    with redis.pipeline(transaction=False) as pipe:
        for _, key in registered:
            pipe.hget(key, "last_heartbeat")
        beats = pipe.execute()
    now, limit = datetime.now(UTC), heartbeat_limit(heartbeat)
    live = Counter(name for (name, _), beat in zip(registered, beats, strict=True) if _alive(beat, now, limit))
    return {name: (infos[name], live[name]) for name in names if live[name]}


def model_of_queue(queue: str | None) -> str | None:
    """The model whose queue this is (`imagegen:<model>:<priority>`), or None for another queue."""
    if not queue or not queue.startswith(QUEUE_PREFIX):
        return None
    return queue[len(QUEUE_PREFIX) :].rpartition(":")[0] or None
