"""`ImagegenWorker`: an RQ `SimpleWorker` (no fork per job, the model stays loaded) that refuses
any task not on the allow-list and keeps heartbeating from a thread while a job samples.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from rq.job import Job
from rq.queue import Queue
from rq.worker import SimpleWorker, WorkerStatus

from app.core.jobs import ALLOWED_TASKS, ErrorCode

log = logging.getLogger(__name__)


class ImagegenWorker(SimpleWorker):
    def __init__(self, *args: Any, heartbeat_interval: float = 5.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.heartbeat_interval = heartbeat_interval

    def refusal_reason(self, job: Job) -> str | None:
        """Why a job must not run, or None. Checked before anything of the job is imported."""
        if job.func_name not in ALLOWED_TASKS:
            return f"task {job.func_name!r} is not on this worker's allow-list"
        callbacks = (job._success_callback_name, job._failure_callback_name, job._stopped_callback_name)
        if any(callbacks):
            return "jobs with callbacks are not accepted"
        return None

    def execute_job(self, job: Job, queue: Queue) -> None:
        reason = self.refusal_reason(job)
        if reason is not None:
            log.warning("refusing job %s: %s", job.id, reason)
            job.meta["error"] = {"code": ErrorCode.refused.value, "message": reason}
            job.save_meta()
            self.handle_job_failure(job, queue, exc_string=f"refused: {reason}")
            self.set_state(WorkerStatus.IDLE)
            return
        execution = self.prepare_execution(job)
        stop = threading.Event()
        beat = threading.Thread(target=self._beat, args=(job, execution, stop), name="heartbeat", daemon=True)
        beat.start()
        try:
            self.perform_job(job, queue, execution)
        finally:
            stop.set()
            beat.join()
        self.set_state(WorkerStatus.IDLE)

    def _beat(self, job: Job, execution: Any, stop: threading.Event) -> None:
        # A SimpleWorker runs the job on its main thread and would send no heartbeat until it ends,
        # so a killed worker's job would look alive for job_timeout + 60 s.
        while not stop.wait(self.heartbeat_interval):
            try:
                self.maintain_heartbeats(job, execution)
            except Exception:  # Redis blips must not kill the job; the next beat retries
                log.warning("heartbeat for job %s failed", job.id, exc_info=True)

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        # Short TTL: the job counts as abandoned a few missed beats after the worker dies.
        return int(self.heartbeat_interval * 3) + 5
