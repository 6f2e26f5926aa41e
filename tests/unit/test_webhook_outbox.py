"""The webhook sender's outbox in Redis (a real redis-server): events not yet delivered outlive
their sender, a crashed one's are adopted and delivered by another, once, in order, with the same
bodies and delivery ids; progress stays in memory; without Redis, delivery goes on from memory."""

from __future__ import annotations

import json
import threading
import time

from app.core import webhooks
from app.core.config import Settings
from app.core.events import EventType, make_event
from app.core.webhooks import WebhookSender, alive_key, delivery_id, outbox_key
from tests.procs import WebhookReceiver, free_port, wait_for

DOWN = 10**9  # a WebhookReceiver `fail` count: answers 503 until set back to 0


def _settings() -> Settings:
    # Enough attempts that no delivery is given up on while a test waits (backoff capped at 30 s).
    return Settings(webhook_secret="servers-secret", webhook_allow_private=True, webhook_max_attempts=20)


class QuickSender(WebhookSender):
    """A sender whose alive key expires three seconds after it stops refreshing it, and that looks for
    stopped senders' outboxes several times a second (the defaults: 30 s and 10 s)."""

    ALIVE_TTL = 3.0  # fifteen heartbeats: a loaded machine's stalls do not expire a live sender's key
    HEARTBEAT = 0.2
    ADOPT_EVERY = 0.2
    RETRY_CAP = 1.0


def _event(kind: str, job: str, step: int = 0):
    return make_event(EventType(kind), job, "running", progress={"step": step, "total": 9})


def _body(event) -> bytes:
    return event.model_dump_json(exclude_none=True).encode()


def _outbox(redis, sender: WebhookSender) -> dict[str, dict]:
    return {k.decode(): json.loads(v) for k, v in redis.hgetall(outbox_key(sender.id)).items()}


def _crash(sender: WebhookSender) -> None:
    """Stop `sender` as a kill would: its threads end, nothing more reaches Redis, its outbox stays
    and its alive key is left to expire."""
    assert sender._keeper is not None
    sender._halt.set()
    sender._wake.set()
    with sender._ready:
        sender._stopped = True
        sender._ready.notify_all()
    for thread in [sender._keeper, *sender._threads]:
        thread.join(30)
        assert not thread.is_alive()


def test_an_undelivered_event_waits_in_the_outbox_until_delivered(redis_db) -> None:
    receiver = WebhookReceiver(fail=DOWN)
    sender = QuickSender(_settings(), connection=redis_db)
    bystander = QuickSender(_settings(), connection=redis_db)  # adopts only from stopped senders
    event = _event("succeeded", "job-a")
    try:
        sender.submit(receiver.url, event, "servers-secret", owner="alice")
        wait_for(lambda: len(_outbox(redis_db, sender)) == 1 and receiver.attempts >= 1, 20, "the entry")
        [entry] = _outbox(redis_db, sender).values()
        assert entry == {"url": receiver.url, "job_id": "job-a", "owner": "alice", "body": _body(event).decode()}
        assert redis_db.pttl(alive_key(sender.id)) > 0  # it expires unless refreshed
        assert redis_db.sismember(webhooks.OUTBOXES_KEY, sender.id)
        time.sleep(1.5 * QuickSender.ALIVE_TTL)  # the alive key outlives its TTL: refreshed
        assert len(_outbox(redis_db, sender)) == 1 and not redis_db.exists(outbox_key(bystander.id))
        receiver.fail = 0
        wait_for(lambda: receiver.accepted, 30, "the delivery")
        wait_for(lambda: not redis_db.exists(outbox_key(sender.id)), 20, "the entry's deletion")
    finally:
        sender.close(timeout=5)
        bystander.close(timeout=5)
        receiver.close()
    assert [body for _, body in receiver.accepted] == [_body(event)]  # by its own sender only


