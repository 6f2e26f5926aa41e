"""`ImagegenWorker`: an RQ `SimpleWorker` (no fork per job, the model stays loaded) that refuses
any task not on the allow-list and keeps heartbeating from a thread while a job samples.

A job is never in no list: `ClaimingQueue` takes it from its queue into that queue's intermediate
list in one step, and it leaves that list only in the transaction that marks it started. RQ's own
dequeue does so only for a worker of a single queue; ours serve three (the priorities), for which
RQ pops with BLPOP, and a worker or Redis dying right after the pop left the job `queued` forever.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError
from rq import worker_registration
from rq.exceptions import AbandonedJobError, DequeueTimeout, DeserializationError, StopRequested
from rq.job import Job, JobStatus
from rq.job_lifecycle import call_exception_handlers
from rq.queue import Queue
from rq.registry import clean_registries
from rq.utils import as_text, utcformat
from rq.utils import now as utcnow
from rq.worker import SimpleWorker, WorkerStatus

from app.core import events, logs, metrics
from app.core.catalog import model_of_queue
from app.core.enqueue import OWNER_QUEUED_PREFIX
from app.core.events import EventType, JobEvent
from app.core.jobs import ALLOWED_TASKS, MODELS_KEY, ErrorCode, ModelInfo, status_from_rq, wake_key
from worker.events import EventSink

log = logging.getLogger(__name__)

WAKE_WAIT = 1.0  # seconds an idle worker blocks on the wake stream before it looks at the queues again
# KEYS: queue, its intermediate list, for each queue in priority order; then the model's wake stream.
# ARGV[1]: RQ's job-key prefix. Returns {position of the queue's key, job id, the job's hash as a flat
# list} (read here: one round trip fewer), or {0, last id of the wake stream} when all are empty.
CLAIM_NEXT = """
for i = 1, #KEYS - 1, 2 do
  local id = redis.call('LPOP', KEYS[i])
  if id then
    redis.call('RPUSH', KEYS[i + 1], id)
    return {i, id, redis.call('HGETALL', ARGV[1] .. id)}
  end
