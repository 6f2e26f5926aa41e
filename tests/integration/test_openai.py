"""`/v1/images/generations` driven by the official `openai` SDK against the real stack."""

from __future__ import annotations

import base64
import io
import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

from tests.procs import Stack, service_env, start_api

pytestmark = pytest.mark.integration
FAST = {"num_inference_steps": 2}


def sdk(base_url: str, timeout: float = 120) -> openai.OpenAI:
    # Any key works; no retries so a failure shows as itself, not as a re-submitted job.
    return openai.OpenAI(base_url=base_url + "/v1", api_key="sk-test", max_retries=0, timeout=timeout)


def png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def test_b64_json_two_images(stack: Stack) -> None:
    result = sdk(stack.base_url).images.generate(
        prompt="a red circle on a blue background",
        n=2,
        size="32x32",
        response_format="b64_json",
        user="tester",
        extra_body={"seed": 7, "negative_prompt": "blurry", "guidance_scale": 2.0, **FAST},
    )
    assert isinstance(result.created, int) and abs(result.created - time.time()) < 300
    assert result.data is not None and len(result.data) == 2
    images = [png(base64.b64decode(d.b64_json or "")) for d in result.data]
    assert [i.size for i in images] == [(32, 32), (32, 32)]
    assert [i.text["seed"] for i in images] == ["7", "8"]  # image i uses seed + i
    assert all(d.url is None for d in result.data)


def test_the_current_sdks_other_arguments_are_taken_or_refused_by_name(stack: Stack) -> None:
    """The SDK's newer arguments were all 400 `unknown_param`: those with nothing to do here are
    taken, and values that cannot be honoured (transparency, JPEG, streaming) refused by name."""
    client = sdk(stack.base_url)
    result = client.images.generate(
        prompt="x",
        size="32x32",
        response_format="b64_json",
        output_format="png",
        background="opaque",
        moderation="low",
        output_compression=80,
        safety_identifier="user-1234",
        stream=False,
        extra_body=FAST,
    )
    assert result.data is not None and png(base64.b64decode(result.data[0].b64_json or "")).size == (32, 32)
    for name, value in (("output_format", "jpeg"), ("background", "transparent"), ("stream", True)):
        with pytest.raises(openai.BadRequestError) as info:
            client.images.generate(prompt="x", **{name: value})  # type: ignore[arg-type]
        assert info.value.response.json()["error"]["param"] == name
    served = client.models.retrieve("tiny-random")
    assert served.id == "tiny-random" and served.object == "model"
    for name in ("dall-e-3", "stabilityai/sdxl-turbo"):  # hub ids (IMAGEGEN_MODEL may be one) have a slash
        with pytest.raises(openai.NotFoundError) as missing:
            client.models.retrieve(name)
        assert missing.value.response.json()["error"]["code"] == "model_not_found", name
    with httpx.Client(base_url=stack.base_url) as http:
        r = http.get("/v1/models/stabilityai%2Fsdxl-turbo")
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        assert "stabilityai/sdxl-turbo" in r.json()["error"]["message"]
        # Any text reaches the route, a newline too (schema fuzzing found our own 404 shape there).
        r = http.get("/v1/models/a%2Fb%0Ac%C3%BF")
        assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error", r.text


def test_url_format_points_at_our_image_endpoint(stack: Stack) -> None:
    raw = sdk(stack.base_url).images.with_raw_response.generate(
        model="tiny-random", prompt="a yellow triangle", n=1, size="32x32", response_format="url", extra_body=FAST
    )
    job_id = raw.headers["x-imagegen-job-id"]
    result = raw.parse()
    assert result.data is not None
    [datum] = result.data
    assert datum.url == f"{stack.base_url}/jobs/{job_id}/images/0" and datum.b64_json is None
    r = httpx.get(datum.url, timeout=10)
    assert r.status_code == 200 and png(r.content).size == (32, 32)


