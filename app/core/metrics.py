"""Job metrics that workers write to Redis and the API's /metrics reads back, so every worker's
figures reach one scrape (counters and histogram buckets as Redis hashes; no per-process state).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from redis import Redis
    from redis.client import Pipeline

PREFIX = "imagegen:metrics:"
JOBS = PREFIX + "jobs"  # hash: final status -> count
IMAGES = PREFIX + "images"  # string counter
# Seconds; covers a tiny CPU model (tens of ms) up to large GPU batches (minutes).
BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
HISTOGRAMS = {
    "queue_wait": "Seconds from submission to the start of sampling",
    "sampling": "Seconds spent denoising and decoding",
    "total": "Seconds from submission to the end of the job",
}


def _hist_key(name: str) -> str:
    return f"{PREFIX}hist:{name}"


def observe(pipe: Redis | Pipeline, name: str, seconds: float) -> None:
    """Add one observation: its bucket (cumulated when read), the sum and the count."""
    bucket = next((b for b in BUCKETS if seconds <= b), math.inf)
    key = _hist_key(name)
    pipe.hincrby(key, repr(bucket), 1)
    pipe.hincrbyfloat(key, "sum", seconds)
    pipe.hincrby(key, "count", 1)


def record_job(pipe: Pipeline, status: str, images: int, timings: dict[str, float]) -> None:
    """Count a finished job on `pipe` (the caller's pipeline or transaction, executed by the caller)."""
    pipe.hincrby(JOBS, status, 1)
    if images:
        pipe.incrby(IMAGES, images)
    for name, seconds in timings.items():
        if name in HISTOGRAMS and seconds >= 0:
            observe(pipe, name, seconds)


def read_histogram(redis: Redis, name: str) -> tuple[list[tuple[str, float]], float]:
    """Cumulative (le, count) pairs in Prometheus order, and the sum."""
    raw = {k.decode(): float(v) for k, v in (redis.hgetall(_hist_key(name)) or {}).items()}  # type: ignore[union-attr]
    cumulative = 0.0
    buckets = []
    for b in (*BUCKETS, math.inf):
        cumulative += raw.get(repr(b), 0.0)
        buckets.append(("+Inf" if b == math.inf else repr(b), cumulative))
    return buckets, raw.get("sum", 0.0)
