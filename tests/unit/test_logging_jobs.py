"""`job_id` on every log line about a job (README, Operations): on the one-job and batching worker
paths (RQ's own lines included, and the batch's finisher thread) and in the webhook sender."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from typing import Any

import pytest

from app.core.logs import JobContextFilter, JsonFormatter
from tests.unit.test_batching import enqueue as enqueue_batched
from tests.unit.test_batching import env as batching_env  # noqa: F401  (a fixture)
from tests.unit.test_worker import enqueue
from tests.unit.test_worker import env as worker_env  # noqa: F401  (a fixture)

ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


class JsonLines(logging.Handler):
    """The root handler `app.core.logs.configure` installs, keeping each JSON line parsed."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.addFilter(JobContextFilter())
        self.setFormatter(JsonFormatter())
        self.lines: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))

    def about(self, job_id: str) -> list[dict[str, Any]]:
        return [line for line in self.lines if job_id in line["msg"]]


@pytest.fixture
def json_lines() -> Iterator[JsonLines]:
    handler = JsonLines()
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def assert_each_line_names_its_job(lines: JsonLines, job_ids: list[str]) -> None:
    for job_id in job_ids:
        about = lines.about(job_id)
        assert about, f"no line about {job_id}"
        for line in about:
            others = set(ID.findall(line["msg"])) - {job_id}
            if not others:  # a line about this job alone
                assert line.get("job_id") == job_id, line


def test_every_line_about_a_batched_job_carries_its_id(batching_env, json_lines) -> None:  # noqa: F811
    engine, store, queue, _, make = batching_env
    jobs = [enqueue_batched(queue, prompt=f"p{i}", seed=i, num_inference_steps=2 + i) for i in range(3)]
    canceled = enqueue_batched(queue, prompt="cancel me", num_inference_steps=50)
    failing = enqueue_batched(queue, prompt="undecodable", num_inference_steps=1)

    def cancel(tick: int, requests: list[Any]) -> None:
        if tick == 2:
            from app.core.jobs import cancel_key

            queue.connection.set(cancel_key(canceled.id), 1)

    engine.on_tick = cancel
    make().work(burst=True, logging_level="INFO")
    ids = [j.id for j in [*jobs, canceled, failing]]
    assert_each_line_names_its_job(json_lines, ids)
    # RQ's own lines about each job, logged on the finisher thread, carry it too.
    for job in jobs:
        ok = [line for line in json_lines.about(job.id) if "Job OK" in line["msg"]]
        assert ok and all(line.get("job_id") == job.id for line in ok)
    done = [line for line in json_lines.lines if "Successfully completed" in line["msg"]]  # RQ's, naming no id
    assert len(done) == 3 and {line.get("job_id") for line in done} == {j.id for j in jobs}
    # Lines about no job name none (not the job the session began with).
    quitting = [line for line in json_lines.lines if "quitting" in line["msg"]]
    assert quitting and all("job_id" not in line for line in quitting), quitting


def test_every_line_about_a_job_of_the_one_job_worker_carries_its_id(worker_env, json_lines) -> None:  # noqa: F811
    runtime, store, queue, worker = worker_env
    ok = enqueue(queue, prompt="fine", num_inference_steps=2)
    bad = enqueue(queue, prompt="explode", num_inference_steps=2)
    worker.work(burst=True, logging_level="INFO")
    assert_each_line_names_its_job(json_lines, [ok.id, bad.id])
    msgs = {line["msg"] for line in json_lines.about(ok.id)}
    assert any("Job OK" in m for m in msgs) and any("result is kept" in m for m in msgs)
    done = [line for line in json_lines.lines if "Successfully completed" in line["msg"]]  # RQ's, naming no id
    assert [line.get("job_id") for line in done] == [ok.id]
    quitting = [line for line in json_lines.lines if "quitting" in line["msg"]]  # about no job: names none
    assert quitting and all("job_id" not in line for line in quitting), quitting


def test_webhook_sender_lines_carry_the_deliverys_job_id(json_lines) -> None:
    from app.core.config import Settings
    from app.core.events import EventType, make_event
    from app.core.webhooks import WebhookSender

    settings = Settings(webhook_secret="k", webhook_allow_private=False, webhook_max_attempts=1)
    sender = WebhookSender(settings, threads=1)
    try:  # a private address, refused
        sender.submit("http://127.0.0.1:9/hook", make_event(EventType.started, "job-refused", "running"))
    finally:
        sender.close(timeout=10)
    settings = Settings(webhook_secret="k", webhook_allow_private=True, webhook_max_attempts=1)
    sender = WebhookSender(settings, threads=1)
    sender.MAX_PENDING = 1  # type: ignore[misc]
    try:  # two events queue before the thread takes either: one is dropped; nothing listens on port 9
        with sender._ready:
            sender.submit("http://127.0.0.1:9/hook", make_event(EventType.progress, "job-dropped", "running"))
            sender.submit("http://127.0.0.1:9/hook", make_event(EventType.started, "job-failing", "running"))
    finally:
        sender.close(timeout=10)
    webhook_lines = [line for line in json_lines.lines if line["logger"] == "app.core.webhooks"]
    assert any(line.get("job_id") == "job-refused" and "refused" in line["msg"] for line in webhook_lines)
    assert any(line.get("job_id") == "job-dropped" and "dropped" in line["msg"] for line in webhook_lines)
    failing = [line for line in webhook_lines if line.get("job_id") == "job-failing"]
    assert any("failed" in line["msg"] for line in failing), webhook_lines
    assert any("gave up" in line["msg"] for line in failing), webhook_lines
    assert all("job_id" in line for line in webhook_lines), webhook_lines
