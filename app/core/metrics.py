"""Job metrics that workers write to Redis and the API's /metrics reads back, so every worker's
figures reach one scrape (counters and histogram buckets as Redis hashes; no per-process state).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from redis import Redis
    from redis.client import Pipeline

PREFIX = "imagegen:metrics:"
JOBS = PREFIX + "jobs"  # hash: final status -> count
FAILURES = PREFIX + "failures"  # hash: error code of a failed job -> count
IMAGES = PREFIX + "images"  # string counter
# Seconds; covers a tiny CPU model (tens of ms) up to large GPU batches (minutes).
BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
HISTOGRAMS = {
    "queue_wait": "Seconds from submission to the start of sampling",
    "sampling": "Seconds spent denoising and decoding",
    "total": "Seconds from submission to the end of the job",
}
# Jobs denoised together in one step of a batching worker (`IMAGEGEN_MAX_BATCH` > 1): how full its
# batches run, e.g. to choose `IMAGEGEN_MAX_BATCH` or the number of workers.
BATCH_JOBS = "batch_jobs"
BATCH_BUCKETS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0)


def _hist_key(name: str) -> str:
    return f"{PREFIX}hist:{name}"


def observe(pipe: Redis | Pipeline, name: str, seconds: float) -> None:
    """Add one observation: its bucket (cumulated when read), the sum and the count."""
    observe_counts(pipe, name, {seconds: 1})


def observe_counts(
    pipe: Redis | Pipeline,
    name: str,
    counts: Mapping[float, int] | Mapping[int, int],
    buckets: tuple[float, ...] = BUCKETS,
) -> None:
    """Add `n` observations of each `value` in `counts` (a caller's tally, written at once)."""
    per_bucket: dict[float, int] = {}
    for value, n in counts.items():
        bucket = next((b for b in buckets if value <= b), math.inf)
        per_bucket[bucket] = per_bucket.get(bucket, 0) + n
    key = _hist_key(name)
    for bucket, n in per_bucket.items():
        pipe.hincrby(key, repr(bucket), n)
    pipe.hincrbyfloat(key, "sum", sum(value * n for value, n in counts.items()))
    pipe.hincrby(key, "count", sum(counts.values()))


def record_job(
    pipe: Pipeline, status: str, images: int, timings: dict[str, float], error_code: str | None = None
) -> None:
    """Count a finished job on `pipe` (the caller's pipeline or transaction, executed by the caller);
    a failed one also by its error code (one of `ErrorCode`'s, a label with few values)."""
    pipe.hincrby(JOBS, status, 1)
    if status == "failed" and error_code:
        pipe.hincrby(FAILURES, error_code, 1)
    if images:
        pipe.incrby(IMAGES, images)
    for name, seconds in timings.items():
        if name in HISTOGRAMS and seconds >= 0:
            observe(pipe, name, seconds)


def read_histogram(
    redis: Redis, name: str, bounds: tuple[float, ...] = BUCKETS
) -> tuple[list[tuple[str, float]], float]:
    """Cumulative (le, count) pairs in Prometheus order, and the sum."""
    raw = {k.decode(): float(v) for k, v in (redis.hgetall(_hist_key(name)) or {}).items()}  # type: ignore[union-attr]
    cumulative = 0.0
    buckets = []
    for b in (*bounds, math.inf):
        cumulative += raw.get(repr(b), 0.0)
        buckets.append(("+Inf" if b == math.inf else repr(b), cumulative))
    return buckets, raw.get("sum", 0.0)
