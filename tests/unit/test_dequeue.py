"""The worker's dequeue (`ClaimingQueue`) on a real redis-server: a taken job is never in no list,
priorities are kept, idle workers wake on the API's wake stream, and a worker dying between taking
a job and starting it leaves the job where RQ's maintenance finds it."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
from rq import Queue
from rq.exceptions import DequeueTimeout
from rq.job import Job
from rq.serializers import JSONSerializer

import worker.worker as worker_module
from app.api.services import JobService
from app.core.config import Settings
from app.core.jobs import TASK_GENERATE, GenerationParams, wake_key
from app.core.queue import get_queues
from worker.worker import ClaimingQueue, ImagegenWorker


def enqueue(queue: Queue, prompt: str, **options) -> Job:
    kwargs = {"params": {"prompt": prompt, "num_inference_steps": 1}}
    return queue.enqueue(TASK_GENERATE, kwargs=kwargs, job_id=str(uuid.uuid4()), **options)


def dequeue(queues: list[Queue], timeout: int | None) -> tuple[Job, Queue] | None:
    return ClaimingQueue.dequeue_any(queues, timeout, connection=queues[0].connection, serializer=JSONSerializer)


def test_the_highest_priority_job_moves_to_its_intermediate_list(redis_db) -> None:
    high, normal, low = get_queues(redis_db, "m")
    first_normal, second_normal = enqueue(normal, "n1"), enqueue(normal, "n2")
    urgent = enqueue(high, "h")
    got = dequeue([high, normal, low], timeout=None)
    assert got is not None and got[0].id == urgent.id and got[1].name == high.name
    # Taken, not yet started: out of the queue and in its intermediate list, never in no list.
    assert high.get_job_ids() == [] and redis_db.lrange(high.intermediate_queue_key, 0, -1) == [urgent.id.encode()]
    got = dequeue([high, normal, low], timeout=None)
    assert got is not None and got[0].id == first_normal.id
    assert normal.get_job_ids() == [second_normal.id]


def test_the_claim_reads_the_job_in_the_same_round_trip(redis_db, round_trips) -> None:
    """The job comes back from the claim script itself, the same as RQ's fetch would build it; a
    queued id whose hash is gone is skipped."""
    high, normal, low = get_queues(redis_db, "m")
    ghost = enqueue(normal, "gone")
    redis_db.delete(ghost.key)
    job = enqueue(normal, "n1", meta={"owner": "k"}, result_ttl=77)
    with round_trips.record() as sent:
        got = dequeue([high, normal, low], timeout=None)
    assert got is not None and got[1] is normal and len(sent) == 2  # the ghost's claim, then this job's
    fetched = Job.fetch(job.id, connection=redis_db, serializer=JSONSerializer)
    assert got[0].to_dict() == fetched.to_dict() and got[0].meta == {"owner": "k"} and got[0].result_ttl == 77
    assert got[0].kwargs == fetched.kwargs


def test_nothing_waiting_is_none_without_a_timeout_and_a_timeout_with_one(redis_db) -> None:
    queues = get_queues(redis_db, "m")
    assert dequeue(queues, timeout=None) is None
    with pytest.raises(DequeueTimeout):
        dequeue(queues, timeout=1)


def test_an_idle_worker_wakes_on_a_job_the_api_queues(redis_db, redis_server, monkeypatch) -> None:
    # Looking at the queues again only after a minute: what returns the job is the wake-up.
    monkeypatch.setattr(worker_module, "WAKE_WAIT", 60.0)
    queues = get_queues(redis_db, "m")
    got: list[object] = []
    waiter = threading.Thread(target=lambda: got.append(dequeue(queues, timeout=20)))
    waiter.start()
    time.sleep(0.3)  # blocked on the wake stream by now
    settings = Settings(redis_url=f"redis://127.0.0.1:{redis_server.port}/15", model="m")
    job = JobService(settings, redis_db).submit(GenerationParams(prompt="wake up"))
    waiter.join(20)
    assert not waiter.is_alive()
    assert got and got[0] is not None and got[0][0].id == job.id  # type: ignore[index]
    assert redis_db.xlen(wake_key("m")) == 1


def test_jobs_queued_without_a_wake_up_are_found_at_the_next_look(redis_db, monkeypatch) -> None:
    monkeypatch.setattr(worker_module, "WAKE_WAIT", 0.05)
    queues = get_queues(redis_db, "m")
    got: list[object] = []
    waiter = threading.Thread(target=lambda: got.append(dequeue(queues, timeout=20)))
    waiter.start()
    time.sleep(0.3)
    job = enqueue(queues[1], "RQ's own enqueue, e.g. a retry")
    waiter.join(20)
    assert got and got[0] is not None and got[0][0].id == job.id  # type: ignore[index]


def test_a_job_whose_worker_died_after_taking_it_is_requeued_by_maintenance(redis_db, monkeypatch) -> None:
    """Put back at the front of its queue once seen there for a minute, with no retry spent: RQ's
    own clean-up failed it (a retry spent on a job that never ran, then `internal_error`)."""
    queues = get_queues(redis_db, "m")
    job = enqueue(queues[1], "orphan")  # no retries
    enqueue(queues[1], "queued after it")
    assert dequeue(queues, timeout=None) is not None  # ...and the worker dies here
    worker = ImagegenWorker(queues, connection=redis_db, serializer=JSONSerializer)
    for _ in range(2):  # the first sighting, then one within the minute: its worker may yet start it
        worker.clean_registries()
        assert redis_db.lrange(queues[1].intermediate_queue_key, 0, -1) == [job.id.encode()]
    monkeypatch.setattr(worker_module, "STUCK_AFTER", 0.0)  # a minute later, still there
    worker.clean_registries()
    assert queues[1].get_job_ids()[0] == job.id and redis_db.llen(queues[1].intermediate_queue_key) == 0
    job.refresh()
    assert job.get_status() == "queued" and job.retries_left is None


def test_a_sighting_from_an_earlier_claim_does_not_count_for_this_one(redis_db, monkeypatch) -> None:
    """RQ's marker of a first sighting is kept a day: a job taken again (after a retry) within it
    was failed or re-queued by the next clean-up in the moment between its claim and its start,
    while its worker went on to run it."""
    queues = get_queues(redis_db, "m")
    job = enqueue(queues[1], "taken again")
    waiting = queues[1].intermediate_queue
    redis_db.set(waiting.get_first_seen_key(job.id), time.time() - 3600)  # its earlier claim, an hour ago
    assert dequeue(queues, timeout=None) is not None  # taken again; about to start
    ImagegenWorker(queues, connection=redis_db, serializer=JSONSerializer).clean_registries()
    assert redis_db.lrange(queues[1].intermediate_queue_key, 0, -1) == [job.id.encode()]
    assert queues[1].get_job_ids() == [] and job.get_status(refresh=True) == "queued"
