"""Bad settings stop every process with the problems listed, one per line, naming the variable:
never a traceback, never a value (pydantic's message quoted every setting read, secrets too)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.procs import ROOT

SECRET_URL = "redis://:SuperSecretRedisPw@localhost:6379/0"
SECRET_KEY = "alice-key-0123456789abcdef"
COMMANDS = {
    "worker": [sys.executable, "-m", "worker"],
    "api": [sys.executable, "-m", "uvicorn", "app.main:app", "--port", "1"],
    "keys": [sys.executable, "-m", "app.keys", "list"],
}


def run(command: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEGEN_")}
    return subprocess.run(COMMANDS[command], env=clean | env, cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_bad_settings_are_listed_without_their_values(command: str) -> None:
    out = run(
        command,
        IMAGEGEN_REDIS_URL=SECRET_URL,
        IMAGEGEN_API_KEYS=SECRET_KEY,
        IMAGEGEN_MIN_SIZE="12",  # a check across settings: pydantic's message held all of them
    )
    text = out.stdout + out.stderr
    assert out.returncode == 2, text
    assert f"imagegen {command}: bad settings:\n  IMAGEGEN_MIN_SIZE must be a multiple of 8" in out.stderr
    assert "Traceback" not in text
    assert "SuperSecret" not in text and SECRET_KEY[:8] not in text and "0123456789" not in text


@pytest.mark.parametrize(
    ("env", "line"),
    [
        ({"IMAGEGEN_RESULT_TTL": "abc"}, "IMAGEGEN_RESULT_TTL: Input should be a valid integer"),
        ({"IMAGEGEN_REDIS_URL": "redis://:pw@localhost:abc/0"}, "IMAGEGEN_REDIS_URL is not a valid Redis URL"),
    ],
)
def test_the_api_names_the_setting_and_exits(env: dict[str, str], line: str) -> None:
    # A field that did not parse, and a Redis URL that passed the prefix check but crashed start-up.
    out = run("api", **env)
    assert out.returncode == 2 and line in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and "pw@" not in out.stderr


def test_a_cuda_worker_without_a_gpu_says_so() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    out = run("worker", IMAGEGEN_DEVICE="cuda", IMAGEGEN_REDIS_URL="redis://127.0.0.1:1/0")
    assert out.returncode == 1 and "IMAGEGEN_DEVICE=cuda, but this torch" in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
