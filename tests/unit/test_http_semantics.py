"""HTTP semantics of the job routes over the real app (a real Redis, no worker; a job's run is
written into Redis as a worker writes it): idempotent replays with `Prefer: wait`, HEAD, the image
caching headers and conditional GET, and prompts the worker cannot use."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from rq.job import Job
from rq.results import Result

from app.core import events
from app.core.config import Settings
from app.core.events import EventType
from app.core.jobs import GenerationParams
from app.core.queue import SERIALIZER
from app.main import create_app
from tests.procs import RedisServer
from tests.unit.test_model_routing import publish

TTL = 600


@pytest.fixture
def http(redis_server: RedisServer, redis_db, tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(
        redis_url=f"redis://127.0.0.1:{redis_server.port}/15",
        model="main",
        results_dir=str(tmp_path / "results"),
        result_ttl=TTL,
    )
    with TestClient(create_app(settings)) as client:
        yield client


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buf, "PNG")
    return buf.getvalue()


def start(redis_db, job_id: str) -> None:
    redis_db.hset(Job.key_for(job_id), "status", "started")


def succeed(http: TestClient, redis_db, job_id: str) -> bytes:
    """What a worker writes when a one-image job succeeds: the PNG, RQ's result and status, the event."""
    png = _png()
    http.app.state.store.put(job_id, 0, png, TTL)  # type: ignore[attr-defined]
    job = Job.fetch(job_id, connection=redis_db, serializer=SERIALIZER)
    images = [{"index": 0, "seed": 1, "width": 8, "height": 8}]
    Result.create(job, Result.Type.SUCCESSFUL, TTL, return_value={"images": images})
    redis_db.hset(Job.key_for(job_id), mapping={"status": "finished", "ended_at": _now()})
    event = events.make_event(EventType.succeeded, job_id, "succeeded", images=[{**images[0], "url": "/x"}])
    events.publish(redis_db, event, TTL)
    return png


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


BODY = {"prompt": "a red circle", "seed": 1}


# 1. Idempotent replays with `Prefer: wait`


def test_a_replay_with_prefer_wait_of_an_unfinished_job_is_a_202(http: TestClient, redis_db) -> None:
    """The replay got 200 with "status":"running" (and with `Accept: image/png` a 200 JSON, which
    `curl -sf -o x.png` saved as the image)."""
    key = {"Idempotency-Key": "replay-1"}
    first = http.post("/generate", json=BODY, headers=key)
    assert first.status_code == 202, first.text
    job_id = first.json()["id"]
    wait = {**key, "Prefer": "wait=0.2"}
    r = http.post("/generate", json=BODY, headers=wait)
    assert (r.status_code, r.json()["status"]) == (202, "queued")
    start(redis_db, job_id)
    for headers in (wait, {**wait, "Accept": "image/png"}):
        r = http.post("/generate", json=BODY, headers=headers)
        assert r.status_code == 202 and r.headers["content-type"] == "application/json"
        assert r.json()["id"] == job_id and r.json()["status"] == "running"
        assert r.headers["preference-applied"] == "wait=0.2"
    png = succeed(http, redis_db, job_id)
    r = http.post("/generate", json=BODY, headers=wait)  # an ended job: 200, as any replay
    assert (r.status_code, r.json()["status"]) == (200, "succeeded")
    r = http.post("/generate", json=BODY, headers=key)  # without a wait: the original job, 200
    assert (r.status_code, r.json()["id"]) == (200, job_id)
    r = http.post("/generate", json=BODY, headers={**wait, "Accept": "image/png"})
    assert r.status_code == 200 and r.content == png and r.headers["content-type"] == "image/png"


# 3. The PNG's headers, wherever it is sent


def _check_image_headers(headers, job_id: str) -> None:
    assert headers["etag"] == f'"{job_id}-0"'
    cache = re.fullmatch(r"private, max-age=(\d+), immutable", headers["cache-control"])
    assert cache is not None and TTL - 10 <= int(cache[1]) <= TTL, headers["cache-control"]
    assert headers["content-disposition"] == f'inline; filename="{job_id}-0.png"'
    assert headers["x-content-type-options"] == "nosniff"


def test_image_responses_are_cacheable_and_conditional(http: TestClient, redis_db) -> None:
    job_id = http.post("/generate", json=BODY).json()["id"]
    png = succeed(http, redis_db, job_id)
    url = f"/jobs/{job_id}/images/0"
    r = http.get(url)
    assert r.status_code == 200 and r.content == png
    _check_image_headers(r.headers, job_id)
    for tag in (f'"{job_id}-0"', f'W/"{job_id}-0"', f'"other", "{job_id}-0"', "*"):
        r = http.get(url, headers={"If-None-Match": tag})
        assert r.status_code == 304 and r.content == b"", tag
        _check_image_headers(r.headers, job_id)
    r = http.get(url, headers={"If-None-Match": f'"{job_id}-1"'})
    assert r.status_code == 200 and r.content == png
    assert http.get(f"/jobs/{job_id}/images/1", headers={"If-None-Match": "*"}).status_code == 404
    ended = datetime.now(UTC) - timedelta(seconds=100)  # fresh for what is left of the job, no longer
    redis_db.hset(Job.key_for(job_id), "ended_at", ended.strftime("%Y-%m-%dT%H:%M:%S.%fZ"))
    left = int(http.get(url).headers["cache-control"].split("max-age=")[1].split(",")[0])
    assert TTL - 110 <= left <= TTL - 100


