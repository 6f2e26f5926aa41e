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
        ("handling=lenient, WAIT = 3", 3.0),
        # `;` starts parameters of the preference before it (RFC 7240): no `wait` preference here
        ("handling=lenient; WAIT = 3", 0.0),
        ("foo; wait=5", 0.0),
        ("foo;wait=5, wait=2", 2.0),
        ('foo; bar="a, wait=3", wait=1', 1.0),  # a comma inside a quoted string separates nothing
        ('foo="x;y, wait=3"', 0.0),
        ("wait=4; foo=bar", 4.0),  # a parameter of `wait` itself
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
        # JSON takes the q of application/json, else application/*, else */*
        ("image/png;q=0.5, */*", False),
        ("image/png;q=0.5, application/*", False),
        ("image/png;q=0.5, application/*;q=0.4, */*", True),  # application/* before */*
        ("image/png;q=0.5, application/json;q=0.4, application/*", True),
        ("image/png;q=0.9, */*;q=1.0", False),
        # equal q: the named PNG still wins over a wildcard, in either order (as before)
        ("image/png, */*", True),
        ("*/*, image/png", True),
        ("application/*, image/png", True),
    ],
)
def test_wants_png(accept: str | None, png: bool) -> None:
    assert wants_png(accept) is png
