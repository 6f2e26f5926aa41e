"""IMAGEGEN_PIN_THREADS: a real worker process whose torch threads are bound to cores, one each."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.procs import RedisServer, service_env, start_worker
from worker.__main__ import pin_threads

pytestmark = pytest.mark.integration


def allowed_cpus(pid: int, tid: int) -> set[int]:
    """The CPUs a thread may run on (Linux: Cpus_allowed_list, e.g. "0-3,6")."""
    for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            cpus: set[int] = set()
            for part in line.split(":", 1)[1].strip().split(","):
                first, _, last = part.partition("-")
                cpus.update(range(int(first), int(last or first) + 1))
            return cpus
    raise AssertionError("no Cpus_allowed_list")


def test_the_environment_is_set_only_when_asked_and_never_overridden() -> None:
    env: dict[str, str] = {}
    pin_threads(False, env)
    assert env == {}
    pin_threads(True, env)
    assert env == {"OMP_PROC_BIND": "true", "OMP_PLACES": "cores"}
    env = {"OMP_PROC_BIND": "false"}
    pin_threads(True, env)
    assert env["OMP_PROC_BIND"] == "false"


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux's /proc")
def test_a_pinned_worker_keeps_each_torch_thread_on_one_core(redis_server: RedisServer, tmp_path: Path) -> None:
    available = os.sched_getaffinity(0)
    threads = min(2, len(available))
    env = service_env(f"redis://127.0.0.1:{redis_server.port}/8", tmp_path, threads=str(threads))
    env = {k: v for k, v in env.items() if not k.startswith("OMP_")}
    redis_server.client(8).flushdb()
    for pinned in (True, False):
        env["IMAGEGEN_PIN_THREADS"] = str(pinned).lower()
        worker = start_worker(env, tmp_path / f"worker-{pinned}.log", ready=redis_server.client(8))
        try:
            main = allowed_cpus(worker.pid, worker.pid)  # the warm-up has run torch's parallel regions
            if pinned:
                assert len(main) == 1 and main <= available, main
            elif len(available) > 1:
                assert main == available  # free to run anywhere it was allowed
        finally:
            worker.stop()
            redis_server.client(8).delete("rq:workers")
