"""app.api.bodies: a route reading its own JSON body and headers answers as FastAPI would."""

from __future__ import annotations

from typing import Annotated, Any

import fastapi.routing
import pytest
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient
from pydantic import BaseModel, ConfigDict, Field

from app.api import errors
from app.api.bodies import DirectRoute, header, header_parameters, json_request_body, read_json
from app.core.config import Settings
from app.main import create_app
from tests.procs import RedisServer


class Inner(BaseModel):
    size: int = Field(ge=1)


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)
    inner: Inner | None = None


def client() -> TestClient:
    app = FastAPI()
    errors.install(app)

    @app.post(
        "/echo",
        openapi_extra={"requestBody": json_request_body(Body), "parameters": header_parameters(tag="A label")},
    )
    async def echo(request: Request) -> dict:
        body = await read_json(request, Body)
        return {"body": body.model_dump(), "tag": header(request, "tag")}

    return TestClient(app)


def test_valid_body_and_header() -> None:
    r = client().post("/echo", json={"name": "a", "inner": {"size": 2}}, headers={"Tag": "t"})
    assert r.status_code == 200 and r.json() == {"body": {"name": "a", "inner": {"size": 2}}, "tag": "t"}
    r = client().post("/echo", content=b'{"name": "a"}', headers={"content-type": "application/merge-patch+json"})
    assert r.status_code == 200 and r.json()["tag"] is None


