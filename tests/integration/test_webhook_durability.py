"""Webhook events outlive a worker killed while its receiver was down: another worker adopts them
from the dead one's outbox in Redis and delivers them, with the same delivery id."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import httpx
import pytest

from app.core.webhooks import alive_key, verify
from tests.procs import WEBHOOK_SECRET, WebhookReceiver, service_env, start_api, start_redis, start_worker, wait_for

pytestmark = pytest.mark.integration
FAST = {"num_inference_steps": 2, "width": 32, "height": 32}


def test_a_completed_event_is_delivered_after_its_worker_is_killed(tmp_path: Path) -> None:
    """A worker killed (OOM killer, a node lost) while a completed event waited out its backoff lost
    it: the client relying on webhooks never learned its job had ended."""
    server = start_redis(tmp_path / "redis")  # its own: no other test's senders adopt from it
    redis = server.client()
    receiver = WebhookReceiver(fail=10**9)  # down until told
    env = service_env(server.url, tmp_path, webhook_max_attempts="20")  # minutes of retries
    api = worker = second = None
    try:
        api, base = start_api(env, tmp_path / "api.log")
        worker = start_worker(env, tmp_path / "worker.log", ready=redis)
        body = {"prompt": "x", "webhook": receiver.url, "webhook_events": ["completed"], **FAST}
        r = httpx.post(base + "/generate", json=body, headers={"Prefer": "wait=60"}, timeout=90)
        assert r.status_code == 200 and r.json()["status"] == "succeeded", r.text
        job_id = r.json()["id"]
        api.stop()  # its sender would adopt too: the second worker is the only one left to

        def waiting() -> str | None:
            """The id of the sender whose outbox holds the job's event, once it was refused."""
            for key in redis.scan_iter("imagegen:webhooks:outbox:*"):
                entries = [json.loads(v) for v in redis.hvals(key)]
                if any(e["job_id"] == job_id for e in entries) and receiver.attempts >= 1:
                    return key.decode().rsplit(":", 1)[1]
            return None

        wait_for(lambda: waiting() is not None, 30, "the completed event waiting in the worker's outbox")
        dead = waiting()
        assert dead is not None
        worker.stop(signal.SIGKILL)
        assert redis.pttl(alive_key(dead)) > 0  # it expires within 30 s of the kill; deleted to save the wait
        redis.delete(alive_key(dead))
        refused = {headers["x-imagegen-delivery"] for headers in receiver.tried}
        receiver.fail = 0
        second = start_worker(env, tmp_path / "worker2.log", ready=redis)
        wait_for(lambda: receiver.accepted, 60, "the completed event, delivered by the second worker")
    finally:
        for proc in (second, worker, api):
            if proc is not None:
                proc.stop()
        receiver.close()
        server.proc.stop()
    [(headers, got)] = receiver.accepted
    event = json.loads(got)
    assert event["job_id"] == job_id and event["type"] == "succeeded"
    assert refused == {headers["x-imagegen-delivery"]}  # the same event: receivers drop repeats by it
    assert verify(WEBHOOK_SECRET, headers["x-imagegen-timestamp"], got, headers["x-imagegen-signature"])
