"""Webhook signing, SSRF refusal and retry policy against a real HTTP receiver on loopback."""

from __future__ import annotations

import json

import pytest

from app.core.webhooks import WebhookTargetError, attempt, check_target, sign, verify
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
        "168.63.129.16",  # Azure's host service (wire server)
        "100.100.100.200",  # Alibaba's metadata
        "fec0::1",  # deprecated IPv6 site-local
        "::ffff:168.63.129.16",
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
    # Refused at submission, not a ValueError out of urlsplit (a 500), nor a URL accepted whose
    # port fails only at delivery (an event dropped as "crashed").
    for url in ("http://[::1/x", "http://1.1.1.1:99999/x", "http://1.1.1.1:abc/"):
        with pytest.raises(WebhookTargetError, match="not a valid URL"):
            check_target(url, allow_private=True)
    for host in ("a..b", "a" * 64 + ".example"):  # names the IDNA codec refuses: a UnicodeError, before any lookup
        with pytest.raises(WebhookTargetError, match="does not resolve"):
            check_target(f"http://{host}/x", allow_private=False)


def test_delivery_retries_with_backoff_then_succeeds() -> None:
    from app.core.webhooks import WebhookSender, backoff

    receiver = WebhookReceiver(fail=2)
    sender = WebhookSender(_sender_settings())
    event = _event("succeeded", "job-a")
    try:
        sender.submit(receiver.url, event)
        sender.close(timeout=10)  # the two retries are due 0.5 s and 1 s after their failures
    finally:
        receiver.close()
    assert receiver.attempts == 3 and [backoff(1), backoff(2), backoff(99)] == [0.5, 1.0, 30.0]
    headers, got = receiver.accepted[-1]
    assert json.loads(got)["job_id"] == "job-a"
    assert verify("k", headers["x-imagegen-timestamp"], got, headers["x-imagegen-signature"])


def test_every_retry_of_an_event_carries_its_delivery_id_and_other_events_differ() -> None:
    from app.core.webhooks import WebhookSender

    receiver = WebhookReceiver(fail=2)
    sender = WebhookSender(_sender_settings())
    try:
        sender.submit(receiver.url, _event("started", "job-a"))
        sender.submit(receiver.url, _event("succeeded", "job-a"))
        sender.submit(receiver.url, _event("succeeded", "job-b"))
        sender.close(timeout=10)
    finally:
        receiver.close()
    ids = [headers.get("x-imagegen-delivery") for headers in receiver.tried]
    assert len(ids) == 5 and all(ids), ids
    assert ids[0] == ids[1] == ids[2]  # the first event, refused twice, then delivered
    assert len(set(ids[2:])) == 3  # three events, three ids


def test_events_still_waiting_at_shutdown_are_logged_not_dropped_silently(caplog) -> None:
    from app.core.webhooks import WebhookSender

    receiver = WebhookReceiver(fail=1000)  # down for the whole shutdown
    sender = WebhookSender(_sender_settings())
    try:
        sender.submit(receiver.url, _event("succeeded", "job-late"))
        with caplog.at_level("WARNING", logger="app.core.webhooks"):
            sender.close(timeout=0.3)
    finally:
        receiver.close()
    said = [r.getMessage() for r in caplog.records if "not delivered before shutdown" in r.getMessage()]
    assert len(said) == 1 and "1 event(s) for 1 receiver(s)" in said[0] and "job-late" in said[0], said
    assert "127.0.0.1" not in said[0]  # receivers' URLs stay out of the logs (tokens in paths)


def test_an_event_still_being_sent_at_shutdown_is_not_logged_as_dropped(caplog, monkeypatch) -> None:
    import time

    from app.core import webhooks

    monkeypatch.setattr(webhooks, "attempt", lambda *args, **kwargs: time.sleep(1.0) or True)  # a slow receiver
    sender = webhooks.WebhookSender(_sender_settings())
    sender.submit("https://hooks.example/x", _event("succeeded", "job-sending"))
    sender.submit("https://hooks.example/x", _event("succeeded", "job-waiting"))
    time.sleep(0.2)  # the first is being sent
    with caplog.at_level("WARNING", logger="app.core.webhooks"):
        sender.close(timeout=0.2)
    said = [r.getMessage() for r in caplog.records if "not delivered before shutdown" in r.getMessage()]
    assert len(said) == 1 and "1 event(s)" in said[0] and "job-waiting" in said[0], said
    assert "job-sending" not in said[0]


