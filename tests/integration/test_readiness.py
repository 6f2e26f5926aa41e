"""/readyz and the API's behaviour while its dependencies are gone (own Redis and worker)."""

from __future__ import annotations

import signal
import time

import httpx
import pytest

from tests.procs import service_env, start_api, start_redis, start_worker, wait_for

pytestmark = pytest.mark.integration


def test_readyz_follows_worker_and_redis(tmp_path) -> None:
    server = start_redis(tmp_path / "redis")
    env = service_env(server.url, tmp_path, maintenance_interval="1")
    worker = start_worker(env, tmp_path / "worker.log", ready=server.client())
    api, base = start_api(env, tmp_path / "api.log")
    try:
        with httpx.Client(base_url=base, timeout=10) as http:
            r = http.get("/readyz")
            assert r.status_code == 200 and r.json() == {"status": "ready", "redis": "ok", "workers": 1}

            # The worker stops (SIGTERM: it unregisters): not ready, and the reason says so.
            assert worker.stop(signal.SIGTERM) is not None
            r = http.get("/readyz")
            assert r.status_code == 503 and "worker" in r.json()["error"]["message"]
            assert http.get("/healthz").status_code == 200

            # Jobs are still accepted while no worker runs; they wait in Redis.
            job = http.post("/generate", json={"prompt": "waits for a worker", "num_inference_steps": 2}).json()
            worker = start_worker(env, tmp_path / "worker2.log", ready=server.client())
            wait_for(lambda: http.get("/readyz").status_code == 200, 20, "ready again")
            wait_for(lambda: http.get(f"/jobs/{job['id']}").json()["status"] == "succeeded", 60, "queued job done")

            # Redis dies while the worker samples a job, and stays away a few seconds: the worker's
            # loop drops, then waits for Redis instead of exiting (it died building its next loop).
            slow = {"prompt": "running when redis dies", "num_inference_steps": 150, "width": 64, "height": 64}
            running = http.post("/generate", json=slow).json()
            wait_for(lambda: http.get(f"/jobs/{running['id']}").json()["status"] == "running", 30, "the slow job runs")
            # Redis dies: 503 with Retry-After, never a 500 or a hang.
            server.proc.stop(signal.SIGKILL)
            started = time.monotonic()
            for path in ("/readyz", f"/jobs/{job['id']}"):
                r = http.get(path)
                assert r.status_code == 503 and r.headers["retry-after"], (path, r.text)
                assert "redis" in r.json()["error"]["message"].lower()
            r = http.post("/generate", json={"prompt": "while redis is down"})
            assert r.status_code == 503 and r.headers["retry-after"]
            assert time.monotonic() - started < 30
            time.sleep(3)

            # Redis comes back (same data dir, AOF): the API recovers by itself and the job is still there.
            server.restart()
            wait_for(lambda: http.get(f"/jobs/{job['id']}").status_code == 200, 30, "API reconnects")
            assert http.get(f"/jobs/{job['id']}").json()["status"] == "succeeded"
            wait_for(lambda: http.get("/readyz").status_code == 200, 30, "the worker serves again")
            assert worker.alive(), worker.output()[-2000:]
            http.delete(f"/jobs/{running['id']}")

            # Redis loses its data (restarted without persistence, flushed): the live worker lists
            # itself and its model again at its next maintenance, and serves on.
            server.client().flushall()
            assert http.get("/readyz").status_code == 503
            wait_for(lambda: http.get("/readyz").status_code == 200, 30, "the worker registers again")
            assert [m["name"] for m in http.get("/models").json()["models"]] == ["tiny-random"]
            job = http.post("/generate", json={"prompt": "after the flush", "num_inference_steps": 2}).json()
            wait_for(lambda: http.get(f"/jobs/{job['id']}").json()["status"] == "succeeded", 60, "job after the flush")
    finally:
        api.stop()
        worker.stop()
        server.proc.stop()


def test_no_request_fails_once_a_restarted_redis_is_back(tmp_path) -> None:
    """A Redis restart leaves the API's pooled connections closed by the server: the first command
    on each must reconnect and go on, not answer 503 (one per pooled connection, as it did)."""
    from concurrent.futures import ThreadPoolExecutor

    server = start_redis(tmp_path / "redis")
    env = service_env(server.url, tmp_path)
    api, base = start_api(env, tmp_path / "api.log")
    try:
        with httpx.Client(base_url=base, timeout=30) as http, ThreadPoolExecutor(16) as pool:

            def burst() -> list[httpx.Response]:  # fills both clients' pools with connections
                posts = list(pool.map(lambda i: http.post("/generate", json={"prompt": f"p{i}"}), range(48)))
                assert {r.status_code for r in posts} == {202}, posts[0].text
                return posts + list(pool.map(lambda r: http.get(f"/jobs/{r.json()['id']}"), posts))

            jobs = burst()
            server.restart()  # same data directory: the jobs are kept
            after = burst()
            codes = [r.status_code for r in after]
            assert codes.count(200) == 48, [r.text for r in after if r.status_code >= 500][:2]
            assert all(http.get(f"/jobs/{r.json()['id']}").status_code == 200 for r in jobs[:48])
    finally:
        api.stop()
        server.proc.stop()