end
local last = redis.call('XREVRANGE', KEYS[#KEYS], '+', '-', 'COUNT', 1)
return {0, last[1] and last[1][1] or '0-0'}
"""


class ClaimingQueue(Queue):
    """RQ's queue with a dequeue that never leaves a taken job in no list (see the module doc).

    When every queue is empty it blocks on the model's wake stream from the id the claim saw, so a
    job queued after that look wakes it at once; jobs queued without a wake-up (RQ's own retries)
    are found within WAKE_WAIT.
    """

    @classmethod
    def dequeue_any(  # type: ignore[override]
        cls,
        queues: list[Queue],
        timeout: int | None,
        connection: Any = None,
        job_class: Any = None,
        serializer: Any = None,
        death_penalty_class: Any = None,
    ) -> tuple[Job, Queue] | None:
        keys = [key for q in queues for key in (q.key, q.intermediate_queue_key)]
        keys.append(wake_key(model_of_queue(queues[0].name) or queues[0].name))
        deadline = None if timeout is None else time.monotonic() + timeout
        job_cls = job_class or Job
        claim = connection.register_script(CLAIM_NEXT)  # EVALSHA: the body is sent once per Redis, not per look
        while True:
            position, value, *fields = claim(keys=keys, args=[job_cls.redis_job_namespace_prefix])
            if position:
                queue = queues[(position - 1) // 2]
                flat = fields[0] if fields else []
                if not flat:
                    continue  # its hash is gone (RQ skips such ids too); maintenance clears the list
                job = job_cls(as_text(value), connection=connection, serializer=serializer)
                try:
                    job.restore(dict(zip(flat[::2], flat[1::2], strict=True)))
                except Exception as exc:  # as RQ's dequeue: the failure names the job and its queue
                    exc.job_id, exc.queue = job.id, queue  # type: ignore[attr-defined]
                    raise
                # Every line about it from here (RQ's "dequeued" line included) carries its id; the
                # worker clears it when the job is done (`ImagegenWorker.execute_job`).
                logs.current_job_id.set(job.id)
                return job, queue
            if deadline is None:
                return None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DequeueTimeout(timeout, [q.key for q in queues])
            connection.xread({keys[-1]: value}, count=1, block=max(1, int(min(remaining, WAKE_WAIT) * 1000)))


@dataclass
class _Success:
    """What a success adds to RQ's success transaction (see `ImagegenWorker.handle_job_success`)."""

    event: JobEvent | None
    written: bool = False


HUNG_GRACE = 60.0  # seconds past its timeout after which a job's heartbeats stop (see `beats_due`)
# A re-queued job back in its owner's set of waiting jobs (`app.core.enqueue`), where the owner
# has one (a bound on waiting jobs): dropped from it once it had started, it was no longer counted.
REQUEUED_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2])
end
return 0
"""
STUCK_AFTER = 60.0  # seconds a job may sit taken but not started before it counts as its worker's loss
# A sighting's marker outlives any gap between maintenance passes (a long IMAGEGEN_MAINTENANCE_INTERVAL,
# workers busy with long jobs); one older than the job's last queueing is not counted anyway.
SIGHTING_TTL = 24 * 3600
# Seconds a worker's lock on a queue's registry maintenance lasts if it is never released: RQ's own
# lasts 899 s, and a worker killed while holding it, or a Redis that went down before its release
# (the lock survives in the append-only file), stopped abandoned-job recovery on that queue for up
# to 15 minutes. A pass takes milliseconds.
MAINTENANCE_LOCK_TTL = 60
LISTEN_WAIT = 1.0  # seconds the command listener waits per read (see `ImagegenWorker.subscribe`)
UNREADABLE = "<unreadable>"  # what `task_of` answers for a job whose data our serializer cannot read


def task_of(job: Job) -> str | None:
    """The job's task name, or UNREADABLE (a job another producer queued with RQ's pickle
    serializer, say): reading it raised out of the worker's loop, which then restarted with the
    job stuck in its intermediate list."""
    try:
        return job.func_name
    except DeserializationError:
        return UNREADABLE


class ImagegenWorker(SimpleWorker):
    queue_class = ClaimingQueue

    def __init__(
        self,
        *args: Any,
        heartbeat_interval: float = 5.0,
        events: EventSink | None = None,
        shutdown_grace: float = 30.0,
        model_info: ModelInfo | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.heartbeat_interval = heartbeat_interval
        self.events = events
        self.shutdown_grace = shutdown_grace
        self.model_info = model_info  # what it publishes in MODELS_KEY (see `publish_model`)
        # Set `shutdown_grace` seconds after a warm shutdown began with a job still running; the
        # task checks it at every step and hands the job back to the queue.
        self.requeue_requested = threading.Event()
        # (started registry key, execution) of the job running on the one-job path, else None: the
        # task checks it is still registered (see `tasks.LostRunError`).
        self.claim: tuple[str, str] | None = None
        self._succeeding: dict[str, _Success] = {}  # jobs whose success RQ is recording
        self._failing: set[str] = set()  # jobs whose failure RQ is recording
        # Jobs of dead workers that RQ's maintenance re-queues or fails (see `_note_abandoned`).
        self._lost: list[Job] = []
        # The device's error once it failed under a job (`tasks.DeviceFaultError`), and the jobs it
        # failed under: this worker then stops, and the process exits (see `_stop_if_device_failed`).
        self.device_fault: str | None = None
        self.device_fault_jobs: list[str] = []
        self.push_exc_handler(self._note_abandoned)

    def subscribe(self) -> None:
        """RQ's listener for commands (stop, kill), waking every LISTEN_WAIT seconds instead of 60:
        at shutdown RQ joins it without a limit, and a listener that had read its unsubscribe
        reply waited out the rest of its 60 s for a subscription, so an idle worker took up to
        64 s to exit after SIGTERM (compose's grace is 45 s, then SIGKILL)."""
        self.log.info("Worker %s: subscribing to channel %s", self.name, self.pubsub_channel_name)
        self.pubsub = self.connection.pubsub()
        self.pubsub.subscribe(**{self.pubsub_channel_name: self.handle_payload})
        self.pubsub_thread = self.pubsub.run_in_thread(  # type: ignore[assignment]
            sleep_time=LISTEN_WAIT, daemon=True, exception_handler=self._pubsub_exception_handler
        )

    def run_maintenance_tasks(self) -> None:
        super().run_maintenance_tasks()
        self._register_again_if_lost()

    def register_birth(self) -> None:
        super().register_birth()
        self.publish_model()

    def publish_model(self) -> None:
        """Put this worker's model in MODELS_KEY, where the API reads its defaults and routing."""
        if self.model_info is not None:
            self.connection.hset(MODELS_KEY, self.model_info.name, self.model_info.model_dump_json())

    def _register_again_if_lost(self) -> None:
        """Redis lost its data while this worker lived (restarted without persistence, flushed):
        RQ's heartbeats only refresh the worker's own key, so it would go on serving unlisted, and
        `/readyz`, `GET /models` and model routing would not see it. Register it and its model again."""
        queue_key = worker_registration.WORKERS_BY_QUEUE_KEY % self.queues[0].name
        try:
            with self.connection.pipeline(transaction=False) as pipe:
                pipe.sismember(queue_key, self.key)
                pipe.hexists(MODELS_KEY, self.model_info.name if self.model_info else "")
                registered, listed = pipe.execute()
            if registered and (listed or self.model_info is None):
                return
            log.warning("this worker's registration is gone from Redis (data lost?); registering again")
            self.connection.delete(self.key)  # a heartbeat since may have left a bare hash RQ takes for a live twin
            self.register_birth()
        except RedisError:
            log.warning("could not check this worker's registration (Redis unavailable)")

    def handle_exception(self, job: Job, *exc_info: Any) -> None:
        """RQ logs every failing job's traceback at ERROR. An outcome of ours (canceled, refused,
        invalid, timed out; a sampling error was logged with its traceback where it happened) or a
        hand-back (at shutdown, after a device fault) is one line instead, at INFO for cancels and
        hand-backs at shutdown. A device fault is noted here, where every run's error passes on
        both paths (one job, a batch), for the worker to stop once the job's outcome is written."""
        from worker import tasks
        from worker.tasks import DeviceFailedError, DeviceFaultError, JobFailedError, LostRunError, RequeueError

        exc = exc_info[1] if len(exc_info) > 1 else None
        if isinstance(exc, DeviceFaultError | DeviceFailedError):
            self.device_fault = self.device_fault or exc.what
            self.device_fault_jobs.append(job.id)
        if isinstance(exc, LostRunError):
            return  # logged where the run stopped; nothing of it is recorded
        if not isinstance(exc, JobFailedError | RequeueError | DeviceFaultError):
            super().handle_exception(job, *exc_info)
            return
        if isinstance(exc, RequeueError):
            log.info("job %s: handed back to the queue at shutdown", job.id)
        elif isinstance(exc, DeviceFaultError):
            log.warning("job %s: handed back to the queue after a device fault (%d under it so far; it fails past %d)",
                        job.id, tasks.device_faults(job), tasks.MAX_DEVICE_HANDBACKS)  # fmt: skip
        elif exc.code is ErrorCode.canceled:
            log.info("job %s: %s", job.id, exc.message)
        else:
            log.warning("job %s: failed (%s): %s", job.id, exc.code.value, exc.message)
        call_exception_handlers(self._exc_handlers, job, *exc_info)

    def request_stop(self, signum: Any, frame: Any) -> None:
        busy = self.get_state() == WorkerStatus.BUSY
        super().request_stop(signum, frame)  # raises StopRequested when idle
        if busy:
            timer = threading.Timer(self.shutdown_grace, self.requeue_requested.set)
            timer.daemon = True
            timer.start()

    def refusal_reason(self, job: Job) -> str | None:
        """Why a job must not run, or None. Checked before anything of the job is imported."""
        if task_of(job) is UNREADABLE:
            return "the job's data cannot be read here (queued with another serializer?)"
        if job.func_name not in ALLOWED_TASKS:
            return f"task {job.func_name!r} is not on this worker's allow-list"
        callbacks = (job._success_callback_name, job._failure_callback_name, job._stopped_callback_name)
        if any(callbacks):
            return "jobs with callbacks are not accepted"
        return None

    def validate_queues(self) -> None:
        # RQ wants instances of `queue_class`; only its dequeue (a classmethod) is ours.
        for queue in self.queues:
            if not isinstance(queue, Queue):
                raise TypeError(f"{queue!r} is not an RQ queue")

    def refuse(self, job: Job, queue: Queue, reason: str) -> None:
        """Fail a job that must not run, and take it out of the intermediate list (else RQ's
        maintenance would take it for stuck and fail it a second time)."""
        log.warning("refusing job %s: %s", job.id, reason)
        job.meta["error"] = {"code": ErrorCode.refused.value, "message": reason}
        job.save_meta()
        self.handle_job_failure(job, queue, exc_string=f"refused: {reason}")
        self.connection.lrem(queue.intermediate_queue_key, 1, job.id)

    def prepare_job_execution(self, job: Job, remove_from_intermediate_queue: bool = False) -> None:
        # Every job we take waits in its queue's intermediate list until this transaction.
        super().prepare_job_execution(job, remove_from_intermediate_queue=True)

    def dequeue_job_and_maintain_ttl(self, timeout: int | None, max_idle_time: int | None = None) -> Any:
        logs.current_job_id.set(None)  # no job yet: the dequeue sets it (`ClaimingQueue.dequeue_any`)
        return super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)

    def execute_job(self, job: Job, queue: Queue) -> None:
        try:
            with logs.job_context(job.id):  # RQ's own lines about it ("Job OK", its result's TTL) too
                self._execute_one(job, queue)
        finally:
            logs.current_job_id.set(None)  # set since its dequeue
        self._stop_if_device_failed()

    def _stop_if_device_failed(self) -> None:
        """After a device fault, with its jobs handed back (or failed), RQ's loop ends as on a stop
        request: no further job is taken, and the worker's registration goes as on any stop. The
        process then exits (`worker.__main__`): its CUDA context cannot be repaired from inside."""
        if self.device_fault is not None:
            raise StopRequested

    def _execute_one(self, job: Job, queue: Queue) -> None:
        reason = self.refusal_reason(job)
        if reason is not None:
            self.refuse(job, queue, reason)
            self.set_state(WorkerStatus.IDLE)
            return
        execution = self.prepare_execution(job)
        stop = threading.Event()
        beat = threading.Thread(target=self._beat, args=(job, execution, stop), name="heartbeat", daemon=True)
        beat.start()
        self.claim = (queue.started_job_registry.key, execution.composite_key)
        try:
            self.perform_job(job, queue, execution)
        finally:
            self.claim = None
            stop.set()
            beat.join()
        self.set_state(WorkerStatus.IDLE)

    def _finalize_success(self, job: Job, *args: Any, **kwargs: Any) -> None:
        with logs.job_context(job.id):  # on a batching worker's finisher thread too
            super()._finalize_success(job, *args, **kwargs)

    def _finalize_failure(self, job: Job, *args: Any, **kwargs: Any) -> None:
        with logs.job_context(job.id):
            super()._finalize_failure(job, *args, **kwargs)

    # Terminal events go out only after RQ has stored the outcome, so a client that reacts to
    # `succeeded` by downloading the image never races the job's own status. On success they go out
    # with it: RQ writes the outcome in one transaction and calls `cleanup_execution` last before
    # EXEC, where the event, the job's meta and its metrics join that transaction (one round trip).
    def handle_job_success(self, job: Job, queue: Queue, started_job_registry: Any, execution: Any) -> None:
        if self._taken_from_us(job, queue, execution):
            return
        event = None
        if self.events is not None:
            result = job._result or {}
            images = [dict(img, url=f"/jobs/{job.id}/images/{img['index']}") for img in result.get("images", [])]
            total = (job.meta.get("progress") or {}).get("total", 0)
            progress = {"step": total, "total": total}
            event = events.make_event(EventType.succeeded, job.id, "succeeded", images=images, progress=progress)
        success = _Success(event)
        self._succeeding[job.id] = success
        try:
            super().handle_job_success(job, queue, started_job_registry, execution)
        finally:
            del self._succeeding[job.id]
        if not success.written:  # an RQ that no longer cleans up in its transaction: write them after
            with self.connection.pipeline(transaction=False) as pipe:
                self._write_success(pipe, job, success)
                pipe.execute()
        if event is not None and self.events is not None:
            self.events.deliver(job, event)

    def cleanup_execution(self, job: Job, pipeline: Any, execution: Any = None) -> None:
        super().cleanup_execution(job, pipeline, execution)
        success = self._succeeding.get(job.id)
        if success is not None:  # inside RQ's success transaction (again, if RQ retries it)
            self._write_success(pipeline, job, success)
        if job.id in self._failing:  # the error the task noted (`tasks._fail`), with the failure
            pipeline.hset(job.key, "meta", job._serialize_meta())

    def _write_success(self, pipe: Any, job: Job, success: _Success) -> None:
        # RQ's success leaves the job's meta alone; its timings (set by the task or the batch) go here.
        pipe.hset(job.key, "meta", job._serialize_meta())
        if success.event is not None and self.events is not None:
            events.publish(pipe, success.event, events.stream_ttl(self.events.settings, success.event, job.result_ttl))
        metrics.record_job(pipe, "succeeded", len((job._result or {}).get("images", [])), _timings(job))
        success.written = True

    def handle_execution_ended(self, job: Job, queue: Queue, heartbeat_ttl: int) -> None:
        # RQ also renews the job's heartbeat here, to cover a success callback; imagegen's jobs
        # have none, and the outcome is written next, so that round trip is skipped.
        job.ended_at = utcnow()

    def handle_job_failure(
        self, job: Job, queue: Queue, started_job_registry: Any = None, exc_string: str = "", execution: Any = None
    ) -> None:
        if self._taken_from_us(job, queue, execution):
            return
        if job.meta.pop("requeue", False):
            # Handed back during shutdown: run it again from the start, ahead of newer jobs.
            job.retries_left = (job.retries_left or 0) + 1
            job.retry_intervals = [0]
            job.enqueue_at_front_on_retry = True
        elif job.meta.get("error"):
            job.retries_left = 0  # a failure the task reported itself: retrying cannot help
        # The meta goes in RQ's failure transaction (`cleanup_execution`): saved when the task
        # failed, it was written even by a run that had lost the job, over the other run's.
        self._failing.add(job.id)
        try:
            super().handle_job_failure(job, queue, started_job_registry, exc_string, execution)
        finally:
            self._failing.discard(job.id)
        status_now = job.get_status(refresh=True)
        if status_now == JobStatus.QUEUED:  # a retry (or a hand-back) re-queued it
            self._announce_requeued(job)
        if self.events is None or status_now != JobStatus.FAILED:
            return
        status = status_from_rq("failed", job.meta)
        self._record(job, status.value, 0, _error_code(job.meta))
        error = job.meta.get("error") or {"code": ErrorCode.internal_error.value, "message": "the job failed"}
        self.events.emit(job, EventType(status.value), status.value, error=error, progress=job.meta.get("progress"))

    def _announce_requeued(self, job: Job) -> None:
        """A job back in its queue starts over: its progress goes back to 0 and a `queued` event
        tells its followers (they saw it running, and would next see it start again from 0)."""
        total = (job.meta.get("progress") or {}).get("total", 0)
        job.meta["progress"] = {"step": 0, "total": total}
        try:
            with self.connection.pipeline(transaction=False) as pipe:  # one round trip
                pipe.hset(job.key, "meta", job._serialize_meta())
                owner = job.meta.get("owner")
                if owner and job.created_at is not None:  # waiting again: it counts against its key's bound
                    pipe.eval(REQUEUED_SCRIPT, 1, OWNER_QUEUED_PREFIX + str(owner), job.created_at.timestamp(), job.id)
                pipe.execute()
            if self.events is not None:
                self.events.emit(job, EventType.queued, "queued", progress=job.meta["progress"])
        except RedisError:
            log.warning("job %s: its return to the queue could not be announced (Redis unavailable)", job.id)

    def _record(self, job: Job, status: str, images: int, error_code: str | None = None) -> None:
        """Shared metrics (read by the API's /metrics) of a job that did not succeed."""
        try:
            with self.connection.pipeline(transaction=False) as pipe:
                metrics.record_job(pipe, status, images, _timings(job), error_code)
                pipe.execute()
        except Exception:
            log.warning("could not record metrics for job %s", job.id, exc_info=True)

    def clean_registries(self) -> None:
        """RQ's registry maintenance, plus recovery of jobs a dead worker had dequeued but not yet
        started: RQ skips those (their status is still `queued`) and they would sit in no queue."""
        for queue in self.queues:
            if self.connection.set(queue.registry_cleaning_key, 1, nx=True, ex=MAINTENANCE_LOCK_TTL):
                try:
                    self._recover_orphans(queue)
                    clean_registries(queue, self._exc_handlers)
                    self._announce_lost()
                    worker_registration.clean_worker_registry(queue)
                    self._recover_taken(queue)
                finally:
                    queue.release_maintenance_lock()
        self.last_cleaned_at = utcnow()  # type: ignore[assignment]

    def _taken_from_us(self, job: Job, queue: Queue, execution: Any) -> bool:
        """Whether this run of the job lost it before it ended: a worker that stalled (SIGSTOP, a
        frozen VM, swapping) past its heartbeats was taken for dead, RQ's maintenance re-queued
        the job and another worker ran it. RQ then dropped this run's execution from the started
        registry (heartbeats never add it back). Its outcome is not recorded: it would count the
        job twice and send a second terminal event after the other run's."""
        if execution is None:
            return False  # refused before it ran
        try:
            registered = self.connection.zscore(queue.started_job_registry.key, execution.composite_key)
        except RedisError:
            return False  # recording will meet the same outage and leave the job to recovery
        if registered is not None:
            return False
        log.warning("job %s: taken for lost while this worker stalled and run again; this run's outcome is dropped",
                    job.id, extra={"job_id": job.id})  # fmt: skip
        try:
            with self.connection.pipeline() as pipe:
                self.cleanup_execution(job, pipe, execution)  # this run's execution record only
                pipe.execute()
        except RedisError:
            self.executions.pop(execution.id, None)
        return True

    def _note_abandoned(self, job: Job, exc_type: Any, exc_value: Any, traceback: Any) -> bool:
        """RQ's maintenance calls the exception handlers for every job whose worker died; it then
        re-queues those with retries left and fails the others, in its own transaction, which none
        of our code sees: no event (webhooks, SSE), no metrics, no end time. Noted here, announced
        once RQ has written the outcome (`_announce_lost`)."""
        if exc_type is AbandonedJobError:
            self._lost.append(job)
        return True  # the other handlers run too

    def _announce_lost(self) -> None:
        lost, self._lost = self._lost, []
        for job in lost:
            try:
                status = job.get_status(refresh=True)
                if status == JobStatus.QUEUED:  # RQ re-queued it: retries were left
                    log.warning("job %s: its worker was lost; queued again", job.id, extra={"job_id": job.id})
                    self._announce_requeued(job)
                if status != JobStatus.FAILED:
                    continue
                error = {"code": ErrorCode.worker_lost.value, "message": "the worker running this job was lost"}
                job.meta["error"] = error
                job.ended_at = utcnow()
                with self.connection.pipeline(transaction=False) as pipe:
                    pipe.hset(job.key, mapping={"meta": job._serialize_meta(), "ended_at": utcformat(job.ended_at)})
                    metrics.record_job(pipe, JobStatus.FAILED.value, 0, _timings(job), ErrorCode.worker_lost.value)
                    pipe.execute()
                log.warning("job %s: failed, its worker was lost (no retries left)", job.id, extra={"job_id": job.id})
                if self.events is not None:
                    self.events.emit(job, EventType.failed, "failed", error=error, progress=job.meta.get("progress"))
            except RedisError:
                log.warning("job %s: its loss could not be recorded (Redis unavailable)", job.id)

    def _recover_orphans(self, queue: Queue) -> None:
        for job_id in queue.started_job_registry.get_expired_job_ids():
            job = Job.fetch_many([job_id], connection=self.connection, serializer=self.serializer)[0]
            if job is None or job.get_status(refresh=False) != JobStatus.QUEUED:
                continue
            if self.connection.lpos(queue.key, job_id) is None:
                self._put_back(queue, job)

    def _put_back(self, queue: Queue, job: Job) -> None:
        """A job taken by a worker that died before starting it, back at the front of its queue,
        and out of the dead worker's intermediate list (with its sighting marker) in the same
        transaction: that list's clean-up would otherwise re-queue it a second time later, a
        second run of a job that may have succeeded meanwhile."""
        log.warning("job %s was taken by a worker that died before starting it; requeued", job.id)
        waiting = queue.intermediate_queue
        with self.connection.pipeline() as pipe:
            pipe.lrem(waiting.key, 0, job.id)
            pipe.delete(waiting.get_first_seen_key(job.id))
            queue._enqueue_job(job, pipeline=pipe, at_front=True)
            pipe.execute()

    def _recover_taken(self, queue: Queue) -> None:
        """Jobs a worker took (each waits in its queue's intermediate list until it starts) and died
        before starting: put back at the front of their queue, as `_recover_orphans` does, once seen
        there for STUCK_AFTER seconds. RQ's own clean-up of that list failed them instead: a retry
        spent on a job that never ran, then `internal_error` rather than `worker_lost`. Its marker
        of a first sighting (kept a day) also outlived the claim it was set for, so a job taken
        again within the day could be failed and re-queued in the milliseconds between its next
        claim and its start, and run twice; a marker older than the job's last queueing is
        taken for a first sighting here."""
        waiting = queue.intermediate_queue
        for job_id in waiting.get_job_ids():
            if job_id in queue.started_job_registry:
                continue  # started: heartbeats and the started registry look after it
            job = queue.fetch_job(job_id)
            if job is None or job.get_status(refresh=False) != JobStatus.QUEUED:
                waiting.remove(job_id)  # gone, or ended without starting (canceled)
                continue
            seen = waiting.get_first_seen(job_id)
            queued = job.enqueued_at
            if seen is None or (queued is not None and seen < queued):
                self.connection.set(waiting.get_first_seen_key(job_id), time.time(), ex=SIGHTING_TTL)
                continue
            if (utcnow() - seen).total_seconds() >= STUCK_AFTER:
                self._put_back(queue, job)

    def _beat(self, job: Job, execution: Any, stop: threading.Event) -> None:
        # A SimpleWorker runs the job on its main thread and would send no heartbeat until it ends,
        # so a killed worker's job would look alive for job_timeout + 60 s.
        began = time.monotonic()
        while not stop.wait(self.heartbeat_interval):
            if not self.beats_due(job, time.monotonic() - began):
                return
            try:
                self.maintain_heartbeats(job, execution)
            except Exception:  # Redis blips must not kill the job; the next beat retries
                log.warning("heartbeat for job %s failed", job.id, exc_info=True, extra={"job_id": job.id})

    def beats_due(self, job: Job, running_s: float) -> bool:
        """Whether a job that has been running `running_s` seconds still gets heartbeats. Not once
        it is HUNG_GRACE past its timeout: its run is stuck where RQ's timeout cannot interrupt it
        (a CUDA hang, a write to a dead NFS server: the signal waits for the C call to return) and
        would hold the job, and keep this worker "live", forever. Without beats the job is
        recovered as abandoned (re-queued or failed with `worker_lost`), and the worker's own
        registration expires with them. A run that wakes up later finds the job no longer its own."""
        limit = job.timeout or self.queue_class.DEFAULT_TIMEOUT
        if limit < 0 or running_s <= limit + HUNG_GRACE:  # RQ's -1: no limit
            return True
        log.error("job %s: still running %.0f s after its %s s timeout; its heartbeats stop, so that it is "
                  "recovered as abandoned", job.id, running_s - limit, limit, extra={"job_id": job.id})  # fmt: skip
        return False

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        # Short TTL: the job counts as abandoned a few missed beats after the worker dies.
        return int(self.heartbeat_interval * 3) + 5


def _error_code(meta: dict[str, Any]) -> str:
    """A failed job's error code as a metric label: one of `ErrorCode`'s values, whatever the meta holds."""
    code = (meta.get("error") or {}).get("code")
    return str(code) if code in ErrorCode.__members__ else ErrorCode.internal_error.value


def _timings(job: Job) -> dict[str, float]:
    """A finished job's latencies for the metrics: queue wait (of its last run), sampling, total
    (seconds). The total runs from its submission: RQ sets `enqueued_at` anew when it re-queues a
    job (its worker lost, a hand-back at shutdown), and the time of the earlier runs went missing."""
    timings = {}
    if job.enqueued_at and job.started_at:
        timings["queue_wait"] = (job.started_at - job.enqueued_at).total_seconds()
    submitted = job.created_at or job.enqueued_at
    if submitted and job.ended_at:
        timings["total"] = (job.ended_at - submitted).total_seconds()
    sampling_ms = (job.meta.get("timings") or {}).get("sampling_ms")
    if sampling_ms is not None:
        timings["sampling"] = sampling_ms / 1000
    return timings
