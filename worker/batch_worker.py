"""`BatchingWorker`: serves several jobs at once with step-level batching (`IMAGEGEN_MAX_BATCH` > 1).

RQ's loop hands over the first job as usual; the worker then keeps a batching session open while
any job is active. Between denoising ticks (at most every `CHECK_INTERVAL`, and only once the
model's wake stream moved: a job was queued or a cancel asked for) it claims more waiting jobs of
the same image size (highest priority first, never skipping past an incompatible one, so order is
kept) and reads the cancel flags; it registers each job with RQ exactly as
`perform_job` would (execution in the started registry, status `started`, heartbeats), runs one
batched UNet step for all of them, and finishes every job the moment its own last step is done.
Each job keeps its own generator, progress, events, cancel flag, timeout and outcome; one job
failing never fails the others. A device fault (`tasks.DeviceFaultError`) is the exception: it
breaks the process's CUDA context for every job on it, so all of them go back to their queues and
the worker stops; a job handed back so is sampled alone from then on.
"""

from __future__ import annotations

import functools
import logging
import math
import sys
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError
from redis.exceptions import RedisError
from rq.executions import Execution
from rq.job import Job
from rq.utils import now as utcnow
from rq.worker import WorkerStatus

from app.core import events, logs, metrics
from app.core.catalog import model_of_queue
from app.core.events import EventType
from app.core.jobs import (
    ALLOWED_TASKS,
    TASK_GENERATE,
    ErrorCode,
    GenerationParams,
    cancel_key,
    wake_key,
)
from worker import tasks
from worker.events import record_progress, record_start
from worker.worker import UNREADABLE, ImagegenWorker, task_of

if TYPE_CHECKING:
    from PIL.Image import Image
    from rq.queue import Queue

    from worker.batching import BatchEngine, Request

log = logging.getLogger(__name__)

CHECK_INTERVAL = 0.02  # seconds at least between reads of the queue heads and cancel flags
RECHECK_INTERVAL = 1.0  # ...and at most, when the model's wake stream did not move (as an idle worker)
LINGER_RETRY = 0.5  # seconds before reading the queues again after a failed read, while lingering
LINGER_POLL = 0.002  # seconds between looks at the wake stream while an emptied batch's jobs are recorded
WATCH_BLOCK_MS = 250  # how long the wake-stream watcher blocks before it looks whether the session ended
# Move each candidate id from its queue (KEYS[2i-1]) to that queue's intermediate list (KEYS[2i]),
# as RQ's own single-queue dequeue does. The one LREM that removes it owns the job, so two workers
# can never claim the same job, and an id already taken (or canceled) is simply skipped. Until the
# job is registered as started it sits in the intermediate list, where RQ's maintenance finds it if
# this worker (or Redis) dies in between: a bare LREM would leave it in no list at all.
CLAIM_SCRIPT = """
local taken = {}
for i, id in ipairs(ARGV) do
  taken[i] = redis.call('LREM', KEYS[2 * i - 1], 1, id)
  if taken[i] > 0 then
    redis.call('RPUSH', KEYS[2 * i], id)
  end
end
return taken
"""


class _DeviceFault(Exception):
    """The device failed during the session (see `tasks._is_device_fatal`): raised out of the
    sampling loop, it ends the session with every job on the device handed back (`_hand_back_all`)."""

    def __init__(self, cause: BaseException, admitted: list[tuple[Job, Queue, Execution, bool]] | None = None) -> None:
        super().__init__(str(cause))
        self.cause = cause
        # Jobs registered as started but not in `slots` yet (see `_admit`), each with whether it
        # had been on the device.
        self.admitted = admitted or []


@dataclass(eq=False)  # compared and hashed by identity
class Slot:
    """A job taking part in the batch."""

    job: Job
    queue: Queue
    execution: Execution
    params: GenerationParams
    request: Request
    steps: int  # the step count clients see (num_inference_steps)
    load_s: float  # from taking the job to the start of its sampling (registration, parameters)
    began: float  # `time.perf_counter()` when its sampling began (text encoding, noise)
    last_write: float = 0.0
    reported: int = 0
    storing_since: float | None = None  # `time.perf_counter()` when the finisher began storing it

    @functools.cached_property
    def claim(self) -> tuple[str, str]:
        """Its run in the started registry (key, member): what the ownership checks read."""
        return (self.queue.started_job_registry.key, self.execution.composite_key)