def test_delivery_gives_up_and_never_reaches_refused_targets(caplog) -> None:
    from app.core.config import Settings
    from app.core.webhooks import WebhookSender, attempt

    receiver = WebhookReceiver(fail=99)
    sender = WebhookSender(Settings(webhook_secret="k", webhook_allow_private=True, webhook_max_attempts=3))
    url = receiver.url + "?token=receiver-secret-123"  # receivers often carry their token so
    caplog.set_level("INFO", logger="app.core.webhooks")
    try:
        sender.submit(url, _event("succeeded", "job-a"))
        sender.close(timeout=10)
        assert receiver.attempts == 3
        assert attempt(url, b"{}", secret="k", allow_private=False) is False
        assert receiver.attempts == 3  # loopback refused: nothing was sent
    finally:
        receiver.close()
    # Every failure and the refusal were logged with the host only: no path, no token.
    lines = [r.getMessage() for r in caplog.records if r.name == "app.core.webhooks"]  # httpx's: see test_logs
    assert sum("http://127.0.0.1:" in line for line in lines) >= 4, lines
    assert not any("receiver-secret" in line or "/hook" in line for line in lines), lines


def test_webhook_urls_are_shown_without_their_path() -> None:
    from app.core.webhooks import shown

    assert shown("https://hooks.example.com/t/abc?sig=1") == "https://hooks.example.com/…"
    assert shown("https://hooks.example.com") == "https://hooks.example.com"
    assert shown("http://[::1]:8080/x") == "http://[::1]:8080/…"
    assert shown("https://example.com:99999/x") == "<malformed URL>"


@pytest.mark.parametrize(
    "addr",
    [
        "2002:a9fe:a9fe::",  # 6to4 of 169.254.169.254
        "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
        "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
    ],
)
def test_ipv4_addresses_inside_ipv6_ones_are_judged_as_themselves(addr: str) -> None:
    with pytest.raises(WebhookTargetError):
        check_target("http://hooks.example/x", allow_private=False, resolve=lambda host: [addr])
    check_target("http://hooks.example/x", allow_private=False, resolve=lambda host: ["2002:5db8:d70e::"])  # public


@pytest.mark.parametrize(
    "url", ["http://hooks.example/x\nERROR forged", "http://hooks.example/a b", "http://h.example/\x7f"]
)
def test_urls_with_spaces_or_control_characters_are_refused(url: str) -> None:
    with pytest.raises(WebhookTargetError, match="control characters"):
        check_target(url, allow_private=True)


def test_the_request_goes_to_the_address_that_was_checked() -> None:
    """DNS rebinding: the host is resolved once, checked, and connected to at that address (with
    its own Host header), so a second lookup cannot lead the request elsewhere. `.invalid` never
    resolves for the HTTP client itself."""
    receiver = WebhookReceiver()
    port = receiver.server.server_port
    lookups: list[str] = []

    def resolve(host: str) -> list[str]:
        lookups.append(host)
        return ["127.0.0.1"]

    try:
        ok = attempt(f"http://hooks.invalid:{port}/x", b"{}", secret="k", allow_private=True, resolve=resolve)
    finally:
        receiver.close()
    assert ok and lookups == ["hooks.invalid"]
    assert receiver.accepted[0][0]["host"] == f"hooks.invalid:{port}"


def test_an_attempt_ends_by_its_deadline_when_the_receiver_dribbles() -> None:
    """A receiver that sends a header line every 0.2 s never trips the client's per-read timeout;
    the attempt still ends (closed under it) once its deadline passes."""
    import socket
    import threading
    import time

    from app.core.webhooks import attempt

    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def dribble() -> None:
        conn, _ = server.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\n")
        while not stop.wait(0.2):
            try:
                conn.sendall(b"X-Slow: 1\r\n")
            except OSError:
                break
        conn.close()

    threading.Thread(target=dribble, daemon=True).start()
    started = time.monotonic()
    try:
        outcome = attempt(f"http://127.0.0.1:{server.getsockname()[1]}/x", b"{}", secret="k", allow_private=True,
                          deadline=1.0)  # fmt: skip
    finally:
        stop.set()
        server.close()
    assert outcome is None  # may be retried
    assert time.monotonic() - started < 30  # it ended at all (the dribble goes on for ever)


def _sender_settings():
    from app.core.config import Settings

    return Settings(webhook_secret="k", webhook_allow_private=True, webhook_max_attempts=6)


def _event(kind: str, job: str, step: int = 0):
    from app.core.events import EventType, make_event

    return make_event(EventType(kind), job, "running", progress={"step": step, "total": 9})


