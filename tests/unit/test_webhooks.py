"""Webhook signing, SSRF refusal and retry policy against a real HTTP receiver on loopback."""

from __future__ import annotations

import json

import pytest

from app.core.webhooks import WebhookTargetError, check_target, deliver, sign, verify
from tests.procs import WebhookReceiver


def test_signature_round_trip() -> None:
    sig = sign("s3cret", "1700000000", b'{"a":1}')
    assert sig.startswith("sha256=") and len(sig) == 7 + 64
    assert verify("s3cret", "1700000000", b'{"a":1}', sig)
    assert not verify("s3cret", "1700000001", b'{"a":1}', sig)
    assert not verify("other", "1700000000", b'{"a":1}', sig)


@pytest.mark.parametrize(
    "addr",
    [
        "127.0.0.1",
        "10.1.2.3",
        "192.168.0.10",
        "172.16.5.4",
        "169.254.169.254",
        "::1",
        "fd00::1",
        "::ffff:127.0.0.1",
        "0.0.0.0",
        "100.64.0.1",
    ],
)
def test_internal_targets_are_refused(addr: str) -> None:
    with pytest.raises(WebhookTargetError):
        check_target("http://hooks.example/x", allow_private=False, resolve=lambda host: [addr])
    check_target("http://hooks.example/x", allow_private=True, resolve=lambda host: [addr])


def test_public_targets_and_bad_urls() -> None:
    check_target("https://hooks.example/x", allow_private=False, resolve=lambda host: ["93.184.215.14"])
    for url in ("ftp://hooks.example/x", "http:///nohost", "http://user:pw@hooks.example/", "javascript:alert(1)"):
        with pytest.raises(WebhookTargetError):
            check_target(url, allow_private=True)


def test_delivery_retries_with_backoff_then_succeeds() -> None:
    receiver = WebhookReceiver(fail=2)
    sleeps: list[float] = []
    try:
        body = json.dumps({"type": "succeeded"}).encode()
        ok = deliver(receiver.url, body, secret="k", max_attempts=5, allow_private=True, sleep=sleeps.append)
    finally:
        receiver.close()
    assert ok and receiver.attempts == 3
    assert sleeps == [0.5, 1.0]
    headers, got = receiver.accepted[-1]
    assert got == body and verify("k", headers["x-imagegen-timestamp"], got, headers["x-imagegen-signature"])


def test_delivery_gives_up_and_never_reaches_refused_targets() -> None:
    receiver = WebhookReceiver(fail=99)
    try:
        assert not deliver(receiver.url, b"{}", secret="k", max_attempts=3, allow_private=True, sleep=lambda s: None)
        assert receiver.attempts == 3
        assert not deliver(receiver.url, b"{}", secret="k", max_attempts=3, allow_private=False, sleep=lambda s: None)
        assert receiver.attempts == 3  # loopback refused: nothing was sent
    finally:
        receiver.close()
