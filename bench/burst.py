"""Burst: N submissions from many concurrent clients on loopback against a real Redis, worker and
API with a bounded queue. Prints counts by status code (only 202 and 429 expected, zero 5xx) and
checks that every accepted job reaches a terminal state. Bounded in count and time.

    .venv/bin/python -m bench.burst --requests 10000 --clients 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

from tests.procs import service_env, start_api, start_redis, start_worker

TINY = {"prompt": "burst", "num_inference_steps": 1, "width": 8, "height": 8}


async def submit_all(base: str, total: int, clients: int, deadline: float) -> tuple[Counter, list[str]]:
    codes: Counter = Counter()
    accepted: list[str] = []
    next_index = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async with httpx.AsyncClient(base_url=base, timeout=30, limits=limits) as http:

        async def client() -> None:
            nonlocal next_index
            while next_index < total and time.monotonic() < deadline:
                i = next_index
                next_index += 1
                try:
                    r = await http.post("/generate", json=TINY | {"seed": i})
                except httpx.HTTPError as exc:
                    codes[type(exc).__name__] += 1
                    continue
                codes[r.status_code] += 1
                if r.status_code == 202:
                    accepted.append(r.json()["id"])

        await asyncio.gather(*(client() for _ in range(clients)))
    return codes, accepted


def wait_terminal(base: str, ids: list[str], deadline: float) -> Counter:
    finals: Counter = Counter()
    pending = list(ids)
    with httpx.Client(base_url=base, timeout=30) as http:
        while pending and time.monotonic() < deadline:
            still = []
            for job_id in pending:
                r = http.get(f"/jobs/{job_id}")
                status = r.json()["status"] if r.status_code == 200 else f"http {r.status_code}"
                if status in ("succeeded", "failed", "canceled") or status.startswith("http"):
                    finals[status] += 1
                else:
                    still.append(job_id)
            pending = still
            if pending:
                time.sleep(0.5)
    finals["unfinished"] += len(pending)
    return finals


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--max-queue", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=300, help="limit for submitting and for draining each")
    args = parser.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="imagegen-burst-"))
    server = start_redis(tmp / "redis")
    env = service_env(server.url, tmp, max_queue=str(args.max_queue), log_level="WARNING")
    worker = start_worker(env, tmp / "worker.log", ready=server.client())
    api, base = start_api(env, tmp / "api.log")
    try:
        started = time.monotonic()
        codes, accepted = asyncio.run(submit_all(base, args.requests, args.clients, started + args.seconds))
        submit_s = time.monotonic() - started
        finals = wait_terminal(base, accepted, time.monotonic() + args.seconds)
    finally:
        api.stop()
        worker.stop()
        server.proc.stop(signal.SIGTERM)
    report = {
        "requests": sum(codes.values()),
        "clients": args.clients,
        "submit_seconds": round(submit_s, 2),
        "requests_per_second": round(sum(codes.values()) / submit_s, 1),
        "by_status_code": {str(k): v for k, v in sorted(codes.items(), key=lambda kv: str(kv[0]))},
        "server_errors": sum(v for k, v in codes.items() if isinstance(k, int) and k >= 500),
        "accepted": len(accepted),
        "accepted_outcomes": dict(finals),
        "lost_or_unfinished": len(accepted) - finals["succeeded"] - finals["failed"] - finals["canceled"],
    }
    print(json.dumps(report, indent=2))
    ok = report["server_errors"] == 0 and report["lost_or_unfinished"] == 0 and set(codes) <= {202, 429}
    print("OK: only 202/429, no 5xx, every accepted job finished" if ok else "FAILED", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
