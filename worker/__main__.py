"""`python -m worker`: load the model once, warm it up, then serve jobs until SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import os
import sys
import time

from pydantic import ValidationError


def main() -> int:
    from app.core.config import Settings

    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"imagegen worker: bad settings:\n{exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("worker")

    # transformers warns at import about optional image backends this text-to-image worker never uses.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch

    if settings.threads:
        torch.set_num_threads(settings.threads)

    from app.core.jobs import MODELS_KEY
    from app.core.queue import SERIALIZER, connect, get_queues
    from app.core.storage import LocalImageStore, make_store
    from worker import tasks
    from worker.events import EventSink, WebhookSender
    from worker.runtime import DiffusersRuntime
    from worker.sweeper import start_sweeper
    from worker.worker import ImagegenWorker

    started = time.perf_counter()
    runtime = DiffusersRuntime.load(settings)
    runtime.warm_up()
    log.info("model %s ready in %.2fs (load + warm-up)", settings.model, time.perf_counter() - started)

    connection = connect(settings.redis_url)
    store = make_store(settings, connection)
    sender = WebhookSender(settings) if settings.webhook_secret else None
    sink = EventSink(connection, settings, sender)
    tasks.bind(tasks.WorkerContext(runtime, store, settings, connection, sink))
    if isinstance(store, LocalImageStore):
        start_sweeper(store, connection, settings.sweep_interval)
    connection.hset(MODELS_KEY, runtime.info.name, runtime.info.model_dump_json())
    worker = ImagegenWorker(
        get_queues(connection, settings.model),
        events=sink,
        connection=connection,
        serializer=SERIALIZER,
        heartbeat_interval=settings.worker_heartbeat,
        worker_ttl=int(settings.worker_heartbeat * 4) + 15,
        maintenance_interval=30,
    )
    try:
        worker.work(with_scheduler=False, logging_level=settings.log_level)
    finally:
        if sender is not None:
            sender.close()  # deliver what is pending before exiting
    return 0


if __name__ == "__main__":
    sys.exit(main())
