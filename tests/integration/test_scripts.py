"""scripts/generate.sh and scripts/follow.sh (curl helpers) against a scripted HTTP server in the
test: odd answers (drops, hangs, 429/503, errors on the event stream) that the real stack does not
give on demand. The happy paths against the real stack are in test_client_cli and test_quickstart."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.procs import ROOT

SCRIPTS = ROOT / "scripts"
PNG = b"\x89PNG\r\n\x1a\nnot really"
JOB = "job-1"


def job(status: str, step: int = 0) -> dict:
    return {"id": JOB, "status": status, "progress": {"step": step, "total": 4}}


def event(n: int, kind: str) -> str:
    data = {"type": kind, "job_id": JOB, "status": kind, "progress": {"step": n, "total": 4}}
    return f"id: {n}\nevent: {kind}\ndata: {json.dumps(data)}\n\n"


@dataclass
class Reply:
    status: int = 200
    body: bytes | dict | str = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    stream: list[str | float] | None = None  # SSE chunks, and pauses (seconds) between them
    abort: bool = False  # the stream ends without its last chunk (curl: exit 18)
    hold: bool = False  # the stream stays open (keepalives) until the client goes
    hang: bool = False  # accepted, never answered


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]


class Fake(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, respond: Callable[[Seen], Reply | None]) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.respond = respond
        self.seen: list[Seen] = []
        self.stopping = threading.Event()
        self.url = f"http://127.0.0.1:{self.server_address[1]}"

    def calls(self, method: str, path: str) -> list[Seen]:
        return [s for s in self.seen if s.method == method and s.path.split("?")[0] == path]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Fake

    def log_message(self, *args: object) -> None:
        pass

    def handle_one(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        path = self.requestline.split()[1]  # as sent: http.server turns a leading // into /
        seen = Seen(self.command, path, {k.lower(): v for k, v in self.headers.items()})
        self.server.seen.append(seen)
        reply = self.server.respond(seen) or Reply(404, {"error": {"code": "not_found", "message": "no route"}})
        time.sleep(reply.delay)
        if reply.hang:
            self.server.stopping.wait(60)
            self.close_connection = True
            return
        self.send_response(reply.status)
        for k, v in reply.headers.items():
            self.send_header(k, v)
        if reply.stream is None:
            body = reply.body
            if isinstance(body, dict):
                body = json.dumps(body).encode()
            elif isinstance(body, str):
                body = body.encode()
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        try:
            for item in reply.stream:
                if isinstance(item, float):
                    time.sleep(item)
                else:
                    self.chunk(item)
            while reply.hold and not self.server.stopping.wait(0.2):
                self.chunk("event: keepalive\n\n")
            if reply.abort:
                self.close_connection = True
            else:
                self.wfile.write(b"0\r\n\r\n")
        except OSError:
            self.close_connection = True

    def chunk(self, text: str) -> None:
        data = text.encode()
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    do_GET = do_POST = do_DELETE = handle_one


@pytest.fixture
def serve() -> Iterator[Callable[[Callable[[Seen], Reply | None]], Fake]]:
    servers: list[Fake] = []

    def start(respond: Callable[[Seen], Reply | None]) -> Fake:
        fake = Fake(respond)
        threading.Thread(target=fake.serve_forever, daemon=True).start()
        servers.append(fake)
        return fake

    yield start
    for fake in servers:
        fake.stopping.set()
        fake.shutdown()
        fake.server_close()


def clean_env(url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEGEN_")}
    return env | {"IMAGEGEN_URL": url} | extra


def run(argv: list[str], env: dict[str, str], cwd: Path, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def generate(fake_url: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return run([str(SCRIPTS / "generate.sh"), "x", "out.png"], clean_env(fake_url, **env), tmp_path)


def follow(fake_url: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return run([str(SCRIPTS / "follow.sh"), "x"], clean_env(fake_url, **env), tmp_path)


def routes(
    polls: list[Reply] | None = None,
    events: list[Reply] | None = None,
    submits: list[Reply] | None = None,
    delay: float = 0.0,
) -> Callable[[Seen], Reply | None]:
    """A job that succeeds at once, unless `polls`/`events`/`submits` script the answers in turn
    (the last one repeats)."""
    polls = polls or [Reply(body=job("succeeded", 4))]
    events = events or [Reply(stream=[event(1, "queued"), event(2, "succeeded")])]
    submits = submits or [Reply(202, job("queued"), {"location": f"/jobs/{JOB}"})]
    counts = {"poll": 0, "events": 0, "submit": 0}

    def pick(kind: str, replies: list[Reply]) -> Reply:
        n = counts[kind] = counts[kind] + 1
        return replies[min(n, len(replies)) - 1]

    def respond(req: Seen) -> Reply | None:
        path = req.path.split("?")[0]
        if req.method == "POST" and path == "/generate":
            reply = pick("submit", submits)
        elif req.method == "GET" and path == f"/jobs/{JOB}":
            reply = pick("poll", polls)
        elif req.method == "GET" and path == f"/jobs/{JOB}/events":
            reply = pick("events", events)
        elif req.method == "GET" and path == f"/jobs/{JOB}/images/0":
            reply = Reply(body=PNG, headers={"content-type": "image/png"})
        elif req.method == "DELETE" and path == f"/jobs/{JOB}":
            reply = Reply(202, job("running"))
        else:
            return None
        if delay and not reply.delay:
            reply = Reply(**{**reply.__dict__, "delay": delay})
        return reply

    return respond


def command_lines() -> list[bytes]:
    lines = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            with contextlib.suppress(OSError):  # gone since listed
                lines.append(Path(f"/proc/{pid}/cmdline").read_bytes())
    return lines


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs /proc")
@pytest.mark.parametrize("script", ["generate.sh", "follow.sh"])
def test_the_api_key_is_on_no_command_line(serve, tmp_path: Path, script: str) -> None:
    """`-H "authorization: Bearer $KEY"` put the key in curl's argv, which `ps` shows to every user."""
    key = r"sk-secret-0123456789\\abc\"def"  # with what a curl config quotes
    slow_events = [Reply(stream=[event(1, "queued"), 0.4, event(2, "started"), 0.4, event(3, "succeeded")])]
    polls = [Reply(body=job("running", 1)), Reply(body=job("running", 2)), Reply(body=job("succeeded", 4))]
    fake = serve(routes(polls=polls, events=slow_events, delay=0.3))
    argv = [str(SCRIPTS / script), "x", *(["out.png"] if script == "generate.sh" else [])]
    proc = subprocess.Popen(
        argv,
        env=clean_env(fake.url, IMAGEGEN_API_KEY=key),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    saw_curl = leaked = False
    deadline = time.monotonic() + 20
    while proc.poll() is None and time.monotonic() < deadline:
        for line in command_lines():
            saw_curl |= line.startswith(b"curl\0")
            leaked |= key.encode() in line
        time.sleep(0.005)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert saw_curl and not leaked
    assert fake.seen and all(s.headers.get("authorization") == f"Bearer {key}" for s in fake.seen)


@pytest.mark.parametrize(("status", "says"), [(404, "not_found"), (401, "missing API key"), (410, "expired")])
def test_follow_fails_on_an_http_error_with_the_body_on_stderr(serve, tmp_path: Path, status: int, says: str) -> None:
    """The events request had no --fail: the error JSON went to stdout, and the script ended 0."""
    error = Reply(status, {"error": {"code": says.replace(" ", "_"), "message": says}})
    fake = serve(routes(events=[error]))
    r = follow(fake.url, tmp_path)
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert r.stdout == "" and f"HTTP {status}" in r.stderr and says in r.stderr
    assert len(fake.calls("GET", f"/jobs/{JOB}/events")) == 1  # not retried


def test_follow_retries_503_after_retry_after_then_fails(serve, tmp_path: Path) -> None:
    busy = Reply(503, {"error": {"code": "unavailable", "message": "draining"}}, {"retry-after": "0"})
    fake = serve(routes(events=[busy]))
    r = follow(fake.url, tmp_path)
    assert r.returncode == 1 and "HTTP 503" in r.stderr and "draining" in r.stderr, r.stderr
    assert len(fake.calls("GET", f"/jobs/{JOB}/events")) == 6  # one try and 5 more, no more


@pytest.mark.parametrize(("last", "code"), [("succeeded", 0), ("failed", 3), ("canceled", 4)])
def test_follow_exits_by_the_jobs_outcome(serve, tmp_path: Path, last: str, code: int) -> None:
    fake = serve(routes(events=[Reply(stream=[event(1, "queued"), "event: keepalive\n\n", event(2, last)])]))
    r = follow(fake.url, tmp_path)
    assert r.returncode == code, (r.returncode, r.stderr)
    assert r.stdout.splitlines()[-3:] == [f"event: {last}", event(2, last).splitlines()[2], ""]


def test_follow_resumes_a_dropped_stream_with_last_event_id(serve, tmp_path: Path) -> None:
    """A dropped stream ended the script with curl's exit 18 (and no way to see the outcome)."""
    first = Reply(stream=["retry: 50\n\n", event(1, "queued"), event(2, "started")], abort=True)
    rest = Reply(stream=[event(3, "progress"), event(4, "succeeded")])
    fake = serve(routes(events=[first, rest]))
    r = follow(fake.url, tmp_path)
    assert r.returncode == 0, (r.returncode, r.stderr)
    kinds = [line.split(":", 1)[1].strip() for line in r.stdout.splitlines() if line.startswith("event:")]
    assert kinds == ["queued", "started", "progress", "succeeded"]
    calls = fake.calls("GET", f"/jobs/{JOB}/events")
    assert len(calls) == 2 and "last-event-id" not in calls[0].headers
    assert calls[1].headers["last-event-id"] == "2"


def test_follow_gives_up_on_a_stream_that_keeps_dropping(serve, tmp_path: Path) -> None:
    fake = serve(routes(events=[Reply(stream=["retry: 10\n\n", event(1, "queued")], abort=True)]))
    r = follow(fake.url, tmp_path)
    assert r.returncode == 1 and "stream lost" in r.stderr, (r.returncode, r.stderr)
    assert len(fake.calls("GET", f"/jobs/{JOB}/events")) == 6


@pytest.mark.parametrize("script", ["generate.sh", "follow.sh"])
def test_a_trailing_slash_on_the_url_is_dropped(serve, tmp_path: Path, script: str) -> None:
    """IMAGEGEN_URL=http://host:8000/ made `//generate`, a 404."""
    fake = serve(routes())
    r = (generate if script == "generate.sh" else follow)(fake.url + "//", tmp_path)
    assert r.returncode == 0, r.stderr
    assert fake.seen and not any(s.path.startswith("//") for s in fake.seen)


@pytest.mark.parametrize("script", ["generate.sh", "follow.sh"])
def test_ctrl_c_cancels_the_job(serve, tmp_path: Path, script: str) -> None:
    """Ctrl-C left the job queued or running on the server."""
    fake = serve(
        routes(polls=[Reply(body=job("running", 1), delay=0.1)], events=[Reply(stream=[event(1, "queued")], hold=True)])
    )
    argv = [str(SCRIPTS / script), "x", *(["out.png"] if script == "generate.sh" else [])]
    proc = subprocess.Popen(
        argv, env=clean_env(fake.url), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not fake.calls("GET", f"/jobs/{JOB}" + ("/events" if script == "follow.sh" else "")):
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        time.sleep(0.3)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
        _, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, (proc.returncode, err)
    assert len(fake.calls("DELETE", f"/jobs/{JOB}")) == 1


def test_without_python3_the_scripts_say_so(serve, tmp_path: Path) -> None:
    """The error was "not JSON fields", about the user's (fine) arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for folder in os.environ["PATH"].split(os.pathsep):
        if not os.path.isdir(folder):
            continue
        for name in os.listdir(folder):
            target = Path(folder) / name
            if not name.startswith("python") and not (bin_dir / name).exists() and os.access(target, os.X_OK):
                (bin_dir / name).symlink_to(target)
    fake = serve(routes())
    for script in ("generate.sh", "follow.sh"):
        argv = ["bash", str(SCRIPTS / script), "x", *(["out.png"] if script == "generate.sh" else [])]
        r = run(argv, clean_env(fake.url, PATH=str(bin_dir)), tmp_path)
        assert r.returncode == 2 and "needs python3" in r.stderr, (r.returncode, r.stderr)
        assert "not JSON" not in r.stderr
    assert fake.seen == []


def curl_wrapper(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """A `curl` first on PATH that logs each call (argv and its -K config) and shortens --max-time
    to 1 s, so a hang the real limit would end shows up in a fast test."""
    bin_dir, log = tmp_path / "wrap", tmp_path / "curl.log"
    bin_dir.mkdir()
    real = subprocess.run(["bash", "-c", "command -v curl"], capture_output=True, text=True, check=True).stdout.strip()
    (bin_dir / "curl").write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        "args = sys.argv[1:]\n"
        "config = ''\n"
        "for i, a in enumerate(args):\n"
        "    if a == '-K':\n"
        "        config = open(args[i + 1]).read()\n"
        "    if i and args[i - 1] == '--max-time':\n"
        "        args[i] = '1'\n"
        f"with open({str(log)!r}, 'a') as f:\n"
        "    f.write(json.dumps({'argv': sys.argv[1:], 'config': config}) + '\\n')\n"
        f"os.execv({real!r}, [{real!r}, *args])\n"
    )
    (bin_dir / "curl").chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}, log


@pytest.mark.parametrize("hang", ["submit", "poll"])
def test_a_hung_server_does_not_hang_generate(serve, tmp_path: Path, hang: str) -> None:
    """No curl call had --connect-timeout or --max-time: a server that accepted and never answered
    held the script forever."""
    env, log = curl_wrapper(tmp_path)
    fake = serve(routes(**{f"{hang}s": [Reply(hang=True)]}))  # type: ignore[arg-type]
    started = time.monotonic()
    r = generate(fake.url, tmp_path, **env)
    assert r.returncode == 1 and "cannot reach" in r.stderr, (r.returncode, r.stderr)
    assert time.monotonic() - started < 10
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert calls and all("connect-timeout" in c["config"] or "--connect-timeout" in c["argv"] for c in calls)


def test_every_curl_call_has_a_time_limit(serve, tmp_path: Path) -> None:
    env, log = curl_wrapper(tmp_path)
    fake = serve(routes(polls=[Reply(body=job("running", 1)), Reply(body=job("succeeded", 4))]))
    assert generate(fake.url, tmp_path, **env).returncode == 0
    assert follow(fake.url, tmp_path, **env).returncode == 0
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(calls) >= 5
    for c in calls:
        assert "connect-timeout" in c["config"] or "--connect-timeout" in c["argv"], c
        streaming = c["argv"][-1].endswith("/events")
        # The event stream has no end to wait for; a silent one (no keepalive) is dropped instead.
        assert ("-y" in c["argv"] or "--speed-time" in c["argv"]) if streaming else "--max-time" in c["argv"], c


@pytest.mark.parametrize(
    ("polls", "submits", "code", "calls", "slept"),
    [
        ([Reply(503, headers={"retry-after": "1"}), Reply(429, headers={"retry-after": "0"}), None], None, 0, 3, 1),
        (None, [Reply(429, {"error": {"message": "100 jobs waiting"}}, {"retry-after": "1"}), None], 0, 1, 1),
        ([Reply(503, "busy", {"retry-after": "0"})], None, 1, 6, 0),
    ],
)
def test_generate_waits_out_429_and_503(
    serve, tmp_path: Path, polls: list, submits: list | None, code: int, calls: int, slept: float
) -> None:
    """The first answer other than 200 ended the script, a 503 while the server restarts included."""
    done = Reply(body=job("succeeded", 4))
    queued = Reply(202, job("queued"))
    fake = serve(
        routes(
            polls=[p or done for p in polls] if polls else None,
            submits=[s or queued for s in submits] if submits else None,
        )
    )
    started = time.monotonic()
    r = generate(fake.url, tmp_path)
    assert r.returncode == code, (r.returncode, r.stderr)
    assert len(fake.calls("GET", f"/jobs/{JOB}")) == calls
    assert time.monotonic() - started >= slept
    if code == 0:
        assert (tmp_path / "out.png").read_bytes() == PNG
    else:
        assert "HTTP 503" in r.stderr and "busy" in r.stderr


def test_a_retry_after_given_as_a_date_waits_a_second(serve, tmp_path: Path) -> None:
    """Its digits were run together ("Wed, 21 Oct 2015 07:28:00 GMT" → 2120150728000) and read as
    more than 60 s: a minute's wait."""
    date = Reply(503, "busy", {"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"})
    fake = serve(routes(polls=[date, Reply(body=job("succeeded", 4))]))
    started = time.monotonic()
    r = generate(fake.url, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "retrying in 1s" in r.stderr and time.monotonic() - started < 30


def test_no_empty_array_expansion_that_bash_3_aborts_on() -> None:
    """macOS /bin/bash (3.2) with `set -u` aborts on `"${auth[@]}"` when the array is empty."""
    for script in ("_submit.sh", "generate.sh", "follow.sh"):
        text = (SCRIPTS / script).read_text()
        bare = re.findall(r'(?<!\+)"\$\{\w+\[@\]\}"', text)
        assert not bare, (script, bare)