def test_image_links_use_the_public_url_when_one_is_set(stack: Stack, tmp_path: Path) -> None:
    """Behind a proxy the links took the API's own address (or whatever `Host` a client sent);
    IMAGEGEN_PUBLIC_URL names the address clients use, with its path prefix."""
    public = "https://images.example.com/imagegen"
    api, base = start_api(stack.env | {"IMAGEGEN_PUBLIC_URL": public + "/"}, tmp_path / "api.log")
    try:
        headers = {"Prefer": "wait=50", "Host": "evil.example"}
        job = httpx.post(f"{base}/generate", json={"prompt": "x", "width": 32, "height": 32, **FAST}, headers=headers)
        assert job.status_code == 200, job.text
        assert job.json()["images"][0]["url"] == f"{public}/jobs/{job.json()['id']}/images/0"
        # The job's own address too: `Location` was /jobs/<id>, which the proxy did not serve.
        assert job.headers["location"] == f"{public}/jobs/{job.json()['id']}"
        queued = httpx.post(f"{base}/generate", json={"prompt": "z", **FAST})
        assert queued.status_code == 202 and queued.headers["location"] == f"{public}/jobs/{queued.json()['id']}"
        r = httpx.post(f"{base}/v1/images/generations", json={"prompt": "y", "size": "32x32", **FAST}, timeout=60)
        assert r.json()["data"][0]["url"] == f"{public}/jobs/{r.headers['x-imagegen-job-id']}/images/0"
    finally:
        api.stop()


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"size": "33x33"}, "size"),  # not a multiple of 8
        ({"size": "4096x4096"}, "size"),  # over the server's bounds
        ({"size": "512x512"}, "size"),  # over the model's bound (8× its native size)
        ({"size": "big"}, "size"),
        ({"size": "\uff16\uff14x\uff16\uff14"}, "size"),  # fullwidth digits
        ({"model": "m" * 300}, "model"),
        ({"n": 11}, "n"),
        ({"n": True}, "n"),  # taken as 1 by pydantic's lax mode
        ({"model": "dall-e-3"}, "model"),
        ({"extra_body": {"num_inference_steps": 0}}, "num_inference_steps"),
        ({"extra_body": {"surprise": 1}}, "surprise"),
        ({"prompt": "\f "}, "prompt"),  # only whitespace: our check, not OpenAI's schema (was a 500)
    ],
)
def test_bad_requests_raise_bad_request_error(stack: Stack, kwargs: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        sdk(stack.base_url).images.generate(**{"prompt": "x", **kwargs})
    assert info.value.status_code == 400
    error = info.value.response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]
    if param == "size":  # one code whichever check refused it (the model's bound was `validation_error`)
        assert error["code"] == "invalid_size", error


def test_null_n_and_response_format_and_size_auto_mean_the_defaults(stack: Stack) -> None:
    """OpenAI's spec has `n` and `response_format` nullable with defaults, and its SDK sends `null`
    for a None; `size="auto"` is in the SDK's type (gpt-image-1's default). All three were 400s."""
    raw = sdk(stack.base_url).images.with_raw_response.generate(
        prompt="x", n=None, response_format=None, size="auto", extra_body=FAST
    )
    sent = json.loads(raw.http_request.content)
    assert sent["n"] is None and sent["response_format"] is None and sent["size"] == "auto"
    result = raw.parse()
    assert result.data is not None
    [datum] = result.data  # n: 1
    assert datum.url and datum.b64_json is None  # response_format: url
    with stack.client() as http:
        [native] = [m for m in http.get("/models").json()["models"] if m["default"]]
        image = http.get(datum.url)
    assert image.status_code == 200 and png(image.content).size == (native["width"], native["height"])