class BatchingWorker(ImagegenWorker):
    def __init__(
        self,
        *args: Any,
        engine: BatchEngine,
        max_batch: int,
        check_interval: float = CHECK_INTERVAL,
        recheck_interval: float = RECHECK_INTERVAL,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.engine = engine
        self.max_batch = max_batch
        self.check_interval = check_interval
        self.recheck_interval = recheck_interval
        self._checked_at = -math.inf  # when the queue heads and cancel flags were last read
        # The model's wake stream moves with every job queued and every cancel (see `_watch`): the
        # queues and flags are read again only after it moved, while jobs may be waiting, or every
        # `recheck_interval` (jobs queued without a wake-up, e.g. RQ's own retries).
        self._wake_key = wake_key(model_of_queue(self.queues[0].name) or self.queues[0].name)
        self._wake_seen: tuple[int, int] = (0, 0)  # newest wake-stream id the watcher saw
        self._checked_through: tuple[int, int] | None = None  # the stream's newest id at the last read
        self._maybe_waiting = True  # the last read saw queued jobs, or did not look at the queues
        self.clock = time.monotonic
        self.slots: list[Slot] = []
        self._finishing: set[Slot] = set()  # out of the batch, their images being stored: still beaten
        self._hung: set[Slot] = set()  # past their timeout and grace: no more heartbeats (`beats_due`)
        # Guards `slots` against the heartbeat thread; held while a slot's heartbeat is written so
        # a job never gets a heartbeat after its execution was cleaned up.
        self._lock = threading.Lock()
        self._claim_script = self.connection.register_script(CLAIM_SCRIPT)
        self._watcher: threading.Thread | None = None
        # Batched steps by how many jobs they held, not yet written (with the next progress write).
        self._batch_jobs: Counter[int] = Counter()
        self._redis_away = False  # a progress write failed and none has worked since (finisher thread)

    # -- the session --------------------------------------------------------------------------

    def execute_job(self, job: Job, queue: Queue) -> None:
        if _runs_alone(job):
            super().execute_job(job, queue)  # e.g. variations: the one-job path (which refuses the unreadable)
            return
        try:
            # Lines of the session are about several jobs: each operation on one job names it
            # (`logs.job_context`), not the job the session began with (set since its dequeue).
            logs.current_job_id.set(None)
            self._run_session(job, queue)
        finally:
            logs.current_job_id.set(None)
        self._stop_if_device_failed()

    def _run_session(self, job: Job, queue: Queue) -> None:
        self._hung = set()
        stop = threading.Event()
        beat = threading.Thread(target=self._beat_all, args=(stop,), name="heartbeat", daemon=True)
        beat.start()
        # Storing a finished job's images and recording its outcome is mostly waiting on disk and
        # Redis: one thread does it while the next step computes.
        self._finisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="finish")
        self._checked_at, self._checked_through = -math.inf, None  # the first step reads them
        self._recording: Future[None] | None = None  # the last finished job handed to the finisher
        try:
            self._admit([(job, queue)])
            while self.slots:
                self._tick()
                if self._checked_through is not None and self._watcher is None:
                    self._watcher = threading.Thread(
                        target=self._watch, args=(self._checked_through, stop), name="wake-watch", daemon=True
                    )
                    self._watcher.start()
                if not self.slots:
                    self._linger()
        except _DeviceFault as fault:
            self._hand_back_all(fault)
        except Exception:
            # A cold shutdown (SystemExit) leaves the jobs to abandoned-job recovery instead.
            self._abandon_all(sys.exc_info())
            raise
        finally:
            if self._batch_jobs:  # steps since the last progress write (e.g. of a canceled last job)
                self._finisher.submit(self._write_progress, [], _context().events.ttl, self._take_batch_tally())
            self._finisher.shutdown(wait=True)  # every finished job is recorded before the session ends
            stop.set()
            beat.join()
            self._watcher = None  # it returns within WATCH_BLOCK_MS
        self.set_state(WorkerStatus.IDLE)

    def _tick(self) -> None:
        ctx = _context()
        # 1. Registry maintenance, as RQ's loop does between jobs: a busy session must still
        #    recover the jobs of dead workers.
        if self.should_run_maintenance_tasks:
            try:
                self.run_maintenance_tasks()
            except Exception as exc:  # not these jobs' fault: keep sampling, maintain again later
                self.last_cleaned_at = utcnow()  # type: ignore[assignment]  # after the interval, not every step
                if isinstance(exc, RedisError):  # as for the reads below: once Redis is back
                    log.warning("registry maintenance skipped (Redis unavailable)")
                else:  # another job's or worker's record it could not handle
                    log.exception("registry maintenance failed; the batch goes on")
        # 2. Hand everything back past the shutdown grace: last taken first, since each goes to
        #    the front of its queue, so that they wait there in the order they came.
        if ctx.should_requeue():
            for slot in reversed(list(self.slots)):
                with logs.job_context(slot.job.id):
                    log.info("job %s: shutting down, handing the job back to the queue", slot.job.id)
                    slot.job.meta["requeue"] = True
                    self._end_failed(slot, tasks.RequeueError())
            return
        # 3. One round trip: the heads of the queues (while there is room and no stop was asked
        #    for) and the cancel flags of the active jobs; at most every `check_interval` seconds,
        #    so that short steps (a lone job on a small model) do not each wait for Redis, and
        #    only when something may have changed (see `_check_due`).
        slots = list(self.slots)
        room = 0 if self._stop_requested or self._alone() else self.max_batch - self._rows()
        replies: list[Any] = [0, 1] * len(slots)  # per job: its cancel flag, whether it is still ours
        now = self.clock()
        heads: list[Any] = []
        if self._check_due(now):
            self._checked_at = now
            try:
                with self.connection.pipeline(transaction=False) as pipe:
                    # The stream's newest id first: whatever is queued or canceled after it moves it on.
                    pipe.xrevrange(self._wake_key, count=1)
                    for q in self._ordered_queues if room > 0 else ():
                        pipe.lrange(q.key, 0, room - 1)
                    for slot in slots:
                        pipe.exists(cancel_key(slot.job.id))
                        pipe.zscore(*slot.claim)
                    newest, *replies = pipe.execute()
                self._checked_through = _stream_id(newest[0][0]) if newest else (0, 0)
                heads = replies[: len(replies) - 2 * len(slots)]
                self._maybe_waiting = room <= 0 or any(heads)
            except RedisError:
                # Redis is away: keep sampling, as the one-job task does; results are stored once it
                # is back, or the jobs are re-run once this worker is found to have lost them.
                log.warning("queues and cancel flags not checked (Redis unavailable)")
                replies = [0, 1] * len(slots)
        checks = replies[len(replies) - 2 * len(slots) :]
        # 4. Drop jobs run again elsewhere, end canceled and timed-out ones; admit waiting jobs of
        #    the same shape.
        slots = self._drop_lost(slots, checks[1::2])
        self._check_cancels_and_timeouts(
            slots, [f for f, ours in zip(checks[::2], checks[1::2], strict=True) if ours is not None]
        )
        if any(heads):
            try:
                self._fill(heads, room)
            except RedisError:
                log.warning("no jobs admitted this step (Redis unavailable)")
        if not self.slots:
            return
        # 5. One batched UNet step for every active job.
        self._step(list(self.slots))
        # 6. Progress, then finish every job whose last step is done.
        self._report_progress(ctx)
        finished = [s for s in self.slots if s.request.done]
        decoded: list[list[Image] | None] = [None] * len(finished)
        if len(finished) > 1:
            try:
                decoded = list(self.engine.decode_many([s.request for s in finished]))
            except Exception as exc:  # each is decoded alone below, so only a culprit fails
                _raise_if_device_failed(exc)
                log.warning("decoding %d jobs together failed; decoding them one by one", len(finished), exc_info=True)
        for slot, images in zip(finished, decoded, strict=True):
            if images is None:
                try:
                    images = self.engine.decode(slot.request)
                except Exception as exc:
                    _raise_if_device_failed(exc)
                    with logs.job_context(slot.job.id):
                        log.exception("job %s: decoding failed", slot.job.id)
                        self._end_failed(slot, _sampling_failure(slot.job, exc))
                    continue
            with self._lock:  # out of the batch, still beaten until its outcome is recorded
                self._finishing.add(slot)  # (`_remove` would take it out of both: no heartbeat while it
                self.slots.remove(slot)  # waited for the finisher, and its job was run again)
            sampling_s = time.perf_counter() - slot.began
            self._recording = self._finisher.submit(self._finish, slot, ctx, images, sampling_s)

    def _linger(self) -> None:
        """The batch emptied while the finisher still records its last jobs, whose clients may
        already be sending their next ones: start whatever is queued meanwhile (read as soon as
        the wake stream moves) instead of after every record and a new session. Without this,
        jobs that finish together start again together, and clients that each submit after their
        last result keep the worker in waves with a pause between them."""
        retry_at = 0.0
        while not self.slots and not self._stop_requested and self._recording is not None:
            woken = self._wake_seen > (self._checked_through or (0, 0))
            if self._watcher is not None and woken and time.monotonic() >= retry_at:
                before = self._checked_through
                self._checked_at = -math.inf  # read the queues now, not after `check_interval`
                self._tick()
                if self._checked_through == before:  # the read failed (Redis away): not again at once
                    retry_at = time.monotonic() + LINGER_RETRY
            elif not wait([self._recording], timeout=LINGER_POLL).not_done:
                return

    def _check_due(self, now: float) -> bool:
        if now - self._checked_at < self.check_interval:
            return False
        return (
            self._checked_through is None  # the session's first step
            or self._maybe_waiting
            or self._wake_seen > self._checked_through  # a job was queued or a cancel asked for
            or now - self._checked_at >= self.recheck_interval
        )

    def _watch(self, after: tuple[int, int], stop: threading.Event) -> None:
        """Note the newest id of the model's wake stream while the session lasts (a thread that
        blocks on Redis, so the sampling loop itself never waits to learn that nothing changed)."""
        last = f"{after[0]}-{after[1]}"
        while not stop.is_set():
            try:
                got: Any = self.connection.xread({self._wake_key: last}, count=100, block=WATCH_BLOCK_MS)
            except RedisError:
                stop.wait(0.5)  # the sampling loop falls back to its periodic reads meanwhile
                continue
            if got and not stop.is_set():  # a finished session's watcher writes nothing more
                last = _text(got[0][1][-1][0])
                self._wake_seen = max(self._wake_seen, _stream_id(last))

    # -- claiming -----------------------------------------------------------------------------

    def _rows(self) -> int:
        return sum(s.params.num_images for s in self.slots)

    def _alone(self) -> bool:
        """Whether the batch holds a job the device has failed under before: it is sampled alone,
        so that a job that makes the device fault cannot take others' hand-backs with it (each
        device fault counts against every job on the device: see `tasks.device_fault`)."""
        return any(tasks.device_faults(s.job) for s in self.slots)

    def _fill(self, heads: list[list[bytes]], room: int) -> None:
        """Claim waiting jobs from the queue heads (highest priority first) while they fit."""
        shape = self.engine.shape(self.slots[0].params) if self.slots else None
        candidates = [(q, _text(i)) for q, ids in zip(self._ordered_queues, heads, strict=True) for i in ids]
        if not candidates:
            return
        jobs = Job.fetch_many([i for _, i in candidates], connection=self.connection, serializer=self.serializer)
        chosen: list[tuple[Queue, Job]] = []
        for (q, _), job in zip(candidates, jobs, strict=True):
            if job is None:
                continue  # a stale id: RQ's own dequeue skips it too
            if _runs_alone(job) or tasks.device_faults(job):
                break  # RQ's loop takes it alone when its turn comes (see `_alone`)
            rows, job_shape = self._shape_of(job)
            # Stop at the first job that does not fit, so nothing overtakes it: once the batch
            # drains, the next session starts with it.
            if (job_shape is not None and shape is not None and job_shape != shape) or rows > room:
                break
            shape = shape or job_shape
            room -= rows
            chosen.append((q, job))
        if not chosen:
            return
        keys = [key for q, _ in chosen for key in (q.key, q.intermediate_queue_key)]
        taken = self._claim_script(keys=keys, args=[j.id for _, j in chosen])
        claimed = [(job, q) for (q, job), got in zip(chosen, taken, strict=True) if got]
        for job, _ in claimed:
            job.redis_server_version = self.get_redis_server_version()
            log.info("job %s: joins the batch", job.id, extra={"job_id": job.id})
        if claimed:
            self._admit(claimed)

    def _shape_of(self, job: Job) -> tuple[int, Any]:
        """Rows and shape a waiting job would add; (1, None) when it will be refused or fail at once."""
        if job.func_name != TASK_GENERATE:
            return 1, None
        try:
            params = GenerationParams.model_validate((job.kwargs or {}).get("params"))
        except (ValidationError, TypeError):
            return 1, None
        return params.num_images, self.engine.shape(self.engine.runtime.info.fill(params))

    # -- one job's lifecycle ------------------------------------------------------------------

    def _admit(self, taken: list[tuple[Job, Queue]]) -> None:
        """Register jobs with RQ as `perform_job` would (execution in the started registry, status
        `started`, heartbeats, out of the intermediate list), record their resolved parameters and
        announce their start, all in one transaction for every job taken together; then start
        sampling them. A job whose cancel flag is already set is registered and ends as canceled."""
        ctx = _context()
        taken_at = time.perf_counter()
        ready: list[tuple[Job, Queue, GenerationParams]] = []
        for job, queue in taken:
            with logs.job_context(job.id):
                reason = self.refusal_reason(job)
                if reason is not None:
                    self.refuse(job, queue, reason)
                    continue
                try:
                    params = tasks.resolve(ctx, job, (job.kwargs or {}).get("params"))
                except tasks.JobFailedError:
                    failure = sys.exc_info()
                    execution = self.prepare_execution(job)
                    self.prepare_job_execution(job)
                    self._finalize_failure(job, queue, execution, failure)
                    continue
                tasks.note_params(ctx, job, params)  # into `job.meta`, written with the registration below
                ready.append((job, queue, params))
        if not ready:
            return
        ttl = self.get_heartbeat_ttl(ready[0][0])
        started: list[tuple[Job, Queue, GenerationParams, Execution, events.JobEvent, int]] = []
        with self.connection.pipeline() as pipe:  # MULTI/EXEC, as RQ's own two preparation steps
            self.set_state(WorkerStatus.BUSY, pipeline=pipe)
            self.heartbeat(ttl, pipeline=pipe)
            for job, queue, params in ready:
                execution = Execution.create(job, ttl, pipeline=pipe, worker_name=self.name)
                self.executions[execution.id] = execution
                job.heartbeat(utcnow(), ttl, pipeline=pipe)
                job.prepare_for_execution(self.name, pipeline=pipe)
                pipe.persist(job.key)
                pipe.lrem(queue.intermediate_queue_key, 1, job.id)
                reply = len(pipe.command_stack)  # where this job's answer (1: canceled) lands
                event = events.make_event(EventType.started, job.id, "running", progress=job.meta["progress"])
                record_start(pipe, job, event, ctx.events.ttl)
                started.append((job, queue, params, execution, event, reply))
            try:
                replies = pipe.execute()
            except Exception:
                # Not started: the jobs stay in their intermediate lists for RQ's maintenance.
                for _, _, _, execution, _, _ in started:
                    self.executions.pop(execution.id, None)
                raise
        self.procline(f"Processing {len(self.slots) + len(started)} jobs")
        for i, (job, queue, params, execution, event, reply) in enumerate(started):
            try:
                with logs.job_context(job.id):
                    if replies[reply]:
                        raise tasks._fail(job, ErrorCode.canceled, "canceled before it started", canceled_at_step=0)
                    self._announce(job, event)
                    began = time.perf_counter()
                    try:
                        request = self.engine.start(params)
                    except Exception as exc:
                        if tasks._device_broken(exc):
                            rest = [(j, q, e, False) for j, q, _, e, _, _ in started[i + 1 :]]
                            raise _DeviceFault(exc, [(job, queue, execution, True), *rest]) from exc
                        raise _sampling_failure(job, exc) from None
            except _DeviceFault:
                raise
            except Exception:
                self._finalize_failure(job, queue, execution, sys.exc_info())
                continue
            steps = params.num_inference_steps or request.total
            with self._lock:
                self.slots.append(Slot(job, queue, execution, params, request, steps, began - taken_at, began))

    def _step(self, slots: list[Slot]) -> None:
        """One batched step; if it fails, retry each job alone so only the culprit fails."""
        self._batch_jobs[len(slots)] += 1
        if len(slots) == 1:
            self._step_alone(slots[0])
            return
        before = [s.request.step for s in slots]
        try:
            self.engine.tick([s.request for s in slots])
            return
        except Exception as exc:
            _raise_if_device_failed(exc)  # no retries: nothing runs on a broken device
            log.warning("batched step of %d jobs failed; retrying them one by one", len(slots), exc_info=exc)
            oom = tasks._is_oom(exc)
            # Nothing of the failed step is kept (the exception's traceback holds its activations).
        if oom:
            self.engine.runtime.free_memory()  # before the retries, which need that memory
        for slot, step in zip(slots, before, strict=True):
            if slot.request.step == step:  # else it advanced before the failure
                self._step_alone(slot)

    def _step_alone(self, slot: Slot) -> None:
        """One step of this job alone. A job of several images that runs out of memory alone runs
        one image's UNet rows per call from then on, as the one-job path splits it image by image
        (its images are the same: each row is computed as in the full batch)."""
        request = slot.request
        while True:
            try:
                self.engine.tick([request])
                return
            except Exception as exc:
                _raise_if_device_failed(exc)
                if not (tasks._is_oom(exc) and _splittable(request)):
                    self._fail_step(slot, exc)
                    return
            self.engine.runtime.free_memory()
            images = slot.params.num_images
            log.warning("job %s: out of memory with %d images; one image at a time", slot.job.id, images,
                        extra={"job_id": slot.job.id})  # fmt: skip
            request.chunk_rows = request.image_rows

    def _fail_step(self, slot: Slot, exc: BaseException) -> None:
        with logs.job_context(slot.job.id):
            log.error("job %s: sampling failed", slot.job.id, exc_info=exc)
            self._freed_if_oom(exc)
            self._end_failed(slot, _sampling_failure(slot.job, exc))

    def _freed_if_oom(self, exc: BaseException) -> None:
        """After an out-of-memory error, cached memory is released for the jobs that go on."""
        if tasks._is_oom(exc):
            self.engine.runtime.free_memory()

    def _drop_lost(self, slots: list[Slot], registered: list[Any]) -> list[Slot]:
        """Stop the jobs whose run is no longer in the started registry (this worker stalled past
        its heartbeats and they were re-queued and run elsewhere: see `tasks.LostRunError`), with
        nothing of them saved; returns the others."""
        kept = []
        for slot, score in zip(slots, registered, strict=True):
            if score is not None:
                kept.append(slot)
                continue
            log.warning("job %s: run again elsewhere while this worker stalled; this run stops", slot.job.id,
                        extra={"job_id": slot.job.id})  # fmt: skip
            self._remove(slot)
            try:
                raise tasks.LostRunError
            except tasks.LostRunError:
                self._finalize_failure(slot.job, slot.queue, slot.execution, sys.exc_info())
        return kept

    def _check_cancels_and_timeouts(self, slots: list[Slot], flags: list[int]) -> None:
        now = utcnow()
        for slot, flag in zip(slots, flags, strict=True):
            job = slot.job
            if flag:
                canceled = tasks.CanceledError(slot.reported, slot.steps)
                log.info("job %s: canceled at step %d/%d", job.id, slot.reported, slot.steps, extra={"job_id": job.id})
                job.meta["progress"] = {"step": slot.reported, "total": slot.steps}  # the last write may be older
                error = tasks._fail(job, ErrorCode.canceled, str(canceled), canceled_at_step=slot.reported)
                self._end_failed(slot, error)
            elif (limit := job.timeout or 0) > 0 and job.started_at and (now - job.started_at).total_seconds() > limit:
                # RQ's -1 means no limit.
                self._end_failed(slot, tasks._fail(job, ErrorCode.timeout, f"job ran past its {limit} s limit"))

    def _report_progress(self, ctx: tasks.WorkerContext) -> None:
        """Progress for every job, at most 10 per second each, the last step always. Written by the
        finisher thread (one pipeline) while the next step computes; that thread also records
        outcomes, so a job's progress always lands before its end. The tally of jobs per batched
        step (the `imagegen_batch_jobs` histogram) rides along."""
        now = time.monotonic()
        due = []
        for slot in self.slots:
            r = slot.request
            # Samplers with extra warm-up timesteps (PNDM) report on the client's step scale.
            slot.reported = round(r.step * slot.steps / r.total) if r.total else slot.steps
            if slot.reported == slot.steps or now - slot.last_write >= tasks.PROGRESS_INTERVAL:
                slot.last_write = now
                progress = {"step": slot.reported, "total": slot.steps}
                slot.job.meta["progress"] = progress
                due.append((slot.job, slot.claim, slot.job._serialize_meta(), progress))  # as of this step
        if due:
            self._finisher.submit(self._write_progress, due, ctx.events.ttl, self._take_batch_tally())

    def _take_batch_tally(self) -> Counter[int]:
        tally, self._batch_jobs = self._batch_jobs, Counter()
        return tally

    def _write_progress(
        self, due: list[tuple[Job, tuple[str, str], bytes, dict[str, int]]], ttl: int, tally: Counter[int]
    ) -> None:
        """Each job's progress, written only while its run owns the job (a job run again elsewhere
        while this worker stalled leaves the batch at the next check, having written nothing)."""
        try:
            with self.connection.pipeline(transaction=False) as pipe:
                sent = []
                for job, claim, meta, progress in due:
                    event = events.make_event(EventType.progress, job.id, "running", progress=progress)
                    record_progress(pipe, claim, job, meta, event, ttl)
                    sent.append((job, event))
                if tally:
                    metrics.observe_counts(pipe, metrics.BATCH_JOBS, tally, metrics.BATCH_BUCKETS)
                written = pipe.execute()
            for (job, event), owned in zip(sent, written, strict=False):
                if owned:
                    self._announce(job, event)
            if self._redis_away:
                self._redis_away = False
                log.info("progress recorded again (Redis is back)")
        except RedisError:
            if not self._redis_away:  # once per outage, not at every step
                self._redis_away = True
                log.warning("progress not recorded while Redis is unavailable")

    def _announce(self, job: Job, event: events.JobEvent) -> None:
        if self.events is not None:
            self.events.deliver(job, event)

    def _finish(self, slot: Slot, ctx: tasks.WorkerContext, images: list[Image], sampling_s: float) -> None:
        """Store a finished job's images, then record its success with RQ (on the finisher thread).

        Its timings are wall time, as on the one-job path: sampling from its text encoding to its
        decoded images (steps shared with other jobs count in full)."""
        with logs.job_context(slot.job.id):  # a thread of its own: its lines name the job here
            self._finish_one(slot, ctx, images, sampling_s)

    def _finish_one(self, slot: Slot, ctx: tasks.WorkerContext, images: list[Image], sampling_s: float) -> None:
        job = slot.job
        try:
            try:
                stored = slot.storing_since = time.perf_counter()
                results = tasks.store_images(ctx, job, slot.params, images)
            except Exception as exc:
                # Not the job's fault (a full disk, Redis refusing the PNG): as on the one-job path,
                # retried while it has retries left, then `internal_error`, the path kept out of it.
                log.exception("job %s: storing failed", job.id)
                self._end_failed(slot, exc, on_finisher=True)
                return
            job.meta["timings"] = tasks.timings(slot.load_s, sampling_s, time.perf_counter() - stored)
            self._remove(slot)  # no heartbeat once its execution is being ended
            log.info("job %s: %d image(s), %.3fs of batched sampling", job.id, len(results), slot.request.work_s)
            self._finalize_success(job, slot.queue, slot.execution, {"images": results})
            tasks._record_steptime(ctx, slot.params, slot.request.work_s)  # after: the client waits for the outcome
        except Exception:
            # Redis went away while recording: the job stays in the started registry and is
            # recovered as abandoned once its heartbeat expires, as for a broken session.
            log.exception("job %s: could not record its outcome; left for recovery", job.id)
        finally:
            self._remove(slot)  # its heartbeats end here whatever happened

    def _end_failed(self, slot: Slot, exc: BaseException, *, on_finisher: bool = False) -> None:
        with logs.job_context(slot.job.id):
            self._end_failed_now(slot, exc, on_finisher)

    def _end_failed_now(self, slot: Slot, exc: BaseException, on_finisher: bool) -> None:
        self._remove(slot)
        if not on_finisher:
            # Progress writes queued on the finisher thread carry the meta as of their step: they
            # land first, then the job's own meta (with its error) is saved with its failure.
            self._finisher.submit(lambda: None).result()
        try:
            raise exc
        except BaseException:
            self._finalize_failure(slot.job, slot.queue, slot.execution, sys.exc_info())

    def _remove(self, slot: Slot) -> None:
        with self._lock:
            if slot in self.slots:
                self.slots.remove(slot)
            self._finishing.discard(slot)

    def _abandon_all(self, exc_info: Any) -> None:
        """The session itself broke (a bug, Redis gone): record a failure for every job still active.

        When even that fails, the jobs stay in the started registry and are recovered as abandoned
        once their heartbeats expire.
        """
        for slot in list(self.slots):
            try:
                self._end_failed(slot, _sampling_failure(slot.job, exc_info[1]))
            except Exception:
                log.warning("job %s: could not record the failure; left for recovery", slot.job.id,
                            extra={"job_id": slot.job.id})  # fmt: skip
        with self._lock:
            self.slots.clear()

    def _hand_back_all(self, fault: _DeviceFault) -> None:
        """The device failed: the process's CUDA context is broken for every job on it, so each goes
        back to its queue (or fails, past its hand-backs: `tasks.device_fault`), and the worker stops
        after this session (`_stop_if_device_failed`). Jobs being stored go on: their images were
        copied off the device before it failed (a copy after the fault would have raised it).
        A job whose outcome cannot be written stays in the started registry and is recovered as
        abandoned once its heartbeats, which end with this process, expire."""
        log.warning("the device failed; every job on it goes back to its queue", exc_info=fault.cause)
        self.device_fault = self.device_fault or tasks.one_line(fault.cause)  # stop, whatever is recorded
        # Last taken first: each goes to the front of its queue, so they wait in the order they came.
        for job, queue, execution, ran in reversed(fault.admitted):
            error = tasks.device_fault(job, fault.cause, ran=ran)
            try:
                self._finalize_failure(job, queue, execution, (type(error), error, None))
            except Exception:
                log.warning("job %s: could not hand it back; left for recovery", job.id, extra={"job_id": job.id})
        for slot in reversed(list(self.slots)):
            try:
                self._end_failed(slot, tasks.device_fault(slot.job, fault.cause))
            except Exception:
                log.warning("job %s: could not hand it back; left for recovery", slot.job.id,
                            extra={"job_id": slot.job.id})  # fmt: skip
        with self._lock:
            self.slots.clear()

    def _beat_all(self, stop: threading.Event) -> None:
        # One thread keeps every active job's heartbeat fresh, so `rq info` and abandoned-job
        # detection see each of them exactly as for a single job.
        # Jobs whose images the finisher is still storing count too: behind other jobs' PNGs on a
        # busy machine that can outlast the registry entry, and the job would be run again.
        # A job stuck past its timeout and grace (the sampling loop or the finisher hung in C code)
        # gets no more: it is recovered as abandoned (see `ImagegenWorker.beats_due`).
        while not stop.wait(self.heartbeat_interval):
            for slot in [*self.slots, *self._finishing]:
                if slot in self._hung:
                    continue
                # Sampling counts from its start; out of the batch, only the storing of its own
                # images counts (waiting for the finisher behind other jobs' is not being stuck).
                since = slot.began - slot.load_s if slot.storing_since is None else slot.storing_since
                waiting = slot not in self.slots and slot.storing_since is None
                if not waiting and not self.beats_due(slot.job, time.perf_counter() - since):
                    self._hung.add(slot)
                    continue
                with self._lock:
                    if slot not in self.slots and slot not in self._finishing:
                        continue
                    try:
                        self.maintain_heartbeats(slot.job, slot.execution)
                    except Exception:  # Redis blips must not kill the session; the next beat retries
                        log.warning("heartbeat for job %s failed", slot.job.id, exc_info=True,
                                    extra={"job_id": slot.job.id})  # fmt: skip