def test_followers_past_max_streams_poll_and_leave_submissions_their_connections(tmp_path) -> None:
    """Each SSE stream or long-poll blocked in Redis holds a connection. Past IMAGEGEN_MAX_STREAMS
    they poll instead, so followers never take the connections submissions need (at 100 blocked
    reads, redis-py's pool refused every further command: POST /generate answered 503)."""
    import asyncio

    server = start_redis(tmp_path / "redis")
    env = service_env(server.url, tmp_path, max_streams="4")
    api, base = start_api(env, tmp_path / "api.log")

    async def scenario() -> tuple[list[str], list[str], list[int], int]:
        async with httpx.AsyncClient(base_url=base, timeout=60, limits=httpx.Limits(max_connections=100)) as http:
            job = (await http.post("/generate", json={"prompt": "followed by many"})).json()

            async def follow() -> str:
                kinds = []
                async with http.stream("GET", f"/jobs/{job['id']}/events") as r:
                    async for line in r.aiter_lines():
                        if line.startswith("event:") and "keepalive" not in line:
                            kinds.append(line.split(":", 1)[1].strip())
                return ",".join(kinds)

            async def long_poll() -> str:
                return (await http.get(f"/jobs/{job['id']}?wait=20")).json()["status"]

            streams = [asyncio.create_task(follow()) for _ in range(24)]
            polls = [asyncio.create_task(long_poll()) for _ in range(8)]
            await asyncio.sleep(2)
            blocked = server.client().info("clients")["blocked_clients"]
            posts = [(await http.post("/generate", json={"prompt": f"p{i}"})).status_code for i in range(5)]
            assert (await http.delete(f"/jobs/{job['id']}")).status_code == 200
            return await asyncio.gather(*streams), await asyncio.gather(*polls), posts, blocked

    try:
        streams, polls, posts, blocked = asyncio.run(asyncio.wait_for(scenario(), 60))
    finally:
        api.stop()
        server.proc.stop()
    assert blocked <= 4 and posts == [202] * 5
    assert streams == ["queued,canceled"] * 24 and polls == ["canceled"] * 8


def test_a_killed_worker_leaves_every_count_once_its_beats_stop(tmp_path) -> None:
    """kill -9 leaves RQ's worker key for a minute and more, and with no worker left nothing cleans
    the registry: /models and the `imagegen_workers` gauge kept counting the dead worker (an alert
    on zero workers never fired). All counts now drop it with /readyz, three beats late."""
    from prometheus_client.parser import text_string_to_metric_families

    server = start_redis(tmp_path / "redis")
    env = service_env(server.url, tmp_path)  # IMAGEGEN_WORKER_HEARTBEAT=1: dropped after 8 s
    worker = start_worker(env, tmp_path / "worker.log", ready=server.client())
    api, base = start_api(env, tmp_path / "api.log")

    def gauge(http: httpx.Client) -> float:
        families = text_string_to_metric_families(http.get("/metrics").text)
        return next(f for f in families if f.name == "imagegen_workers").samples[0].value

    try:
        with httpx.Client(base_url=base, timeout=10) as http:
            wait_for(lambda: http.get("/readyz").status_code == 200, 30, "ready")
            assert gauge(http) == 1 and len(http.get("/models").json()["models"]) == 1
            worker.stop(signal.SIGKILL)
            wait_for(lambda: http.get("/readyz").status_code == 503, 30, "not ready once the beats stop")
            assert gauge(http) == 0 and http.get("/models").json()["models"] == []
            assert server.client().exists(*server.client().keys("rq:worker:*"))  # RQ's key is still there
    finally:
        api.stop()
        worker.stop()
        server.proc.stop()


def test_redis_out_of_memory_is_a_503_not_a_500(tmp_path) -> None:
    """Redis at maxmemory with noeviction (as it should run) refuses writes: clients are told to
    come back later (503 with Retry-After, in OpenAI's shape on /v1), and nothing logs a traceback."""
    server = start_redis(tmp_path / "redis")
    api = None
    try:
        env = service_env(server.url, tmp_path, api_keys="alice-key-0123456789abcdef", rate_limit_images="50")
        api, base = start_api(env, tmp_path / "api.log")
        key = {"Authorization": "Bearer alice-key-0123456789abcdef"}
        assert httpx.post(base + "/generate", json={"prompt": "x"}, headers=key).status_code == 202
        used = int(server.client().info("memory")["used_memory"])
        server.client().config_set("maxmemory", used // 2)
        for path, body in (("/generate", {"prompt": "x"}), ("/v1/images/generations", {"prompt": "x"})):
            r = httpx.post(base + path, json=body, headers=key)
            assert r.status_code == 503, (path, r.text)
            assert "out of memory" in r.json()["error"]["message"] and int(r.headers["retry-after"]) > 0
        server.client().config_set("maxmemory", 0)
        assert httpx.post(base + "/generate", json={"prompt": "x"}, headers=key).status_code == 202
        assert "Traceback" not in api.output() and "out of memory" in api.output()
    finally:
        if api is not None:
            api.stop()
        server.proc.stop()