def test_a_crashed_senders_events_are_adopted_and_delivered_in_order_with_the_same_ids(redis_db) -> None:
    """A worker killed while a receiver was down lost every event it still held: the client never
    learned its job ended. Another sender delivers them, signed with the owner's secret read again."""
    redis_db.hset(webhooks.SECRETS_KEY, "carol", "carols-secret")
    receiver = WebhookReceiver(fail=DOWN)
    other_url = receiver.url + "?to=other"
    sent = [
        (receiver.url, _event("started", "job-a")),
        (receiver.url, _event("progress", "job-a", 3)),  # memory only: not adopted
        (other_url, _event("started", "job-c")),
        (receiver.url, _event("succeeded", "job-a", 9)),
        (receiver.url, _event("succeeded", "job-b", 9)),
        (other_url, _event("failed", "job-c", 2)),
    ]
    dying = QuickSender(_settings(), connection=redis_db)
    adopter = None
    try:
        for url, event in sent:
            dying.submit(url, event, "carols-secret", owner="carol")
        wait_for(lambda: len(_outbox(redis_db, dying)) == 5 and receiver.attempts >= 2, 20, "the entries")
        _crash(dying)
        refused = {headers["x-imagegen-delivery"] for headers in receiver.tried}
        assert redis_db.exists(outbox_key(dying.id))  # left as a kill leaves it
        receiver.fail = 0
        adopter = QuickSender(_settings(), connection=redis_db)
        wait_for(lambda: len(receiver.accepted) == 5, 30, "the adopted deliveries")
        wait_for(lambda: not redis_db.exists(outbox_key(adopter.id)), 20, "the adopter's entries' deletion")
    finally:
        if adopter is not None:
            adopter.close(timeout=5)
        receiver.close()
    assert not redis_db.exists(outbox_key(dying.id)) and not redis_db.sismember(webhooks.OUTBOXES_KEY, dying.id)
    bodies = [body for _, body in receiver.accepted]
    stored = [_body(e) for _, e in sent if e.type is not EventType.progress]
    assert sorted(bodies) == sorted(stored)  # the same bytes: the same delivery ids
    for headers, body in receiver.accepted:
        assert headers["x-imagegen-delivery"] == delivery_id(body)
        assert webhooks.verify("carols-secret", headers["x-imagegen-timestamp"], body, headers["x-imagegen-signature"])
    assert refused <= {headers["x-imagegen-delivery"] for headers, _ in receiver.accepted}
    each_url = [[_body(e) for u, e in sent if u == url and e.type is not EventType.progress] for url in
                (receiver.url, other_url)]  # fmt: skip
    for expected in each_url:  # each URL's events in the order they were submitted
        assert [b for b in bodies if b in expected] == expected


def test_senders_adopting_at_once_never_both_deliver_an_event(redis_db) -> None:
    receiver = WebhookReceiver()
    dead = [QuickSender(_settings(), threads=0, connection=redis_db) for _ in range(8)]
    events = []
    for n, sender in enumerate(dead):
        for kind in ("started", "succeeded"):
            event = _event(kind, f"job-{n}")
            sender.submit(f"{receiver.url}?n={n}", event)
            events.append(event)
    for sender in dead:  # nothing delivers (no threads): all sixteen wait in the outboxes
        wait_for(lambda s=sender: len(_outbox(redis_db, s)) == 2, 20, "the entries")
        _crash(sender)
    go = threading.Barrier(4)
    adopters: list[WebhookSender] = []

    def start() -> None:
        go.wait()
        adopters.append(QuickSender(_settings(), connection=redis_db))

    starters = [threading.Thread(target=start) for _ in range(4)]
    try:
        for thread in starters:
            thread.start()
        for thread in starters:
            thread.join(10)
        wait_for(lambda: len(receiver.accepted) >= len(events), 30, "every delivery")
        wait_for(lambda: not any(redis_db.hlen(outbox_key(a.id)) for a in adopters), 20, "the entries' deletion")
    finally:
        for adopter in adopters:
            adopter.close(timeout=5)  # all delivered: a second copy of any would have gone out by now
        receiver.close()
    ids = [headers["x-imagegen-delivery"] for headers, _ in receiver.accepted]
    assert sorted(ids) == sorted(delivery_id(_body(e)) for e in events)  # each once
    assert not any(redis_db.exists(outbox_key(s.id)) for s in dead)


