"""Deletes local PNGs whose job has expired from Redis (Redis-stored images expire by TTL)."""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from rq.job import Job

from app.core.jobs import parse_job_id
from app.core.storage import LocalImageStore

if TYPE_CHECKING:
    from redis import Redis

log = logging.getLogger(__name__)
MIN_AGE = 1.0  # seconds: leave folders alone for a moment after their last write


def sweep(store: LocalImageStore, connection: Redis) -> int:
    """One pass; returns how many jobs' images were removed."""
    removed = 0
    if not store.root.is_dir():
        return 0
    now = time.time()
    for folder in store.root.iterdir():
        job_id = parse_job_id(folder.name)
        if job_id is None or job_id != folder.name or now - folder.stat().st_mtime < MIN_AGE:
            continue
        if not connection.exists(Job.key_for(job_id)):
            store.delete(job_id)
            removed += 1
    return removed


def start_sweeper(store: LocalImageStore, connection: Redis, interval: float) -> threading.Thread:
    def loop() -> None:
        while True:
            time.sleep(interval)
            try:
                if n := sweep(store, connection):
                    log.info("removed the images of %d expired job(s)", n)
            except Exception:
                log.warning("sweep failed", exc_info=True)

    thread = threading.Thread(target=loop, name="sweeper", daemon=True)
    thread.start()
    return thread
