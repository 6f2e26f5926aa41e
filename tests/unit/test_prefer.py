"""Parsing the `Prefer: wait=N` header of POST /generate (RFC 7240)."""

from __future__ import annotations

import pytest

from app.api.routes.generate import MAX_WAIT, prefer_wait


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
