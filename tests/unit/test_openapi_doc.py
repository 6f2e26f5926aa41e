"""The OpenAPI document tells clients what this server does: its own size bounds, and with API keys
on, the bearer scheme, which operations need it, and their 401."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from app.core.config import Settings
from app.main import create_app


def _spec(**settings: Any) -> dict[str, Any]:
    with TestClient(create_app(Settings(**settings))) as http:  # no Redis needed to read the document
        return http.get("/openapi.json").json()


def _integer(field: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in field.get("anyOf", [field]) if c.get("type") == "integer")


def test_request_sizes_carry_the_servers_bounds() -> None:
    """They said 8–4096 in any step; a width of 2048 was a 422 from a server that takes 1024."""
    spec = _spec(max_width=512, max_height=768, min_size=16)
    body = spec["paths"]["/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    for name, limit in (("width", 512), ("height", 768)):
        field = _integer(body["properties"][name])
        assert (field["minimum"], field["maximum"], field["multipleOf"]) == (16, limit, 8)
    image = spec["components"]["schemas"]["ImageRef"]["properties"]["width"]
    assert "maximum" not in image and "multipleOf" not in image  # answers are left as they are


def test_without_keys_nothing_asks_for_one() -> None:
    spec = _spec()
    assert "securitySchemes" not in spec.get("components", {})
    assert all("security" not in op for ops in spec["paths"].values() for op in ops.values())
    headers = spec["paths"]["/generate"]["post"]["responses"]["202"]["headers"]
    assert "Location" in headers  # where the queued job is polled


def test_with_keys_operations_name_the_bearer_scheme_and_their_401() -> None:
    """Nothing said a key was needed: SDKs generated from the document sent none."""
    spec = _spec(api_keys="k" * 32)
    assert spec["components"]["securitySchemes"]["apiKey"] == {
        "type": "http",
        "scheme": "bearer",
        "description": spec["components"]["securitySchemes"]["apiKey"]["description"],
    }
    paths = spec["paths"]
    for path in ("/healthz", "/readyz", "/metrics"):
        assert paths[path]["get"]["security"] == []
    assert paths["/jobs/{job_id}/images/{index}"]["get"]["security"] == [{"apiKey": []}, {}]  # or a signed link
    for path, method in (("/generate", "post"), ("/jobs", "get"), ("/jobs/{job_id}", "delete"), ("/models", "get")):
        operation = paths[path][method]
        assert operation["security"] == [{"apiKey": []}], path
        assert operation["responses"]["401"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorEnvelope")
    v1 = paths["/v1/images/generations"]["post"]["responses"]["401"]
    assert v1["content"]["application/json"]["schema"]["$ref"].endswith("/OpenAIErrorEnvelope")
