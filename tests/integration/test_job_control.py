"""Job control against real processes: queue position/ETA, priorities, cancel, long-poll, SSE,
webhooks, idempotency, listing and expiry."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import redis
from httpx_sse import connect_sse
from prometheus_client.parser import text_string_to_metric_families

from app.core.webhooks import verify
from tests.procs import WEBHOOK_SECRET, Stack, WebhookReceiver, service_env, start_api, wait_for

pytestmark = pytest.mark.integration
FAST = {"num_inference_steps": 3, "width": 32, "height": 32}
# Long enough to keep the single worker busy for a while, small enough to cancel quickly.
BLOCKER = {"prompt": "blocker", "num_inference_steps": 150, "width": 128, "height": 128}


def wait_running(stack: Stack, http: httpx.Client, job_id: str, min_step: int = 1) -> dict:
    deadline = time.monotonic() + 60
    while True:
        job = http.get(f"/jobs/{job_id}").json()
        if job["status"] == "running" and job["progress"]["step"] >= min_step:
            return job
        assert job["status"] in ("queued", "running") and time.monotonic() < deadline, job
        time.sleep(0.02)


def canceled_total(http: httpx.Client) -> float:
    families = text_string_to_metric_families(http.get("/metrics").text)
    jobs = next(f for f in families if f.name == "imagegen_jobs")
    return sum(s.value for s in jobs.samples if s.labels.get("status") == "canceled")


def test_queue_positions_priorities_eta_and_cancel(stack: Stack) -> None:
    with stack.client() as http:
        # Measure step times for the blocker's size first, so ETAs have data.
        stack.wait(http, stack.submit(http, **(BLOCKER | {"num_inference_steps": 5}))["id"])
        blocker = stack.submit(http, **BLOCKER)
        running = wait_running(stack, http, blocker["id"], min_step=2)
        assert running["queue_position"] is None and running["eta_seconds"] > 0

        waiting = [stack.submit(http, prompt=f"w{i}", **FAST) for i in range(5)]
        views, times = [], []
        for j in waiting:
            views.append(http.get(f"/jobs/{j['id']}").json())
            times.append(time.monotonic())
        assert [v["queue_position"] for v in views] == [0, 1, 2, 3, 4]
        etas = [v["eta_seconds"] for v in views]
        assert all(e is not None for e in etas) and etas[0] > 0
        # Each later job waits longer, up to the blocker's progress between the two reads.
        for i in range(4):
            assert etas[i + 1] >= etas[i] - (times[i + 1] - times[i]) - 0.01, (etas, times)

        urgent = stack.submit(http, prompt="urgent", priority="high", **FAST)
        assert http.get(f"/jobs/{urgent['id']}").json()["queue_position"] == 0
        assert [http.get(f"/jobs/{j['id']}").json()["queue_position"] for j in waiting] == [1, 2, 3, 4, 5]

        # The running job's ETA falls as it progresses.
        first = http.get(f"/jobs/{blocker['id']}").json()
        time.sleep(0.5)
        later = http.get(f"/jobs/{blocker['id']}").json()
        assert later["progress"]["step"] > first["progress"]["step"]
        assert later["eta_seconds"] < first["eta_seconds"]

        # Cancel a queued job: 200, it never starts.
        canceled = lambda: canceled_total(http)  # noqa: E731
        before = canceled()
        r = http.delete(f"/jobs/{waiting[4]['id']}")
        assert r.status_code == 200 and r.json()["status"] == "canceled"
        # Cancel the running job: 202, it stops at its next step; the worker moves on at once.
        r = http.delete(f"/jobs/{blocker['id']}")
        assert r.status_code == 202
        done = stack.wait(http, blocker["id"])
        assert done["status"] == "canceled" and done["error"]["code"] == "canceled"
        step = int(done["error"]["message"].split("step ")[1].split(" ")[0])
        assert r.json()["progress"]["step"] <= step < 150
        assert http.get(f"/jobs/{blocker['id']}/images/0").status_code == 409
        assert canceled() == before + 2  # the queued one counts too, with no worker to count it
        # A cancel is an outcome, not an error: one line at INFO in the worker's log, no traceback.
        lines = [json.loads(line) for line in stack.workers[0].output().splitlines() if line.startswith("{")]
        about = [line for line in lines if line.get("job_id") == blocker["id"] or blocker["id"] in line["msg"]]
        assert any("canceled" in line["msg"] for line in about), about
        assert [line for line in about if line["level"] == "ERROR" or "Traceback" in str(line)] == []

        # Priority order held: the urgent job finished before every normal one started.
        finished = {j["id"]: stack.wait(http, j["id"]) for j in [urgent, *waiting[:4]]}
        assert all(j["status"] == "succeeded" for j in finished.values())
        assert all(finished[urgent["id"]]["started_at"] <= finished[j["id"]]["started_at"] for j in waiting[:4])
        canceled = http.get(f"/jobs/{waiting[4]['id']}").json()
        assert canceled["status"] == "canceled" and canceled["started_at"] is None

        assert http.delete(f"/jobs/{urgent['id']}").status_code == 409
        assert http.delete("/jobs/00000000-0000-4000-8000-000000000000").status_code == 404


def test_long_poll_returns_at_the_end_or_the_deadline(stack: Stack) -> None:
    with stack.client() as http:
        blocker = stack.submit(http, **BLOCKER)
        queued = stack.submit(http, prompt="behind the blocker", **FAST)
        started = time.monotonic()
        r = http.get(f"/jobs/{queued['id']}", params={"wait": 1})
        assert r.status_code == 200 and r.json()["status"] == "queued"
        assert 0.9 <= time.monotonic() - started < 10
        http.delete(f"/jobs/{blocker['id']}")
        started = time.monotonic()
        r = http.get(f"/jobs/{queued['id']}", params={"wait": 60}, timeout=70)
        assert r.json()["status"] == "succeeded"
        assert time.monotonic() - started < 30  # returned at the end, not after 60 s
        assert http.get(f"/jobs/{queued['id']}", params={"wait": 61}).status_code == 422


def test_prefer_wait_answers_the_post_when_the_job_ends(stack: Stack) -> None:
    with stack.client() as http:
        r = http.post("/generate", json={"prompt": "in one request", **FAST}, headers={"Prefer": "wait=30"})
        assert r.status_code == 200 and r.headers["preference-applied"] == "wait=30"
        job = r.json()
        assert job["status"] == "succeeded" and r.headers["location"] == f"/jobs/{job['id']}"
        assert http.get(job["images"][0]["url"]).content.startswith(b"\x89PNG")
        # Not done within the wait: 202 and the state it had then.
        blocker = stack.submit(http, **BLOCKER)
        r = http.post("/generate", json={"prompt": "behind it", **FAST}, headers={"Prefer": "respond-async, wait=0.5"})
        assert r.status_code == 202 and r.json()["status"] == "queued" and r.headers["preference-applied"] == "wait=0.5"
        http.delete(f"/jobs/{blocker['id']}")
        # A preference that cannot be understood is ignored (RFC 7240): the usual 202.
        r = http.post("/generate", json={"prompt": "no wait", **FAST}, headers={"Prefer": "wait=soon"})
        assert r.status_code == 202 and "preference-applied" not in r.headers


def test_prefer_wait_with_accept_png_answers_with_the_image(stack: Stack) -> None:
    png = {"Prefer": "wait=30", "Accept": "image/png"}
    with stack.client() as http:
        body, keyed = {"prompt": "straight to pixels", "seed": 3, **FAST}, {**png, "Idempotency-Key": "pixels"}
        r = http.post("/generate", json=body, headers=keyed)  # answered on the job's `succeeded` event
        assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
        job_id = r.headers["location"].removeprefix("/jobs/")
        assert r.headers["content-location"] == f"/jobs/{job_id}/images/0"
        assert r.content == http.get(f"/jobs/{job_id}/images/0").content  # the stored PNG, byte for byte
        again = http.post("/generate", json=body, headers=keyed)  # already ended: read from the job
        assert again.status_code == 200 and again.content == r.content
        assert again.headers["location"] == f"/jobs/{job_id}"
        # Several images: the job as JSON (each image has its URL).
        r = http.post("/generate", json={"prompt": "two", "num_images": 2, **FAST}, headers=png)
        assert r.status_code == 200 and len(r.json()["images"]) == 2
        # Not done within the wait: 202 and the job as JSON, as without Accept.
        blocker = stack.submit(http, **BLOCKER)
        behind = {**png, "Prefer": "wait=0.3", "Idempotency-Key": "png-then-cancel"}
        r = http.post("/generate", json={"prompt": "behind it", **FAST}, headers=behind)
        assert r.status_code == 202 and r.json()["status"] == "queued"
        # Ended without an image (canceled): a 409 that says so, as GET /jobs/{id}/images/0 does.
        assert http.delete(f"/jobs/{r.json()['id']}").status_code == 200
        r = http.post("/generate", json={"prompt": "behind it", **FAST}, headers=behind)
        assert r.status_code == 409 and r.json()["error"]["code"] == "job_not_succeeded", r.text
        assert "canceled" in r.json()["error"]["message"]
        http.delete(f"/jobs/{blocker['id']}")


def test_sse_stream_and_resume(stack: Stack) -> None:
    with stack.client() as http:
        job = stack.submit(http, prompt="stream me", num_inference_steps=20, width=64, height=64)
        with connect_sse(http, "GET", f"/jobs/{job['id']}/events") as source:
            events = [(e.event, e.id, json.loads(e.data)) for e in source.iter_sse()]
        kinds = [k for k, _, _ in events]
        assert kinds[0] == "queued" and kinds[1] == "started" and kinds[-1] == "succeeded"
        assert set(kinds[2:-1]) <= {"progress"}
        last = events[-1][2]
        assert last["job_id"] == job["id"] and last["status"] == "succeeded"
        assert last["images"][0]["url"] == f"/jobs/{job['id']}/images/0"
        assert all(e["job_id"] == job["id"] and "timestamp" in e for _, _, e in events)

        # Resume after the second event: the rest comes again, the terminal event included.
        second_id = events[1][1]
        headers = {"Last-Event-ID": second_id}
        with connect_sse(http, "GET", f"/jobs/{job['id']}/events", headers=headers) as source:
            rest = [(e.event, e.id) for e in source.iter_sse()]
        assert rest == [(k, i) for k, i, _ in events[2:]]
        # Resuming after the terminal event (or beyond it) answers 204, which tells an EventSource to
        # stop: it sent that event again, then an empty 200 that browsers reconnected after, forever.
        for last in (events[-1][1], "18446744073709551615-18446744073709551615"):
            r = http.get(f"/jobs/{job['id']}/events", headers={"Last-Event-ID": last})
            assert r.status_code == 204 and r.content == b"", last
        # Ids Redis would refuse mid-stream are refused up front (they broke the open stream).
        for bogus in (
            "bogus",
            "1-",
            "0-",
            "-1",
            "18446744073709551616",
            "99999999999999999999-0",
            "1" * 64,
            "²".encode("latin-1"),
        ):
            r = http.get(f"/jobs/{job['id']}/events", headers={"Last-Event-ID": bogus})
            assert r.status_code == 422, (bogus, r.status_code)


def test_webhooks_signed_retried_and_in_order(stack: Stack) -> None:
    receiver = WebhookReceiver(fail=2)
    try:
        with stack.client() as http:
            job = stack.submit(
                http,
                prompt="call me back",
                num_inference_steps=10,
                width=64,
                height=64,
                webhook=receiver.url,
                webhook_events=["start", "progress", "completed"],
            )
            stack.wait(http, job["id"])
        wait_for(lambda: any(json.loads(b)["type"] == "succeeded" for _, b in receiver.accepted), 60, "completion")
    finally:
        receiver.server.shutdown()
    kinds = [json.loads(body)["type"] for _, body in receiver.accepted]
    assert kinds[0] == "started" and kinds[-1] == "succeeded" and set(kinds[1:-1]) <= {"progress"}
    assert receiver.attempts == len(receiver.accepted) + 2  # two 503s, then every event delivered
    for headers, body in receiver.accepted:
        assert verify(WEBHOOK_SECRET, headers["x-imagegen-timestamp"], body, headers["x-imagegen-signature"])
        assert json.loads(body)["job_id"] == job["id"]


def test_webhooks_to_internal_addresses_are_refused_by_default(stack: Stack, tmp_path: Path) -> None:
    env = service_env(stack.env["IMAGEGEN_REDIS_URL"], tmp_path) | {"IMAGEGEN_WEBHOOK_ALLOW_PRIVATE": "false"}
    api, base = start_api(env, tmp_path / "api.log")
    try:
        for target in (
            "http://127.0.0.1:9/x",
            "http://169.254.169.254/latest/meta-data",
            "http://10.0.0.1/",
            "http://localhost/hook",
            "file:///etc/passwd",
            "http://[::1/x",  # these four were 500s (a ValueError or UnicodeError out of the check)
            "http://1.1.1.1:99999/x",  # or accepted, then dropped at delivery
            "http://a..b/",
            "http://" + "a" * 64 + ".example/",
        ):
            r = httpx.post(base + "/generate", json={"prompt": "x", "webhook": target})
            assert r.status_code == 422 and "webhook" in r.json()["error"]["message"], (target, r.text)
    finally:
        api.stop()


def test_idempotency_key(stack: Stack) -> None:
    body = {"prompt": "only once", **FAST}
    with stack.client() as http, ThreadPoolExecutor(2) as pool:
        answers = list(
            pool.map(lambda _: http.post("/generate", json=body, headers={"Idempotency-Key": "k-1"}), range(2))
        )
        assert sorted(r.status_code for r in answers) == [200, 202]
        assert answers[0].json()["id"] == answers[1].json()["id"]
        again = http.post("/generate", json=body, headers={"Idempotency-Key": "k-1"})
        assert again.status_code == 200 and again.json()["id"] == answers[0].json()["id"]
        r = http.post("/generate", json=body | {"seed": 5}, headers={"Idempotency-Key": "k-1"})
        assert r.status_code == 409 and r.json()["error"]["code"] == "idempotency_conflict"
        other = http.post("/generate", json=body, headers={"Idempotency-Key": "k-2"})
        assert other.status_code == 202 and other.json()["id"] != answers[0].json()["id"]
        # A request refused before its job was written does not hold its key: the retry is
        # answered anew (it was a 503 "still being processed" for 24 h).
        too_big = body | {"width": 4096}
        for _ in range(2):
            r = http.post("/generate", json=too_big, headers={"Idempotency-Key": "k-3"})
            assert r.status_code == 422 and r.json()["error"]["code"] == "validation_error", r.text
        fixed = http.post("/generate", json=body, headers={"Idempotency-Key": "k-3"})
        assert fixed.status_code == 202, fixed.text
        r = http.post("/generate", json=body, headers={"Idempotency-Key": ""})
        assert r.status_code == 422 and "Idempotency-Key" in r.json()["error"]["message"]
        # Once the key's job has expired (its TTL removed it), a retry is told so: 410. It was a
        # 503 "still being processed" after a 2 s wait, for the rest of the key's 24 h.
        first = answers[0].json()["id"]
        stack.wait(http, first)
        redis.Redis.from_url(stack.env["IMAGEGEN_REDIS_URL"]).delete(f"rq:job:{first}")
        r = http.post("/generate", json=body, headers={"Idempotency-Key": "k-1"})
        assert r.status_code == 410 and r.json()["error"]["code"] == "gone" and first in r.text, r.text


def test_listing_is_newest_first_paginated_and_filtered(stack: Stack) -> None:
    with stack.client() as http:
        mine = [stack.submit(http, prompt=f"list {i}", **FAST)["id"] for i in range(3)]
        for job_id in mine:
            stack.wait(http, job_id)
        page1 = http.get("/jobs", params={"limit": 2}).json()
        assert [j["id"] for j in page1["jobs"]] == mine[::-1][:2] and page1["next_cursor"]
        page2 = http.get("/jobs", params={"limit": 2, "cursor": page1["next_cursor"]}).json()
        assert page2["jobs"][0]["id"] == mine[0]
        ok = http.get("/jobs", params={"status": "succeeded", "limit": 100}).json()["jobs"]
        assert all(j["status"] == "succeeded" for j in ok) and set(mine) <= {j["id"] for j in ok}
        assert http.get("/jobs", params={"status": "nope"}).status_code == 422
        for cursor in ("x", "nan", "NaN", "inf"):
            assert http.get("/jobs", params={"cursor": cursor}).status_code == 422, cursor


@pytest.mark.parametrize("which", ["short_ttl_stack", "redis_store_stack"])
def test_results_expire_with_410_and_images_are_deleted(which: str, request) -> None:
    s: Stack = request.getfixturevalue(which)
    db = int(s.env["IMAGEGEN_REDIS_URL"].rsplit("/", 1)[1])
    with s.client() as http:
        job = s.wait(http, s.submit(http, prompt="ephemeral", **FAST)["id"])
        assert http.get(job["images"][0]["url"]).status_code == 200
        wait_for(lambda: http.get(f"/jobs/{job['id']}").status_code == 410, 30, "job expiry", interval=0.5)
        r = http.get(f"/jobs/{job['id']}/images/0")
        assert r.status_code == 410 and "expired" in r.json()["error"]["message"]
    if which == "short_ttl_stack":
        folder = Path(s.env["IMAGEGEN_RESULTS_DIR"]) / job["id"]
        wait_for(lambda: not folder.exists(), 15, "sweeper to delete the images")
    else:
        assert s.redis.client(db).exists(f"imagegen:image:{job['id']}:0") == 0


def test_webhooks_of_canceled_queued_jobs_never_hold_up_requests(stack: Stack, tmp_path: Path) -> None:
    """The API announces a job canceled before it started. Its delivery ran as a background task
    on the threads that serve every plain route, retrying for minutes: 40 cancels to a receiver
    that hangs stalled `/healthz` for 75 s. Now the API's own sender threads deliver them."""
    import socket

    hang = socket.socket()
    hang.bind(("127.0.0.1", 0))
    hang.listen(64)  # accepts connections and never answers
    url = f"http://127.0.0.1:{hang.getsockname()[1]}/hook"
    env = service_env(f"redis://127.0.0.1:{stack.redis.port}/11", tmp_path)  # no worker: jobs stay queued
    stack.redis.client(11).flushdb()
    api, base = start_api(env, tmp_path / "api.log")
    try:
        with httpx.Client(base_url=base, timeout=30) as http:
            body = {"prompt": "x", "webhook": url, "webhook_events": ["completed"]}
            ids = [http.post("/generate", json=body).json()["id"] for _ in range(45)]
            started = time.monotonic()
            for job_id in ids:
                assert http.delete(f"/jobs/{job_id}").status_code == 200
            assert http.get("/healthz").status_code == 200
            assert time.monotonic() - started < 15  # was 75 s: the 41st cancel waited for a thread
    finally:
        api.stop()
        hang.close()


