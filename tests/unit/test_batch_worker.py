"""worker.batch_worker without Redis: its heartbeat thread and its wait for an emptied batch (fakes)."""

from __future__ import annotations

import threading
from collections import Counter
from types import SimpleNamespace
from typing import Any

from worker.batch_worker import BatchingWorker, Slot


def _slot(name: str) -> Slot:
    job: Any = SimpleNamespace(id=name)
    return Slot(job=job, queue=None, execution=name, params=None, request=None, steps=1, load_s=0, began=0)  # type: ignore[arg-type]


def test_jobs_being_stored_keep_their_heartbeat_until_recorded() -> None:
    """A job left the batch when its last step ended, and its heartbeats stopped with it, while
    the finisher thread could still be storing other jobs' PNGs ahead of it: past the registry
    entry's life, abandoned-job recovery ran it again."""
    running, storing, recorded = _slot("running"), _slot("storing"), _slot("recorded")
    beaten: list[str] = []
    stop = threading.Event()

    def maintain_heartbeats(job, execution) -> None:
        beaten.append(job.id)
        stop.set()  # one round

    worker = SimpleNamespace(
        slots=[running],
        _finishing={storing},
        _lock=threading.Lock(),
        heartbeat_interval=0.01,
        maintain_heartbeats=maintain_heartbeats,
        _hung=set(),
        beats_due=lambda job, running_s: True,  # none is past its timeout (see test_heartbeat_hung.py)
    )
    BatchingWorker._beat_all(worker, stop)  # type: ignore[arg-type]
    assert sorted(beaten) == ["running", "storing"] and "recorded" not in beaten
    worker._finishing = set()
    BatchingWorker._remove(worker, running)  # type: ignore[arg-type]
    stop.clear()
    beaten.clear()
    threading.Timer(0.1, stop.set).start()
    BatchingWorker._beat_all(worker, stop)  # type: ignore[arg-type]
    assert beaten == [] and recorded not in worker.slots


def test_lingering_does_not_spin_while_redis_is_away() -> None:
    """The batch emptied, a wake-up was seen, and the read of the queues failed (Redis away): the
    read was tried again at once, forever, each failure logged, until Redis came back."""
    import time
    from concurrent.futures import Future

    recording: Future[None] = Future()
    ticks: list[float] = []
    worker = SimpleNamespace(
        slots=[],
        _stop_requested=False,
        _recording=recording,
        _watcher=object(),
        _wake_seen=(5, 0),
        _checked_through=(1, 0),
        _checked_at=0.0,
        _tick=lambda: ticks.append(time.monotonic()),  # as a failed read: nothing advances
    )
    threading.Timer(0.3, recording.set_result, [None]).start()
    BatchingWorker._linger(worker)  # type: ignore[arg-type]
    assert 1 <= len(ticks) <= 2, len(ticks)  # once, then again after LINGER_RETRY at the earliest


def test_a_batched_step_out_of_memory_frees_it_then_runs_each_job_alone() -> None:
    """A batched step that ran out of (GPU) memory was retried job by job with nothing freed, the
    failed step's activations still held by the exception kept for its log line: the retries,
    which need that memory, ran out too and every job ended `out_of_memory`."""
    import gc
    import weakref

    calls: list[int] = []
    freed: list[int] = []
    held: list[weakref.ref[Any]] = []

    class Activations:  # stands for the failed step's tensors, referenced from its frames
        pass

    def tick(requests: list[Any]) -> None:
        calls.append(len(requests))
        if len(requests) > 1:
            activations = Activations()
            held.append(weakref.ref(activations))
            raise MemoryError("out of memory")
        assert held[0]() is None, "the failed step's memory is still held"
        assert freed, "cached memory was not released before the retries"
        requests[0].step += 1

    engine = SimpleNamespace(tick=tick, runtime=SimpleNamespace(free_memory=lambda: freed.append(1) or gc.collect()))
    slots = [_slot("a"), _slot("b")]
    for slot in slots:
        slot.request = SimpleNamespace(step=0, chunk_rows=None, params=SimpleNamespace(num_images=1))  # type: ignore[assignment]
    ended: list[str] = []
    worker = SimpleNamespace(
        engine=engine,
        _batch_jobs=Counter(),
        _end_failed=lambda slot, exc: ended.append(slot.job.id),
    )
    for name in ("_freed_if_oom", "_step_alone", "_fail_step"):
        setattr(worker, name, getattr(BatchingWorker, name).__get__(worker))
    import logging

    logging.disable(logging.CRITICAL)  # pytest keeps each log record, its traceback with it
    try:
        BatchingWorker._step(worker, slots)  # type: ignore[arg-type]
    finally:
        logging.disable(logging.NOTSET)
    assert calls == [2, 1, 1] and ended == [] and [s.request.step for s in slots] == [1, 1]
    assert freed == [1]
