"""app.api.bodies: a route reading its own JSON body and headers answers as FastAPI would."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from pydantic import BaseModel, ConfigDict, Field

from app.api import errors
from app.api.bodies import header, header_parameters, json_request_body, read_json


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
