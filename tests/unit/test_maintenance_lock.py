"""The lock a worker takes for a queue's registry maintenance (a real redis-server)."""

from __future__ import annotations

import time

from rq import Queue
from rq.serializers import JSONSerializer

from worker.worker import ImagegenWorker


def test_a_maintenance_lock_never_released_expires_within_a_minute(redis_db, monkeypatch) -> None:
    """A worker killed between taking the lock and releasing it, or a Redis that went down before
    the release (the lock came back from the append-only file), left RQ's 899 s lock: no worker
    recovered that queue's abandoned jobs for up to 15 minutes (a chaos run left a job `running`
    through its 4-minute drain). A pass takes milliseconds; the lock now lasts a minute at most."""
    queue = Queue("imagegen:fake:normal", connection=redis_db, serializer=JSONSerializer)
    worker = ImagegenWorker([queue], connection=redis_db, serializer=JSONSerializer)
    monkeypatch.setattr(Queue, "release_maintenance_lock", lambda self: None)  # gone before releasing it
    worker.clean_registries()
    assert 0 < redis_db.ttl(queue.registry_cleaning_key) <= 60
    # Meanwhile no other pass runs (the lock still excludes a second cleaner).
    other = ImagegenWorker([queue], connection=redis_db, serializer=JSONSerializer)
    before = time.monotonic()
    other.clean_registries()
    assert time.monotonic() - before < 5 and redis_db.exists(queue.registry_cleaning_key)