def test_errors_keep_fastapis_locations_and_codes() -> None:
    http = client()
    r = http.post("/echo", json={"name": "a", "inner": {"size": 0}})
    err = r.json()["error"]
    assert r.status_code == 422 and err["code"] == "validation_error" and err["message"].startswith("inner.size:")
    assert err["details"][0]["loc"] == ["body", "inner", "size"]
    r = http.post("/echo", json={"name": "a", "extra": 1})
    assert r.status_code == 422 and r.json()["error"]["details"][0]["type"] == "extra_forbidden"
    r = http.post("/echo", content=b'{"name": ', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "malformed_json"
    assert (
        r.json()["error"]["message"] == "request body is not valid JSON: EOF while parsing a value at line 1 column 9"
    )
    # Valid JSON a parser cannot hold: the message says why, not just "not valid JSON".
    r = http.post(
        "/echo", content=b'{"name": "a", "n": 1' + b"0" * 5000 + b"}", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and "number out of range" in r.json()["error"]["message"], r.json()
    for headers in ({"content-type": "text/plain"}, {"content-type": "application/x-www-form-urlencoded"}, {}):
        r = http.post("/echo", content=b'{"name": "a"}', headers=headers)
        assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type", headers
    r = http.post("/echo", json={"name": "a"}, headers={"Tag": "x" * 256})
    assert r.status_code == 422 and r.json()["error"]["details"][0]["loc"] == ["header", "tag"]


def test_openapi_documents_the_body_and_headers() -> None:
    operation = client().get("/openapi.json").json()["paths"]["/echo"]["post"]
    schema = operation["requestBody"]["content"]["application/json"]["schema"]
    assert schema["title"] == "Body" and schema["required"] == ["name"] and "$defs" not in schema
    assert "$ref" not in str(schema) and schema["properties"]["inner"]["anyOf"][0]["properties"]["size"]["minimum"] == 1
    string = {"type": "string", "maxLength": 255}
    assert operation["parameters"] == [
        {"name": "tag", "in": "header", "required": False, "description": "A label", "schema": string}
    ]


@pytest.fixture
def solver_calls(monkeypatch) -> list[object]:
    """The dependants FastAPI's per-request solver is called for, from now on."""
    calls: list[object] = []
    solve = fastapi.routing.solve_dependencies

    async def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(kwargs.get("dependant"))
        return await solve(*args, **kwargs)

    monkeypatch.setattr(fastapi.routing, "solve_dependencies", counted)
    return calls


def test_direct_route_calls_its_endpoint_without_fastapis_solver(solver_calls: list[object]) -> None:
    app = FastAPI()
    errors.install(app)
    router = APIRouter(route_class=DirectRoute)

    @router.post("/direct", response_model=Body, openapi_extra={"requestBody": json_request_body(Body)})
    async def direct(request: Request) -> Response:
        body = await read_json(request, Body)
        if body.name == "teapot":
            raise HTTPException(418, detail="short and stout")
        return JSONResponse(body.model_dump(), status_code=201)

    @app.post("/declared")
    async def declared(body: Body) -> dict:
        return body.model_dump()

    app.include_router(router)
    calls = solver_calls
    http = TestClient(app)
    r = http.post("/direct", json={"name": "a"})
    assert r.status_code == 201 and r.json() == {"name": "a", "inner": None} and calls == []
    # The app's handlers still shape its errors: its own exceptions and read_json's.
    r = http.post("/direct", json={"name": "teapot"})
    assert r.status_code == 418 and r.json()["error"]["message"] == "short and stout"
    assert http.post("/direct", json={"name": ""}).json()["error"]["code"] == "validation_error"
    assert calls == []
    assert http.post("/declared", json={"name": "a"}).status_code == 200 and len(calls) == 1  # the check can fail
    schema = http.get("/openapi.json").json()["paths"]["/direct"]["post"]
    assert schema["requestBody"]["content"]["application/json"]["schema"]["title"] == "Body"


def test_direct_route_refuses_endpoints_with_parameters() -> None:
    def dependency() -> int:
        return 1

    async def with_dependency(request: Request, n: Annotated[int, Depends(dependency)]) -> Response:
        return Response()

    async def with_query(request: Request, q: str) -> Response:
        return Response()

    async def without_request() -> Response:
        return Response()

    for endpoint in (with_dependency, with_query, without_request):
        router = APIRouter(route_class=DirectRoute)
        with pytest.raises(TypeError, match="DirectRoute"):
            router.post("/x")(endpoint)

    async def alone(request: Request) -> Response:
        return Response()

    router = APIRouter(route_class=DirectRoute)
    router.post("/x")(alone)
    app = FastAPI()
    app.include_router(router)
    assert TestClient(app).post("/x").status_code == 200  # fine as it is


def test_direct_route_runs_dependencies_given_where_it_is_included(solver_calls: list[object]) -> None:
    """A guard added where the route is included (a key check on the router, the inclusion or the
    app) used to make every request a 500: FastAPI builds that view of the route at the first
    request, and the route refused it there. Now such a route runs through FastAPI's handler, its
    guards with it."""
    seen: list[str] = []

    def guard(request: Request) -> None:
        seen.append(request.url.path)
        if request.headers.get("x-key") != "k":
            raise HTTPException(403, "no")

    async def alone(request: Request) -> Response:
        return Response("ok")

    def routed(**dependencies: Any) -> APIRouter:
        router = APIRouter(route_class=DirectRoute, **dependencies)
        router.post("/x")(alone)
        return router

    guarded = [Depends(guard)]
    apps = [FastAPI(), FastAPI(), FastAPI(dependencies=guarded)]
    apps[0].include_router(routed(), dependencies=guarded)
    apps[1].include_router(routed(dependencies=guarded))
    apps[2].include_router(routed())
    for app in apps:
        http = TestClient(app)
        seen.clear()
        assert http.post("/x").status_code == 403
        assert http.post("/x", headers={"x-key": "k"}).text == "ok"
        assert seen == ["/x", "/x"]
    solver_calls.clear()
    plain = FastAPI()
    plain.include_router(routed())
    assert TestClient(plain).post("/x").text == "ok" and solver_calls == []  # no guard: direct


def test_post_generate_solves_nothing_per_request(
    solver_calls: list[object], redis_server: RedisServer, redis_db
) -> None:
    """The hot route goes straight to its endpoint, its caller's key still checked first."""
    calls = solver_calls
    url = f"redis://127.0.0.1:{redis_server.port}/15"
    with TestClient(create_app(Settings(redis_url=url, api_keys="open-sesame-0123456789"))) as http:
        ok = {"authorization": "Bearer open-sesame-0123456789"}
        r = http.post("/generate", json={"prompt": "a red circle"}, headers=ok)
        assert r.status_code == 202 and r.json()["status"] == "queued", r.text
        r = http.post("/generate", content=b"not json", headers={"content-type": "text/plain"})
        assert r.status_code == 401  # the key before the body, as when the key was a dependency
        r = http.post("/generate", content=b"not json", headers={"content-type": "text/plain", **ok})
        assert r.status_code == 415
        assert calls == []
        assert http.get("/jobs", headers=ok).status_code == 200 and calls  # other routes still solve
