"""Logging for every process: one JSON object per line (or plain text), with the job id on every
line logged while a job runs in a worker."""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

# `color_message`: uvicorn's copy of its message with ANSI colour codes, noise in a JSON line.
_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "color_message"}

# The job a worker thread is handling now (set by the worker around each job, or each operation on
# one job of a batch); read by `JobContextFilter`. Each thread has its own (threads start empty).
current_job_id: ContextVar[str | None] = ContextVar("imagegen_job_id", default=None)


@contextmanager
def job_context(job_id: str | None) -> Iterator[None]:
    """Lines logged by this thread inside the block carry `job_id` (unless they pass their own)."""
    token = current_job_id.set(job_id)
    try:
        yield
    finally:
        current_job_id.reset(token)


class JobContextFilter(logging.Filter):
    """Adds `job_id` unless the call passed one in `extra`: the job this thread is handling
    (`current_job_id`), else RQ's current job (set only while the task function runs)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "job_id"):
            job_id = current_job_id.get()
            if job_id is not None:
                record.job_id = job_id
                return True
            try:
                from rq import get_current_job

                job = get_current_job()
            except Exception:
                job = None
            if job is not None:
                record.job_id = job.id
        return True


class RedactSignatures(logging.Filter):
    """Access-log lines name the path with its query: a signed image link's `sig` there would let
    whoever reads the logs open the image (see `app.core.auth.ImageLinks`). It is logged as `sig=…`."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args  # uvicorn's: (client, method, path with query, HTTP version, status)
        if isinstance(args, tuple) and any(isinstance(a, str) and "sig=" in a for a in args):
            record.args = tuple(_SIG.sub("sig=…", a) if isinstance(a, str) else a for a in args)
        return True


_SIG = re.compile(r"sig=[^&\s]*")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = value if isinstance(value, str | int | float | bool | None) else str(value)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure(level: str, fmt: str, process: str) -> None:
    """Route every logger (uvicorn's and RQ's included) through one stderr handler."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(JobContextFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {process} %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers = [handler]
    # `warnings.warn` goes through the handler too (one JSON line). Off first: an earlier capture
    # makes it a no-op, even where `warnings.showwarning` was put back since (as pytest does).
    logging.captureWarnings(False)
    logging.captureWarnings(True)
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "rq.worker"):
        logger = logging.getLogger(name)
        if name == "uvicorn.access" and not logger.handlers and not logger.propagate:
            continue  # `uvicorn --no-access-log` turned it off: keep it off
        logger.handlers = []
        if name == "uvicorn.access":
            logger.filters = [f for f in logger.filters if not isinstance(f, RedactSignatures)] + [RedactSignatures()]
        logger.propagate = True
        logger.setLevel(logging.NOTSET)  # IMAGEGEN_LOG_LEVEL decides, not uvicorn's own INFO
    # httpx logs every request at INFO with its full URL: webhook targets, tokens in their query
    # included. Our own lines say what happened to each delivery (scheme and host only).
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger().level))
