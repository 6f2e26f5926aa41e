"""Parsing the `Prefer: wait=N` (RFC 7240) and `Accept` headers of POST /generate."""

from __future__ import annotations

import pytest

from app.api.routes.generate import MAX_WAIT, prefer_wait, wants_png


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        (None, 0.0),
        ("", 0.0),
        ("wait=5", 5.0),
        ("respond-async, wait=2.5", 2.5),
        ("handling=lenient; WAIT = 3", 3.0),
        ('wait="4"', 4.0),
        ("wait=3600", MAX_WAIT),  # capped like the long-poll
        ("wait=0", 0.0),
        ("wait=-1", 0.0),
        ("wait=nan", 0.0),
        ("wait=inf", 0.0),
        ("wait=soon", 0.0),  # not understood: ignored
        ("return=minimal", 0.0),
    ],
)
def test_prefer_wait(header: str | None, seconds: float) -> None:
    assert prefer_wait(header) == seconds


@pytest.mark.parametrize(
    ("accept", "png"),
    [
        (None, False),
        ("", False),
        ("*/*", False),  # wildcards never select bytes: only a client that names the PNG gets it
        ("image/*", False),
        ("application/json", False),
        ("image/png", True),
        ("IMAGE/PNG", True),
        ("image/png, application/json", True),  # same q: the first listed
        ("application/json, image/png", False),
        ("application/json;q=0.5, image/png", True),
        ("image/png;q=0.2, application/json", False),
        ("image/png;q=0", False),
        ("image/png;q=bogus", False),
        ("text/html, image/png;q=0.9, */*;q=0.8", True),
    ],
)
def test_wants_png(accept: str | None, png: bool) -> None:
    assert wants_png(accept) is png
