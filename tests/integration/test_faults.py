"""Faults survived, with real processes: kill -9 of workers and Redis, restarts, SIGTERM, timeouts,
a full queue."""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from rq import Worker

from tests.procs import Proc, service_env, start_api, start_redis, start_worker, wait_for
from tests.procs import job_ended as _wait

pytestmark = pytest.mark.integration
LONG = {"prompt": "long", "num_inference_steps": 150, "width": 128, "height": 128}
TINY = {"prompt": "tiny", "num_inference_steps": 1, "width": 8, "height": 8}


@pytest.fixture
def env(tmp_path):
    server = start_redis(tmp_path / "redis")
    env = service_env(server.url, tmp_path, maintenance_interval="1", max_retries="1")
    procs: list[Proc] = []
    yield server, env, procs, tmp_path
    for p in procs:
        p.stop(signal.SIGKILL)
    server.proc.stop(signal.SIGKILL)


def _worker(server, env, procs, tmp_path, name: str, **extra: str) -> Proc:
    proc = start_worker(
        env | {f"IMAGEGEN_{k.upper()}": v for k, v in extra.items()}, tmp_path / f"{name}.log", ready=server.client()
    )
    procs.append(proc)
    return proc


def _api(env, procs, tmp_path, name: str = "api", **extra: str) -> str:
    proc, base = start_api(env | {f"IMAGEGEN_{k.upper()}": v for k, v in extra.items()}, tmp_path / f"{name}.log")
    procs.append(proc)
    return base


def _whereabouts(connection, job_id: str) -> dict[str, object]:
    """Where RQ has a job: its status and every list and registry that holds it (for failure messages)."""
    found: dict[str, object] = {"status": connection.hget(f"rq:job:{job_id}", "status")}
    for key in connection.scan_iter("rq:*"):
        kind = connection.type(key)
        if kind == b"list" and connection.lpos(key, job_id) is not None:
            found[key.decode()] = "listed"
        elif kind == b"zset" and any(m.startswith(job_id.encode()) for m in connection.zrange(key, 0, -1)):
            found[key.decode()] = "registered"
    return found


def _running_on(server, job_id: str, timeout: float = 60) -> int:
    """PID of the worker running the job (from RQ's worker registry), once sampling has begun."""
    found: list[int] = []
    connection = server.client()

    def check() -> bool:
        if connection.hget(f"rq:job:{job_id}", "status") != b"started":
            return False
        for w in Worker.all(connection=connection):
            if w.get_current_job_id() == job_id:
                found.append(w.pid)
                return True
        return False

    wait_for(check, timeout, f"a worker to start {job_id}")
    return found[0]


def test_worker_killed_mid_job_is_rerun_then_fails_as_worker_lost(env) -> None:
    server, env, procs, tmp = env
    workers = [_worker(server, env, procs, tmp, f"w{i}") for i in range(2)]
    base = _api(env, procs, tmp)  # IMAGEGEN_MAX_RETRIES=1
    no_retry = _api(env, procs, tmp, "api-no-retry", max_retries="0")
    with httpx.Client(base_url=base, timeout=10) as http:
        job = http.post("/generate", json=LONG).json()
        victim = _running_on(server, job["id"])
        killed_at = time.monotonic()
        next(w for w in workers if w.pid == victim).stop(signal.SIGKILL)
        # Re-run on the surviving worker: started again after the kill, then succeeded.
        done = _wait(http, job["id"], 90)
        assert done["status"] == "succeeded", done
        print(f"re-run finished {time.monotonic() - killed_at:.1f}s after kill -9")

        # Without retries left, a lost worker ends the job as failed/worker_lost.
        _worker(server, env, procs, tmp, "w2")  # someone must be alive to notice
        lost = httpx.post(no_retry + "/generate", json=LONG).json()
        victim = _running_on(server, lost["id"])
        next(p for p in procs if p.pid == victim).stop(signal.SIGKILL)
        done = _wait(http, lost["id"], 90)
        assert done["status"] == "failed" and done["error"]["code"] == "worker_lost", done
        # ...and says so like every other end: its terminal event, an end time and the metrics
        # (RQ's maintenance failed it in a transaction of its own, which announced nothing).
        from app.core import events

        wait_for(lambda: bool(server.client().exists(events.end_key(lost["id"]))), 10, "the failed event")
        kinds = [e.type.value for _, e in events.read(server.client(), lost["id"])]
        assert kinds[-1] == "failed" and kinds.count("failed") == 1, kinds
        assert http.get(f"/jobs/{lost['id']}").json()["finished_at"]
        assert server.client().hget("imagegen:metrics:jobs", "failed") == b"1"
        assert server.client().hgetall("imagegen:metrics:failures") == {b"worker_lost": b"1"}
        assert 'imagegen_job_failures_total{code="worker_lost"} 1.0' in http.get("/metrics").text


