"""What a new user does: `make run`, then `scripts/generate.sh`, then Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.procs import ROOT, free_port, wait_for

pytestmark = pytest.mark.integration


def _started_by(data: Path) -> list[int]:
    """Processes `make run` started for this data folder (each runs in a session of its own):
    found by the folder in their command line (Redis) or environment (worker, API)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            text = (proc / "cmdline").read_bytes() + (proc / "environ").read_bytes()
        except OSError:
            continue
        if str(data).encode() in text:
            found.append(int(proc.name))
    return found


def assert_red_blob_on_blue(image: Image.Image) -> None:
    """The prompt was followed: a compact red shape inside, blue all around (checked by pixels)."""
    a = np.asarray(image.convert("RGB")).astype(int)
    red = (a[..., 0] > 150) & (a[..., 1] < 90) & (a[..., 2] < 90)
    blue = (a[..., 2] > 150) & (a[..., 0] < 90) & (a[..., 1] < 90)
    border = np.ones(red.shape, bool)
    border[2:-2, 2:-2] = False
    assert blue[border].mean() > 0.9, f"background not blue: {blue[border].mean():.2f}"
    assert 0.04 < red.mean() < 0.6, f"red share {red.mean():.2f}"
    assert (red | blue).mean() > 0.9  # nothing else of note in the picture
    ys, xs = np.nonzero(red)
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    assert red.sum() / box > 0.5, "the red pixels do not form one blob"


def test_make_run_then_generate_script_then_ctrl_c(tmp_path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEGEN_")}
    # What a new user gets: the default model (the committed tiny-shapes), no IMAGEGEN_MODEL.
    # The data folder given relative to the checkout, as README's `.data` default reads: it made a
    # socket URL (`unix://../x/redis.sock`) that named no socket, and the worker never connected.
    data = os.path.relpath(tmp_path / "data", ROOT)
    env.update(IMAGEGEN_PORT=str(port), IMAGEGEN_DATA_DIR=data, IMAGEGEN_THREADS="1", IMAGEGEN_SHUTDOWN_GRACE="2")
    log = open(tmp_path / "make-run.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        ["make", "-s", "run"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: httpx.get(base + "/readyz", timeout=2).status_code == 200, 120, "make run to be ready")
        # A private Redis with AOF under the data dir, reached through a unix socket.
        assert (tmp_path / "data" / "redis.sock").exists()
        out = tmp_path / "out.png"
        done = subprocess.run(
            [
                str(ROOT / "scripts" / "generate.sh"),
                "a red circle on a blue background",
                str(out),
                '"seed":7',
            ],
            env=env | {"IMAGEGEN_URL": base},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        image = Image.open(out)
        assert image.format == "PNG" and image.text["seed"] == "7" and image.size == (32, 32)
        assert_red_blob_on_blue(image)
        followed = subprocess.run(
            [str(ROOT / "scripts" / "follow.sh"), "a green square", '"num_inference_steps":5'],
            env=env | {"IMAGEGEN_URL": base},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert followed.returncode == 0, followed.stderr
        kinds = [line.split(":", 1)[1].strip() for line in followed.stdout.splitlines() if line.startswith("event:")]
        assert kinds[0] == "queued" and kinds[-1] == "succeeded", followed.stdout
        # A second one on the same data folder refuses to start (it took over the first's Redis).
        second = subprocess.run(
            ["make", "-s", "run"], cwd=ROOT, env=env | {"IMAGEGEN_PORT": str(free_port())},
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert second.returncode != 0 and "another `make run` is using" in second.stderr, second.stderr
        assert httpx.get(base + "/readyz", timeout=5).status_code == 200
        # Ctrl-C while a job samples: the worker hands it back to the queue, Redis still up.
        long = httpx.post(base + "/generate", json={"prompt": "long", "num_inference_steps": 150, "width": 64,
                                                    "height": 64}, timeout=10).json()  # fmt: skip
        wait_for(lambda: httpx.get(f"{base}/jobs/{long['id']}", timeout=5).json()["status"] == "running", 60, "it")
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            for pid in _started_by(tmp_path / "data"):
                os.kill(pid, signal.SIGKILL)
            raise
        deadline = time.monotonic() + 30
        while _started_by(tmp_path / "data") and time.monotonic() < deadline:
            time.sleep(0.1)
        log.close()
    assert not _started_by(tmp_path / "data"), "Ctrl-C left processes running"
    assert list((tmp_path / "data").glob("appendonlydir/*.aof")) or (tmp_path / "data" / "appendonly.aof").exists()
    output = (tmp_path / "make-run.log").read_text()
    assert f"job {long['id']}: shutting down, handing the job back to the queue" in output, output[-3000:]
    assert "Traceback" not in output and "ConnectionError" not in output, output[-3000:]
