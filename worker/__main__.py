"""`python -m worker`: load the model once, warm it up, then serve jobs until SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import threading
import time
from typing import Any, NoReturn


def main() -> int:
    from app.core.config import load_settings

    settings = load_settings("worker")
    from app.core import logs

    logs.configure(settings.log_level, settings.log_format, "worker")
    log = logging.getLogger("worker")

    # transformers warns at import about optional image backends this text-to-image worker never uses.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    pin_threads(settings.pin_threads, os.environ)  # before torch is imported (its OpenMP reads them)
    libraries_log_through_us(os.environ)  # imports diffusers and transformers, and so torch
    import torch

    if settings.device == "cuda" and not torch.cuda.is_available():
        log.error("IMAGEGEN_DEVICE=cuda, but this torch (%s) sees no CUDA device", torch.__version__)
        return 1
    if settings.threads:
        torch.set_num_threads(settings.threads)

    from redis.exceptions import RedisError
    from rq.exceptions import StopRequested

    from app.core.queue import SERIALIZER, connect, get_queues
    from app.core.storage import LocalImageStore, make_store
    from app.core.webhooks import WebhookSender
    from worker import tasks
    from worker.events import EventSink
    from worker.runtime import DiffusersRuntime
    from worker.sweeper import start_sweeper
    from worker.worker import ImagegenWorker

    started = time.perf_counter()
    try:
        runtime = DiffusersRuntime.load(settings)
        log.info("%s", describe(settings, runtime))
        for line in ignored_settings(settings):
            log.warning("%s", line)
        engine = None
        if settings.max_batch > 1:
            from worker.batching import BatchEngine

            # Its start-up checks run the UNet (compiling it, with IMAGEGEN_COMPILE and invariance).
            engine = runtime.eager_if_compiling_fails(
                lambda: BatchEngine.create(runtime, settings.invariant_batches, max_rows=2 * settings.max_batch)
            )
        # Generation jobs run through the engine when there is one, else through the pipeline.
        (engine or runtime).warm_up()
    except (OSError, ValueError) as exc:
        # No such folder or hub id, weights missing, a bad imagegen.json, defaults the model refuses.
        log.error("cannot load model %r: %s", settings.model, str(exc).splitlines()[0] if str(exc) else exc)
        return 1
    log.info("model %s ready in %.2fs (load + warm-up)", settings.model, time.perf_counter() - started)

    connection = connect(settings.redis_url)
    store = make_store(settings, connection)
    sender = WebhookSender(settings, connection=connection) if settings.webhook_secret else None
    sink = EventSink(connection, settings, sender)
    if isinstance(store, LocalImageStore):
        try:
            store.check_writable()
        except OSError as exc:
            log.error("cannot write images to IMAGEGEN_RESULTS_DIR=%s: %s", store.root, exc.strerror or exc)
            return 1
        start_sweeper(store, connection, settings.sweep_interval)

    def new_worker() -> ImagegenWorker:
        worker_class: type[ImagegenWorker] = ImagegenWorker
        batching: dict[str, Any] = {}
        if engine is not None:
            from worker.batch_worker import BatchingWorker

            worker_class, batching = BatchingWorker, {"engine": engine, "max_batch": settings.max_batch}
        worker = worker_class(
            get_queues(connection, settings.model),
            events=sink,
            connection=connection,
            serializer=SERIALIZER,
            heartbeat_interval=settings.worker_heartbeat,
            shutdown_grace=settings.shutdown_grace,
            # RQ's idle worker beats once per dequeue timeout (worker_ttl - 15): every heartbeat.
            worker_ttl=math.ceil(settings.worker_heartbeat) + 15,
            maintenance_interval=settings.maintenance_interval,
            model_info=runtime.info,
            **batching,
        )
        context = tasks.WorkerContext(
            runtime, store, settings, connection, sink, worker.requeue_requested.is_set, lambda: worker.claim
        )
        tasks.bind(context)
        return worker

    # RQ's loop quits on some Redis errors (an outage mid-job, a restart); the model stays loaded
    # and a fresh registration resumes serving once Redis answers again. Between two loops a
    # SIGTERM or Ctrl-C is ours: RQ's handlers, left behind by the loop that ended, belonged to its
    # worker, so a stop asked while Redis was away went to that worker and the next one started.
    stop_asked = threading.Event()
    between_loops = lambda: install_stop_handlers(stop_asked)  # noqa: E731
    between_loops()
    device_failed = False
    try:
        while not stop_asked.is_set():
            worker = None
            try:
                if not wait_for_redis(connection, log, stop_asked):
                    break
                worker = new_worker()  # RQ names its connection here: Redis must answer
                worker.work(with_scheduler=False, logging_level=settings.log_level)  # its own handlers
            except RedisError as exc:
                log.warning("lost Redis (%s); reconnecting", exc)
            except StopRequested:
                pass
            between_loops()
            if worker is not None and worker.device_fault is not None:
                device_failed = True
                log.error(
                    "the GPU failed under job(s) %s (%s): this process's CUDA context cannot be trusted any "
                    "more, so the worker exits (status %d) for its supervisor to restart it with a fresh one",
                    ", ".join(worker.device_fault_jobs) or "(none recorded)", worker.device_fault, DEVICE_FAULT_EXIT,
                )  # fmt: skip
                break
            if worker is not None and worker._shutdown_requested_date is not None:
                break
            if stop_asked.wait(1):
                break
            log.warning("worker loop ended without a stop request; restarting it")
    finally:
        if sender is not None:
            sender.close()  # deliver what is pending before exiting
    if device_failed:
        exit_now(DEVICE_FAULT_EXIT)
    return 0


# EX_TEMPFAIL: a fresh process is expected to work. Any non-zero status gets the process restarted
# (compose's `restart: unless-stopped`, Kubernetes); this one tells a device fault apart in `docker ps`.
DEVICE_FAULT_EXIT = 75


def exit_now(status: int) -> NoReturn:
    """Exit without Python's teardown, logs flushed: at exit torch frees what it cached on the
    device, calls into the broken context that can abort the process or hang it."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def describe(settings: Any, runtime: Any) -> str:
    """What the worker runs on, for its start-up log line: device (the GPU's name on CUDA), dtype,
    the deployment switches, the batch size and whether batches keep invariance."""
    import torch

    device = settings.device
    if device == "cuda":
        device = f"cuda ({torch.cuda.get_device_name()})"
    dtype = str(getattr(runtime.pipe, "dtype", settings.dtype)).removeprefix("torch.")
    invariant = settings.max_batch > 1 and settings.invariant_batches

    def switch(on: bool) -> str:
        return "on" if on else "off"

    return (
        f"running on {device}, dtype {dtype}, compile {switch(settings.compile)}, "
        f"channels_last {switch(settings.channels_last)}, max batch {settings.max_batch}, "
        f"batch invariance {switch(invariant)}"
    )