def _context() -> tasks.WorkerContext:
    ctx = tasks._context
    if ctx is None:
        raise RuntimeError("BatchingWorker runs only inside `python -m worker` (tasks.bind not called)")
    return ctx


def _runs_alone(job: Job) -> bool:
    """Another allowed task (variations: the one-job path), or a job whose data cannot be read
    (the one-job path refuses it): never part of a batch."""
    task = task_of(job)
    return task is UNREADABLE or (task in ALLOWED_TASKS and task != TASK_GENERATE)


def _raise_if_device_failed(exc: BaseException) -> None:
    """Out of the session with every job on the device (see `_hand_back_all`) if the device broke."""
    if tasks._device_broken(exc):
        raise _DeviceFault(exc) from exc


def _splittable(request: Any) -> bool:
    """Whether a request that ran out of memory alone can still be split image by image."""
    return request.chunk_rows is None and request.params.num_images > 1


def _sampling_failure(job: Job, exc: BaseException | None) -> tasks.JobFailedError:
    """The task's mapping of sampling exceptions to error codes."""
    if isinstance(exc, tasks.JobFailedError):
        return exc
    if exc is not None and tasks._is_oom(exc):
        where = "the GPU" if tasks._is_gpu_oom(exc) else "the worker"
        return tasks._fail(job, ErrorCode.out_of_memory, f"{where} ran out of memory")
    return tasks._fail(job, ErrorCode.sampling_error, f"{type(exc).__name__}: {exc}")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _stream_id(value: Any) -> tuple[int, int]:
    ms, _, seq = _text(value).partition("-")
    return int(ms), int(seq or 0)
