"""The request counter's labels stay bounded whatever clients send."""

from __future__ import annotations

from fastapi.testclient import TestClient

from app.core.config import Settings
from app.main import create_app


def test_unknown_methods_are_counted_as_other() -> None:
    """Each method token a client invented was a series of its own (PROPFIND, FOO, …)."""
    app = create_app(Settings())
    with TestClient(app) as http:
        for method in ("PROPFIND", "FOO", "BAR", "GET"):
            http.request(method, "/healthz")
    methods = {
        sample.labels["method"]
        for family in app.state.metrics.requests.collect()
        for sample in family.samples
        if sample.name.endswith("_total")
    }
    assert methods == {"GET", "other"}, methods