def test_a_failing_receiver_does_not_hold_up_another() -> None:
    """Each URL waits out its own retries: one thread for all made every receiver wait until a
    failing one had been given up on, event by event (about 15 s each here)."""
    import time

    from app.core.webhooks import WebhookSender

    failing, healthy = WebhookReceiver(fail=10_000), WebhookReceiver()
    sender = WebhookSender(_sender_settings())
    try:
        for kind in ("started", "progress", "succeeded"):
            sender.submit(failing.url, _event(kind, "job-a"))
        sender.submit(healthy.url, _event("started", "job-b"))
        deadline = time.monotonic() + 30
        while not healthy.accepted and time.monotonic() < deadline:
            time.sleep(0.05)
        assert healthy.accepted, "never delivered"
        assert failing.attempts < 6  # the failing URL's first event is still being retried
    finally:
        sender.close(timeout=0)
        failing.close()
        healthy.close()


def test_a_waiting_progress_event_is_replaced_by_the_jobs_newer_one() -> None:
    from app.core.webhooks import WebhookSender

    sender = WebhookSender(_sender_settings(), threads=0)  # nothing delivers: look at what waits
    url = "http://hooks.example/x"
    for kind, job, step in [("started", "a", 0), ("progress", "a", 1), ("progress", "a", 2), ("progress", "b", 1),
                            ("progress", "a", 3), ("succeeded", "a", 9)]:  # fmt: skip
        sender.submit(url, _event(kind, job, step))
    waiting = [json.loads(p.body) for p in sender._targets[url].pending]
    assert [(e["type"], e["job_id"], e["progress"]["step"]) for e in waiting] == [
        ("started", "a", 0), ("progress", "b", 1), ("progress", "a", 3), ("succeeded", "a", 9)]  # fmt: skip
    for i in range(200):  # at most MAX_PENDING wait; progress goes first, the terminal events stay
        sender.submit(url, _event("progress", f"job{i}", 1))
    kinds = [json.loads(p.body)["type"] for p in sender._targets[url].pending]
    assert len(kinds) == WebhookSender.MAX_PENDING and kinds[:1] == ["started"] and "succeeded" in kinds


def test_close_delivers_what_waits_in_order() -> None:
    from app.core.webhooks import WebhookSender

    receiver = WebhookReceiver(fail=1)  # the first try fails: its retry still comes before the rest
    sender = WebhookSender(_sender_settings())
    try:
        for kind, step in [("started", 0), ("progress", 4), ("succeeded", 9)]:
            sender.submit(receiver.url, _event(kind, "job-a", step))
        sender.close(timeout=20)
    finally:
        receiver.close()
    assert [json.loads(body)["type"] for _, body in receiver.accepted] == ["started", "progress", "succeeded"]


def test_a_keys_own_webhook_secret_signs_its_jobs_webhooks(redis_db) -> None:
    """With one secret for all, a tenant able to verify its own webhooks could forge them to any
    other tenant's receiver. A key's own secret signs its jobs' events; others keep the server's."""
    import time

    from rq.job import Job

    from app.core import webhooks
    from app.core.config import Settings
    from worker.events import EventSink, WebhookSender

    redis_db.hset(webhooks.SECRETS_KEY, "carol-owner", "carols-secret")
    receiver = WebhookReceiver()
    settings = Settings(webhook_secret="servers-secret", webhook_allow_private=True)
    sender = WebhookSender(settings)
    sink = EventSink(redis_db, settings, sender)
    hook = {"url": receiver.url, "events": ["start"]}
    try:
        for job_id, owner in (("carol-job", "carol-owner"), ("alice-job", "alice-owner"), ("open-job", None)):
            job = Job(job_id, connection=redis_db)
            job.meta = {"webhook": hook} | ({"owner": owner} if owner else {})
            sink.deliver(job, _event("started", job_id))
        deadline = time.monotonic() + 20
        while len(receiver.accepted) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        sender.close(timeout=5)
        receiver.close()
    signed_with = {}
    for headers, body in receiver.accepted:
        ts, signature = headers["x-imagegen-timestamp"], headers["x-imagegen-signature"]
        for secret in ("carols-secret", "servers-secret"):
            if webhooks.verify(secret, ts, body, signature):
                signed_with[json.loads(body)["job_id"]] = secret
    assert signed_with == {"carol-job": "carols-secret", "alice-job": "servers-secret", "open-job": "servers-secret"}