def test_redis_kill9_loses_no_accepted_job(env) -> None:
    server, env, procs, tmp = env
    _worker(server, env, procs, tmp, "w")
    base = _api(env, procs, tmp)
    with httpx.Client(base_url=base, timeout=30) as http, ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda i: http.post("/generate", json=TINY | {"seed": i}), range(500)))
        assert {r.status_code for r in answers} == {202}
        ids = [r.json()["id"] for r in answers]
        time.sleep(1.5)  # AOF fsyncs every second: what was accepted before this is on disk
        server.restart()  # kill -9, then start on the same data directory
        finals = {}
        deadline = time.monotonic() + 240
        pending = set(ids)
        while pending and time.monotonic() < deadline:
            for job_id in list(pending):
                r = http.get(f"/jobs/{job_id}")
                if r.status_code == 404:
                    finals[job_id] = "lost"
                    pending.discard(job_id)
                elif r.status_code == 200 and r.json()["status"] in ("succeeded", "failed", "canceled"):
                    finals[job_id] = r.json()["status"]
                    pending.discard(job_id)
            time.sleep(0.5)
    stuck = {j: _whereabouts(server.client(), j) for j in sorted(pending)[:3]}
    lost = [j for j, s in finals.items() if s == "lost"]
    print(
        f"500 jobs: {sum(s == 'succeeded' for s in finals.values())} succeeded, {len(lost)} lost, "
        f"{len(pending)} unfinished {stuck}"
    )
    assert not pending and not lost
    assert set(finals.values()) == {"succeeded"}


def test_api_restart_and_sigterm_drain(env) -> None:
    server, env, procs, tmp = env
    api, base = start_api(env, tmp / "api1.log")
    job = httpx.post(base + "/generate", json=TINY).json()
    api.stop(signal.SIGKILL)  # nothing in flight lives in the API
    api, base = start_api(env, tmp / "api2.log")
    procs.append(api)
    assert httpx.get(f"{base}/jobs/{job['id']}").json()["status"] == "queued"

    # SIGTERM while a long-poll and an event stream are open: uvicorn stops accepting, answers the
    # long-poll at once with the job as it stands (it held the shutdown for the whole wait, up to
    # 60 s) and ends the stream with a complete response (it was cut mid-body).
    def follow() -> list[str]:
        with httpx.stream("GET", f"{base}/jobs/{job['id']}/events", timeout=30) as r:
            return [line for line in r.iter_lines() if line.startswith("event:")]

    with ThreadPoolExecutor(2) as pool:
        pending = pool.submit(httpx.get, f"{base}/jobs/{job['id']}", params={"wait": 50}, timeout=60)
        stream = pool.submit(follow)
        time.sleep(0.5)
        api.popen.send_signal(signal.SIGTERM)
        assert api.popen.wait(30) in (0, -signal.SIGTERM)  # well before the long-poll's 50 s (uvicorn re-raises it)
        r = pending.result()
        events_seen = stream.result()  # raises if the body was cut short
    assert r.status_code == 200 and r.json()["id"] == job["id"] and r.json()["status"] == "queued"
    assert events_seen == ["event: queued"]

    _worker(server, env, procs, tmp, "w")
    base = _api(env, procs, tmp, "api3")
    assert _wait(httpx.Client(base_url=base), job["id"], 60)["status"] == "succeeded"


def test_worker_sigterm_finishes_its_job_or_requeues_it_after_the_grace(env) -> None:
    server, env, procs, tmp = env
    patient = _worker(server, env, procs, tmp, "patient", shutdown_grace="120")
    base = _api(env, procs, tmp)
    with httpx.Client(base_url=base, timeout=10) as http:
        first = http.post("/generate", json=LONG | {"num_inference_steps": 60}).json()
        _running_on(server, first["id"])
        second = http.post("/generate", json=TINY).json()
        patient.popen.send_signal(signal.SIGTERM)
        assert patient.popen.wait(120) == 0
        assert http.get(f"/jobs/{first['id']}").json()["status"] == "succeeded"  # finished, not dropped
        assert http.get(f"/jobs/{second['id']}").json()["status"] == "queued"  # and took no new job

        hasty = _worker(server, env, procs, tmp, "hasty", shutdown_grace="0.5")
        assert _wait(http, second["id"], 60)["status"] == "succeeded"
        # Long enough to outlast the 0.5 s grace on any machine (seconds), short enough to run again.
        long_job = http.post("/generate", json=LONG | {"num_inference_steps": 50, "width": 256, "height": 256}).json()
        _running_on(server, long_job["id"])
        hasty.popen.send_signal(signal.SIGTERM)
        assert hasty.popen.wait(60) == 0
        requeued = http.get(f"/jobs/{long_job['id']}").json()
        assert requeued["status"] == "queued" and requeued["queue_position"] == 0, requeued
        # It starts over, and says so: no progress, no time stamps of the run that was cut short
        # (they showed 15/40, a finished_at and a negative queue wait), and a `queued` event.
        assert requeued["progress"]["step"] == 0 and requeued["started_at"] is None, requeued
        assert requeued["finished_at"] is None and requeued["timings"]["queue_wait_ms"] is None, requeued
        from app.core import events

        assert [e.type.value for _, e in events.read(server.client(), long_job["id"])][-1] == "queued"
        _worker(server, env, procs, tmp, "finisher")
        assert _wait(http, long_job["id"], 300)["status"] == "succeeded"  # all 50 steps again