def ignored_settings(settings: Any) -> list[str]:
    """A line for each setting asked for that this worker does not apply."""
    lines = []
    if settings.device == "cuda" and settings.batch_invariant:
        lines.append(
            "IMAGEGEN_BATCH_INVARIANT=true is ignored with IMAGEGEN_DEVICE=cuda: batch invariance is kept on "
            "the CPU only (cuBLAS and cuDNN pick kernels by batch size)"
        )
    return lines


def libraries_log_through_us(environ: Any) -> None:
    """No tqdm bars on stderr (the hub's downloads, diffusers' and transformers' loading and saving
    of weights), and the libraries' warnings through our handler: bars and their plain-text lines
    broke `IMAGEGEN_LOG_FORMAT=json`'s one JSON object per line."""
    environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import diffusers.utils.logging
    import transformers.utils.logging

    for library in (diffusers.utils.logging, transformers.utils.logging):
        library.disable_progress_bar()
        # Their warnings (deprecations, config notices) through our handler, as JSON when it is:
        # each library's own stderr handler wrote them as plain text.
        library.disable_default_handler()
        library.enable_propagation()


PIN_VARIABLES = {"OMP_PROC_BIND": "true", "OMP_PLACES": "cores"}  # read by torch's OpenMP runtime


def pin_threads(enabled: bool, environ: Any) -> None:
    """With `IMAGEGEN_PIN_THREADS`, ask torch's OpenMP runtime (read once, when torch loads) to keep
    each of its threads on a core of its own. On a small machine shared with the API and Redis the
    threads otherwise move between cores and at times share one, and each waits for the other at
    the end of every parallel region: under load on 2 cores, 5 % more images/s pinned (4 alternated
    rounds, bench/README.md). Values already in the environment are kept. The main thread is bound
    too, and threads it starts later inherit its core."""
    if enabled:
        for name, value in PIN_VARIABLES.items():
            environ.setdefault(name, value)


def install_stop_handlers(stop: threading.Event) -> None:
    """SIGTERM and SIGINT set `stop` (the worker between two RQ loops has no job to hand back)."""

    def asked(signum: int, frame: Any) -> None:
        logging.getLogger("worker").info("stop requested (%s)", signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, asked)


def wait_for_redis(connection: Any, log: logging.Logger, stop: threading.Event | None = None) -> bool:
    """Until Redis answers (True), or `stop` is set (False)."""
    from redis.exceptions import RedisError

    stop = stop or threading.Event()
    delay = 0.5
    while not stop.is_set():
        try:
            connection.ping()
            return True
        except RedisError as exc:
            log.warning("Redis unavailable (%s); retrying in %.1fs", exc, delay)
            stop.wait(delay)
            delay = min(delay * 2, 10.0)
    return False


if __name__ == "__main__":
    sys.exit(main())