def test_a_clean_close_leaves_waiting_events_to_the_next_sender(redis_db, caplog) -> None:
    receiver = WebhookReceiver(fail=DOWN)
    first = WebhookSender(_settings(), connection=redis_db)
    events = [_event("started", "job-late"), _event("succeeded", "job-late", 9)]
    nxt = None
    try:
        for event in events:
            first.submit(receiver.url, event)
        first.submit(receiver.url, _event("progress", "job-other", 1))  # not kept: said to be lost
        wait_for(lambda: len(_outbox(redis_db, first)) == 2 and receiver.attempts >= 1, 20, "the entries")
        with caplog.at_level("WARNING", logger="app.core.webhooks"):
            first.close(timeout=0.3)
        assert not redis_db.exists(alive_key(first.id))  # at once: not left to expire
        for thread in first._threads:  # an attempt still in flight is refused too
            thread.join(30)
        assert sorted(e["body"].encode() for e in _outbox(redis_db, first).values()) == sorted(map(_body, events))
        receiver.fail = 0
        nxt = WebhookSender(_settings(), connection=redis_db)  # the defaults: adopts as it starts
        wait_for(lambda: len(receiver.accepted) == 2, 30, "the handed-over deliveries")
        wait_for(lambda: not redis_db.exists(outbox_key(nxt.id)), 20, "the entries' deletion")
    finally:
        if nxt is not None:
            nxt.close(timeout=5)
        receiver.close()
    said = [r.getMessage() for r in caplog.records]
    handed = [m for m in said if "handed over" in m]
    assert len(handed) == 1 and "job-late" in handed[0] and "job-other" not in handed[0], said
    lost = [m for m in said if "not delivered before shutdown" in m]
    assert len(lost) == 1 and "job-other" in lost[0] and "job-late" not in lost[0], said
    assert [body for _, body in receiver.accepted] == [_body(e) for e in events]  # in order, once each
    assert not redis_db.exists(outbox_key(first.id))


def test_progress_events_are_not_written_to_the_outbox(redis_db) -> None:
    sender = WebhookSender(_settings(), threads=0, connection=redis_db)  # nothing delivers
    try:
        sender.submit("http://hooks.example/x", _event("started", "job-a"))
        for step in range(1, 6):
            sender.submit("http://hooks.example/x", _event("progress", "job-a", step))
        sender.submit("http://hooks.example/x", _event("succeeded", "job-a", 9))
        # The writes go out in the order noted: once the last is there, so is any before it.
        wait_for(lambda: any('"succeeded"' in e["body"] for e in _outbox(redis_db, sender).values()), 20, "it")
        kinds = [json.loads(e["body"])["type"] for _, e in sorted(_outbox(redis_db, sender).items())]
        assert kinds == ["started", "succeeded"]
    finally:
        sender.close(timeout=0)


def test_with_redis_unreachable_events_are_delivered_from_memory(caplog) -> None:
    from app.core.queue import connect

    receiver = WebhookReceiver(fail=1)
    sender = WebhookSender(_settings(), connection=connect(f"redis://127.0.0.1:{free_port()}/0", timeout=1))
    events = [_event("started", "job-a"), _event("succeeded", "job-a", 9)]
    try:
        with caplog.at_level("WARNING", logger="app.core.webhooks"):
            for event in events:
                sender.submit(receiver.url, event)
            wait_for(lambda: len(receiver.accepted) == 2, 30, "the deliveries")
            sender.close(timeout=5)
    finally:
        receiver.close()
    assert [body for _, body in receiver.accepted] == [_body(e) for e in events]
    warned = [r.getMessage() for r in caplog.records if "cannot write the outbox" in r.getMessage()]
    assert len(warned) == 1, warned  # once, not once per try
    assert any("adopted once its alive key expires" in r.getMessage() for r in caplog.records)
    assert not any("not delivered" in r.getMessage() for r in caplog.records)


