"""`IMAGEGEN_LOG_FORMAT=json`: nothing but JSON lines on stderr (no progress bars, warnings through
logging, no uvicorn ANSI copy of the message); and /healthz answering with the threadpool full."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import threading
import time
import warnings
from pathlib import Path

import pytest

from app.core import logs
from tests.procs import PYTHON

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers, root.level = handlers, level
    logging.captureWarnings(False)


def test_the_json_formatter_drops_uvicorns_coloured_copy() -> None:
    record = logging.LogRecord("uvicorn.error", logging.INFO, __file__, 1, "Started server process [%d]", (7,), None)
    record.color_message = "Started server process [\x1b[36m%d\x1b[0m]"
    entry = json.loads(logs.JsonFormatter().format(record))
    assert entry["msg"] == "Started server process [7]" and "color_message" not in entry


def test_python_warnings_are_json_lines(capsys, restore_logging) -> None:
    logs.configure("INFO", "json", "test")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("steps_offset is outdated", FutureWarning, stacklevel=1)
    err = capsys.readouterr().err
    lines = [json.loads(line) for line in err.splitlines()]
    assert lines and lines[-1]["logger"] == "py.warnings" and "steps_offset" in lines[-1]["msg"]


def test_the_libraries_warnings_are_json_lines(capsys, restore_logging) -> None:
    """diffusers and transformers write their warnings with stderr handlers of their own, as plain
    text; the worker hands them to ours."""
    import diffusers.utils.logging
    import transformers.utils.logging

    from worker.__main__ import libraries_log_through_us

    logs.configure("INFO", "json", "test")
    try:
        libraries_log_through_us({})
        diffusers.utils.logging.get_logger("diffusers.models").warning("a config attribute is ignored")
        transformers.utils.logging.get_logger("transformers.models").error("a weight was not used")
        err = capsys.readouterr().err
        lines = [json.loads(line) for line in err.splitlines()]  # every line JSON
        assert [entry["msg"] for entry in lines] == ["a config attribute is ignored", "a weight was not used"]
    finally:
        for library in (diffusers.utils.logging, transformers.utils.logging):
            library.disable_propagation()
            library.enable_default_handler()


def test_a_starting_worker_writes_only_json_lines(tmp_path: Path) -> None:
    """Loading (and first creating) the model printed tqdm bars ("Loading weights: 100%|███…")."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IMAGEGEN_", "HF_HUB_DISABLE"))}
    env.update(
        HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",
        IMAGEGEN_REDIS_URL="redis://127.0.0.1:1/0",  # nothing there: it loads the model, then waits for Redis
        IMAGEGEN_MODEL="tiny-random",
        IMAGEGEN_MODEL_CACHE=str(tmp_path / "models"),  # empty: the model is made, then loaded
        IMAGEGEN_RESULTS_DIR=str(tmp_path / "results"),
        IMAGEGEN_THREADS="1",
        IMAGEGEN_LOG_FORMAT="json",
    )
    err_path = tmp_path / "stderr"
    with err_path.open("wb") as err:
        proc = subprocess.Popen([PYTHON, "-m", "worker"], cwd=ROOT, env=env, stdout=err, stderr=err)
        try:
            deadline = time.monotonic() + 120
            while "Redis unavailable" not in err_path.read_text(errors="replace"):
                assert proc.poll() is None, err_path.read_text(errors="replace")[-3000:]
                assert time.monotonic() < deadline, err_path.read_text(errors="replace")[-3000:]
                time.sleep(0.2)
        finally:
            proc.terminate()
            proc.wait(30)
    text = err_path.read_text(errors="replace")
    assert "model tiny-random ready" in text
    bad = []
    for line in text.splitlines():
        try:
            json.loads(line)
        except ValueError:
            bad.append(line)
    assert not [line for line in bad if "it/s]" in line], bad[:5]  # tqdm's bars
    assert not bad, bad[:5]


def test_healthz_answers_while_the_threadpool_is_exhausted() -> None:
    """With Redis hung, /readyz calls hold every threadpool thread; /healthz (the Docker
    HEALTHCHECK, 3 s timeout) must not queue behind them."""
    import anyio.to_thread
    import httpx
    from fastapi import FastAPI

    from app.api.routes import health

    app = FastAPI()
    app.include_router(health.router)
    release = threading.Event()

    @app.get("/hung")
    def hung() -> dict[str, str]:  # a sync route on a hung Redis: holds a threadpool thread
        release.wait(10)
        return {}

    async def scenario() -> float:
        anyio.to_thread.current_default_thread_limiter().total_tokens = 4
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            blocked = [asyncio.create_task(client.get("/hung")) for _ in range(8)]
            await asyncio.sleep(0.3)
            started = time.monotonic()
            try:
                response = await asyncio.wait_for(client.get("/healthz"), 2)
                assert response.status_code == 200 and response.json() == {"status": "ok"}
                return time.monotonic() - started
            finally:
                release.set()
                await asyncio.gather(*blocked, return_exceptions=True)

    try:
        took = asyncio.run(scenario())
    except TimeoutError:
        pytest.fail("/healthz waited for a threadpool thread")
    assert took < 1.0
