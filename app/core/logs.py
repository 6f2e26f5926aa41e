"""Logging for every process: one JSON object per line (or plain text), with the job id on every
line logged while a job runs in a worker."""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JobContextFilter(logging.Filter):
    """Adds `job_id` from RQ's current job (worker side) unless the call passed one in `extra`."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "job_id"):
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
