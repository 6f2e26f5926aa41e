"""scripts/ensure-venv.sh and scripts/run.sh, run with stand-ins for python and redis-server:
the failures they must report at once, before anything is downloaded or started."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.procs import ROOT


def _script(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


def test_ensure_venv_refuses_a_python_older_than_3_11(tmp_path: Path) -> None:
    """Ubuntu 22.04's python3 is 3.10: `make` got through the torch download and failed only at
    `pip install -e .`. Now ensure-venv.sh stops first, saying what to install."""
    claim = "import sys; sys.version_info = (3, 10, 12, 'final', 0); exec(sys.argv[1])"
    # This Python, claiming to be 3.10 (the script runs `python -c CODE`).
    old = _script(tmp_path / "python3.10", f'#!/bin/sh\nexec "{sys.executable}" -c "{claim}" "$2"\n')
    run = subprocess.run(
        [str(ROOT / "scripts" / "ensure-venv.sh"), str(old)], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 1
    assert "is Python 3.10; imagegen needs 3.11 or newer" in run.stderr
    assert "make PYTHON=" in run.stderr and "python3.11-venv" in run.stderr
    assert "missing:" not in run.stderr  # stopped before looking for the venv package

    gone = subprocess.run(
        [str(ROOT / "scripts" / "ensure-venv.sh"), str(tmp_path / "no-such-python")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert gone.returncode == 1 and "not found" in gone.stderr


def _run_sh(tmp_path: Path, data: Path) -> tuple[subprocess.CompletedProcess[str], float, str]:
    """scripts/run.sh with a redis-server that records its arguments and dies at once."""
    if shutil.which("flock") is None:
        pytest.skip("no flock here")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    args_file = tmp_path / "redis-args"
    _script(
        bin_dir / "redis-server",
        f'#!/bin/sh\nprintf "%s\\n" "$@" > "{args_file}"\necho "FATAL: stand-in redis-server" >&2\nexit 1\n',
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEGEN_")}
    env |= {"PATH": f"{bin_dir}:{env['PATH']}", "IMAGEGEN_DATA_DIR": str(data), "BIN": str(tmp_path / "no-venv")}
    start = time.monotonic()
    run = subprocess.run([str(ROOT / "scripts" / "run.sh")], capture_output=True, text=True, env=env, timeout=60)
    return run, time.monotonic() - start, args_file.read_text() if args_file.exists() else ""


def test_run_sh_says_at_once_when_its_redis_dies(tmp_path: Path) -> None:
    """It waited 5 s for a ping and, where it fell back to TCP port 6399, could reach someone else's
    Redis there. Now it sees its redis-server gone, says so with the log's end, and starts nothing."""
    data = tmp_path / "data"
    run, took, args = _run_sh(tmp_path, data)
    assert run.returncode == 1
    assert "redis-server did not start" in run.stderr and "FATAL: stand-in redis-server" in run.stderr
    assert "imagegen:" not in run.stdout  # neither the worker nor the API was started
    assert took < 4
    argv = args.split("\n")
    assert argv[argv.index("--port") + 1] == "0"  # no TCP listener at all
    assert argv[argv.index("--unixsocket") + 1] == f"{data}/redis.sock"


def test_run_sh_puts_a_socket_too_long_for_its_data_folder_in_a_private_one(tmp_path: Path) -> None:
    """A data folder whose socket path would pass ~100 bytes used TCP port 6399 (another Redis may
    hold it): the socket now goes in a folder of its own under /tmp, removed when run.sh ends."""
    data = tmp_path / ("d" * max(1, 101 - len(str(tmp_path))))
    assert len(f"{data}/redis.sock") >= 100
    run, _, args = _run_sh(tmp_path, data)
    assert run.returncode == 1
    argv = args.split("\n")
    sock = Path(argv[argv.index("--unixsocket") + 1])
    assert len(str(sock)) < 100 and sock.parent.parent == Path("/tmp"), sock
    assert argv[argv.index("--dir") + 1] == str(data)  # its data (AOF) stays in the data folder
    assert not sock.parent.exists()  # removed on the way out