def test_the_png_sent_from_the_post_has_the_image_headers(http: TestClient, redis_db) -> None:
    """It had neither Cache-Control nor `X-Content-Type-Options: nosniff`."""
    job_id = http.post("/generate", json=BODY).json()["id"]
    png = succeed(http, redis_db, job_id)
    headers = {"Prefer": "wait=1", "Accept": "image/png", "Idempotency-Key": "png-headers"}
    r = http.post("/generate", json=BODY, headers=headers)  # a new job: a worker never comes, ...
    assert r.status_code == 202
    other = r.json()["id"]
    succeed(http, redis_db, other)
    r = http.post("/generate", json=BODY, headers=headers)  # ... so finish it and replay
    assert r.status_code == 200 and r.content == png
    _check_image_headers(r.headers, other)
    assert r.headers["location"].endswith(f"/jobs/{other}")


# 2. HEAD on the GET routes


def test_head_is_answered_on_the_get_routes(http: TestClient, redis_db) -> None:
    publish(redis_db, "main")  # a live worker, for /readyz
    job_id = http.post("/generate", json=BODY).json()["id"]
    succeed(http, redis_db, job_id)
    for path in (f"/jobs/{job_id}/images/0", f"/jobs/{job_id}", "/jobs", "/healthz", "/readyz", "/models"):
        get, head = http.get(path), http.head(path)
        assert head.status_code == get.status_code == 200, (path, head.status_code)
        assert head.headers["content-type"] == get.headers["content-type"], path
        if path != "/jobs" and path != f"/jobs/{job_id}":  # (those carry queue positions and ETAs that move)
            assert head.headers["content-length"] == get.headers["content-length"], path
    assert http.head(f"/jobs/{job_id}/images/9").status_code == 404  # errors as GET answers them
    assert http.head("/jobs/00000000-0000-0000-0000-000000000000").status_code == 404


def test_openapi_lists_no_head_operations(http: TestClient) -> None:
    paths = http.get("/openapi.json").json()["paths"]
    operations = [op for item in paths.values() for method, op in item.items() if method != "parameters"]
    assert not any("head" in item for item in paths.values())
    ids = [op["operationId"] for op in operations]
    assert len(ids) == len(set(ids))
    assert set(paths["/jobs/{job_id}/images/{index}"]) == {"get"} and set(paths["/healthz"]) == {"get"}


# 5. Prompts the worker cannot use


@pytest.mark.parametrize(
    "prompt", ["\u200b", " \u200c\u200d\n", "\ufeff\u2060\t", "\u3000\u200b", "\u0000", "\x07\x1b \x7f"]
)
def test_a_prompt_of_invisible_characters_is_blank(http: TestClient, prompt: str) -> None:
    r = http.post("/generate", json={"prompt": prompt})
    assert r.status_code == 422 and r.json()["error"]["message"] == "prompt: Value error, must not be blank", r.text
    r = http.post("/v1/images/generations", json={"prompt": prompt})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text


def test_visible_text_passes_whatever_invisible_characters_it_holds() -> None:
    params = GenerationParams(prompt="a red\tcircle\r\non blue", negative_prompt="blurry\n")
    assert params.prompt == "a red\tcircle\r\non blue"
    assert GenerationParams(prompt="\u200bcat\u200d").prompt == "\u200bcat\u200d"
    assert GenerationParams(prompt="cat\x00\x1b", negative_prompt="\x00").negative_prompt == "\x00"


def test_a_replay_that_names_the_default_model_is_the_same_request(http: TestClient) -> None:
    """`"model": "main"` on a server whose model is `main` asks for what leaving it out asks for:
    the retry was a 409 (another body) when one of the two named it."""
    key = {"Idempotency-Key": "replay-model"}
    first = http.post("/generate", json=BODY, headers=key)
    again = http.post("/generate", json={**BODY, "model": "main"}, headers=key)
    assert (first.status_code, again.status_code) == (202, 200), again.text
    assert again.json()["id"] == first.json()["id"]
    other = http.post("/generate", json={**BODY, "seed": 12345}, headers=key)
    assert other.status_code == 409  # a request that differs still does


def test_an_idempotency_key_used_on_another_route_is_named(http: TestClient) -> None:
    """The same key on /generate, then on /variations (and the other way round): a 409 that says
    which request the key went with, not "a different request body"."""
    first = http.post("/generate", json={"prompt": "a red circle"}, headers={"Idempotency-Key": "k-route"})
    assert first.status_code == 202, first.text
    files = {"image": ("x.png", _png(), "image/png")}
    again = http.post("/variations", files=files, headers={"Idempotency-Key": "k-route"})
    assert again.status_code == 409, again.text
    error = again.json()["error"]
    assert error["code"] == "idempotency_conflict"
    assert "POST /generate" in error["message"] and first.json()["id"] in error["message"], error
    varied = http.post("/variations", files=files, headers={"Idempotency-Key": "k-other"})
    assert varied.status_code == 202, varied.text
    back = http.post("/generate", json={"prompt": "x"}, headers={"Idempotency-Key": "k-other"})
    assert back.status_code == 409 and "POST /variations" in back.json()["error"]["message"], back.text
    # Same route, another body: as before.
    body = http.post("/generate", json={"prompt": "a blue square"}, headers={"Idempotency-Key": "k-route"})
    assert body.status_code == 409 and "different request body" in body.json()["error"]["message"]
