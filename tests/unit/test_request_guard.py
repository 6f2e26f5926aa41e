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


def _files() -> dict[str, tuple[str, bytes, str]]:
    return {"image": ("x.png", _png(), "image/png")}


def test_a_cross_site_form_post_is_refused_and_queues_nothing(make: Make, redis_db) -> None:
    http = make()
    # What a plain HTML form on another site makes the visitor's browser send: no CORS preflight.
    for headers in (
        {"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"},
        {"Origin": "https://evil.example"},  # plain HTTP: browsers send Sec-Fetch-* only to HTTPS and loopback
        {"Origin": "null"},  # a sandboxed frame
        {"Sec-Fetch-Site": "same-site", "Origin": "https://other.127.0.0.1.example"},
        # Claimed forwarding headers do not help a request that names another origin outright.
        {"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site", "X-Forwarded-Host": "evil.example"},
    ):
        answer = http.post("/variations", files=_files(), headers=headers)
        assert answer.status_code == 403, (headers, answer.text)
        assert answer.json()["error"]["code"] == "forbidden"
        assert "IMAGEGEN_CORS_ORIGINS" in answer.json()["error"]["message"]
    answer = http.post("/v1/images/variations", files=_files(), headers={"Sec-Fetch-Site": "cross-site"})
    assert answer.status_code == 403
    assert answer.json()["error"]["type"] == "invalid_request_error"  # OpenAI's error shape under /v1
    # A form-encoded or text body to /generate too (it answers 415 after the guard, never queues).
    for ctype in ("application/x-www-form-urlencoded", "text/plain"):
        answer = http.post("/generate", content=b"prompt=x", headers={"Content-Type": ctype, "Origin": "http://evil"})
        assert answer.status_code == 403, (ctype, answer.text)
    assert _queued(redis_db) == 0


def test_what_browsers_preflight_is_left_to_cors(make: Make) -> None:
    """A JSON body or a DELETE from another site needs the server's CORS permission before a
    browser sends it (and CORS is off by default): the guard leaves those to it."""
    http = make()
    cross = {"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"}
    assert http.post("/generate", json=JOB, headers=cross).status_code == 202
    assert http.delete("/jobs/3f1c1d2e-8e9a-4f7b-9c1d-2e8e9a4f7b9c", headers=cross).status_code == 404


def test_the_pages_own_requests_and_other_clients_pass(make: Make, redis_db) -> None:
    http = make()
    for headers in (
        {"Origin": "http://127.0.0.1:8000", "Sec-Fetch-Site": "same-origin"},
        # Behind a proxy that rewrote Host: on HTTPS the browser still says same-origin...
        {"Origin": "https://images.example.com", "Sec-Fetch-Site": "same-origin", "Host": "api:8000"},
        # ...on plain HTTP only Origin comes, and the proxy's forwarding headers name the host.
        {"Origin": "http://gpu-box", "Host": "127.0.0.1:8000", "X-Forwarded-Host": "gpu-box"},
        {"Origin": "http://gpu-box:8080", "Host": "api", "Forwarded": 'for=10.0.0.1;host="gpu-box:8080";proto=http'},
        {"Origin": "http://127.0.0.1:8000"},
        {"Origin": "http://gpu-box", "Host": "gpu-box:80"},  # a default port, written or not
        {"Origin": "http://gpu-box", "Host": "gpu-box."},  # a trailing dot
        {},  # curl, SDKs: neither header
        {"Sec-Fetch-Site": "none"},  # a URL typed by the user
    ):
        answer = http.post("/variations", files=_files(), headers=headers)
        assert answer.status_code == 202, (headers, answer.text)
    # Reads are never refused for their origin: CORS decides what a page may read.
    assert http.get("/healthz", headers={"Sec-Fetch-Site": "cross-site"}).status_code == 200
    assert _queued(redis_db) == 9


def test_origins_allowed_by_cors_or_the_public_url_pass(make: Make) -> None:
    http = make(cors_origins="https://app.example.com", public_url="https://images.example.com:443/imagegen")
    allowed = {"Origin": "https://app.example.com", "Sec-Fetch-Site": "cross-site"}
    assert http.post("/variations", files=_files(), headers=allowed).status_code == 202
    public = {"Origin": "https://images.example.com", "Host": "api:8000"}
    assert http.post("/variations", files=_files(), headers=public).status_code == 202
    refused = {"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"}
    assert http.post("/variations", files=_files(), headers=refused).status_code == 403
    assert make(cors_origins="*").post("/variations", files=_files(), headers=refused).status_code == 202


def test_allowed_hosts(make: Make) -> None:
    http = make(allowed_hosts="localhost,127.0.0.1,::1,*.example.com:443,example.org.")
    for host in ("127.0.0.1:8000", "localhost", "LOCALHOST:80", "localhost.:8000", "[::1]:8000", "api.example.com",
                 "example.org"):  # fmt: skip
        assert http.get("/healthz", headers={"Host": host}).status_code == 200, host
    for host in ("rebind.evil.example:8000", "example.com", "127.0.0.2", "evilexample.com"):
        answer = http.get("/jobs", headers={"Host": host})
        assert answer.status_code == 400, host
        assert "IMAGEGEN_ALLOWED_HOSTS" in answer.json()["error"]["message"]
    # Empty (the default): any host.
    assert make().get("/jobs", headers={"Host": "rebind.evil.example"}).status_code == 200