def test_an_adoption_whose_answer_was_lost_is_still_delivered(redis_db) -> None:
    """The adoption script ran (the entries moved into the adopter's outbox) but its answer never
    came (Redis restarting, a timeout): the adopter did not know of them, and they sat in its own
    outbox, undelivered, for as long as it ran."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    receiver = WebhookReceiver(fail=DOWN)
    dying = QuickSender(_settings(), connection=redis_db)
    event = _event("succeeded", "job-lost-answer")
    adopter = None
    try:
        dying.submit(receiver.url, event, "servers-secret")
        wait_for(lambda: len(_outbox(redis_db, dying)) == 1 and receiver.attempts >= 1, 20, "the entry")
        _crash(dying)
        receiver.fail = 0
        adopter = QuickSender(_settings(), connection=redis_db)
        script = adopter._adopt_script
        lost = []

        def answer_lost(*args, **kwargs):
            script(*args, **kwargs)
            if not lost:
                lost.append(True)
                raise RedisConnectionError("connection reset after the script ran")
            return []

        adopter._adopt_script = answer_lost
        wait_for(lambda: lost, 30, "the adoption")
        wait_for(lambda: receiver.accepted, 30, "the adopted delivery")
        wait_for(lambda: not redis_db.exists(outbox_key(adopter.id)), 20, "the entry's deletion")
        time.sleep(1)  # nothing sent twice
        assert [body for _, body in receiver.accepted] == [_body(event)]
    finally:
        if adopter is not None:
            adopter.close(timeout=5)
        receiver.close()


class SlowBeat(QuickSender):
    HEARTBEAT = 1.5


def test_after_its_own_redis_outage_a_sender_does_not_adopt_the_live_ones(redis_db) -> None:
    """In a Redis outage every alive key can expire while every sender runs on: the first to get
    through again adopted the others' outboxes and their events went out twice."""
    receiver = WebhookReceiver(fail=DOWN)
    live = SlowBeat(_settings(), connection=redis_db)
    other = QuickSender(_settings(), connection=redis_db)
    event = _event("succeeded", "job-outage")
    try:
        live.submit(receiver.url, event, "servers-secret")
        wait_for(lambda: len(_outbox(redis_db, live)) == 1 and receiver.attempts >= 1, 20, "the entry")
        flush = other._flush
        failed = []

        def outage() -> None:
            if not failed:
                failed.append(True)
                redis_db.delete(alive_key(live.id))  # expired in the outage; `live` refreshes it within 1.5 s
                raise ConnectionError("Redis is away")
            flush()

        other._flush = outage  # type: ignore[method-assign]
        other._wake.set()
        wait_for(lambda: failed and not other._failing, 20, "the other's outage and recovery")
        wait_for(lambda: redis_db.exists(alive_key(live.id)), 20, "the live sender's refresh")
        time.sleep(1)
        assert len(_outbox(redis_db, live)) == 1 and not redis_db.exists(outbox_key(other.id))
        receiver.fail = 0
        wait_for(lambda: receiver.accepted, 30, "the delivery")
        time.sleep(1)
        assert len(receiver.accepted) == 1
    finally:
        live.close(timeout=5)
        other.close(timeout=5)
        receiver.close()


def test_an_event_submitted_after_close_is_logged(redis_db, caplog) -> None:
    receiver = WebhookReceiver()
    sender = QuickSender(_settings(), connection=redis_db)
    sender.close(timeout=1)
    sender.submit(receiver.url, _event("succeeded", "job-late"))
    receiver.close()
    assert any("after the sender stopped" in r.getMessage() for r in caplog.records)
    assert not redis_db.exists(outbox_key(sender.id))
