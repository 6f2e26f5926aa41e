"""Requests a browser was made to send from another site, and host names the server does not
answer to, over the real app (a real Redis, no worker): a cross-site form post queues nothing."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.core.config import Settings
from app.main import create_app
from tests.procs import RedisServer

Make = Callable[..., TestClient]
JOB = {"prompt": "a red circle"}


@pytest.fixture
def make(redis_server: RedisServer, redis_db, tmp_path: Path) -> Iterator[Make]:
    clients: list[TestClient] = []

    def build(**overrides: str) -> TestClient:
        settings = Settings(
            redis_url=f"redis://127.0.0.1:{redis_server.port}/15",
            model="main",
            results_dir=str(tmp_path / "results"),
            **overrides,
        )
        client = TestClient(create_app(settings), base_url="http://127.0.0.1:8000")
        client.__enter__()
        clients.append(client)
        return client

    yield build
    for client in clients:
        client.__exit__(None, None, None)


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), "red").save(buf, "PNG")
    return buf.getvalue()


def _queued(redis_db) -> int:
    return sum(int(redis_db.llen(key)) for key in redis_db.scan_iter("rq:queue:*"))


def test_a_cross_site_form_post_is_refused_and_queues_nothing(make: Make, redis_db) -> None:
    http = make()
    # What a plain HTML form on another site makes the visitor's browser send: no CORS preflight.
    files = {"image": ("x.png", _png(), "image/png")}
    for headers in (
        {"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"},
        {"Origin": "https://evil.example"},  # a browser that sends no Sec-Fetch-* headers
        {"Origin": "null"},  # a sandboxed frame
        {"Sec-Fetch-Site": "same-site", "Origin": "https://other.127.0.0.1.example"},
    ):
        answer = http.post("/variations", files=files, headers=headers)
        assert answer.status_code == 403, (headers, answer.text)
        assert answer.json()["error"]["code"] == "forbidden"
        assert "IMAGEGEN_CORS_ORIGINS" in answer.json()["error"]["message"]
    answer = http.post("/v1/images/variations", files=files, headers={"Sec-Fetch-Site": "cross-site"})
    assert answer.status_code == 403
    assert answer.json()["error"]["type"] == "invalid_request_error"  # OpenAI's error shape under /v1
    assert http.delete("/jobs/abc", headers={"Sec-Fetch-Site": "cross-site"}).status_code == 403
    assert _queued(redis_db) == 0


def test_the_pages_own_requests_and_other_clients_pass(make: Make, redis_db) -> None:
    http = make()
    same = {"Origin": "http://127.0.0.1:8000", "Sec-Fetch-Site": "same-origin"}
    assert http.post("/generate", json=JOB, headers=same).status_code == 202
    # Behind a proxy that rewrote Host, the browser still says same-origin.
    proxied = {"Origin": "https://images.example.com", "Sec-Fetch-Site": "same-origin", "Host": "api:8000"}
    assert http.post("/generate", json=JOB, headers=proxied).status_code == 202
    assert http.post("/generate", json=JOB, headers={"Origin": "http://127.0.0.1:8000"}).status_code == 202
    assert http.post("/generate", json=JOB).status_code == 202  # curl, SDKs: neither header
    assert http.post("/generate", json=JOB, headers={"Sec-Fetch-Site": "none"}).status_code == 202  # typed URL
    # Reads are never refused for their origin: CORS decides what a page may read.
    assert http.get("/healthz", headers={"Sec-Fetch-Site": "cross-site"}).status_code == 200
    assert _queued(redis_db) == 5


def test_origins_allowed_by_cors_or_the_public_url_pass(make: Make) -> None:
    http = make(cors_origins="https://app.example.com", public_url="https://images.example.com/imagegen")
    allowed = {"Origin": "https://app.example.com", "Sec-Fetch-Site": "cross-site"}
    assert http.post("/generate", json=JOB, headers=allowed).status_code == 202
    assert http.post("/generate", json=JOB, headers={"Origin": "https://images.example.com"}).status_code == 202
    refused = {"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"}
    assert http.post("/generate", json=JOB, headers=refused).status_code == 403
    assert make(cors_origins="*").post("/generate", json=JOB, headers=refused).status_code == 202


def test_allowed_hosts(make: Make) -> None:
    http = make(allowed_hosts="localhost,127.0.0.1,::1,*.example.com")
    for host in ("127.0.0.1:8000", "localhost", "LOCALHOST:80", "[::1]:8000", "api.example.com"):
        assert http.get("/healthz", headers={"Host": host}).status_code == 200, host
    for host in ("rebind.evil.example:8000", "example.com", "127.0.0.2", "evilexample.com"):
        answer = http.get("/jobs", headers={"Host": host})
        assert answer.status_code == 400, host
        assert "IMAGEGEN_ALLOWED_HOSTS" in answer.json()["error"]["message"]
    # Empty (the default): any host.
    assert make().get("/jobs", headers={"Host": "rebind.evil.example"}).status_code == 200
