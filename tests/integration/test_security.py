"""Security against the real API process: API keys and job ownership, rate limits, CORS, hostile
input, and job ids that never reach Redis."""

from __future__ import annotations

import subprocess
import threading
import time

import httpx
import pytest

from tests.procs import PYTHON, ROOT, RedisServer, Stack, service_env, start_api, start_worker

pytestmark = pytest.mark.integration
ALICE, BOB = "alice-key-0123456789abcdef", "bob-key-0123456789abcdef"
FAST = {"num_inference_steps": 2, "width": 32, "height": 32}


@pytest.fixture(scope="module")
def secured(redis_server: RedisServer, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("secured")
    env = service_env(f"redis://127.0.0.1:{redis_server.port}/5", tmp, api_keys=f"{ALICE},{BOB}")
    api, base = start_api(env, tmp / "api.log")
    yield base, env
    api.stop()


def test_keys_required_and_jobs_belong_to_their_key(secured) -> None:
    base, env = secured
    assert httpx.get(base + "/healthz").status_code == 200  # health needs no key
    r = httpx.post(base + "/generate", json={"prompt": "x"})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert r.json()["error"]["code"] == "unauthorized"
    assert httpx.get(base + "/jobs", headers={"Authorization": "Bearer wrong-key-0123456789"}).status_code == 401
    assert httpx.get(base + "/jobs", headers={"Authorization": f"Basic {ALICE}"}).status_code == 401

    alice = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {ALICE}"})
    bob = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {BOB}"})
    job = alice.post("/generate", json={"prompt": "alice's", **FAST}).json()
    jid = job["id"]
    assert alice.get(f"/jobs/{jid}").status_code == 200
    unauthorised = 0
    for method, path in [
        ("GET", f"/jobs/{jid}"),
        ("GET", f"/jobs/{jid}/images/0"),
        ("GET", f"/jobs/{jid}/events"),
        ("DELETE", f"/jobs/{jid}"),
        ("GET", f"/jobs/{jid}?wait=1"),
    ]:
        r = bob.request(method, path)
        assert r.status_code == 404, (method, path, r.status_code)
        unauthorised += r.status_code == 200
    assert unauthorised == 0
    assert jid in {j["id"] for j in alice.get("/jobs").json()["jobs"]}
    assert jid not in {j["id"] for j in bob.get("/jobs").json()["jobs"]}
    # The same Idempotency-Key from two clients makes two jobs.
    a = alice.post("/generate", json={"prompt": "same"}, headers={"Idempotency-Key": "k"}).json()
    b = bob.post("/generate", json={"prompt": "same"}, headers={"Idempotency-Key": "k"}).json()
    assert a["id"] != b["id"]
    # The OpenAI SDK's bearer key works on /v1 too; without one it is refused in OpenAI's shape.
    r = httpx.post(base + "/v1/images/generations", json={"prompt": "x"})
    assert r.status_code == 401 and "message" in r.json()["error"]
    assert r.headers["www-authenticate"] == "Bearer"


def test_keys_stored_hashed_in_redis_via_the_cli(secured) -> None:
    base, env = secured

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [PYTHON, "-m", "app.keys", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
        )

    created = run("create", "carol")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert key.startswith("ig_") and len(key) > 30
    listed = run("list").stdout
    assert "carol" in listed and key not in listed  # only a digest prefix is shown (and stored)
    carol = {"Authorization": f"Bearer {key}"}
    assert httpx.post(base + "/generate", json={"prompt": "carol's"}, headers=carol).status_code == 202
    assert run("revoke", "carol").returncode == 0
    assert httpx.get(base + "/jobs", headers=carol).status_code == 401


def test_high_priority_only_for_keys_granted_it(secured) -> None:
    """Any key could jump the queue; a stored key now needs the grant, given or taken by the CLI."""
    base, env = secured

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [PYTHON, "-m", "app.keys", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
        )

    key = run("create", "erin").stdout.strip()
    erin = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"})
    high = {"prompt": "x", "priority": "high", **FAST}
    r = erin.post("/generate", json=high)
    assert r.status_code == 403, r.text
    assert r.json()["error"]["code"] == "forbidden" and "priority" in r.json()["error"]["message"]
    assert erin.post("/generate", json={**high, "priority": "low"}).status_code == 202
    r = erin.post("/variations", data={"priority": "high"}, files={"image": ("x.png", _png(), "image/png")})
    assert r.status_code == 403, r.text  # the variations route too
    assert "normal/low only" in run("list").stdout
    assert run("update", "erin", "--high-priority").returncode == 0
    assert "high allowed" in run("list").stdout
    assert erin.post("/generate", json=high).status_code == 202
    assert run("update", "erin", "--no-high-priority").returncode == 0
    assert erin.post("/generate", json=high).status_code == 403
    # The operator's own keys (IMAGEGEN_API_KEYS) may use every priority.
    alice = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {ALICE}"})
    assert alice.post("/generate", json=high).status_code == 202
    assert run("update", "nobody", "--high-priority").returncode == 1
    # Digest prefixes need 8 hex digits: "e" or "" named every key whose digest starts so (or all).
    assert run("update", "e", "--high-priority").returncode == 1
    assert run("revoke", "").returncode == 1
    assert "erin" in run("list").stdout
    assert run("update", "erin").returncode != 0  # nothing to change is a usage error


def test_a_key_with_its_own_webhook_secret(secured) -> None:
    """`app.keys create NAME --webhook-secret` prints the key and its secret; its jobs' webhooks (here
    a job canceled before it started, which the API itself announces) are signed with that secret,
    other keys' with the server's, and `update --no-webhook-secret` goes back to the server's."""
    import json

    from app.core.webhooks import verify
    from tests.procs import WEBHOOK_SECRET, WebhookReceiver

    base, env = secured

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [PYTHON, "-m", "app.keys", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
        )

    created = run("create", "frank", "--webhook-secret")
    key, secret = created.stdout.split()
    assert key.startswith("ig_") and secret.startswith("whsec_")
    assert "webhook secret: its own" in run("list").stdout
    receiver = WebhookReceiver()

    def canceled_event_secret(api_key: str) -> str | None:
        client = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {api_key}"})
        body = {"prompt": "x", "webhook": receiver.url, "webhook_events": ["completed"], **FAST}
        job = client.post("/generate", json=body).json()
        assert client.delete(f"/jobs/{job['id']}").status_code == 200
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            for headers, raw in receiver.accepted:
                if json.loads(raw)["job_id"] == job["id"]:
                    ts, signature = headers["x-imagegen-timestamp"], headers["x-imagegen-signature"]
                    return next((s for s in (secret, WEBHOOK_SECRET) if verify(s, ts, raw, signature)), None)
            time.sleep(0.05)
        return None

    try:
        assert canceled_event_secret(key) == secret
        assert canceled_event_secret(ALICE) == WEBHOOK_SECRET
        updated = run("update", "frank", "--no-webhook-secret")
        assert updated.returncode == 0 and "webhook secret: the server's" in run("list").stdout
        assert canceled_event_secret(key) == WEBHOOK_SECRET
        rotated = run("update", "frank", "--new-webhook-secret")
        assert rotated.returncode == 0 and "frank: webhook secret whsec_" in rotated.stdout
        secret = rotated.stdout.split("webhook secret ")[1].split()[0]
        assert canceled_event_secret(key) == secret
    finally:
        receiver.close()
        run("revoke", "frank")


def _png() -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(out, format="PNG")
    return out.getvalue()


def test_waiting_jobs_bounded_per_key(redis_server: RedisServer, tmp_path) -> None:
    """One key cannot fill the shared queue: past its bound of waiting jobs it gets 429, other keys
    are unaffected, and a job leaving the queue makes room again."""
    env = service_env(
        f"redis://127.0.0.1:{redis_server.port}/8",
        tmp_path,
        api_keys=f"{ALICE},{BOB}",
        max_queued_per_key="2",
        rate_limit_images="4",  # refused submissions give their images back: three are charged here
    )
    redis_server.client(8).flushdb()
    api, base = start_api(env, tmp_path / "api.log")  # no worker: every job waits
    try:
        alice = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {ALICE}"})
        bob = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {BOB}"})
        first = alice.post("/generate", json={"prompt": "a1", **FAST})
        assert first.status_code == 202
        # A repeat of an Idempotency-Key returns its job and takes no place of its own.
        keyed = {"prompt": "a2", **FAST}
        assert alice.post("/generate", json=keyed, headers={"Idempotency-Key": "k2"}).status_code == 202
        assert alice.post("/generate", json=keyed, headers={"Idempotency-Key": "k2"}).status_code == 200
        r = alice.post("/generate", json={"prompt": "a3", **FAST})
        assert r.status_code == 429, r.text
        assert "2 jobs waiting" in r.json()["error"]["message"] and int(r.headers["retry-after"]) >= 1
        r = alice.post("/variations", files={"image": ("x.png", _png(), "image/png")})
        assert r.status_code == 429, r.text
        assert bob.post("/generate", json={"prompt": "b1", **FAST}).status_code == 202  # per key
        assert alice.delete(f"/jobs/{first.json()['id']}").status_code == 200  # one leaves the queue
        assert alice.post("/generate", json={"prompt": "a4", **FAST}).status_code == 202
        assert alice.post("/generate", json={"prompt": "a5", **FAST}).status_code == 429
        waiting = [j for j in alice.get("/jobs").json()["jobs"] if j["status"] == "queued"]
        assert len(waiting) == 2  # nothing refused was written
    finally:
        api.stop()


def test_signed_image_links_work_without_the_key_until_they_expire(redis_server: RedisServer, tmp_path) -> None:
    """With keys on, image links needed the key, so an `<img>`, another service or an OpenAI SDK
    user handed a `url` got 401; signed links work alone, for that one image, until `exp`."""
    import hashlib
    import hmac
    from base64 import urlsafe_b64encode
    from urllib.parse import parse_qs, urlsplit

    env = service_env(f"redis://127.0.0.1:{redis_server.port}/9", tmp_path, api_keys=f"{ALICE},{BOB}")
    redis_server.client(9).flushdb()
    api, base = start_api(env, tmp_path / "api.log")
    worker = start_worker(env, tmp_path / "worker.log", ready=redis_server.client(9))
    try:
        alice = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {ALICE}"}, timeout=60)
        job = alice.post("/generate", json={"prompt": "x", "num_images": 2, **FAST}, headers={"Prefer": "wait=50"})
        assert job.status_code == 200 and job.json()["status"] == "succeeded", job.text
        url = job.json()["images"][0]["url"]
        parts = urlsplit(url)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        assert set(query) == {"exp", "sig"} and int(query["exp"]) > time.time() + 3000
        r = httpx.get(url)  # no key
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert httpx.get(f"{base}{parts.path}").status_code == 401  # unsigned: the key is needed
        assert alice.get(parts.path).status_code == 200
        bob = {"Authorization": f"Bearer {BOB}"}
        assert httpx.get(f"{base}{parts.path}", headers=bob).status_code == 404  # another key: not its job
        other_image = f"{base}{parts.path[:-1]}1?{parts.query}"
        assert httpx.get(other_image).status_code == 401  # a link opens its own image only
        forged = httpx.get(f"{base}{parts.path}?exp={int(query['exp']) + 1}&sig={query['sig']}")
        assert forged.status_code == 401 and "expired or is not valid" in forged.json()["error"]["message"]
        # Past `exp` (signed with the server's own secret, to show expiry alone refuses it).
        secret = redis_server.client(9).get("imagegen:url-secret")
        past = int(time.time()) - 1
        mac = hmac.new(secret, f"{job.json()['id']}:0:{past}".encode(), hashlib.sha256).digest()
        stale = f"{base}{parts.path}?exp={past}&sig={urlsafe_b64encode(mac).decode()[:32]}"
        assert httpx.get(stale).status_code == 401
        assert httpx.get(stale.replace(f"exp={past}", f"exp={past + 7200}")).status_code == 401
        assert httpx.get(f"{base}{parts.path}?exp={query['exp']}&sig=%C3%A9").status_code == 401  # was a 500
        # The OpenAI route's links are signed too.
        r = alice.post("/v1/images/generations", json={"prompt": "y", "size": "32x32", "num_inference_steps": 2})
        assert r.status_code == 200, r.text
        assert httpx.get(r.json()["data"][0]["url"]).status_code == 200
        # Access logs name the path without the signature, which would open the image.
        assert query["sig"] not in api.output() and "sig=…" in api.output()
        # A new secret (the old one deleted): a process that read it signs with it, and one that
        # still holds the old one accepts those links at once; links signed with the old one die.
        redis_server.client(9).delete("imagegen:url-secret")
        api2, base2 = start_api(env, tmp_path / "api2.log")
        try:
            fresh = httpx.get(f"{base2}{parts.path}", headers={"Authorization": f"Bearer {ALICE}"})
            assert fresh.status_code == 200
            new_url = alice.get(f"{base2}/jobs/{job.json()['id']}").json()["images"][0]["url"]
            assert new_url != url
            assert httpx.get(new_url.replace(base2, base)).status_code == 200  # the first process
            assert httpx.get(url.replace(base, base2)).status_code == 401
        finally:
            api2.stop()
    finally:
        worker.stop()
        api.stop()


def test_rate_limits_per_key(redis_server: RedisServer, tmp_path) -> None:
    env = service_env(
        f"redis://127.0.0.1:{redis_server.port}/6",
        tmp_path,
        api_keys=f"{ALICE},{BOB}",
        rate_limit_requests="5",
        rate_limit_images="4",
    )
    api, base = start_api(env, tmp_path / "api.log")
    try:
        alice = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {ALICE}"})
        bob = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {BOB}"})
        if time.time() % 60 > 55:  # keep the whole test inside one one-minute window
            time.sleep(61 - time.time() % 60)
        assert alice.post("/generate", json={"prompt": "x", "num_images": 3}).status_code == 202
        r = alice.post("/generate", json={"prompt": "x", "num_images": 2})
        assert r.status_code == 429 and "images" in r.json()["error"]["message"]
        codes = [alice.get("/jobs").status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        assert 1 <= int(alice.get("/jobs").headers["retry-after"]) <= 60
        # Limits are per key. Images a refused request would have made are given back; /v1 answers
        # a 429 with Retry-After too (OpenAI's SDKs wait that long before they retry).
        assert bob.post("/generate", json={"prompt": "x", "num_images": 3}).status_code == 202
        r = bob.post("/v1/images/generations", json={"prompt": "x", "n": 1})
        assert r.status_code == 503 and "no worker" in r.json()["error"]["message"]  # given back
        r = bob.post("/v1/images/generations", json={"prompt": "x", "n": 2})
        assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= 60, r.text
        assert bob.post("/generate", json={"prompt": "x", "num_images": 1}).status_code == 202  # 3 + 1 of 4
        assert bob.get("/jobs").status_code == 200
    finally:
        api.stop()


def test_cors_off_by_default_and_explicit_origins(stack: Stack, tmp_path) -> None:
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    r = httpx.options(stack.base_url + "/generate", headers=preflight)
    assert "access-control-allow-origin" not in r.headers
    env = stack.env | {"IMAGEGEN_CORS_ORIGINS": "https://app.example"}
    api, base = start_api(env, tmp_path / "api.log")
    try:
        r = httpx.options(base + "/generate", headers=preflight | {"Access-Control-Request-Headers": "prefer"})
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        assert "prefer" in r.headers["access-control-allow-headers"].lower()  # waiting in the POST
        r = httpx.post(base + "/generate", json={"prompt": "x"}, headers={"Origin": "https://app.example"})
        assert {"location", "preference-applied"} <= set(r.headers["access-control-expose-headers"].lower().split(", "))
        r = httpx.options(base + "/generate", headers=preflight | {"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in r.headers
        # A body over the limit: the page may read the 413 and its message (was an opaque error).
        big = b'{"prompt": "' + b"x" * 2_000_000 + b'"}'
        headers = {"Origin": "https://app.example", "content-type": "application/json"}
        r = httpx.post(base + "/generate", content=big, headers=headers)
        assert r.status_code == 413 and r.headers["access-control-allow-origin"] == "https://app.example"
    finally:
        api.stop()


def test_hostile_prompts_work(stack: Stack) -> None:
    prompts = [
        "tab\there\nnewline\x00nul\x1bescape",
        "🎨🔴 on 🔵 👩🏽‍🎨",
        "دائرة حمراء على خلفية زرقاء",
        "x" * 1000,
        "'; DROP TABLE jobs; --",
        "<script>alert(1)</script>",
    ]
    with stack.client() as http:
        jobs = [stack.submit(http, prompt=p, **FAST) for p in prompts]
        for job, prompt in zip(jobs, prompts, strict=True):
            done = stack.wait(http, job["id"])
            assert done["status"] == "succeeded" and done["params"]["prompt"] == prompt
        assert http.post("/generate", json={"prompt": "x" * 1001}).status_code == 422


def test_bad_job_ids_never_reach_redis(stack: Stack) -> None:
    seen: list[str] = []
    conn = stack.redis.client(1)
    monitor_conn = conn.monitor()
    stop = threading.Event()

    def watch() -> None:
        with monitor_conn as m:
            for command in m.listen():
                seen.append(command["command"])
                if stop.is_set():
                    return

    def wait_until_seen(marker: str) -> bool:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            conn.echo(marker)
            if any(marker in c for c in list(seen)):
                return True
            time.sleep(0.05)
        return False

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    # The monitor is live once it has seen our own marker (a fixed sleep was not always enough).
    assert wait_until_seen("monitor-started"), "the monitor never started"
    with stack.client() as http:
        for bad in ["..%2F..%2Fetc", "*", "rq:job:x", "x" * 300, "%00", "imagegen:index"]:
            for path in (f"/jobs/{bad}", f"/jobs/{bad}/images/0", f"/jobs/{bad}/events"):
                assert http.get(path).status_code == 404, path
            assert http.delete(f"/jobs/{bad}").status_code == 404
    conn.ping()
    stop.set()
    wait_until_seen("monitor-end")  # everything sent before it has been seen; the watcher stops
    watcher.join(5)
    assert any("PING" in c.upper() for c in seen), "the monitor saw nothing: the check would be vacuous"
    # The ids as sent ("..%2F") or decoded ("../"); a Lua script's body may hold its ` .. ` operator.
    assert not [c for c in seen if any(b in c for b in ("..%2F", "../", "rq:job:x", "x" * 300, "imagegen:index"))]


def test_stored_keys_with_auth_off_are_pointed_out(redis_server: RedisServer, tmp_path) -> None:
    """Keys created in Redis protect nothing until auth is on (the compose file could not turn it
    on): the CLI and the API's start-up both say so, and requests are then accepted without a key."""
    env = service_env(f"redis://127.0.0.1:{redis_server.port}/7", tmp_path)
    redis_server.client(7).flushdb()
    created = subprocess.run(
        [PYTHON, "-m", "app.keys", "create", "dave"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert created.returncode == 0 and created.stdout.startswith("ig_"), created.stderr
    assert "IMAGEGEN_AUTH is off" in created.stderr
    api, base = start_api(env, tmp_path / "api.log")
    try:
        assert httpx.get(base + "/jobs").status_code == 200  # no key needed: auth is off
        assert "1 API key(s) are stored in Redis but IMAGEGEN_AUTH is off" in api.output()
    finally:
        api.stop()