def test_every_event_has_progress_even_for_a_job_that_never_started(stack: Stack, tmp_path: Path) -> None:
    """The README's event schema has `progress` in every event; a job canceled while queued got a
    `canceled` event without it (a client reading `progress.step` broke)."""
    env = service_env(f"redis://127.0.0.1:{stack.redis.port}/12", tmp_path)  # no worker: jobs stay queued
    stack.redis.client(12).flushdb()
    api, base = start_api(env, tmp_path / "api.log")
    try:
        with httpx.Client(base_url=base, timeout=30) as http:
            job = http.post("/generate", json={"prompt": "never runs", "num_inference_steps": 7}).json()
            assert http.delete(f"/jobs/{job['id']}").status_code == 200
            with connect_sse(http, "GET", f"/jobs/{job['id']}/events") as source:
                events = [(e.event, json.loads(e.data)) for e in source.iter_sse()]
        assert [kind for kind, _ in events] == ["queued", "canceled"]
        assert all(data["progress"] == {"step": 0, "total": 7} for _, data in events), events
    finally:
        api.stop()


def test_a_long_poll_whose_client_left_stops_waiting(stack: Stack) -> None:
    """Starlette does not cancel a plain route when its client goes: a long-poll (or an OpenAI
    call) went on waiting on Redis for its whole 60 s (120 s), one of the blocking reads that
    `IMAGEGEN_MAX_STREAMS` bounds."""
    import socket
    from urllib.parse import urlsplit

    url = stack.env["IMAGEGEN_REDIS_URL"]
    db = int(urlsplit(url).path.lstrip("/") or 0)
    redis = stack.redis.client(db)

    def blocked_reads() -> int:
        clients = redis.client_list()
        return sum(1 for c in clients if c["cmd"] == "xread" and "b" in c["flags"] and c["db"] == str(db))

    def server_errors(http: httpx.Client) -> float:
        text = http.get("/metrics").text
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("imagegen_http_requests_total{") and 'code="500"' in line
        )

    with stack.client() as http:
        errors_before = server_errors(http)
        big = {"num_inference_steps": 150, "num_images": 4, "width": 128, "height": 128}
        job = stack.submit(http, prompt="outlasts the poll", **big)
        try:
            host, port = urlsplit(stack.base_url).hostname, urlsplit(stack.base_url).port
            for path, body in ((f"/jobs/{job['id']}?wait=60", b""), ("/v1/images/generations", b'{"prompt": "x"}')):
                method = "POST" if body else "GET"
                head = f"{method} {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                others = blocked_reads()  # other readers of this database (workers, earlier tests' streams)
                conn = socket.create_connection((host, port))
                conn.sendall(head.encode() + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
                wait_for(lambda n=others: blocked_reads() > n, 10, f"{path} to block on Redis")
                conn.close()
                wait_for(lambda n=others: blocked_reads() <= n, 6, f"{path} to stop waiting once its client left")
            assert server_errors(http) == errors_before  # ended quietly, not as a 500
        finally:
            http.delete(f"/jobs/{job['id']}")
