"""A GPU that breaks under a job, with real processes: the worker hands its job back and exits for
its supervisor to restart it; a job that breaks every worker ends failed after two hand-backs; an
ordinary error still fails only its job. There is no GPU here: a `sitecustomize` put on the
PYTHONPATH of the workers of this test only makes the pipeline call and the batched step raise
torch's error for prompts with a marker word, as a CUDA worker would."""

from __future__ import annotations

import json
import os
import signal

import httpx
import pytest
from rq import Worker

from tests.procs import Proc, service_env, start_api, start_redis, start_worker, wait_for
from tests.procs import job_ended as _wait

pytestmark = pytest.mark.integration

DEVICE_FAULT_EXIT = 75
TINY = {"num_inference_steps": 1, "width": 8, "height": 8}
INJECTION = '''
"""Test-only faults (tests/integration/test_device_faults.py): the device breaks under prompts that
contain a word of INJECT_DEVICE_FAULT, an ordinary error hits those with a word of
INJECT_SAMPLING_ERROR; on the one-job path (the pipeline call) and in the batched step."""
import os

DEVICE = [w for w in os.environ.get("INJECT_DEVICE_FAULT", "").split(",") if w]
ORDINARY = [w for w in os.environ.get("INJECT_SAMPLING_ERROR", "").split(",") if w]


def _fail_for(prompts):
    if any(w in p for p in prompts for w in DEVICE):
        raise RuntimeError(
            "CUDA error: an illegal memory access was encountered\\n"
            "CUDA kernel errors might be asynchronously reported at some other API call, so the "
            "stacktrace below might be incorrect.\\nFor debugging consider passing CUDA_LAUNCH_BLOCKING=1"
        )
    if any(w in p for p in prompts for w in ORDINARY):
        raise RuntimeError("the UNet fell over")


if DEVICE or ORDINARY:
    from worker import batching, runtime

    _generate = runtime.DiffusersRuntime.generate
    _tick = batching.BatchEngine.tick

    def generate(self, params, on_step):
        _fail_for([params.prompt])
        return _generate(self, params, on_step)

    def tick(self, requests):
        _fail_for([r.params.prompt for r in requests])
        return _tick(self, requests)

    runtime.DiffusersRuntime.generate = generate
    batching.BatchEngine.tick = tick
'''


@pytest.fixture
def env(tmp_path):
    server = start_redis(tmp_path / "redis")
    # No retries for lost workers: a hand-back after a device fault must not depend on them.
    env = service_env(server.url, tmp_path, max_retries="0", maintenance_interval="1")
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(INJECTION)
    procs: list[Proc] = []
    yield server, env, procs, tmp_path
    for p in procs:
        p.stop(signal.SIGKILL)
    server.proc.stop(signal.SIGKILL)


def _worker(env, procs, tmp, name: str, max_batch: int, device: str = "", ordinary: str = "", ready=None) -> Proc:
    path = os.pathsep.join(p for p in (str(tmp / "inject"), env.get("PYTHONPATH", "")) if p)
    extra = {"PYTHONPATH": path, "IMAGEGEN_MAX_BATCH": str(max_batch)}
    proc = start_worker(env | extra | {"INJECT_DEVICE_FAULT": device, "INJECT_SAMPLING_ERROR": ordinary},
                        tmp / f"{name}.log", ready=ready)  # fmt: skip
    procs.append(proc)
    return proc


def _holders(connection, job_id: str) -> list[str]:
    """Every RQ list and registry that holds the job."""
    found = []
    for key in connection.scan_iter("rq:*"):
        kind = connection.type(key)
        listed = kind == b"list" and connection.lpos(key, job_id) is not None
        if listed or (kind == b"zset" and any(m.startswith(job_id.encode()) for m in connection.zrange(key, 0, -1))):
            found.append(key.decode())
    return sorted(found)


def _exited_for_the_device(proc: Proc, job_id: str) -> None:
    wait_for(lambda: not proc.alive(), 60, f"the worker to exit ({proc.log.name})")
    output = proc.output()
    assert proc.popen.returncode == DEVICE_FAULT_EXIT, output[-3000:]
    lines = [line for line in output.splitlines() if "CUDA context cannot be trusted" in line]
    assert len(lines) == 1 and job_id in lines[0], output[-3000:]
    level = json.loads(lines[0])["level"] if lines[0].startswith("{") else lines[0].split()[2]  # JSON or text logs
    assert level == "ERROR" and "an illegal memory access was encountered" in lines[0], lines[0]


def test_a_broken_device_hands_its_job_back_and_restarts_the_worker(env) -> None:
    from app.core.queue import SERIALIZER

    server, env, procs, tmp = env
    redis = server.client()
    first = _worker(env, procs, tmp, "first", 1, device="poison", ordinary="fell-over", ready=redis)
    api, base = start_api(env, tmp / "api.log")
    procs.append(api)
    with httpx.Client(base_url=base, timeout=10) as http:
        # An ordinary error fails its job only; the worker goes on.
        ordinary = _wait(http, http.post("/generate", json=TINY | {"prompt": "it fell-over"}).json()["id"])
        assert ordinary["status"] == "failed" and ordinary["error"]["code"] == "sampling_error", ordinary
        assert first.alive()

        # The device breaks under a job: handed back, not failed, and the worker exits.
        once = http.post("/generate", json=TINY | {"prompt": "poison-once"}).json()["id"]
        _exited_for_the_device(first, once)
        back = http.get(f"/jobs/{once}").json()
        assert back["status"] == "queued" and back["error"] is None and back["queue_position"] == 0, back
        assert len(holders := _holders(redis, once)) == 1 and holders[0].startswith("rq:queue:"), holders
        assert Worker.all(connection=redis) == []  # unregistered as on a stop
        from rq.job import Job

        assert Job.fetch(once, connection=redis, serializer=SERIALIZER).meta["device_faults"] == 1

        # Fresh workers (as their supervisor restarts them), on devices that break under other jobs:
        # the handed-back job completes; a job that breaks every one of them fails after two hand-backs.
        others = [
            _worker(env, procs, tmp, f"next{i}", batch, device="poison-always", ordinary="fell-over")
            for i, batch in enumerate((2, 1, 4))
        ]
        assert _wait(http, once)["status"] == "succeeded"
        wait_for(lambda: len(Worker.all(connection=redis)) == 3, 120, "three workers")
        ordinary = _wait(http, http.post("/generate", json=TINY | {"prompt": "fell-over again"}).json()["id"])
        assert ordinary["status"] == "failed" and ordinary["error"]["code"] == "sampling_error", ordinary
        assert all(w.alive() for w in others)

        always = http.post("/generate", json=TINY | {"prompt": "poison-always"}).json()["id"]
        done = _wait(http, always)
        assert done["status"] == "failed" and done["error"]["code"] == "sampling_error", done
        assert done["error"]["message"].startswith("the GPU failed on each of this job's 3 runs"), done
        for worker in others:  # each ran it once (batching and one-job workers alike) and exited
            _exited_for_the_device(worker, always)
        assert Worker.all(connection=redis) == []
        assert all(h.startswith("rq:failed:") for h in _holders(redis, always)), _holders(redis, always)
