"""Metrics scraped after real jobs, per-job timings, and structured logs of the real processes."""

from __future__ import annotations

import json

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.procs import Stack

pytestmark = pytest.mark.integration
FAST = {"num_inference_steps": 3, "width": 32, "height": 32}


def scrape(stack: Stack) -> dict[str, list]:
    with stack.client() as http:
        r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {f.name: f.samples for f in text_string_to_metric_families(r.text)}


def value(samples: list, name: str, **labels: str) -> float:
    return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def test_metrics_after_real_jobs(stack: Stack) -> None:
    before = scrape(stack)
    with stack.client() as http:
        ok = stack.wait(http, stack.submit(http, prompt="metrics", num_images=2, **FAST)["id"])
        assert ok["status"] == "succeeded"
        http.get("/jobs/00000000-0000-4000-8000-000000000000")
    after = scrape(stack)
    jobs = lambda m: value(m.get("imagegen_jobs", []), "imagegen_jobs_total", status="succeeded")  # noqa: E731
    assert jobs(after) >= jobs(before) + 1
    images = lambda m: value(m.get("imagegen_images", []), "imagegen_images_total")  # noqa: E731
    assert images(after) >= images(before) + 2
    for name in ("queue_wait", "sampling", "total"):
        samples = after[f"imagegen_job_{name}_seconds"]
        count = value(samples, f"imagegen_job_{name}_seconds_count")
        assert count >= 1 and value(samples, f"imagegen_job_{name}_seconds_bucket", le="+Inf") == count
    requests = after["imagegen_http_requests"]
    assert value(requests, "imagegen_http_requests_total", route="/generate", method="POST", code="202") >= 1
    assert value(requests, "imagegen_http_requests_total", route="/jobs/{job_id}", method="GET", code="404") >= 1
    assert {s.labels["priority"] for s in after["imagegen_queue_depth"]} == {"high", "normal", "low"}
    assert value(after["imagegen_workers"], "imagegen_workers") >= 1
    assert value(after["imagegen_redis_up"], "imagegen_redis_up") == 1


def test_timings_and_json_logs(stack: Stack) -> None:
    with stack.client() as http:
        job = stack.wait(http, stack.submit(http, prompt="timed", **FAST)["id"])
    t = job["timings"]
    assert t["queue_wait_ms"] >= 0 and t["load_ms"] >= 0 and t["sampling_ms"] > 0 and t["encode_ms"] > 0
    lines = [json.loads(line) for line in stack.workers[0].output().splitlines() if line.startswith("{")]
    assert lines and all({"ts", "level", "logger", "msg"} <= set(line) for line in lines)
    about = [line for line in lines if line.get("job_id") == job["id"]]
    assert about, "no worker log line carries the job id"
    api_lines = [json.loads(line) for line in stack.api.output().splitlines() if line.startswith("{")]
    assert any(job["id"] in line["msg"] for line in api_lines)  # access log lines name the job's URL


def test_a_client_gone_mid_body_is_no_server_error(stack: Stack) -> None:
    import socket
    import time
    from urllib.parse import urlsplit

    url = urlsplit(stack.base_url)
    for path in ("/generate", "/v1/images/generations"):
        with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
            head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
            sock.sendall(head.encode() + b'{"prompt": "x"')  # 14 of the 100 bytes, then gone
    deadline = time.monotonic() + 10
    while True:  # the server notices the closed connection on its own time
        requests = scrape(stack)["imagegen_http_requests"]
        gone = [
            value(requests, "imagegen_http_requests_total", route=p, code="499")
            for p in ("/generate", "/v1/images/generations")
        ]
        if all(gone) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert all(n >= 1 for n in gone), gone
    assert value(requests, "imagegen_http_requests_total", code="500") == 0
    assert "unhandled error" not in stack.api.output()
