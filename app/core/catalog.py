"""Which models live workers serve right now.

Each worker writes its `ModelInfo` into the `MODELS_KEY` hash when it starts; an entry counts
only while some registered worker whose RQ key is still alive listens on that model's queues.
RQ lets a worker's key expire a few missed heartbeats after the worker dies (the worker
heartbeats from a thread even mid-job), so a killed worker drops out by itself, and a
stopped one at once (it unregisters).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from pydantic import ValidationError
from redis import Redis
from rq.worker_registration import WORKERS_BY_QUEUE_KEY

from app.core.jobs import MODELS_KEY, QUEUE_PREFIX, ModelInfo, Priority, queue_name


def served_models(redis: Redis) -> dict[str, tuple[ModelInfo, int]]:
    """Model name -> (its published info, live workers), for models with at least one live worker."""
    raw: dict[Any, Any] = redis.hgetall(MODELS_KEY)  # type: ignore[assignment]
    infos: dict[str, ModelInfo] = {}
    for name, data in raw.items():
        try:
            infos[name.decode()] = ModelInfo.model_validate_json(data)
        except ValidationError:  # written by an incompatible worker version: not servable here
            continue
    names = sorted(infos)
    with redis.pipeline(transaction=False) as pipe:
        for name in names:  # every worker of a model listens on all its priorities; normal suffices
            pipe.smembers(WORKERS_BY_QUEUE_KEY % queue_name(name, Priority.normal))
        members: list[set[bytes]] = pipe.execute()
    registered = [(name, key) for name, keys in zip(names, members, strict=True) for key in keys]
    with redis.pipeline(transaction=False) as pipe:
        for _, key in registered:
            pipe.exists(key)
        alive = pipe.execute()
    live = Counter(name for (name, _), ok in zip(registered, alive, strict=True) if ok)
    return {name: (infos[name], live[name]) for name in names if live[name]}


def model_of_queue(queue: str | None) -> str | None:
    """The model whose queue this is (`imagegen:<model>:<priority>`), or None for another queue."""
    if not queue or not queue.startswith(QUEUE_PREFIX):
        return None
    return queue[len(QUEUE_PREFIX) :].rpartition(":")[0] or None
