"""The job contract shared by API and worker, and the import-time rules."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from app.core.config import Settings
from app.core.jobs import GenerationParams, JobStatus, ModelInfo, Scheduler, image_seed, parse_job_id, status_from_rq
from tests.procs import ROOT


@pytest.mark.parametrize(
    ("rq", "meta", "ours"),
    [
        ("queued", {}, JobStatus.queued),
        ("deferred", {}, JobStatus.queued),
        ("scheduled", {}, JobStatus.queued),
        (None, {}, JobStatus.queued),
        ("started", {}, JobStatus.running),
        ("finished", {}, JobStatus.succeeded),
        ("failed", {}, JobStatus.failed),
        ("failed", {"error": {"code": "canceled", "message": "x"}}, JobStatus.canceled),
        ("stopped", {}, JobStatus.canceled),
        ("canceled", {}, JobStatus.canceled),
    ],
)
def test_status_mapping(rq, meta, ours) -> None:
    assert status_from_rq(rq, meta) is ours


def test_terminal_statuses() -> None:
    assert {s for s in JobStatus if s.is_terminal()} == {JobStatus.succeeded, JobStatus.failed, JobStatus.canceled}


def test_params_validation() -> None:
    ok = GenerationParams(prompt="a red circle", width=64, height=32, seed=2**32 - 1, scheduler="euler_a")
    assert ok.scheduler is Scheduler.euler_a
    for bad in (
        {"prompt": ""},
        {"prompt": "   "},
        {"prompt": "x" * 1001},
        {"prompt": "x", "width": 60},
        {"prompt": "x", "seed": -1},
        {"prompt": "x", "num_images": 0},
        {"prompt": "x", "extra": 1},
    ):
        with pytest.raises(ValidationError):
            GenerationParams(**bad)
    assert GenerationParams(prompt="مرحبا 👋 \x07 bell").prompt.startswith("مرحبا")


def test_model_defaults_fill_only_missing_fields() -> None:
    info = ModelInfo(name="m", width=32, height=32, num_inference_steps=20, guidance_scale=3.0, scheduler="ddim")
    filled = info.fill(GenerationParams(prompt="x", width=64, guidance_scale=0))
    assert (filled.width, filled.height, filled.num_inference_steps, filled.guidance_scale) == (64, 32, 20, 0)
    assert filled.scheduler is Scheduler.ddim


def test_seeds_and_ids() -> None:
    assert [image_seed(2**32 - 2, i) for i in range(3)] == [2**32 - 2, 2**32 - 1, 0]
    assert parse_job_id("../../etc/passwd") is None
    assert parse_job_id("rq:job:*") is None
    assert parse_job_id("6F9619FF-8B86-D011-B42D-00C04FC964FF") == "6f9619ff-8b86-d011-b42d-00c04fc964ff"


def test_settings_fail_fast_on_nonsense(monkeypatch) -> None:
    for key, value in [
        ("IMAGEGEN_MAX_WIDTH", "1004"),
        ("IMAGEGEN_REDIS_URL", "http://x"),
        ("IMAGEGEN_DTYPE", "float16"),
        ("IMAGEGEN_STORAGE", "s3"),
        ("IMAGEGEN_RESULT_TTL", "0"),
    ]:
        monkeypatch.setenv(key, value)
        with pytest.raises(ValidationError):
            Settings()
        monkeypatch.delenv(key)
    monkeypatch.setenv("IMAGEGEN_DEVICE", "cuda")
    monkeypatch.setenv("IMAGEGEN_DTYPE", "float16")
    assert Settings().dtype == "float16"


def _imports_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys; print(' '.join(sys.modules))"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        env={"IMAGEGEN_DTYPE": "nonsense"},
    )
    return set(out.stdout.split())


def test_core_imports_neither_fastapi_nor_torch() -> None:
    mods = _imports_after("import app.core.config, app.core.jobs, app.core.queue, app.core.storage, app.core.errors")
    assert not {m for m in mods if m.split(".")[0] in {"fastapi", "torch", "diffusers", "worker", "starlette"}}


def test_api_imports_no_torch_and_reads_no_env_at_import() -> None:
    # IMAGEGEN_DTYPE=nonsense would fail Settings(): importing must not read it.
    mods = _imports_after("import app.main, app.api.routes.generate, app.api.routes.jobs")
    assert "fastapi" in mods
    assert not {m for m in mods if m.split(".")[0] in {"torch", "diffusers", "transformers", "worker"}}


def test_logging_keeps_uvicorns_access_log_off_when_asked(monkeypatch) -> None:
    import logging

    from app.core import logs

    access = logging.getLogger("uvicorn.access")
    monkeypatch.setattr(access, "handlers", [])
    monkeypatch.setattr(access, "propagate", False)  # what `uvicorn --no-access-log` leaves behind
    for logger in (logging.getLogger(), *(logging.getLogger(n) for n in ("uvicorn", "uvicorn.error", "rq.worker"))):
        for attr in ("handlers", "level", "propagate"):  # restored after the test
            monkeypatch.setattr(logger, attr, getattr(logger, attr))
    monkeypatch.setattr(access, "level", access.level)
    logs.configure("INFO", "json", "api")
    assert not access.hasHandlers()  # uvicorn checks this before formatting any access line
    monkeypatch.setattr(access, "handlers", [logging.NullHandler()])  # access log on: routed through ours
    logs.configure("WARNING", "json", "api")
    assert access.propagate and access.handlers == [] and access.getEffectiveLevel() == logging.WARNING


def test_logging_leaves_out_httpxs_request_lines(monkeypatch) -> None:
    """httpx logs each request at INFO with its whole URL: a webhook target's token went into the
    logs with it. Its warnings still come through, at any level."""
    import logging

    from app.core import logs

    loggers = [logging.getLogger(n) for n in ("", "uvicorn", "uvicorn.error", "uvicorn.access", "rq.worker")]
    for logger in [*loggers, logging.getLogger("httpx"), logging.getLogger("httpcore")]:
        for attr in ("handlers", "level", "propagate", "filters"):  # restored after the test
            monkeypatch.setattr(logger, attr, getattr(logger, attr))
    logs.configure("INFO", "text", "worker")
    httpx = logging.getLogger("httpx")
    assert not httpx.isEnabledFor(logging.INFO) and httpx.isEnabledFor(logging.WARNING)
    logs.configure("DEBUG", "text", "worker")
    assert not httpx.isEnabledFor(logging.INFO)


def test_job_progress_is_never_missing() -> None:
    from types import SimpleNamespace

    from app.core.events import job_progress

    ran = SimpleNamespace(meta={"progress": {"step": 3, "total": 9}}, kwargs={"params": {"num_inference_steps": 9}})
    assert job_progress(ran) == {"step": 3, "total": 9}
    queued = SimpleNamespace(meta={}, kwargs={"params": {"num_inference_steps": 12}})
    assert job_progress(queued) == {"step": 0, "total": 12}

    class Planted:  # a job whose arguments cannot be read (another function's, or garbage)
        meta = None

        @property
        def kwargs(self) -> dict:
            raise ValueError("cannot deserialize")

    assert job_progress(Planted()) == {"step": 0, "total": 0}
