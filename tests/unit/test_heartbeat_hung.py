"""A worker hung in C code (a CUDA hang, a write to a dead NFS server) past its job's timeout stops
heartbeating that job, so that abandoned-job recovery takes it back; RQ's timeout (a signal) cannot
interrupt it, and the heartbeat thread used to keep the job running, and the worker live, forever."""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Any

import pytest
from rq.registry import StartedJobRegistry

import worker.worker as worker_module
from app.core.jobs import TASK_GENERATE
from tests.unit.test_batching import env as batching_env  # noqa: F401  (a fixture)
from tests.unit.test_logging_jobs import JsonLines
from tests.unit.test_worker import env as worker_env  # noqa: F401  (a fixture)


class Hang:
    """Blocks the calling (main) thread as a C call would: signals (RQ's SIGALRM timeout) wait."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        if self.entered.is_set():
            return
        self.entered.set()
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        try:
            self.release.wait(20)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGALRM})


def _work_watched(worker: Any, watch: Any, stop: Any) -> JsonLines:
    """`worker.work(burst=True)` with `watch` running on a thread of its own until `stop()`; the
    log lines it wrote, as JSON."""
    handler = JsonLines()
    logging.getLogger().addHandler(handler)
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        worker.work(burst=True)
    finally:
        stop()
        watcher.join()
        logging.getLogger().removeHandler(handler)
    return handler


def _run_hung(worker: Any, queue: Any, hang: Hang, monkeypatch: pytest.MonkeyPatch) -> tuple[bool, list[dict]]:
    """Run one job (timeout 1 s) whose step hangs; True if its started-registry entry expired
    (what abandoned-job recovery acts on) while it hung."""
    monkeypatch.setattr(worker_module, "HUNG_GRACE", 0.5, raising=False)
    monkeypatch.setattr(worker, "get_heartbeat_ttl", lambda job, working_time=0.0: 2)  # RQ scores whole seconds
    job = queue.enqueue(TASK_GENERATE, kwargs={"params": {"prompt": "hang", "num_inference_steps": 3}}, job_timeout=1)
    registry = StartedJobRegistry(queue=queue)
    expired: list[bool] = []

    def watch() -> None:
        hang.entered.wait(10)
        deadline = time.monotonic() + 10  # timeout 1 s + grace 0.5 s + heartbeat TTL 2 s, with room
        while time.monotonic() < deadline and not expired:
            if job.id in registry.get_expired_job_ids():
                expired.append(True)
            time.sleep(0.1)
        hang.release.set()

    handler = _work_watched(worker, watch, hang.release.set)
    stopped = [line for line in handler.lines if "heartbeats stop" in line["msg"]]
    assert all(line.get("job_id") == job.id for line in stopped)
    return bool(expired), stopped


def test_a_job_hung_past_its_timeout_stops_heartbeating(worker_env, monkeypatch) -> None:  # noqa: F811
    runtime, store, queue, worker = worker_env
    hang = Hang()
    generate = runtime.generate

    def hung_generate(params: Any, on_step: Any) -> Any:
        def step(i: int, total: int) -> None:
            hang()
            on_step(i, total)

        return generate(params, step)

    runtime.generate = hung_generate
    expired, stopped = _run_hung(worker, queue, hang, monkeypatch)
    assert expired, "the hung job kept its heartbeats: recovery never takes it back"
    assert len(stopped) == 1 and stopped[0]["level"] == "ERROR"


def test_a_batched_job_hung_past_its_timeout_stops_heartbeating(batching_env, monkeypatch) -> None:  # noqa: F811
    engine, store, queue, _, make = batching_env
    hang = Hang()
    engine.on_tick = lambda tick, requests: hang()
    expired, stopped = _run_hung(make(), queue, hang, monkeypatch)
    assert expired, "the hung job kept its heartbeats: recovery never takes it back"
    assert len(stopped) == 1


def test_no_limit_means_heartbeats_forever(worker_env) -> None:  # noqa: F811
    _, _, queue, worker = worker_env
    job = queue.enqueue(TASK_GENERATE, kwargs={"params": {"prompt": "x"}}, job_timeout=-1)
    assert worker.beats_due(job, 10**9)
    job = queue.enqueue(TASK_GENERATE, kwargs={"params": {"prompt": "x"}}, job_timeout=10)
    assert worker.beats_due(job, 10 + worker_module.HUNG_GRACE)
    assert not worker.beats_due(job, 10 + worker_module.HUNG_GRACE + 1)


def test_a_batched_job_waiting_for_the_finisher_keeps_its_heartbeats(batching_env, monkeypatch) -> None:  # noqa: F811
    """Out of the batch, a job waits for the finisher behind other jobs' PNG writes: that wait is
    not being stuck. Timed from the start of its sampling, it lost its heartbeats there and was
    run again (and the first run's finished result thrown away)."""
    from worker import tasks

    engine, store, queue, _, make = batching_env
    worker = make()
    monkeypatch.setattr(worker_module, "HUNG_GRACE", 0.5, raising=False)
    monkeypatch.setattr(worker, "get_heartbeat_ttl", lambda job, working_time=0.0: 2)
    slow, waiting = (
        queue.enqueue(TASK_GENERATE, kwargs={"params": {"prompt": p, "num_inference_steps": 2}}, job_timeout=1)
        for p in ("slow", "waiting")
    )
    real_store = tasks.store_images

    def store_images(ctx: Any, job: Any, params: Any, images: Any) -> Any:
        if job.id == slow.id:
            time.sleep(4)  # a slow disk: the job behind it waits past its timeout and grace
        return real_store(ctx, job, params, images)

    monkeypatch.setattr(tasks, "store_images", store_images)
    registry = StartedJobRegistry(queue=queue)
    expired: set[str] = set()
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            expired.update(registry.get_expired_job_ids())
            time.sleep(0.1)

    handler = _work_watched(worker, watch, done.set)
    assert waiting.id not in expired, "the job waiting for the finisher lost its heartbeats"
    assert not [line for line in handler.lines if "heartbeats stop" in line["msg"] and line.get("job_id") == waiting.id]
    assert waiting.get_status(refresh=True) == "finished"
