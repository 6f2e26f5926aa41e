"""Webhook deliveries against hostile or slow receivers and nameservers: response bodies never read,
host lookups bounded in time and number, threads shared fairly between receivers, refusals that
do not tell the client where a name points."""

from __future__ import annotations

import json
import socket
import threading
import time
import tracemalloc
import zlib
from collections.abc import Callable

import pytest

from app.core import webhooks
from app.core.webhooks import WebhookTargetError, attempt, check_target
from tests.procs import WebhookReceiver

# --- response bodies ---------------------------------------------------------------------------


class RawReceiver:
    """A loopback server that takes one request and answers `head` (status line and headers),
    then whatever `body` (run on the connection) sends; `request` holds what the client sent, `sent`
    the body bytes it got out."""

    def __init__(self, head: bytes, body: Callable[[socket.socket], int]) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}/hook"
        self.request = b""
        self.sent = 0
        self.stop = threading.Event()

        def serve() -> None:
            conn, _ = self.server.accept()
            conn.settimeout(10)
            try:
                while b"\r\n\r\n" not in self.request:
                    self.request += conn.recv(65536)
                conn.sendall(head)
                self.sent = body(conn)
            except OSError:
                pass
            finally:
                conn.close()

        self.thread = threading.Thread(target=serve, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        self.server.close()

    def headers(self) -> dict[str, str]:
        lines = self.request.split(b"\r\n\r\n")[0].decode().split("\r\n")[1:]
        return {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}


def test_an_endless_response_body_is_never_read() -> None:
    """A receiver answering 200 with a body that never ends: the attempt is delivered at once, and
    the receiver gets out no more than the sockets' buffers hold (the old client read it until its
    deadline, growing by hundreds of MB a second)."""
    chunk = b"x" * 65536

    def endless(conn: socket.socket) -> int:
        sent = 0
        while not receiver.stop.is_set():
            try:
                conn.sendall(chunk)
            except OSError:  # the client dropped the connection
                break
            sent += len(chunk)
        return sent

    receiver = RawReceiver(b"HTTP/1.1 200 OK\r\nContent-Length: 100000000000\r\n\r\n", endless)
    started = time.monotonic()
    try:
        outcome = attempt(receiver.url, b"{}", secret="k", allow_private=True, deadline=5.0)
        took = time.monotonic() - started
        receiver.thread.join(5)  # the connection was closed: the receiver's sending fails
    finally:
        receiver.close()
    assert outcome is True
    assert took < 2.5, took
    assert not receiver.thread.is_alive()
    assert receiver.sent < 64 * 2**20, receiver.sent  # socket buffers' worth, not an endless read
    assert receiver.headers()["accept-encoding"] == "identity"


def test_a_slowly_dribbled_body_does_not_hold_the_attempt() -> None:
    def dribble(conn: socket.socket) -> int:
        sent = 0
        while not receiver.stop.wait(0.1):
            try:
                conn.sendall(b"x")
            except OSError:
                break
            sent += 1
        return sent

    receiver = RawReceiver(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n", dribble)
    started = time.monotonic()
    try:
        outcome = attempt(receiver.url, b"{}", secret="k", allow_private=True, deadline=3.0)
        took = time.monotonic() - started
    finally:
        receiver.close()
    assert outcome is True and took < 2.5, (outcome, took)  # the old code waited out the 3 s deadline


def test_a_compressed_bomb_is_not_inflated() -> None:
    """64 MiB of zeros in 64 KiB of gzip, sent though `Accept-Encoding: identity` asked for none:
    the body is never read, so never inflated (the old client inflated it whole into memory)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: the gzip container
    zeros = bytes(2**20)
    bomb = b"".join(packer.compress(zeros) for _ in range(64)) + packer.flush()
    assert len(bomb) < 2**20  # small on the wire

    def send(conn: socket.socket) -> int:
        conn.sendall(bomb)
        return len(bomb)

    head = f"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: {len(bomb)}\r\n\r\n".encode()
    receiver = RawReceiver(head, send)
    tracemalloc.start()
    try:
        outcome = attempt(receiver.url, b"{}", secret="k", allow_private=True, deadline=10.0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        receiver.close()
    assert outcome is True
    assert peak < 16 * 2**20, peak  # a 64 MiB body inflated would show here
    assert receiver.headers()["accept-encoding"] == "identity"


# --- host lookups at submission ------------------------------------------------------------------


def _in_thread(fn: Callable[[], None]) -> tuple[threading.Thread, list[BaseException | None]]:
    """Run `fn` on a daemon thread; the list gets its exception (None: it returned)."""
    result: list[BaseException | None] = []

    def run() -> None:
        try:
            fn()
        except BaseException as exc:
            result.append(exc)
        else:
            result.append(None)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def test_a_host_whose_nameserver_never_answers_is_refused_in_time(monkeypatch) -> None:
    """`check_target` runs on the API's shared threadpool: a lookup that never ends held a pool
    thread for as long as the system resolver tried, stalling every route that needs the pool."""
    monkeypatch.setattr(webhooks, "RESOLVE_TIMEOUT", 0.3, raising=False)
    never = threading.Event()

    def hanging(host: str) -> list[str]:
        never.wait(30)
        return ["93.184.215.14"]

    try:
        thread, result = _in_thread(
            lambda: check_target("https://hangs.example/x", allow_private=False, resolve=hanging)
        )
        thread.join(3)
        assert not thread.is_alive(), "check_target waited on the lookup"
        assert isinstance(result[0], WebhookTargetError) and "did not resolve in time" in str(result[0]), result
    finally:
        never.set()


def test_lookups_in_flight_are_bounded_and_the_rest_refused_at_once(monkeypatch) -> None:
    monkeypatch.setattr(webhooks, "_lookups", threading.BoundedSemaphore(2), raising=False)
    monkeypatch.setattr(webhooks, "RESOLVE_TIMEOUT", 0.2, raising=False)
    release = threading.Event()
    entered = threading.Semaphore(0)

    def hanging(host: str) -> list[str]:
        entered.release()
        release.wait(30)
        return ["93.184.215.14"]

    def check() -> None:
        check_target("https://hangs.example/x", allow_private=False, resolve=hanging)

    try:
        stuck = [_in_thread(check) for _ in range(2)]
        assert entered.acquire(timeout=3) and entered.acquire(timeout=3)  # both lookups started
        for thread, _ in stuck:  # given up on (each goes on, holding its slot)
            thread.join(3)
        started = time.monotonic()
        thread, result = _in_thread(check)
        thread.join(3)
        assert not thread.is_alive() and time.monotonic() - started < 2, "queued behind the stuck lookups"
        assert isinstance(result[0], WebhookTargetError) and "too many" in str(result[0]), result
        assert not entered.acquire(timeout=0.1)  # refused without a lookup
    finally:
        release.set()
    # The stuck lookups ended: their slots are free again.
    deadline = time.monotonic() + 3
    while True:
        try:
            check_target("https://fine.example/x", allow_private=False, resolve=lambda host: ["93.184.215.14"])
            break
        except WebhookTargetError:
            assert time.monotonic() < deadline, "slots never given back"
            time.sleep(0.05)


def test_a_lookups_own_errors_still_read_does_not_resolve() -> None:
    def broken(host: str) -> list[str]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    with pytest.raises(WebhookTargetError, match="does not resolve"):
        check_target("https://nowhere.example/x", allow_private=False, resolve=broken)
    with pytest.raises(WebhookTargetError, match="does not resolve"):
        check_target("https://nowhere.example/x", allow_private=False, resolve=lambda host: [])


# --- refusals --------------------------------------------------------------------------------------


def test_a_refusal_does_not_tell_the_client_where_the_name_points(caplog) -> None:
    caplog.set_level("INFO", logger="app.core.webhooks")
    with pytest.raises(WebhookTargetError) as refused:
        check_target("http://inside.example/x", allow_private=False, resolve=lambda host: ["10.20.30.40"])
    assert "10.20.30.40" not in str(refused.value) and "not a public address" in str(refused.value)
    assert any("10.20.30.40" in r.getMessage() and "inside.example" in r.getMessage() for r in caplog.records)


# --- sharing the sender's threads ------------------------------------------------------------------


def _settings():
    from app.core.config import Settings

    return Settings(webhook_secret="k", webhook_allow_private=True, webhook_max_attempts=6)


def _event(kind: str, job: str):
    from app.core.events import EventType, make_event

    return make_event(EventType(kind), job, "running", progress={"step": 0, "total": 9})


def test_one_hosts_never_answering_receivers_do_not_hold_up_another_host() -> None:
    """Four URLs on one host (127.0.0.2) that accept a connection and never answer, then one
    healthy receiver: the healthy one is delivered at once, not after the four time out (10 s each)."""
    from app.core.webhooks import WebhookSender

    silent = socket.create_server(("127.0.0.2", 0), backlog=32)  # never accepts: never answers
    port = silent.getsockname()[1]
    healthy = WebhookReceiver()
    sender = WebhookSender(_settings())
    try:
        for i in range(4):
            sender.submit(f"http://127.0.0.2:{port}/tenant/{i}", _event("started", f"slow-{i}"))
        time.sleep(0.3)  # the silent ones have the threads they may take
        submitted = time.monotonic()
        sender.submit(healthy.url, _event("started", "job-healthy"))
        while not healthy.accepted and time.monotonic() - submitted < 8:
            time.sleep(0.02)
        waited = time.monotonic() - submitted
        assert healthy.accepted, "never delivered"
        assert waited < 2, waited
    finally:
        sender.close(timeout=0)
        silent.close()  # resets the waiting connections: the attempts end
        for thread in sender._threads:
            thread.join(5)
        healthy.close()


def test_slow_receivers_spread_over_many_hosts_leave_a_thread_for_the_others(monkeypatch) -> None:
    """Sixty host names never seen before (a wildcard DNS name makes them by the thousand), each
    answering in 0.5 s: they share at most 3 of the 4 threads, so a receiver known to answer fast
    is delivered at once (before, each new name counted as fast until it was timed, and they took
    every thread)."""
    from app.core.webhooks import WebhookSender

    delivered: dict[str, float] = {}  # job id -> when its event arrived
    lock = threading.Lock()

    def fake_attempt(url: str, body: bytes, **kwargs: object) -> bool:
        if (webhooks.urlsplit(url).hostname or "").startswith("slow-"):
            time.sleep(0.5)
        with lock:
            delivered[json.loads(body)["job_id"]] = time.monotonic()
        return True

    monkeypatch.setattr(webhooks, "attempt", fake_attempt)
    monkeypatch.setattr(WebhookSender, "SLOW", 0.3, raising=False)
    sender = WebhookSender(_settings())
    try:
        sender.submit("https://healthy.invalid/hook", _event("started", "job-healthy-1"))
        deadline = time.monotonic() + 5
        while "job-healthy-1" not in delivered and time.monotonic() < deadline:  # known to be fast now
            time.sleep(0.01)
        for i in range(60):
            sender.submit(f"https://slow-{i}.invalid/hook", _event("started", f"job-slow-{i}"))
        time.sleep(0.2)  # every thread they may take is busy with them
        submitted = time.monotonic()
        sender.submit("https://healthy.invalid/hook", _event("succeeded", "job-healthy-2"))
        while "job-healthy-2" not in delivered and time.monotonic() - submitted < 20:
            time.sleep(0.01)
        assert "job-healthy-2" in delivered, "never delivered"
        waited = delivered["job-healthy-2"] - submitted
        assert waited < 2, waited  # the old code: 7.3 s, behind the slow names
    finally:
        sender.close(timeout=0)
        for thread in sender._threads:
            thread.join(5)


def test_each_url_still_gets_its_events_in_order_under_the_shares() -> None:
    """Several URLs on one host (sharing its threads) each receive their events in order."""
    from app.core.webhooks import WebhookSender

    receivers = [WebhookReceiver(fail=1) for _ in range(3)]  # a retry first: it stays ahead of the rest
    sender = WebhookSender(_settings())
    try:
        for n, receiver in enumerate(receivers):
            for kind in ("started", "progress", "succeeded"):
                sender.submit(receiver.url, _event(kind, f"job-{n}"))
        sender.close(timeout=20)
    finally:
        for receiver in receivers:
            receiver.close()
    for receiver in receivers:
        assert [json.loads(body)["type"] for _, body in receiver.accepted] == ["started", "progress", "succeeded"]


def test_a_delivery_whose_lookup_hangs_is_retried_later_not_dropped(monkeypatch) -> None:
    """The lookup at delivery time is timed too (it held a sender thread for as long as the system
    resolver kept trying), and a lookup that did not end is a retry, not a refusal."""
    monkeypatch.setattr(webhooks, "DELIVERY_RESOLVE_TIMEOUT", 0.3)
    release = threading.Event()

    def hanging(host: str) -> list[str]:
        release.wait(10)
        return ["93.184.215.14"]

    started = time.monotonic()
    try:
        outcome = webhooks.attempt(
            "https://hangs.invalid/hook", b"{}", secret="s", allow_private=False, resolve=hanging
        )
    finally:
        release.set()
    assert outcome is None  # tried again later (False would drop the event)
    assert time.monotonic() - started < 2


def test_a_submission_whose_lookup_cannot_run_now_is_a_503(redis_server, redis_db, tmp_path, monkeypatch) -> None:
    """Lookups timed out or all slots busy: nothing is known to be wrong with the URL, so the answer
    is a 503 with Retry-After, which clients retry (a 422 they do not)."""
    from fastapi.testclient import TestClient

    from app.api.routes import generate
    from app.core.config import Settings
    from app.main import create_app

    def busy(url: str, **kwargs: object) -> None:
        raise webhooks.LookupUnavailableError("too many webhook host lookups in progress; try again shortly")

    monkeypatch.setattr(generate, "check_target", busy)
    settings = Settings(
        redis_url=f"redis://127.0.0.1:{redis_server.port}/15",
        model="main",
        results_dir=str(tmp_path / "results"),
        webhook_secret="x" * 32,
    )
    with TestClient(create_app(settings)) as http:
        answer = http.post("/generate", json={"prompt": "p", "webhook": "https://example.com/hook"})
    assert answer.status_code == 503, answer.text
    assert answer.headers["retry-after"] == "2"
    assert "try again" in answer.json()["error"]["message"]


def test_one_api_keys_hanging_lookups_leave_slots_for_the_others(redis_server, redis_db, tmp_path, monkeypatch) -> None:
    """A key whose webhook host's nameserver never answers holds at most MAX_LOOKUPS_PER_OWNER of
    the submission lookups: before, 8 such submissions held every slot and every other key's
    webhooks got 503 until the system resolver gave up on them."""
    from fastapi.testclient import TestClient

    from app.core.config import Settings
    from app.main import create_app

    release = threading.Event()
    entered = threading.Semaphore(0)

    def resolve(host: str) -> list[str]:
        if host == "hangs.example":
            entered.release()
            release.wait(30)
        return ["93.184.215.14"]

    monkeypatch.setattr(webhooks, "_resolve", resolve)
    monkeypatch.setattr(webhooks, "RESOLVE_TIMEOUT", 0.2)
    mallory, alice = "mallory-key-0123456789abcdef", "alice-key-0123456789abcdef"
    settings = Settings(
        redis_url=f"redis://127.0.0.1:{redis_server.port}/15",
        model="main",
        results_dir=str(tmp_path / "results"),
        webhook_secret="x" * 32,
        api_keys=f"{mallory},{alice}",
    )
    try:
        with TestClient(create_app(settings)) as http:
            refused = []
            for _ in range(webhooks.MAX_LOOKUPS):
                answer = http.post(
                    "/generate",
                    json={"prompt": "p", "webhook": "https://hangs.example/hook"},
                    headers={"authorization": f"Bearer {mallory}"},
                )
                assert answer.status_code == 503, answer.text
                refused.append(answer.json()["error"]["message"])
            assert sum("this API key's" in m for m in refused) == webhooks.MAX_LOOKUPS - webhooks.MAX_LOOKUPS_PER_OWNER
            lookups = 0
            while entered.acquire(timeout=0.5):
                lookups += 1
            assert lookups == webhooks.MAX_LOOKUPS_PER_OWNER  # the others were refused before any lookup
            answer = http.post(
                "/generate",
                json={"prompt": "p", "webhook": "https://fine.example/hook"},
                headers={"authorization": f"Bearer {alice}"},
            )
            assert answer.status_code == 202, answer.text
    finally:
        release.set()
    # The stuck lookups ended: mallory's count is back to none.
    deadline = time.monotonic() + 3
    while webhooks._owners_lookups:
        assert time.monotonic() < deadline, f"owners' lookups never given back: {webhooks._owners_lookups}"
        time.sleep(0.05)


def test_a_burst_of_one_keys_fast_lookups_all_pass(monkeypatch) -> None:
    """The per-key bound is for lookups that hang: a client submitting a few at once, each resolved
    in a tenth of a second, waits its turn rather than getting 503s."""
    monkeypatch.setattr(webhooks, "_lookups", threading.BoundedSemaphore(8), raising=False)

    def fast(host: str) -> list[str]:
        time.sleep(0.1)
        return ["93.184.215.14"]

    results = [_in_thread(lambda: check_target("https://fine.example/x", allow_private=False, resolve=fast,
                                               owner="k")) for _ in range(4)]  # fmt: skip
    for thread, _ in results:
        thread.join(10)
    assert [r for _, r in results] == [[None]] * 4, results