def test_worker_sigterm_while_redis_is_away_stops_it(env) -> None:
    """RQ's loop ends when Redis goes; while the worker waited for it, a SIGTERM went to the
    handlers of the loop that had ended, and the worker went on (a fresh loop once Redis was
    back), until the orchestrator's SIGKILL."""
    server, env, procs, tmp = env
    worker = _worker(server, env, procs, tmp, "w")
    with httpx.Client(base_url=_api(env, procs, tmp), timeout=10) as http:
        job = http.post("/generate", json={"prompt": "cut off", "num_inference_steps": 30}).json()
    _running_on(server, job["id"])
    server.proc.stop(signal.SIGKILL)  # mid-job: RQ's loop ends once the job does (an idle one waits itself)
    log = tmp / "w.log"
    wait_for(lambda: "Redis unavailable" in log.read_text(), 120, "the worker to wait for Redis")
    worker.popen.send_signal(signal.SIGTERM)
    wait_for(lambda: not worker.alive(), 15, "the worker to exit")
    assert worker.popen.returncode == 0, log.read_text()[-2000:]


def test_job_timeout_and_full_queue(env) -> None:
    server, env, procs, tmp = env
    _worker(server, env, procs, tmp, "w")
    base = _api(env, procs, tmp, job_timeout="1", max_queue="3")
    with httpx.Client(base_url=base, timeout=10) as http:
        slow = http.post("/generate", json=LONG | {"width": 256, "height": 256}).json()
        done = _wait(http, slow["id"], 60)
        assert done["status"] == "failed" and done["error"]["code"] == "timeout", done
        # On /v1 the job's own time limit is a failure (500), not the route's wait limit (504).
        v1 = http.post("/v1/images/generations", json={"prompt": "long", "size": "256x256", "num_inference_steps": 150},
                       timeout=90)  # fmt: skip
        assert v1.status_code == 500, v1.text
        assert v1.json()["error"]["code"] == "timeout" and v1.json()["error"]["type"] == "server_error"

        _running_on(server, http.post("/generate", json=LONG | {"num_inference_steps": 40}).json()["id"])
        answers = [http.post("/generate", json=TINY) for _ in range(5)]
        assert [r.status_code for r in answers] == [202, 202, 202, 429, 429]
        full = answers[-1]
        assert full.json()["error"]["code"] == "rate_limited" and int(full.headers["retry-after"]) >= 1


@pytest.mark.parametrize("problem", ["no such model", "bad imagegen.json"])
def test_a_model_that_cannot_load_stops_the_worker_with_one_line(env, problem: str) -> None:
    """No such folder or hub id, missing weights or a bad imagegen.json ended in a traceback."""
    import shutil

    from models.registry import resolve

    server, env, procs, tmp = env
    folder = tmp / "model"
    if problem == "bad imagegen.json":
        shutil.copytree(resolve("tiny-random"), folder)
        (folder / "imagegen.json").write_text('{"widht": 64}')
    proc = start_worker(env | {"IMAGEGEN_MODEL": str(folder), "HF_HUB_OFFLINE": "1"}, tmp / "w.log")
    procs.append(proc)
    wait_for(lambda: not proc.alive(), 120, "the worker to exit")
    output = proc.output()
    assert proc.popen.returncode == 1, output[-2000:]
    assert "Traceback" not in output and f"cannot load model '{folder}'" in output, output[-2000:]
    assert "widht" in output if problem == "bad imagegen.json" else "model_index.json" in output


def test_a_results_dir_that_cannot_be_written_stops_the_worker(env) -> None:
    """The worker started and reported ready; every job then sampled, failed to store its PNGs and
    ran again on each retry."""
    server, env, procs, tmp = env
    blocked = tmp / "not-a-folder"
    blocked.write_text("a file where the results folder should be")
    proc = start_worker(env | {"IMAGEGEN_RESULTS_DIR": str(blocked)}, tmp / "w.log")
    procs.append(proc)
    wait_for(lambda: not proc.alive(), 120, "the worker to exit")
    output = proc.output()
    assert proc.popen.returncode == 1, output[-2000:]
    assert f"cannot write images to IMAGEGEN_RESULTS_DIR={blocked}" in output and "Traceback" not in output
