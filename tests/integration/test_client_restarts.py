"""`imagegen_client` submitting while the API is away, against real redis-server, worker and API
processes: the POST is sent again under its one Idempotency-Key until an API answers, and the call
returns the finished job, the only job made."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from imagegen_client import Client, Job
from tests.procs import Proc, RedisServer, free_port, service_env, start_api, start_redis, start_worker, wait_for

pytestmark = pytest.mark.integration


@dataclass
class Services:
    redis: RedisServer
    env: dict[str, str]


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    """Redis and a worker of their own, no API: each test starts that when it wants it."""
    tmp = tmp_path_factory.mktemp("restarts")
    redis = start_redis(tmp / "redis")
    env = service_env(redis.url, tmp)
    worker = start_worker(env, tmp / "worker.log", ready=redis.client())
    yield Services(redis, env)
    worker.stop()
    redis.proc.stop()


def job_ids(base: str) -> set[str]:
    return {job["id"] for job in httpx.get(f"{base}/jobs", params={"limit": 100}, timeout=10).json()["jobs"]}


class Generating(threading.Thread):
    """`Client.generate` in a thread; `job` or `error` once it has returned."""

    def __init__(self, port: int, **params: object) -> None:
        super().__init__(daemon=True)
        self.url = f"http://127.0.0.1:{port}"
        self.params = params
        self.job: Job | None = None
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            with Client(self.url) as client:
                self.job = client.generate("through an outage", timeout=90, **self.params)  # type: ignore[arg-type]
        except Exception as exc:  # reported by the test
            self.error = exc


def test_generate_waits_for_an_api_that_starts_late(services: Services, tmp_path: Path) -> None:
    """No API listens when the call starts (connections refused); one starts on that port two
    seconds later. The call raised `connection_error` at once."""
    port = free_port()
    call = Generating(port, seed=1, num_inference_steps=4, width=32, height=32)
    call.start()
    api: Proc | None = None
    try:
        time.sleep(2.0)  # the call meets a closed port meanwhile
        assert call.is_alive(), call.error
        api, base = start_api(services.env, tmp_path / "api.log", port=port)
        call.join(60)
        assert not call.is_alive() and call.error is None, call.error
        assert call.job is not None and call.job.succeeded
        assert job_ids(base) == {call.job.id}  # exactly one job
    finally:
        if api is not None:
            api.stop()


def test_a_post_cut_by_a_killed_api_is_sent_again_without_a_second_job(services: Services, tmp_path: Path) -> None:
    """The API is killed (kill -9) while it holds generate's POST (`Prefer: wait`) for a job it has
    made; another starts on the port. The repeat, with the same key, is held for that same job."""
    port = free_port()
    api, base = start_api(services.env, tmp_path / "api-1.log", port=port)
    try:
        before = job_ids(base)
        call = Generating(port, seed=2, num_inference_steps=150, width=64, height=64)
        call.start()
        wait_for(lambda: len(job_ids(base) - before) == 1, 20, "the job is made")
        assert call.is_alive(), call.error  # its POST is still held: the kill cuts it
        api.stop(signal.SIGKILL)
        time.sleep(1.0)
        api, _ = start_api(services.env, tmp_path / "api-2.log", port=port)
        call.join(90)
        assert not call.is_alive() and call.error is None, call.error
        assert call.job is not None and call.job.succeeded
        assert job_ids(base) - before == {call.job.id}  # the repeat made no second job
    finally:
        api.stop()
