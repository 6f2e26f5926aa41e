"""Real processes for tests: redis-server on a free loopback port, the worker, the API (uvicorn)."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import redis

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
WEBHOOK_SECRET = "test-webhook-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


@dataclass
class Proc:
    popen: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int | None:
        if self.alive():
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        return self.popen.returncode

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def spawn(args: list[str], log: Path, env: dict[str, str] | None = None) -> Proc:
    log.parent.mkdir(parents=True, exist_ok=True)
    fh = open(log, "wb")  # noqa: SIM115 - the child owns it for its whole life
    popen = subprocess.Popen(args, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    return Proc(popen, log)


@dataclass
class RedisServer:
    port: int
    proc: Proc
    dir: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self, db: int = 0) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, db=db)

    def restart(self) -> None:
        self.proc.stop(signal.SIGKILL)
        self.proc = _redis_proc(self.port, self.dir)
        wait_for(lambda: self.client().ping(), 10, "redis-server restart")


def _redis_proc(port: int, data: Path) -> Proc:
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("redis-server is not installed: run scripts/ensure-redis-server.sh")
    args = [exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data), "--save", ""]
    args += ["--appendonly", "yes", "--appendfsync", "everysec", "--maxmemory-policy", "noeviction"]
    return spawn(args, data / "redis.log")


def start_redis(data: Path) -> RedisServer:
    data.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = RedisServer(port, _redis_proc(port, data), data)
    wait_for(lambda: server.client().ping(), 10, "redis-server")
    return server


def service_env(redis_url: str, tmp: Path, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEGEN_")}
    env.update(
        HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",
        IMAGEGEN_REDIS_URL=redis_url,
        IMAGEGEN_MODEL="tiny-random",
        IMAGEGEN_MODEL_CACHE=str(tmp / "models"),
        IMAGEGEN_RESULTS_DIR=str(tmp / "results"),
        IMAGEGEN_THREADS="1",
        IMAGEGEN_WORKER_HEARTBEAT="1",
        IMAGEGEN_WEBHOOK_SECRET=WEBHOOK_SECRET,
        IMAGEGEN_WEBHOOK_ALLOW_PRIVATE="true",  # the tests' receivers listen on loopback
    )
    env.update({f"IMAGEGEN_{k.upper()}": v for k, v in settings.items()})
    return env


def start_worker(env: dict[str, str], log: Path, ready: redis.Redis | None = None, timeout: float = 120) -> Proc:
    """Start `python -m worker`; with `ready`, wait until it has registered with RQ."""
    from rq import Worker

    before = {w.name for w in Worker.all(connection=ready)} if ready is not None else set()
    proc = spawn([PYTHON, "-m", "worker"], log, env)
    if ready is not None:

        def registered() -> bool:
            if not proc.alive():
                raise RuntimeError(f"worker exited:\n{proc.output()[-3000:]}")
            return bool({w.name for w in Worker.all(connection=ready)} - before)

        deadline = time.monotonic() + timeout
        while not registered():
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker not ready after {timeout}s:\n{proc.output()[-3000:]}")
            time.sleep(0.1)
    return proc


def start_api(env: dict[str, str], log: Path, port: int | None = None) -> tuple[Proc, str]:
    port = port or free_port()
    # A long keep-alive: with uvicorn's 5 s default a test client that waits on something else
    # (a worker starting) may send on a connection the server is just closing (ECONNRESET).
    args = ["--host", "127.0.0.1", "--port", str(port), "--timeout-keep-alive", "120"]
    proc = spawn([PYTHON, "-m", "uvicorn", "app.main:app", *args], log, env)
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if not proc.alive():
            raise RuntimeError(f"api exited:\n{proc.output()[-3000:]}")
        return httpx.get(base + "/healthz", timeout=1).status_code == 200

    wait_for(up, 30, "api /healthz")
    return proc, base


def job_ended(http: httpx.Client, job_id: str, timeout: float = 90) -> dict:
    """`GET /jobs/{id}` once the job has ended, or as it stands after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        job = http.get(f"/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "canceled") or time.monotonic() > deadline:
            return job
        time.sleep(0.1)


@dataclass
class Stack:
    redis: RedisServer
    base_url: str
    api: Proc
    workers: list[Proc] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=30)

    def submit(self, http: httpx.Client, **params) -> dict:
        r = http.post("/generate", json=params)
        assert r.status_code == 202, r.text
        return r.json()

    def wait(self, http: httpx.Client, job_id: str, timeout: float = 120) -> dict:
        """Poll until the job is terminal (every loop has a deadline)."""
        deadline = time.monotonic() + timeout
        while True:
            job = http.get(f"/jobs/{job_id}").json()
            if job["status"] in ("succeeded", "failed", "canceled"):
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout}s")
            time.sleep(0.05)

    def close(self) -> None:
        for w in self.workers:
            w.stop()
        self.api.stop()


class WebhookReceiver:
    """A real HTTP server on loopback that answers the first `fail` deliveries with 503 (and, with
    `flaky`, that share of the others, at random) and keeps (headers, body) of every delivery it
    accepts, in arrival order (`tried`: the headers of every attempt, refused ones too)."""

    def __init__(self, fail: int = 0, flaky: float = 0.0) -> None:
        self.fail = fail
        self.flaky = flaky
        self.attempts = 0
        self.accepted: list[tuple[dict[str, str], bytes]] = []
        self.tried: list[dict[str, str]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["content-length"]))
                outer.attempts += 1
                outer.tried.append({k.lower(): v for k, v in self.headers.items()})
                if outer.attempts <= outer.fail or random.random() < outer.flaky:
                    self.send_response(503)
                else:
                    outer.accepted.append(({k.lower(): v for k, v in self.headers.items()}, body))
                    self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"

    def close(self) -> None:
        self.server.shutdown()
