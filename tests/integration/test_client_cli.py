"""`imagegen_client` (sync and async) and the `imagegen` CLI against the real stack; the wait
fallbacks (no event stream, no long-poll) against a scripted server."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

import imagegen_client.client as client_module
from imagegen_client import AsyncClient, Client, ImagegenError, Job, JobEvent, WaitTimeout
from imagegen_client.client import error_from_response
from tests.procs import ROOT, Stack, start_api, wait_for

pytestmark = pytest.mark.integration
FAST = {"num_inference_steps": 4, "width": 32, "height": 32}
CONSOLE_SCRIPT = Path(sys.executable).parent / "imagegen"


def png_size(data: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(data)).size


def test_submit_wait_download_with_progress(stack: Stack) -> None:
    events: list[JobEvent] = []
    with Client(stack.base_url) as client:
        job = client.submit("a red circle on a blue background", seed=7, num_images=2, **FAST)
        assert job.status in ("queued", "running") and job.params["seed"] == 7
        done = client.wait(job.id, timeout=120, on_progress=events.append)
        assert client.mode == "sse"  # the server streams events; no fallback was needed
        assert done.succeeded and done.progress.step == done.progress.total == 4
        assert [(i.index, i.seed) for i in done.images] == [(0, 7), (1, 8)]
        assert events and events[-1].status == "succeeded" and events[-1].job_id == job.id
        assert any(e.status == "running" and e.progress.step > 0 for e in events), events
        assert [png_size(client.download(job.id, i)) for i in (0, 1)] == [(32, 32), (32, 32)]
        assert client.get(job.id).raw["id"] == job.id


def test_errors_are_typed_from_the_envelope(stack: Stack) -> None:
    with Client(stack.base_url) as client:
        with pytest.raises(ImagegenError) as info:
            client.submit("x", num_images=11)
        assert (info.value.status, info.value.code) == (422, "validation_error")
        assert "num_images" in info.value.message
        for missing in (str(uuid.uuid4()), "not-a-job"):
            with pytest.raises(ImagegenError) as info:
                client.get(missing)
            assert (info.value.status, info.value.code) == (404, "not_found")
        with pytest.raises(ImagegenError) as info:
            client.wait(str(uuid.uuid4()), timeout=10)
        assert info.value.status == 404
        done = client.generate("done already", **FAST)
        assert done.succeeded and client.submit("held", wait=30, **FAST).succeeded  # `Prefer: wait`
        with pytest.raises(ImagegenError) as info:
            client.cancel(done.id)
        assert info.value.status == 409
        with pytest.raises(ImagegenError) as info:
            client.download(done.id, 5)
        assert info.value.status == 404


def test_wait_timeout_then_cancel(stack: Stack) -> None:
    with Client(stack.base_url) as client:
        job = client.submit("slow", num_inference_steps=150, width=64, height=64)
        with pytest.raises(WaitTimeout) as info:
            client.wait(job.id, timeout=0.5)
        assert info.value.job is not None and not info.value.job.done
        canceled = client.cancel(job.id)
        assert canceled.id == job.id
        assert client.wait(job.id, timeout=120).status == "canceled"


def test_async_client(stack: Stack) -> None:
    async def run() -> None:
        events: list[JobEvent] = []
        async with AsyncClient(stack.base_url) as client:
            job = await client.submit("a green square", seed=3, **FAST)
            done = await client.wait(job.id, timeout=120, on_progress=events.append)
            assert done.succeeded and events[-1].status == "succeeded"
            assert png_size(await client.download(job.id)) == (32, 32)
            with pytest.raises(ImagegenError) as info:
                await client.get(str(uuid.uuid4()))
            assert info.value.status == 404

    asyncio.run(run())


class ScriptedServer:
    """A server without `/events` (404) and, optionally, without long-poll (422 on `wait`)."""

    def __init__(self, longpoll: bool) -> None:
        self.longpoll = longpoll
        self.job_id = str(uuid.uuid4())
        self.views = ["queued", "running", "running", "succeeded"]
        self.calls: list[str] = []

    def view(self, status: str) -> dict:
        step = {"queued": 0, "running": 1, "succeeded": 2}[status]
        return {"id": self.job_id, "status": status, "params": {}, "progress": {"step": step, "total": 2}}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.calls.append(f"{request.method} {request.url.path}?{request.url.query.decode()}")
        not_found = {"error": {"code": "not_found", "message": "Not Found"}}
        if not request.url.path.startswith(f"/jobs/{self.job_id}"):
            return httpx.Response(404, json={"error": {"code": "not_found", "message": "no job"}})
        if request.url.path.endswith("/events"):
            return httpx.Response(404, json=not_found)
        if "wait" in request.url.params and not self.longpoll:
            return httpx.Response(422, json={"error": {"code": "validation_error", "message": "wait: unknown"}})
        status = self.views.pop(0) if len(self.views) > 1 else self.views[0]
        return httpx.Response(200, json=self.view(status))


@pytest.mark.parametrize("mode", ["sse", "longpoll"])
def test_wait_rides_out_an_api_restart(stack: Stack, tmp_path: Path, mode: str) -> None:
    """The API restarts (SIGTERM, then up again on its port) while a client waits on a running
    job: the wait goes on and returns the finished job (it raised `connection_error` at once)."""
    import signal
    import threading

    api, base = start_api(stack.env, tmp_path / "api-1.log")
    port = int(base.rsplit(":", 1)[1])
    result: dict[str, object] = {}
    with Client(base) as client:
        client.mode = mode  # type: ignore[assignment]
        job = client.submit("through a restart", num_inference_steps=150, width=128, height=128, seed=2)

        def wait() -> None:
            try:
                result["job"] = client.wait(job.id, timeout=180)
            except Exception as exc:  # reported below
                result["error"] = exc

        waiter = threading.Thread(target=wait)
        waiter.start()
        wait_for(lambda: client.get(job.id).status == "running", 60, "the job runs")
        api.stop(signal.SIGTERM)
        time.sleep(1.0)  # the wait meets a closed port meanwhile
        api, _ = start_api(stack.env, tmp_path / "api-2.log", port=port)
        try:
            waiter.join(180)
        finally:
            api.stop()
    assert "error" not in result, result
    done = result["job"]
    assert isinstance(done, Job) and done.status == "succeeded"


def test_async_wait_rides_out_an_api_restart(stack: Stack, tmp_path: Path) -> None:
    import signal

    api, base = start_api(stack.env, tmp_path / "api-1.log")
    port = int(base.rsplit(":", 1)[1])

    async def scenario() -> Job:
        nonlocal api
        async with AsyncClient(base) as client:
            job = await client.submit("async restart", num_inference_steps=150, width=128, height=128, seed=3)
            waiting = asyncio.create_task(client.wait(job.id, timeout=180))
            while (await client.get(job.id)).status != "running":
                await asyncio.sleep(0.1)
            await asyncio.to_thread(api.stop, signal.SIGTERM)
            await asyncio.sleep(1.0)
            api, _ = await asyncio.to_thread(start_api, stack.env, tmp_path / "api-2.log", port)
            return await waiting

    try:
        done = asyncio.run(asyncio.wait_for(scenario(), 240))
    finally:
        api.stop()
    assert done.status == "succeeded"


def test_wait_keeps_its_deadline_while_a_queued_job_only_gets_keep_alives() -> None:
    job_id = str(uuid.uuid4())
    queued = {"id": job_id, "status": "queued", "params": {}, "progress": {"step": 0, "total": 2}}

    def keep_alives() -> Iterator[bytes]:
        for _ in range(60):  # 6 s of keep-alives (the server sends one every 10 s), then the stream ends
            yield b"event: keepalive\r\n\r\n"
            time.sleep(0.1)

    def server(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/events"):
            return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=keep_alives())
        return httpx.Response(200, json=queued)  # the long-poll: still queued

    with Client("http://scripted", transport=httpx.MockTransport(server)) as client:
        started = time.monotonic()
        with pytest.raises(WaitTimeout):
            client.wait(job_id, timeout=1)
        # Each keep-alive restarted the read timeout, so the wait ran on while the job stayed queued
        # (until the stream ended here; past 100 s for a 12 s timeout against the real server).
        assert time.monotonic() - started < 4


def test_wait_resumed_after_the_end_takes_the_servers_204_as_the_end() -> None:
    """The stream drops right after its terminal event, before the client has read it: resuming
    with that id, the server answers 204 (nothing more will come). The client read it as a server
    without events and stayed on long-polls for good."""
    job_id = str(uuid.uuid4())
    done = {"id": job_id, "status": "succeeded", "params": {}, "progress": {"step": 2, "total": 2}}
    asked: list[str | None] = []

    def dropped() -> Iterator[bytes]:
        yield b'event: started\r\nid: 1-0\r\ndata: {"status": "running"}\r\n\r\n'
        raise httpx.ReadError("dropped")

    def server(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/events"):
            asked.append(request.headers.get("last-event-id"))
            if len(asked) == 1:
                return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=dropped())
            return httpx.Response(204)
        return httpx.Response(200, json=done)

    with Client("http://scripted", transport=httpx.MockTransport(server)) as client:
        assert client.wait(job_id, timeout=60).succeeded  # (a short wait switches to long-polls)
        assert asked == [None, "1-0"] and client.mode == "sse"


def test_answers_that_are_not_jobs_are_imagegen_errors() -> None:
    job_id = str(uuid.uuid4())
    queued = {"id": job_id, "status": "queued", "params": {}, "progress": {"step": 0, "total": 2}}

    def server(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/generate":
            return httpx.Response(202, json=queued)
        if request.url.path == f"/jobs/{job_id}":
            return httpx.Response(200, json=queued)  # the long-poll: still queued
        if request.url.path.endswith("/events"):
            return httpx.Response(404, json={"error": {"code": "not_found", "message": "Not Found"}})
        return httpx.Response(200, text="<html>a web server</html>", headers={"content-type": "text/html"})

    with Client("http://scripted", transport=httpx.MockTransport(server)) as client:
        with pytest.raises(ImagegenError) as info:  # was a bare JSONDecodeError
            client.get(str(uuid.uuid4()))
        assert info.value.code == "unexpected_response" and "text/html" in info.value.message
        with pytest.raises(ValueError, match="job id"):
            client.get("")
        client.mode = "longpoll"
        with pytest.raises(WaitTimeout) as timed_out:  # reports the caller's timeout, not what was left
            client.generate("x", timeout=0.5)
        assert "after 0.5 s" in str(timed_out.value), timed_out.value
    with pytest.raises(ValueError, match="invalid server URL"):
        Client("http://[::1")


@pytest.mark.parametrize(("longpoll", "mode"), [(True, "longpoll"), (False, "poll")])
def test_wait_falls_back_when_the_server_lacks_events(longpoll: bool, mode: str) -> None:
    server = ScriptedServer(longpoll)
    events: list[JobEvent] = []
    with Client("http://scripted", transport=httpx.MockTransport(server)) as client:
        job = client.wait(server.job_id, timeout=10, on_progress=events.append)
        assert job.succeeded and client.mode == mode
        assert [e.status for e in events] == ["running", "succeeded"], events
        with pytest.raises(ImagegenError) as info:  # an unknown job is still an error, not a fallback
            client.wait(str(uuid.uuid4()), timeout=10)
        assert info.value.status == 404
    assert any("wait=" in call for call in server.calls)


@pytest.mark.parametrize("honoured", [True, False])
def test_generate_waits_in_the_post_where_the_server_allows(honoured: bool) -> None:
    calls: list[tuple[str, str | None]] = []
    job_id = str(uuid.uuid4())

    def server(request: httpx.Request) -> httpx.Response:
        prefer = request.headers.get("prefer")
        calls.append((f"{request.method} {request.url.path}", prefer))
        done = {"id": job_id, "status": "succeeded", "params": {}, "progress": {"step": 2, "total": 2}}
        if request.method == "POST" and honoured and prefer:
            return httpx.Response(200, json=done, headers={"Preference-Applied": prefer})
        if request.method == "POST":  # a server that ignores the preference
            return httpx.Response(202, json=done | {"status": "queued", "progress": {"step": 0, "total": 2}})
        return httpx.Response(200, json=done)  # the long-poll that follows

    with Client("http://scripted", transport=httpx.MockTransport(server)) as client:
        client.mode = "longpoll"
        assert client.generate("one request", timeout=10).succeeded
    assert calls[0] == ("POST /generate", "wait=10")  # held no longer than the caller waits
    expected = ["POST /generate"] if honoured else ["POST /generate", f"GET /jobs/{job_id}"]
    assert [c for c, _ in calls] == expected


@pytest.mark.parametrize("png_in_post", [True, False])
def test_image_is_one_request_where_the_server_answers_with_the_png(png_in_post: bool) -> None:
    calls: list[tuple[str, str | None]] = []
    job_id = str(uuid.uuid4())
    done = {"id": job_id, "status": "succeeded", "params": {}, "progress": {"step": 2, "total": 2}}

    def server(request: httpx.Request) -> httpx.Response:
        calls.append((f"{request.method} {request.url.path}", request.headers.get("accept")))
        if request.method == "POST" and png_in_post:
            return httpx.Response(200, content=b"\x89PNG one", headers={"content-type": "image/png"})
        if request.method == "POST":  # a server that answers with the job (older, or JSON only)
            return httpx.Response(200, json=done)
        return httpx.Response(200, content=b"\x89PNG two", headers={"content-type": "image/png"})

    async def from_async_client() -> bytes:
        async with AsyncClient("http://scripted", transport=httpx.MockTransport(server)) as client:
            return await client.image("a red circle", timeout=10, seed=1)

    with Client("http://scripted", transport=httpx.MockTransport(server)) as client:
        png = client.image("a red circle", timeout=10, seed=1)
        with pytest.raises(ValueError):
            client.image("several", num_images=2)
    assert asyncio.run(from_async_client()) == png == (b"\x89PNG one" if png_in_post else b"\x89PNG two")
    assert calls[0] == ("POST /generate", "image/png, application/json;q=0.5")
    one = ["POST /generate"] + ([] if png_in_post else [f"GET /jobs/{job_id}/images/0"])
    assert [c for c, _ in calls] == one * 2  # the blocking client, then the asyncio one


def test_client_image_against_the_real_service(stack: Stack) -> None:
    with Client(stack.base_url) as client:
        png = client.image("a red circle on a blue background", seed=5, num_inference_steps=3, width=32, height=32)
        assert png.startswith(b"\x89PNG")
        with pytest.raises(ImagegenError) as info:
            client.image("", seed=5)
        assert info.value.status == 422


def test_client_stands_alone() -> None:
    # The package ships to users without the server: importing it must not pull in app/ or worker/.
    code = "import sys, imagegen_client.cli; print(sorted({m.split('.')[0] for m in sys.modules} & {'app', 'worker'}))"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


# -- the CLI ----------------------------------------------------------------------------------
def cli(args: list[str], base_url: str | None, *, script: bool = False) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEGEN_")}
    if base_url:
        env["IMAGEGEN_URL"] = base_url
    argv = [str(CONSOLE_SCRIPT)] if script else [sys.executable, "-m", "imagegen_client"]
    return subprocess.run(argv + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)


def test_cli_generate_writes_pngs_and_shows_progress(stack: Stack, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["generate", "a red circle on a blue background", "-n", "2", "--seed", "7"]
    args += ["--steps", "3", "--size", "32x32", "-o", str(out), "--url", stack.base_url]
    r = cli(args, None)
    assert r.returncode == 0, r.stderr
    paths = [Path(p) for p in r.stdout.split()]
    assert len(paths) == 2 and all(p.parent == out and p.exists() for p in paths)
    job_id = paths[0].name.rsplit("-", 1)[0]
    assert sorted(p.name for p in paths) == [f"{job_id}-0.png", f"{job_id}-1.png"]
    assert png_size(paths[0].read_bytes()) == (32, 32)
    assert "3/3" in r.stderr and "succeeded" in r.stderr  # the progress bar reached the end


def test_console_script_generate_status_cancel(stack: Stack, tmp_path: Path) -> None:
    assert CONSOLE_SCRIPT.exists(), "no `imagegen` console script: run `make venv` (pip install -e ./clients/python)"
    args = ["generate", "a blue square", "--steps", "2", "--size", "32x32", "-q", "-o", str(tmp_path)]
    r = cli(args, stack.base_url, script=True)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    [path] = r.stdout.split()
    job_id = Path(path).name.rsplit("-", 1)[0]
    r = cli(["status", job_id], stack.base_url, script=True)
    assert r.returncode == 0 and json.loads(r.stdout)["status"] == "succeeded"
    r = cli(["cancel", job_id], stack.base_url, script=True)  # already finished: 409
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "409" in r.stderr and r.stderr.startswith("imagegen: error: ")


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["generate", "x", "-n", "0"], 2),  # the server refuses it (422): a bad argument all the same
        (["generate", "x", "--size", "33x33"], 2),
        (["generate", "x", "-n", "lots"], 2),  # argparse refuses it
        (["generate", "x", "--size", "big"], 2),
        (["status", "not-a-job"], 1),
        (["frobnicate"], 2),
        (["--url", "http://127.0.0.1:9", "status", str(uuid.uuid4())], 1),  # nothing listens there
        (["--url", "http://[::1", "status", str(uuid.uuid4())], 2),  # not a URL
        (["status", ""], 2),
        (["generate", "x", "--guidance", "nan"], 2),
        (["generate", "x", "--timeout", "0"], 2),  # refused before submitting, not after
        (["generate", "x", "-o", "README.md"], 2),  # a file, not a folder: before the job runs
    ],
)
def test_cli_errors_are_one_line(stack: Stack, args: list[str], code: int) -> None:
    r = cli(args, stack.base_url)
    assert r.returncode == code and r.stdout == "", (r.returncode, r.stderr)
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("imagegen"), r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize(
    ("script", "args", "url", "code", "says"),
    [
        ("generate.sh", ["x", "never.png", '"seed":-1'], None, 1, "HTTP 422"),
        ("follow.sh", ["x", '"width":33'], None, 1, "HTTP 422"),
        ("generate.sh", ["x", "never.png", '"seed":'], None, 2, "not JSON"),
        ("follow.sh", ["x"], "http://127.0.0.1:9", 1, "cannot reach"),
    ],
)
def test_curl_scripts_show_the_servers_refusal(
    stack: Stack, tmp_path: Path, script: str, args: list[str], url: str | None, code: int, says: str
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEGEN_")}
    env["IMAGEGEN_URL"] = url or stack.base_url
    r = subprocess.run(
        [str(ROOT / "scripts" / script), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == code and says in r.stderr, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_a_refusal_carries_the_servers_retry_after(monkeypatch) -> None:
    """A key past its bound of waiting jobs (or a full queue) gets 429 with Retry-After: once its
    submission's retries are over (a short window here), the client hands the wait on, so a batch
    script can back off as the server asks."""
    monkeypatch.setattr(client_module, "RECONNECT_WINDOW", 0.5)

    def server(request: httpx.Request) -> httpx.Response:
        body = {"error": {"code": "rate_limited", "message": "this API key has 100 jobs waiting"}}
        return httpx.Response(429, json=body, headers={"Retry-After": "7"})

    client = Client("http://scripted", transport=httpx.MockTransport(server))
    with client, pytest.raises(ImagegenError) as info:
        client.submit("x")
    assert (info.value.status, info.value.code, info.value.retry_after) == (429, "rate_limited", 7.0)
    assert error_from_response(httpx.Response(503, text="down")).retry_after is None


def test_cli_client_and_scripts_send_an_api_key(stack: Stack, tmp_path: Path) -> None:
    """With API keys on, the CLI, the client and the curl scripts had no way to send one: every
    call was a 401. Now `--api-key`, `api_key=` or $IMAGEGEN_API_KEY."""
    key = "cli-key-0123456789abcdef"
    api, base = start_api(stack.env | {"IMAGEGEN_API_KEYS": key}, tmp_path / "api.log")
    try:
        fast = ["--steps", "2", "--size", "32x32", "-q", "--seed", "3"]
        r = cli(["generate", "keyed", *fast, "-o", str(tmp_path / "none")], base)
        assert r.returncode == 1 and ("API key" in r.stderr or "401" in r.stderr), r.stderr
        r = cli(["generate", "keyed", *fast, "-o", str(tmp_path / "a"), "--api-key", key], base)
        assert r.returncode == 0, r.stderr
        assert len(list((tmp_path / "a").glob("*.png"))) == 1
        env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEGEN_")}
        env |= {"IMAGEGEN_URL": base, "IMAGEGEN_API_KEY": key}
        run = lambda argv: subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)  # noqa: E731
        r = run([sys.executable, "-m", "imagegen_client", "status", str(uuid.uuid4())])
        assert r.returncode == 1 and ("404" in r.stderr or "not_found" in r.stderr), r.stderr  # past the key check
        r = run([str(ROOT / "scripts" / "generate.sh"), "keyed", "out.png", '"seed":4,"num_inference_steps":2'])
        assert r.returncode == 0 and (tmp_path / "out.png").read_bytes().startswith(b"\x89PNG"), r.stderr
        r = run([str(ROOT / "scripts" / "follow.sh"), "keyed", '"num_inference_steps":2'])
        assert r.returncode == 0 and "event: succeeded" in r.stdout, r.stderr
        with Client(base, api_key=key) as client:
            assert client.generate("keyed", num_inference_steps=2, width=32, height=32, timeout=120).succeeded
        with Client(base, api_key="wrong-key-0123456789abcdef") as client, pytest.raises(ImagegenError) as info:
            client.get(str(uuid.uuid4()))
        assert info.value.status == 401
    finally:
        api.stop()


def test_generate_sh_says_what_the_server_answered_for_a_job_gone(stack: Stack, tmp_path: Path) -> None:
    """A job that expired (or another server's) while polled: curl handed the error envelope to a
    Python one-liner reading `progress`, which ended in a traceback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEGEN_")}
    script = (ROOT / "scripts" / "generate.sh").read_text()
    # The job's id is replaced by one the server never made, right after the submission.
    patched = tmp_path / "generate.sh"
    patched.write_text(script.replace('echo "job $id queued" >&2', f'id={uuid.uuid4()}; echo "job $id queued" >&2'))
    (tmp_path / "_submit.sh").write_text((ROOT / "scripts" / "_submit.sh").read_text())
    r = subprocess.run(
        ["bash", str(patched), "x", "out.png", '"num_inference_steps":2'],
        cwd=tmp_path,
        env=env | {"IMAGEGEN_URL": stack.base_url},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1 and "HTTP 404" in r.stderr and "Traceback" not in r.stderr, r.stderr
