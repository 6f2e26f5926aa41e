"""The OpenAI-compatible `/v1` routes as stock OpenAI clients call them: the JS SDK's CORS
preflight from a page, `null` for nullable fields, `size: "auto"`, and a server under a path prefix.

Over the real app (a real Redis, no worker): a request that passes validation ends at the
"no worker" 503, before anything is queued."""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.api.openai_schemas import ImagesGenerationRequest
from app.api.routes.openai import check_model_and_size
from app.api.routes.openai_variations import ImagesVariationRequest
from app.core.config import Settings
from app.main import create_app
from tests.procs import RedisServer

ORIGIN = "https://app.example"
# What openai-node sends with every request (browser or not), besides Authorization and Content-Type.
STAINLESS = [
    "x-stainless-arch",
    "x-stainless-lang",
    "x-stainless-os",
    "x-stainless-package-version",
    "x-stainless-runtime",
    "x-stainless-runtime-version",
    "x-stainless-retry-count",
    "x-stainless-timeout",
]


@pytest.fixture
def settings(redis_server: RedisServer, redis_db, tmp_path: Path) -> Settings:
    return Settings(
        redis_url=f"redis://127.0.0.1:{redis_server.port}/15",
        model="tiny-random",
        results_dir=str(tmp_path / "results"),
        cors_origins=f"{ORIGIN}, https://other.example",
    )


@pytest.fixture
def http(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as client:
        yield client


def _png_b64() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), "red").save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _passed_validation(r) -> bool:  # noqa: ANN001 - an httpx response
    """The request reached the worker check (no worker here), so its fields were all taken."""
    return r.status_code == 503 and "no worker" in r.json()["error"]["message"]


def test_the_js_sdks_preflight_from_an_allowed_origin_is_accepted(http: TestClient) -> None:
    """The preflight named the SDK's x-stainless-* headers and was refused (400 Disallowed CORS headers)."""
    requested = ", ".join(["authorization", "content-type", *STAINLESS])
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": requested}
    r = http.options("/v1/images/generations", headers=preflight)
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == ORIGIN
    allowed = {h.strip().lower() for h in r.headers["access-control-allow-headers"].split(",")}
    assert allowed >= {"authorization", "content-type", *STAINLESS}
    assert "access-control-allow-credentials" not in r.headers  # still no credentials
    r = http.options("/v1/images/generations", headers={**preflight, "Origin": "https://evil.example"})
    assert r.status_code == 400  # other origins are still refused
    r = http.options("/v1/images/generations", headers={**preflight, "Access-Control-Request-Headers": "x-other"})
    assert r.status_code == 400  # and headers nobody sends
    # A client made with an organization or a project sends those too.
    both = {**preflight, "Access-Control-Request-Headers": f"{requested}, openai-organization, openai-project"}
    assert http.options("/v1/images/generations", headers=both).status_code == 200


def test_pages_can_read_x_should_retry(http: TestClient) -> None:
    """Unexposed, the JS SDK could not read `x-should-retry: false` and retried a 504 (a second job)."""
    r = http.get("/v1/nowhere", headers={"Origin": ORIGIN})
    exposed = {h.strip().lower() for h in r.headers["access-control-expose-headers"].split(",")}
    assert "x-should-retry" in exposed and "x-imagegen-job-id" in exposed


def test_null_n_and_response_format_take_their_defaults() -> None:
    body = ImagesGenerationRequest.model_validate({"prompt": "x", "n": None, "response_format": None})
    assert body.n == 1 and body.response_format == "url"
    fields = ImagesVariationRequest.model_validate({"n": None, "response_format": None})
    assert fields.n == 1 and fields.response_format == "url"
    with pytest.raises(ValueError, match="not true or false"):  # what was refused still is
        ImagesGenerationRequest.model_validate({"prompt": "x", "n": True})


def test_size_auto_is_the_models_native_size(settings: Settings, redis_db) -> None:
    for size in ("auto", " AUTO ", None):
        assert asyncio.run(check_model_and_size(None, size, settings, redis_db)) == (None, None)
    assert asyncio.run(check_model_and_size(None, "64x32", settings, redis_db)) == (64, 32)


@pytest.mark.parametrize(
    "fields",
    [{"n": None}, {"response_format": None}, {"size": "auto"}, {"n": None, "response_format": None, "size": "auto"}],
)
def test_v1_routes_take_nulls_and_size_auto(http: TestClient, fields: dict) -> None:
    """Both were 400s: `n`/`response_format` "Input should be ...", size "not of the form WIDTHxHEIGHT"."""
    r = http.post("/v1/images/generations", json={"prompt": "x", **fields})
    assert _passed_validation(r), r.text
    r = http.post("/v1/images/variations", json={"image": _png_b64(), **fields})
    assert _passed_validation(r), r.text


def test_wrong_method_under_a_path_prefix_is_a_405(settings: Settings) -> None:
    """Behind `--root-path /imagegen` the routes were matched against the prefixed path: a 404."""
    with TestClient(create_app(settings), root_path="/imagegen") as http:
        for path in ("/v1/images/generations", "/v1/images/variations"):
            r = http.get("/imagegen" + path)
            assert r.status_code == 405 and r.headers["allow"] == "POST", r.text
            assert r.json()["error"]["code"] == "method_not_allowed"
            assert r.json()["error"]["message"] == f"GET is not allowed on /imagegen{path}; use POST"
        r = http.get("/imagegen/v1/nowhere")
        assert r.status_code == 404 and r.json()["error"]["message"] == "Invalid URL (GET /imagegen/v1/nowhere)"


def test_wrong_method_without_a_prefix_reads_as_before(http: TestClient) -> None:
    r = http.get("/v1/images/generations")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert r.json()["error"]["message"] == "GET is not allowed on /v1/images/generations; use POST"
    r = http.delete("/v1/images/variations")
    assert (
        r.status_code == 405
        and r.json()["error"]["message"] == "DELETE is not allowed on /v1/images/variations; use POST"
    )
    r = http.get("/v1/nowhere")
    assert r.status_code == 404 and r.json()["error"]["message"] == "Invalid URL (GET /v1/nowhere)"
