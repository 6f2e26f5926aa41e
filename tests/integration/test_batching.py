"""Step-level batching for real: redis-server, `python -m worker` with IMAGEGEN_MAX_BATCH > 1 on the
tiny model, uvicorn, HTTP. Batched jobs keep their own lifecycle and give the same PNG bytes as
when they run alone."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from rq.registry import StartedJobRegistry

from app.core.jobs import queue_name
from tests.procs import RedisServer, Stack, service_env, start_api, start_worker, wait_for

pytestmark = pytest.mark.integration
DB = 9
SIZE = {"width": 32, "height": 32}
# Keeps the worker busy with another size while the batch queues up behind it.
BLOCKER = {"prompt": "blocker", "num_inference_steps": 40, "width": 64, "height": 64}
# Different seeds, step counts, samplers and guidance (with and without CFG), one size: 17 UNet
# rows together, past the batch size (16) where CPU convolution kernels would otherwise change.
MIXES = [(7.5, "ddim"), (1.0, "euler"), (3.0, "euler_a"), (7.5, "dpmpp_2m"), (1.0, "unipc"), (5.0, "ddim")]
JOBS = [
    {"prompt": f"job {i}", "seed": 100 + i, "num_inference_steps": 8 + i, "guidance_scale": g, "scheduler": s} | SIZE
    for i, (g, s) in enumerate(MIXES + MIXES[:4])
]


@pytest.fixture(scope="module")
def batch_stack(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("stack-batch")
    redis_server.client(DB).flushdb()
    env = service_env(
        f"redis://127.0.0.1:{redis_server.port}/{DB}", tmp, max_batch="16", maintenance_interval="1", max_retries="1"
    )
    worker = start_worker(env, tmp / "worker.log", ready=redis_server.client(DB))
    api, base = start_api(env, tmp / "api.log")
    s = Stack(redis=redis_server, base_url=base, api=api, workers=[worker], env=env)
    yield s
    s.close()


def _time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _png(stack: Stack, http: httpx.Client, job: dict) -> bytes:
    r = http.get(job["images"][0]["url"])
    assert r.status_code == 200
    return r.content


def _wait_running(http: httpx.Client, job_id: str, timeout: float = 60) -> None:
    def running() -> bool:
        job = http.get(f"/jobs/{job_id}").json()
        assert job["status"] in ("queued", "running"), job
        return job["status"] == "running" and job["progress"]["step"] >= 1

    wait_for(running, timeout, f"{job_id} running")


def test_concurrent_jobs_share_a_batch_and_match_their_solo_runs(batch_stack: Stack) -> None:
    s = batch_stack
    with s.client() as http, ThreadPoolExecutor(len(JOBS)) as pool:
        # Each job alone first: the reference bytes.
        alone = [_png(s, http, s.wait(http, s.submit(http, **p)["id"])) for p in JOBS]
        # Then all together, queued behind a job of another size so they start as one batch.
        blocker = s.submit(http, **BLOCKER)
        _wait_running(http, blocker["id"])
        jobs = list(pool.map(lambda p: s.submit(http, **p), JOBS))
        done = list(pool.map(lambda j: s.wait(http, j["id"]), jobs))
        assert s.wait(http, blocker["id"])["status"] == "succeeded"
        together = [_png(s, http, j) for j in done]
    assert [j["status"] for j in done] == ["succeeded"] * len(JOBS)
    # They ran at the same time: every job started before the first one finished.
    first_end = min(_time(j["finished_at"]) for j in done)
    assert all(_time(j["started_at"]) < first_end for j in done)
    for job, params in zip(done, JOBS, strict=True):
        assert job["progress"] == {"step": params["num_inference_steps"], "total": params["num_inference_steps"]}
        assert job["images"][0]["seed"] == params["seed"]
        assert job["timings"]["sampling_ms"] > 0 and job["timings"]["encode_ms"] > 0
    assert together == alone  # batch invariance, byte for byte
    assert len(set(together)) == len(JOBS)
    # /metrics counted those shared steps: the first 9 held more than 8 jobs each.
    with s.client() as http:
        families = {f.name: f.samples for f in text_string_to_metric_families(http.get("/metrics").text)}
    buckets = {x.labels["le"]: x.value for x in families["imagegen_batch_jobs"] if x.name.endswith("_bucket")}
    assert buckets["16.0"] - buckets["8.0"] >= 1, buckets


def test_cancel_of_one_batched_job_leaves_the_others(batch_stack: Stack) -> None:
    s = batch_stack
    long = {"num_inference_steps": 150} | SIZE
    with s.client() as http, ThreadPoolExecutor(4) as pool:
        jobs = list(pool.map(lambda i: s.submit(http, prompt=f"long {i}", seed=i, **long), range(4)))
        for j in jobs:
            _wait_running(http, j["id"])
        families = {f.name: f.samples for f in text_string_to_metric_families(http.get("/metrics").text)}
        running = {x.labels["priority"]: x.value for x in families["imagegen_jobs_running"]}
        assert running == {"high": 0, "normal": 4, "low": 0}, running
        r = http.delete(f"/jobs/{jobs[1]['id']}")
        assert r.status_code == 202
        done = list(pool.map(lambda j: s.wait(http, j["id"]), jobs))
    assert [j["status"] for j in done] == ["succeeded", "canceled", "succeeded", "succeeded"]
    assert done[1]["error"]["code"] == "canceled" and done[1]["images"] == []


def test_a_job_the_worker_cannot_read_fails_alone(batch_stack: Stack) -> None:
    """A job another producer queued with RQ's default (pickle) serializer joins no batch: reading
    it raised out of the batching session, which failed every job in it as `sampling_error`."""
    from rq import Queue

    from app.core.jobs import Priority

    s = batch_stack
    long = {"num_inference_steps": 150, "num_images": 4, "width": 64, "height": 64}
    with s.client() as http, ThreadPoolExecutor(2) as pool:
        jobs = list(pool.map(lambda i: s.submit(http, prompt=f"beside {i}", seed=i, **long), range(2)))
        for j in jobs:
            _wait_running(http, j["id"])
        foreign = Queue(queue_name("tiny-random", Priority.normal), connection=s.redis.client(DB))
        alien = foreign.enqueue("os.getpid")  # pickled: this worker reads JSON
        done = list(pool.map(lambda j: s.wait(http, j["id"]), jobs))
        assert [j["status"] for j in done] == ["succeeded", "succeeded"], done
        wait_for(lambda: alien.get_status(refresh=True) == "failed", 60, "the foreign job to be refused")
        view = http.get(f"/jobs/{alien.id}").json()
        assert view["status"] == "failed" and view["error"]["code"] == "refused", view
        after = s.wait(http, s.submit(http, prompt="after", **SIZE)["id"])
        assert after["status"] == "succeeded"
    log = s.workers[0].log.read_text()
    assert "loop ended without a stop request" not in log and "unhandled exception" not in log


def test_images_that_cannot_be_stored_fail_as_the_one_job_path_does(batch_stack: Stack) -> None:
    """A storage failure was reported as the job's own `sampling_error`, never retried, its
    message naming the server's path; the one-job path retries it and ends with `internal_error`."""
    s = batch_stack
    results = s.env["IMAGEGEN_RESULTS_DIR"]
    with s.client() as http:
        job = s.submit(http, prompt="nowhere to go", num_inference_steps=150, num_images=4, width=64, height=64)
        blocker = Path(results) / job["id"]
        blocker.parent.mkdir(parents=True, exist_ok=True)
        blocker.write_text("a file where the job's folder goes")
        try:
            done = s.wait(http, job["id"])
        finally:
            blocker.unlink()
        events = http.get(f"/jobs/{job['id']}/events").text
    assert done["status"] == "failed" and done["error"]["code"] == "internal_error", done
    assert results not in done["error"]["message"]
    assert events.count("event: started") == 2  # retried once (IMAGEGEN_MAX_RETRIES=1)


def test_kill_9_mid_batch_recovers_every_job(batch_stack: Stack, tmp_path) -> None:
    s = batch_stack
    conn = s.redis.client(DB)
    with s.client() as http, ThreadPoolExecutor(3) as pool:
        jobs = list(
            pool.map(lambda i: s.submit(http, prompt=f"doomed {i}", seed=i, num_inference_steps=150, **SIZE), range(3))
        )
        for j in jobs:
            _wait_running(http, j["id"])
        registry = StartedJobRegistry(queue_name("tiny-random"), connection=conn)
        assert {j["id"] for j in jobs} <= set(registry.get_job_ids())
        s.workers[0].stop(signal.SIGKILL)
        # A new worker finds the dead one's jobs once their heartbeats expire and runs them again.
        s.workers[0] = start_worker(s.env, tmp_path / "worker2.log", ready=conn)
        started = time.monotonic()
        done = list(pool.map(lambda j: s.wait(http, j["id"], timeout=90), jobs))
    assert [j["status"] for j in done] == ["succeeded"] * 3, done
    assert time.monotonic() - started < 60