def test_error_shapes_on_v1_and_elsewhere(stack: Stack) -> None:
    with stack.client() as http:
        r = http.post("/v1/images/generations", content=b"{nope", headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
        r = http.post("/v1/images/generations", json={"n": 1})
        assert r.status_code == 400
        assert r.json()["error"] == {
            "message": "Missing required parameter: 'prompt'.",
            "type": "invalid_request_error",
            "param": "prompt",
            "code": "missing_required_param",
        }
        r = http.post("/v1/images/generations", headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["message"] == "The request has no JSON body."
        r = http.post("/v1/images/generations", content=b" " * (1 << 20), headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"

        def chunks():
            yield b'{"prompt": "'
            for _ in range(80):
                yield b"x" * 1024

        r = http.post("/v1/images/generations", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large", r.text  # was a 400
        for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
            headers = {"content-type": content_type} if content_type else {}
            r = http.post("/v1/images/generations", content=b'{"prompt": "x"}', headers=headers)
            assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type", r.text

        def upload():
            yield b'--b\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n'
            yield b"Content-Type: image/png\r\n\r\n"
            for _ in range(7 * 1024):
                yield b"x" * 1024

        multipart = {"content-type": "multipart/form-data; boundary=b"}
        r = http.post("/v1/images/variations", content=upload(), headers=multipart)
        assert r.status_code == 413, r.text  # chunked, over the upload limit: was a 500
        r = http.post("/v1/images/variations", content=b"hello", headers={"content-type": "text/plain"})
        assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type", r.text
        r = http.get("/v1/images/generations")
        assert r.status_code == 405 and r.headers["allow"] == "POST", r.text
        assert r.json()["error"]["code"] == "method_not_allowed"
        r = http.get("/v1/nowhere")
        assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
        # The rest of the API keeps its own envelope.
        r = http.post("/generate", json={"prompt": "x", "n": 2})
        assert r.status_code == 422 and set(r.json()["error"]) >= {"code", "message"}
        assert "type" not in r.json()["error"]
        models = http.get("/v1/models").json()
        assert [m["id"] for m in models["data"]] == ["tiny-random"]


def test_canceled_job_is_a_conflict(stack: Stack) -> None:
    outcome: dict[str, object] = {}

    def call() -> None:
        try:
            sdk(stack.base_url).images.generate(
                prompt="to be canceled", size="64x64", extra_body={"num_inference_steps": 150}
            )
        except openai.APIStatusError as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=call)
    thread.start()
    with stack.client() as http:
        job_id = None
        deadline = time.monotonic() + 60
        while job_id is None and time.monotonic() < deadline:
            for job in http.get("/jobs", params={"limit": 20}).json()["jobs"]:
                if job["params"].get("prompt") == "to be canceled" and job["status"] in ("queued", "running"):
                    job_id = job["id"]
            time.sleep(0.05)
        assert job_id, "the /v1 request never queued a job"
        assert http.delete(f"/jobs/{job_id}").status_code in (200, 202)
    thread.join(120)
    assert not thread.is_alive()
    error = outcome.get("error")
    assert isinstance(error, openai.ConflictError), outcome
    assert error.response.json()["error"]["code"] == "canceled"
    # The job existed: OpenAI's SDKs retried a 409 by queueing another one.
    assert error.response.headers["x-should-retry"] == "false"
    assert error.response.headers["x-imagegen-job-id"] == job_id


def test_with_no_live_worker_the_call_is_refused_at_once(stack: Stack, tmp_path: Path) -> None:
    """It waited its whole time-out (120 s by default) for a job nobody would take, then said the
    job "keeps going", and every SDK retry queued one more."""
    env = service_env(f"redis://127.0.0.1:{stack.redis.port}/7", tmp_path)  # a database no worker serves
    api, base = start_api(env, tmp_path / "api.log")
    try:
        started = time.monotonic()
        with pytest.raises(openai.APIStatusError) as info:
            sdk(base).images.generate(prompt="nobody will draw this", size="32x32")
        assert time.monotonic() - started < 10
        assert info.value.status_code == 503 and int(info.value.response.headers["retry-after"]) > 0
        assert "no worker" in info.value.response.json()["error"]["message"]
        assert httpx.get(f"{base}/jobs", timeout=10).json()["jobs"] == []  # nothing was queued
        r = httpx.post(f"{base}/v1/images/generations", json={"prompt": "x", "size": "7x7"}, timeout=10)
        assert r.status_code == 400  # bad input is still a 400 first
    finally:
        api.stop()


def _long_job(http: httpx.Client) -> str:
    """A job that keeps the stack's one worker busy for a while (canceled by the caller)."""
    # Seconds of work even on a fast CPU (4 images at 64 px finished within a second on one).
    body = {"prompt": "a long one", "num_images": 8, "num_inference_steps": 150, "width": 128, "height": 128}
    job = http.post("/generate", json=body).json()
    deadline = time.monotonic() + 30
    while http.get(f"/jobs/{job['id']}").json()["status"] != "running" and time.monotonic() < deadline:
        time.sleep(0.05)
    return job["id"]


def test_timeout_is_a_504_that_the_sdk_does_not_retry_and_the_job_goes_on(stack: Stack, tmp_path: Path) -> None:
    api, base = start_api(stack.env | {"IMAGEGEN_OPENAI_TIMEOUT": "1"}, tmp_path / "api.log")
    with stack.client() as http:
        busy = _long_job(http)
        try:
            # With the SDK's default retries: the answer says not to, so one call queues one job.
            client = openai.OpenAI(base_url=base + "/v1", api_key="sk-test", max_retries=2, timeout=30)
            with pytest.raises(openai.APIStatusError) as info:
                client.images.generate(prompt="waits behind the long one", size="32x32")
            assert info.value.status_code == 504
            assert info.value.response.headers["x-should-retry"] == "false"
            error = info.value.response.json()["error"]
            assert error["code"] == "timeout" and error["type"] == "server_error"
            assert "still waiting in the queue (position 0)" in error["message"]
            job_id = info.value.response.headers["x-imagegen-job-id"]
            assert http.get(f"/jobs/{job_id}").json()["status"] == "queued"
            mine = [
                j
                for j in http.get("/jobs", params={"limit": 50}).json()["jobs"]
                if j["params"]["prompt"] == "waits behind the long one"
            ]
            assert len(mine) == 1
            http.delete(f"/jobs/{job_id}")
        finally:
            http.delete(f"/jobs/{busy}")
            api.stop()


def test_api_shutdown_mid_wait_is_a_503_naming_the_job(stack: Stack, tmp_path: Path) -> None:
    api, base = start_api(stack.env, tmp_path / "api.log")
    with stack.client() as http:
        busy = _long_job(http)
        try:
            with ThreadPoolExecutor(1) as pool:
                pending = pool.submit(
                    httpx.post,
                    base + "/v1/images/generations",
                    json={"prompt": "cut short", "size": "32x32"},
                    timeout=60,
                )
                time.sleep(1.0)
                api.popen.send_signal(signal.SIGTERM)
                r = pending.result()
            assert r.status_code == 503, r.text
            assert r.headers["x-should-retry"] == "false" and r.headers["retry-after"]
            job_id = r.headers["x-imagegen-job-id"]
            assert "shutting down" in r.json()["error"]["message"] and job_id in r.json()["error"]["message"]
            assert http.get(f"/jobs/{job_id}").json()["status"] == "queued"
            http.delete(f"/jobs/{job_id}")
        finally:
            http.delete(f"/jobs/{busy}")
            api.stop()


def test_an_sdk_retry_with_an_idempotency_key_waits_for_the_first_job(stack: Stack, tmp_path: Path) -> None:
    """The SDK sends a call again when its connection breaks (the API killed mid-wait): each retry
    queued another job. With an Idempotency-Key (`extra_headers`) the retry waits for the first."""
    from tests.procs import free_port

    port = free_port()
    api, base = start_api(stack.env, tmp_path / "api1.log", port=port)
    client = openai.OpenAI(base_url=base + "/v1", api_key="sk-test", max_retries=8, timeout=120)
    key = f"draw-{time.monotonic_ns()}"
    with stack.client() as http:
        busy = _long_job(http)  # the call's job waits behind it: the API is killed while it waits
        try:
            with ThreadPoolExecutor(1) as pool:
                pending = pool.submit(
                    client.images.generate,
                    prompt="kept once",
                    size="32x32",
                    response_format="b64_json",
                    extra_headers={"Idempotency-Key": key},
                    extra_body=FAST,
                )
                deadline = time.monotonic() + 30
                while not any(j["params"]["prompt"] == "kept once" for j in http.get("/jobs").json()["jobs"]):
                    assert time.monotonic() < deadline, "the call's job never appeared"
                    time.sleep(0.05)
                api.stop(signal.SIGKILL)
                api, _ = start_api(stack.env, tmp_path / "api2.log", port=port)
                http.delete(f"/jobs/{busy}")
                result = pending.result(timeout=120)
            assert result.data is not None and png(base64.b64decode(result.data[0].b64_json or "")).size == (32, 32)
            listed = http.get("/jobs", params={"limit": 100}).json()["jobs"]
            made = [j for j in listed if j["params"]["prompt"] == "kept once"]
            assert len(made) == 1 and made[0]["status"] == "succeeded", made
            # The same key with another body is refused in OpenAI's shape (and not retried).
            r = httpx.post(base + "/v1/images/generations", json={"prompt": "another", "size": "32x32"},
                           headers={"Idempotency-Key": key}, timeout=30)  # fmt: skip
            assert r.status_code == 409 and r.json()["error"]["code"] == "idempotency_conflict", r.text
        finally:
            http.delete(f"/jobs/{busy}")
            api.stop()
