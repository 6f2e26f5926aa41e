"""A chaos run: the whole service under load while its processes are killed, stopped, paused and
restarted at random, then a check that every job it accepted ended as it should.

    .venv/bin/python -m tests.chaos --seconds 300 --seed 1      # or: make chaos

Real processes, as in the integration tests: redis-server (append-only file, fsync every second),
one API, two workers on tiny-random (one batching, one a job at a time) and a webhook receiver.
Clients submit small jobs with an Idempotency-Key each, retrying the same key through errors and
restarts until they get an answer, as a careful client does; some jobs subscribe to webhooks and
some are canceled. Meanwhile one fault at a time: a worker killed (-9), stopped (SIGTERM) or paused
(SIGSTOP, then SIGCONT: a hung worker whose jobs others recover), the API killed, Redis stopped
and restarted. Then everything is brought back, the jobs drain, and each accepted job is checked:

* it is still known (`GET /jobs/{id}`), and terminal;
* `succeeded` with its images, each served as a PNG of the asked size; `canceled` only if it was
  asked to be; `failed` only as `worker_lost` (a job whose runs were killed more than
  IMAGEGEN_MAX_RETRIES times: by design), never with any other code;
* a job that subscribed got its terminal event by webhook, with the status it ended with;
* one job per submission, however often its POST was sent again (the jobs listed by `GET /jobs`
  name each submission's prompt once), and nothing is left in RQ's queues or registries.

With `--redis-kill` Redis is killed with SIGKILL rather than stopped: writes of its last second may
then be lost (appendfsync everysec), and jobs lost that way are counted apart, not as failures.
Exit status 0 when every check held. Logs stay in the printed folder.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import json
import random
import re
import signal
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from PIL import Image

from tests.procs import (
    Proc,
    RedisServer,
    WebhookReceiver,
    _redis_proc,
    free_port,
    service_env,
    start_api,
    start_redis,
    start_worker,
    wait_for,
)

TERMINAL = {"succeeded", "failed", "canceled"}
UPLOAD = io.BytesIO()
Image.new("RGB", (48, 40), (30, 160, 220)).save(UPLOAD, "PNG")  # the input of variations jobs


@dataclass
class Submitted:
    key: str
    body: dict
    job_id: str | None = None
    cancel_asked: bool = False
    answers: collections.Counter = field(default_factory=collections.Counter)
    unexpected: str | None = None  # an answer no fault explains (the run fails)
    sdk: str | None = None  # made through a client library (`via`): how its call ended
    via: str | None = None


class Service:
    """The processes, each restartable in place (same Redis port, same API port)."""

    def __init__(self, root: Path, seed: int, flaky: float) -> None:
        self.root = root
        self.redis: RedisServer = start_redis(root / "redis")
        self.hooks = WebhookReceiver(flaky=flaky)
        self.env = service_env(
            self.redis.url,
            root,
            maintenance_interval="1",
            max_retries="3",
            shutdown_grace="5",
            job_timeout="120",
            # Enough tries that a receiver failing 3 in 10 at random is not given up on (0.3^10):
            # a give-up is by design, and this run looks for events lost to faults.
            webhook_max_attempts="10",
        )
        self.api_port = free_port()
        self.api, self.base = start_api(self.env, root / "api-0.log", port=self.api_port)
        self.starts = collections.Counter({"api": 1})
        self.workers: dict[str, Proc] = {}
        self.worker_env = {
            "batching": self.env | {"IMAGEGEN_MAX_BATCH": "4"},
            "single": self.env | {"IMAGEGEN_MAX_BATCH": "1"},
        }
        for name in self.worker_env:
            self.start_worker(name)
        self.rng = random.Random(seed)
        self.log: list[str] = []
        self.lock = threading.Lock()

    def start_worker(self, name: str) -> None:
        n = self.starts[name]
        self.starts[name] += 1
        self.workers[name] = start_worker(
            self.worker_env[name], self.root / f"worker-{name}-{n}.log", ready=self.redis.client(), timeout=180
        )

    def restart_api(self, sig: int) -> None:
        self.api.stop(sig)
        n = self.starts["api"]
        self.starts["api"] += 1
        self.api, _ = start_api(self.env, self.root / f"api-{n}.log", port=self.api_port)

    def restart_redis(self, sig: int) -> None:
        self.redis.proc.stop(sig)
        time.sleep(self.rng.uniform(0.5, 3))
        self.redis.proc = _redis_proc(self.redis.port, self.redis.dir)
        wait_for(lambda: self.redis.client().ping(), 20, "redis-server restart")

    def fault(self, redis_kill: bool) -> str:
        """One fault, and the repair that follows it; returns what it did."""
        kind = self.rng.choice(["worker-kill", "worker-term", "worker-pause", "api-kill", "redis-restart"])
        name = self.rng.choice(sorted(self.workers))
        worker = self.workers[name]
        if kind == "worker-kill":
            time.sleep(self.rng.uniform(0, 2))
            worker.stop(signal.SIGKILL)
            self.start_worker(name)
        elif kind == "worker-term":
            worker.stop(signal.SIGTERM, timeout=60)
            self.start_worker(name)
        elif kind == "worker-pause":
            pause = self.rng.uniform(2, 8)
            worker.popen.send_signal(signal.SIGSTOP)
            time.sleep(pause)
            worker.popen.send_signal(signal.SIGCONT)
            kind += f" {pause:.1f}s"
        elif kind == "api-kill":
            self.restart_api(signal.SIGKILL)
        else:
            self.restart_redis(signal.SIGKILL if redis_kill else signal.SIGTERM)
        return kind if kind.startswith(("api", "redis")) else f"{kind} {name}"

    def ensure_up(self) -> None:
        """Every process running (a worker may have exited on its own: that is logged, and restarted)."""
        for name, proc in self.workers.items():
            if not proc.alive():
                self.log.append(f"worker {name} had exited with {proc.popen.returncode}: restarted")
                self.start_worker(name)
        if not self.api.alive():
            self.log.append(f"api had exited with {self.api.popen.returncode}: restarted")
            self.restart_api(signal.SIGTERM)

    def close(self) -> None:
        for proc in [*self.workers.values(), self.api]:
            proc.stop(signal.SIGKILL)
        self.redis.proc.stop(signal.SIGKILL)
        self.hooks.close()


def job_body(rng: random.Random, hook: str, key: str) -> dict:
    size = rng.choice([32, 64])
    body = {
        "prompt": f"chaos {key}",  # one per submission: a second job made for it shows in the listing
        "num_inference_steps": rng.randint(2, 12),
        "width": size,
        "height": size,
        "num_images": rng.choice([1, 1, 1, 2]),
        "seed": rng.randrange(2**31),
        "priority": rng.choice(["low", "normal", "normal", "high"]),
    }
    if rng.random() < 0.5:
        body |= {"webhook": hook, "webhook_events": ["completed"]}
    return body


def client(service: Service, rng: random.Random, stop: threading.Event, out: list[Submitted]) -> None:
    """Submit jobs until `stop`, each with its own key, retried with that key until answered."""
    http = httpx.Client(base_url=service.base, timeout=10)
    outstanding: list[Submitted] = []
    while not stop.is_set():
        key = str(uuid.uuid4())
        item = Submitted(key, job_body(rng, service.hooks.url, key))
        upload = rng.random() < 0.2  # a variations job: its input image waits in Redis with it
        if upload:
            for name in ("webhook", "webhook_events"):
                item.body.pop(name, None)
        deadline = time.monotonic() + 60
        while item.job_id is None and item.unexpected is None and time.monotonic() < deadline:
            try:
                if upload:
                    form = {name: str(value) for name, value in item.body.items()}
                    image = {"image": ("in.png", UPLOAD.getvalue(), "image/png")}
                    r = http.post("/variations", data=form, files=image, headers={"Idempotency-Key": item.key})
                else:
                    r = http.post("/generate", json=item.body, headers={"Idempotency-Key": item.key})
                item.answers[r.status_code] += 1
                if r.status_code in (200, 202):
                    item.job_id = r.json()["id"]
                elif r.status_code in (429, 503):
                    time.sleep(float(r.headers.get("retry-after", "1")))
                else:
                    item.unexpected = f"POST /generate answered {r.status_code}: {r.text[:300]}"
            except httpx.TransportError as exc:
                item.answers[type(exc).__name__] += 1
                time.sleep(0.3)
        out.append(item)
        if item.job_id is None:
            continue
        outstanding.append(item)
        if rng.random() < 0.1:
            time.sleep(rng.uniform(0, 1.5))
            try:
                r = http.delete(f"/jobs/{item.job_id}")
                item.cancel_asked = r.status_code in (200, 202, 409)
                item.answers[f"DELETE {r.status_code}"] += 1
            except httpx.TransportError as exc:  # the cancel may or may not have landed
                item.cancel_asked = True
                item.answers[f"DELETE {type(exc).__name__}"] += 1
        # At most 4 of one client's jobs unfinished at once: a queue that drains, not one that grows.
        while len(outstanding) >= 4 and not stop.is_set():
            with contextlib.suppress(httpx.TransportError, ValueError, KeyError):
                outstanding = [s for s in outstanding if http.get(f"/jobs/{s.job_id}").json()["status"] not in TERMINAL]
            time.sleep(0.3)
        time.sleep(rng.uniform(0, 0.5))
    http.close()


class Patient(httpx.Client):
    """An HTTP client that rides out a restarting API (30 s) rather than ending the check."""

    def request(self, *args, **kwargs) -> httpx.Response:  # type: ignore[override]
        deadline = time.monotonic() + 30
        while True:
            try:
                return super().request(*args, **kwargs)
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)


def listed_prompts(http: httpx.Client) -> collections.Counter:
    """How many jobs the API lists for each prompt (every page)."""
    prompts: collections.Counter = collections.Counter()
    cursor = None
    while True:
        page = http.get("/jobs", params={"limit": 100} | ({"cursor": cursor} if cursor else {})).json()
        prompts.update(job["params"].get("prompt") for job in page["jobs"])
        cursor = page.get("next_cursor")
        if not cursor:
            return prompts


def sdk_client(service: Service, rng: random.Random, stop: threading.Event, out: list[Submitted]) -> None:
    """Submit and wait with the Python client (`Client.generate`, following the event stream),
    which is to ride out the same faults on its own: its resubmissions and its waits."""
    from imagegen_client import Client, ImagegenError

    with Client(service.base) as sdk:
        while not stop.is_set():
            key = str(uuid.uuid4())
            body = job_body(rng, service.hooks.url, key)
            body.pop("webhook", None), body.pop("webhook_events", None)
            item = Submitted(key, body, via="Client.generate")
            params = {k: v for k, v in body.items() if k != "prompt"}
            try:
                job = sdk.generate(body["prompt"], timeout=300, on_progress=lambda e: None, idempotency_key=key,
                                   **params)  # fmt: skip
                item.job_id, item.sdk = job.id, job.status
            except ImagegenError as exc:  # a job that failed says which; anything else is a problem
                found = re.search(r"job ([0-9a-f-]{36}) ", exc.message)
                item.job_id = found.group(1) if found and exc.status is None else None
                item.sdk = f"failed: {exc.code}" if item.job_id else None
                if item.job_id is None:
                    item.unexpected = f"Client.generate raised {exc.code}: {exc}"
            out.append(item)
            time.sleep(rng.uniform(0, 0.5))


def openai_client(service: Service, rng: random.Random, stop: threading.Event, out: list[Submitted]) -> None:
    """Call `/v1/images/generations` with OpenAI's SDK, which sends a call again when its connection
    breaks: with an Idempotency-Key each call must still make one job."""
    import openai

    sdk = openai.OpenAI(base_url=service.base + "/v1", api_key="sk-chaos", max_retries=6, timeout=150)
    while not stop.is_set():
        key = str(uuid.uuid4())
        body = job_body(rng, service.hooks.url, key)
        item = Submitted(key, {k: body[k] for k in ("prompt", "num_images", "width", "height")}, via="OpenAI's SDK")
        try:
            raw = sdk.images.with_raw_response.generate(
                prompt=body["prompt"],
                n=body["num_images"],
                size=f"{body['width']}x{body['height']}",
                response_format="b64_json",
                extra_headers={"Idempotency-Key": key},
                extra_body={"seed": body["seed"], "num_inference_steps": body["num_inference_steps"]},
            )
            item.job_id = raw.headers.get("x-imagegen-job-id")
            data = raw.parse().data or []
            item.sdk = "succeeded" if len(data) == body["num_images"] else f"{len(data)} images"
        except openai.APIStatusError as exc:  # answered once the job was queued: it names the job
            item.job_id = exc.response.headers.get("x-imagegen-job-id")
            code = exc.body.get("code") if isinstance(exc.body, dict) else None
            item.sdk = f"failed: {code}" if exc.status_code in (400, 500) else None  # a 503 or 504: it goes on
            if item.job_id is None:
                item.unexpected = f"the OpenAI SDK raised {exc.status_code}: {exc.message[:200]}"
        except openai.APIConnectionError as exc:
            item.unexpected = f"the OpenAI SDK gave up: {exc}"
        if item.job_id is None and item.unexpected is None:
            item.unexpected = "no X-Imagegen-Job-Id"
        out.append(item)
        time.sleep(rng.uniform(0, 0.5))


def check(service: Service, jobs: list[Submitted], drain_s: float, redis_kill: bool) -> tuple[list[str], dict]:
    """Wait for every accepted job to end, then check each; returns (violations, tallies). With
    `redis_kill`, a job Redis no longer knows is counted apart (lost with Redis's last second)."""
    problems: list[str] = [f"key {j.key}: {j.unexpected}" for j in jobs if j.unexpected]
    tally: collections.Counter = collections.Counter()
    http = Patient(base_url=service.base, timeout=30)
    accepted = [j for j in jobs if j.job_id]
    ended: dict[str, dict] = {}
    deadline = time.monotonic() + drain_s
    while time.monotonic() < deadline:
        for item in accepted:
            if item.job_id in ended:
                continue
            r = http.get(f"/jobs/{item.job_id}")
            if r.status_code == 200 and r.json()["status"] in TERMINAL:
                ended[item.job_id] = r.json()
        if len(ended) == len(accepted):
            break
        time.sleep(1)
    by_key: dict[str, set[str]] = collections.defaultdict(set)
    for item in accepted:
        by_key[item.key].add(item.job_id)
        job = ended.get(item.job_id)
        if job is None:
            r = http.get(f"/jobs/{item.job_id}")
            state = r.json().get("status") if r.status_code == 200 else f"HTTP {r.status_code}"
            if redis_kill and r.status_code == 404:
                tally["lost with Redis's last second"] += 1
                continue
            problems.append(f"job {item.job_id}: not ended after the drain ({state})")
            tally[f"not ended: {state}"] += 1
            continue
        status = job["status"]
        ended_as = status if status != "failed" else f"failed: {job['error']['code']}"
        tally[ended_as] += 1
        if item.via is not None:
            tally[f"by {item.via}"] += 1
        if item.sdk is not None and item.sdk != ended_as:
            problems.append(f"job {item.job_id}: {item.via} said {item.sdk}, the job {ended_as}")
        if status == "canceled" and not item.cancel_asked:
            problems.append(f"job {item.job_id}: canceled, never asked to be")
        if status == "failed" and job["error"]["code"] != "worker_lost":
            problems.append(f"job {item.job_id}: failed as {job['error']['code']}: {job['error']['message'][:200]}")
        if status == "succeeded":
            if len(job["images"]) != item.body["num_images"]:
                problems.append(f"job {item.job_id}: {len(job['images'])} images, asked {item.body['num_images']}")
            for ref in job["images"]:
                got = http.get(ref["url"])
                if got.status_code != 200:
                    problems.append(f"job {item.job_id}: image {ref['index']} answered {got.status_code}")
                    continue
                size = Image.open(io.BytesIO(got.content)).size
                if size != (item.body["width"], item.body["height"]):
                    problems.append(f"job {item.job_id}: image {ref['index']} is {size}")
    problems += [f"key {key}: named jobs {sorted(ids)}" for key, ids in by_key.items() if len(ids) > 1]
    # One job per submission, however often its POST was sent again (its Idempotency-Key).
    listed = listed_prompts(http)
    problems += [f"{n} jobs for prompt {prompt!r}" for prompt, n in listed.items() if n > 1]
    tally["jobs listed"] = sum(listed.values())
    # Webhooks: each subscribed job's terminal event, with the status it ended with. Retries back
    # off up to 30 s and an adopted outbox waits for its sender's alive key to expire (30 s).
    subscribed = {item.job_id for item in accepted if "webhook" in item.body and item.job_id in ended}
    deadline = time.monotonic() + 150
    while True:
        delivered: dict[str, list[dict]] = collections.defaultdict(list)
        for headers, body in list(service.hooks.accepted):
            event = json.loads(body)
            delivered[event["job_id"]].append(event | {"delivery": headers.get("x-imagegen-delivery")})
        missing = [j for j in subscribed if not any(e["type"] == ended[j]["status"] for e in delivered[j])]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(1)
    for item in accepted:
        job = ended.get(item.job_id)
        if job is None or "webhook" not in item.body:
            continue
        tally["webhook jobs"] += 1
        terminal = [e for e in delivered[item.job_id] if e["type"] in TERMINAL]
        if not any(e["type"] == job["status"] for e in terminal):
            problems.append(f"job {item.job_id}: {job['status']}, its webhook got {[e['type'] for e in terminal]}")
        if len({e["delivery"] for e in terminal}) > 1:
            tally["webhook: several terminal events for one job"] += 1
    connection = service.redis.client()
    for key in connection.scan_iter("rq:wip:*"):
        if members := connection.zrange(key, 0, -1):
            problems.append(f"{key.decode()} still holds {[m.decode() for m in members]}")
    for key in connection.scan_iter("rq:queue:*"):
        if connection.type(key) == b"list" and (length := connection.llen(key)):
            problems.append(f"{key.decode()} still holds {length} job(s)")
    http.close()
    return problems, dict(tally)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=300, help="how long faults go on (default 300)")
    parser.add_argument("--seed", type=int, default=1, help="the faults' and the jobs' random seed")
    parser.add_argument("--clients", type=int, default=3, help="concurrent submitting clients (default 3)")
    parser.add_argument(
        "--sdk-clients", type=int, default=1, help="clients using the Python client's generate (default 1)"
    )
    parser.add_argument("--openai-clients", type=int, default=1, help="clients using OpenAI's SDK on /v1 (default 1)")
    parser.add_argument("--gap", type=float, default=6, help="mean seconds between two faults (default 6)")
    parser.add_argument("--drain", type=float, default=240, help="seconds the jobs get to end afterwards")
    parser.add_argument(
        "--flaky-webhooks", type=float, default=0.0, help="share of webhook deliveries answered 503 (default 0)"
    )
    parser.add_argument("--redis-kill", action="store_true", help="kill Redis with SIGKILL, not SIGTERM")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="imagegen-chaos-"))
    print(f"logs: {root}", flush=True)
    service = Service(root, args.seed, args.flaky_webhooks)
    stop = threading.Event()
    jobs: list[Submitted] = []
    crashed: list[str] = []

    def run_client(rng: random.Random, kind=client) -> None:
        try:
            kind(service, rng, stop, jobs)
        except Exception as exc:  # counted as a failed run, not lost in a thread's traceback
            crashed.append(f"a client stopped: {type(exc).__name__}: {exc}")

    clients = (
        [
            threading.Thread(target=run_client, args=(random.Random(args.seed * 100 + i),), daemon=True)
            for i in range(args.clients)
        ]
        + [
            threading.Thread(target=run_client, args=(random.Random(args.seed * 100 + 50 + i), sdk_client), daemon=True)
            for i in range(args.sdk_clients)
        ]
        + [
            threading.Thread(
                target=run_client, args=(random.Random(args.seed * 100 + 80 + i), openai_client), daemon=True
            )
            for i in range(args.openai_clients)
        ]
    )
    try:
        for thread in clients:
            thread.start()
        began = time.monotonic()
        faults: collections.Counter = collections.Counter()
        while time.monotonic() - began < args.seconds:
            time.sleep(service.rng.expovariate(1 / args.gap))
            did = service.fault(args.redis_kill)
            faults[did.split()[0]] += 1
            print(f"{time.monotonic() - began:7.1f}s  {did}", flush=True)
            service.ensure_up()
        stop.set()
        for thread in clients:
            thread.join(90)
        service.ensure_up()
        problems, tally = check(service, jobs, args.drain, args.redis_kill)
        problems = crashed + problems
    finally:
        stop.set()
        service.close()
    unanswered = [j for j in jobs if j.job_id is None]
    answers: collections.Counter = collections.Counter()
    for item in jobs:
        answers.update(item.answers)
    print(f"\nfaults: {dict(faults)}")
    print(f"submissions: {len(jobs)} ({len(unanswered)} never answered in 60 s); answers: {dict(answers)}")
    print(f"jobs: {tally}")
    for line in service.log:
        print(line)
    for line in problems:
        print("PROBLEM", line)
    print(f"\n{len(problems)} problem(s); logs in {root}")
    return 1 if problems or unanswered or any(thread.is_alive() for thread in clients) else 0


if __name__ == "__main__":
    raise SystemExit(main())
