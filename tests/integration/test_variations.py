"""`POST /variations` and `POST /v1/images/variations` against the real stack (tiny Stable
Diffusion worker, so img2img; Kandinsky's image-embedding path is in test_families.py): uploads
as multipart and as base64 JSON, the job lifecycle, and every bad upload as a clear 4xx."""

from __future__ import annotations

import base64
import io
import json
import struct
import time
import uuid
import zlib
from collections.abc import Iterator

import httpx
import openai
import pytest
from PIL import Image
from rq import Queue
from rq.serializers import JSONSerializer

from app.core.jobs import TASK_VARIATIONS, queue_name
from app.core.variations import input_key
from tests.procs import RedisServer, Stack, WebhookReceiver, service_env, start_api, start_worker, wait_for

pytestmark = pytest.mark.integration
DB = 7
FAST = {"num_inference_steps": "4", "width": "32", "height": "32"}


@pytest.fixture(scope="module")
def vstack(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("variations")
    redis_server.client(DB).flushdb()
    env = service_env(f"redis://127.0.0.1:{redis_server.port}/{DB}", tmp, openai_timeout="60")
    worker = start_worker(env, tmp / "worker.log", ready=redis_server.client(DB))
    api, base = start_api(env, tmp / "api.log")
    stack = Stack(redis=redis_server, base_url=base, api=api, workers=[worker], env=env)
    yield stack
    stack.close()
    assert "Traceback" not in api.output(), api.output()[-3000:]


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


SOURCE = encode(Image.new("RGB", (60, 40), (30, 160, 220)))


def header_only_png(width: int, height: int) -> bytes:
    data = bytearray(encode(Image.new("RGB", (1, 1))))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def upload(http: httpx.Client, data: bytes = SOURCE, ctype: str = "image/png", **fields: str) -> httpx.Response:
    return http.post("/variations", files={"image": ("in", data, ctype)}, data=FAST | fields)


def test_multipart_upload_runs_as_an_ordinary_job(vstack: Stack) -> None:
    with vstack.client() as http:
        r = upload(http, num_images="2", seed="9", prompt="a blue square")
        assert r.status_code == 202, r.text
        job = r.json()
        assert r.headers["location"] == f"/jobs/{job['id']}"
        assert job["params"]["strength"] == 0.75 and job["params"]["prompt"] == "a blue square"
        with httpx.stream("GET", f"{vstack.base_url}/jobs/{job['id']}/events", timeout=60) as events:
            kinds = [json.loads(line[5:])["type"] for line in events.iter_lines() if line.startswith("data:")]
        assert kinds[0] == "queued" and kinds[-1] == "succeeded", kinds
        done = vstack.wait(http, job["id"])
        assert done["status"] == "succeeded" and done["progress"] == {"step": 4, "total": 4}
        assert [i["seed"] for i in done["images"]] == [9, 10]
        images = [png(http.get(i["url"]).content) for i in done["images"]]
        assert all(i.size == (32, 32) for i in images) and images[0].text["seed"] == "9"
        assert job["id"] in [j["id"] for j in http.get("/jobs").json()["jobs"]]
    # The input image is dropped once the job has ended.
    assert not vstack.redis.client(DB).exists(input_key(job["id"]))


def test_json_base64_and_data_urls_match_the_multipart_result(vstack: Stack) -> None:
    body = {"seed": 3, "strength": 0.5, "num_inference_steps": 4, "width": 32, "height": 32}
    with vstack.client() as http:
        a = vstack.wait(http, upload(http, seed="3", strength="0.5").json()["id"])
        encoded = base64.b64encode(SOURCE).decode()
        b = vstack.wait(http, http.post("/variations", json=body | {"image": encoded}).json()["id"])
        url = "data:image/png;base64," + encoded
        c = vstack.wait(http, http.post("/variations", json=body | {"image": url}).json()["id"])
        wrapped = base64.encodebytes(SOURCE).decode()  # lines of 76 characters, as `base64` prints them
        d = vstack.wait(http, http.post("/variations", json=body | {"image": wrapped}).json()["id"])
        blobs = [http.get(j["images"][0]["url"]).content for j in (a, b, c, d)]
        assert blobs[0] == blobs[1] == blobs[2] == blobs[3]  # same re-encoded input, seed and parameters
        # img2img ran half the steps, yet progress ends at the requested total.
        assert a["progress"] == {"step": 4, "total": 4}
        stronger = vstack.wait(http, upload(http, seed="3", strength="1.0").json()["id"])
        assert http.get(stronger["images"][0]["url"]).content != blobs[0]


def test_jpeg_and_webp_inputs(vstack: Stack) -> None:
    with vstack.client() as http:
        for fmt, ctype in (("JPEG", "image/jpeg"), ("WEBP", "image/webp")):
            r = upload(http, encode(Image.new("RGB", (50, 50), (200, 0, 0)), fmt), ctype)
            assert r.status_code == 202, r.text
            assert vstack.wait(http, r.json()["id"])["status"] == "succeeded"


def test_bad_uploads_are_clear_4xx(vstack: Stack) -> None:
    noise = encode(Image.effect_noise((128, 128), 60).convert("RGB"))
    cases: list[tuple[str, dict, int, str]] = [
        ("truncated", {"files": {"image": ("a.png", noise[: len(noise) // 2], "image/png")}}, 422, "invalid_image"),
        ("not an image", {"files": {"image": ("a.png", b"plain text", "image/png")}}, 415, "unsupported_media_type"),
        ("declared text", {"files": {"image": ("a.txt", SOURCE, "text/plain")}}, 415, "unsupported_media_type"),
        ("gif", {"files": {"image": ("a.gif", encode(Image.new("P", (4, 4)), "GIF"), "image/gif")}}, 415, ""),
        ("huge", {"files": {"image": ("a.png", header_only_png(5000, 10), "image/png")}}, 422, "invalid_image"),
        ("bomb", {"files": {"image": ("a.png", header_only_png(100_000, 100_000), "image/png")}}, 422, ""),
        ("over 4 MB", {"files": {"image": ("a.png", b"\x89PNG" + b"\0" * (4 << 20), "image/png")}}, 413, ""),
        ("no image", {"data": {"seed": "1"}, "files": {"other": ("x", b"x", "text/plain")}}, 422, ""),
        ("image as text", {"data": {"image": "abc"}, "files": {"x": ("x", b"", "text/plain")}}, 422, ""),
        ("unknown field", {"files": {"image": ("a.png", SOURCE, "image/png")}, "data": {"nope": "1"}}, 422, ""),
        ("strength", {"files": {"image": ("a.png", SOURCE, "image/png")}, "data": {"strength": "1.5"}}, 422, ""),
        ("size", {"files": {"image": ("a.png", SOURCE, "image/png")}, "data": {"width": "30"}}, 422, ""),
        ("model", {"files": {"image": ("a.png", SOURCE, "image/png")}, "data": {"model": "nope"}}, 422, ""),
        ("json no image", {"json": {"seed": 1}}, 422, "validation_error"),
        ("json bad base64", {"json": {"image": "@@@not base64"}}, 422, "validation_error"),
        ("json array", {"json": [1, 2]}, 422, ""),
        ("json bool strength", {"json": {"image": base64.b64encode(SOURCE).decode(), "strength": True}}, 422, ""),
        (
            "malformed json",
            {"content": b"{nope", "headers": {"content-type": "application/json"}},
            400,
            "malformed_json",
        ),
        (
            "deeply nested json",
            {"content": b"[" * 100_000 + b"]" * 100_000, "headers": {"content-type": "application/json"}},
            400,
            "malformed_json",
        ),
        ("text body", {"content": b"hello", "headers": {"content-type": "text/plain"}}, 415, ""),
        ("too big body", {"content": b"x" * (7 << 20), "headers": {"content-type": "application/json"}}, 413, ""),
    ]
    with vstack.client() as http:
        for name, kwargs, status, code in cases:
            r = http.post("/variations", **kwargs)
            assert r.status_code == status, (name, r.status_code, r.text)
            err = r.json()["error"]
            assert err["message"] and (not code or err["code"] == code), (name, err)
        # The usual small limit still applies elsewhere.
        r = http.post(
            "/generate", content=b'{"prompt":"' + b"a" * 200_000 + b'"}', headers={"content-type": "application/json"}
        )
        assert r.status_code == 413


def test_webhook_gets_the_variation_events(vstack: Stack) -> None:
    receiver = WebhookReceiver()
    try:
        with vstack.client() as http:
            r = upload(http, webhook=receiver.url, webhook_events="start,completed")
            assert r.status_code == 202, r.text
            vstack.wait(http, r.json()["id"])
        wait_for(lambda: len(receiver.accepted) == 2, 30, "two webhook deliveries")
        types = [json.loads(body)["type"] for _, body in receiver.accepted]
        assert types == ["started", "succeeded"], types
    finally:
        receiver.close()


def test_low_strength_still_runs_a_step(vstack: Stack) -> None:
    # 2 steps x strength 0.1 would leave no step (one-step turbo models hit this at any strength).
    with vstack.client() as http:
        job = vstack.wait(http, upload(http, strength="0.1", num_inference_steps="2").json()["id"])
    assert job["status"] == "succeeded", job
    assert job["progress"] == {"step": 2, "total": 2}
    with vstack.client() as http:
        # The weakest strength the API takes stretches the schedule to the training timesteps and
        # no further (1e-9 asked for 10^9 steps and exhausted the machine's memory): still one step.
        job = vstack.wait(http, upload(http, strength="0.001", num_inference_steps="2").json()["id"])
        assert job["status"] == "succeeded", job
        r = upload(http, strength="1e-9")
        assert r.status_code == 422 and "strength" in r.json()["error"]["message"], r.text


def test_cancel_a_running_variation(vstack: Stack) -> None:
    with vstack.client() as http:
        fields = {"num_inference_steps": "150", "width": "128", "height": "128", "strength": "1.0"}
        r = http.post("/variations", files={"image": ("in", SOURCE, "image/png")}, data=fields)
        job_id = r.json()["id"]
        deadline = time.monotonic() + 60
        while (view := http.get(f"/jobs/{job_id}").json())["progress"]["step"] < 1:
            assert view["status"] in ("queued", "running") and time.monotonic() < deadline, view
            time.sleep(0.02)
        assert http.delete(f"/jobs/{job_id}").status_code == 202
        done = vstack.wait(http, job_id)
    assert done["status"] == "canceled" and done["progress"]["step"] < 150
    assert not vstack.redis.client(DB).exists(input_key(job_id))


def test_planted_job_without_an_input_fails_cleanly(vstack: Stack) -> None:
    queue = Queue(queue_name("tiny-random"), connection=vstack.redis.client(DB), serializer=JSONSerializer)
    job = queue.enqueue(TASK_VARIATIONS, kwargs={"params": {"seed": 1}}, job_id=str(uuid.uuid4()))
    with vstack.client() as http:
        done = vstack.wait(http, job.id)
    assert done["status"] == "failed" and done["error"]["code"] == "invalid_params"
    assert "input image" in done["error"]["message"]
    # With an input but parameters the worker refuses: the input goes with the job, as when it runs.
    redis = vstack.redis.client(DB)
    refused = str(uuid.uuid4())
    redis.set(input_key(refused), SOURCE, ex=600)
    queue.enqueue(TASK_VARIATIONS, kwargs={"params": {"seed": 1, "width": 12345}}, job_id=refused)
    with vstack.client() as http:
        done = vstack.wait(http, refused)
    assert done["status"] == "failed" and done["error"]["code"] == "invalid_params"
    assert not redis.exists(input_key(refused))


def test_an_input_over_the_upload_limit_as_png_still_runs(vstack: Stack) -> None:
    """The API stores uploads as PNGs of up to the largest size allowed: a photo at 1536 px takes
    more bytes as PNG than the 4 MiB upload limit, and the worker refused its own API's PNG."""
    import random

    rng = random.Random(0)
    noise = Image.frombytes("RGB", (1300, 1300), rng.randbytes(1300 * 1300 * 3))
    data = encode(noise)
    assert len(data) > 4 * 1024 * 1024
    redis = vstack.redis.client(DB)
    queue = Queue(queue_name("tiny-random"), connection=redis, serializer=JSONSerializer)
    job_id = str(uuid.uuid4())
    redis.set(input_key(job_id), data, ex=600)
    params = {"seed": 1, "num_inference_steps": 4, "width": 32, "height": 32}
    queue.enqueue(TASK_VARIATIONS, kwargs={"params": params}, job_id=job_id)
    with vstack.client() as http:
        done = vstack.wait(http, job_id)
    assert done["status"] == "succeeded", done


def test_openai_variations_with_an_idempotency_key_make_one_job(vstack: Stack) -> None:
    """The SDK sends a call again when its connection breaks; with an Idempotency-Key the repeat
    waits for the job the first queued (each call queued its own)."""
    url = vstack.base_url + "/v1/images/variations"
    key = {"Idempotency-Key": str(uuid.uuid4())}
    form = {"size": "32x32", "num_inference_steps": "2", "response_format": "b64_json"}
    upload = {"image": ("in.png", SOURCE, "image/png")}
    first = httpx.post(url, files=upload, data=form, headers=key, timeout=60)
    again = httpx.post(url, files=upload, data=form, headers=key, timeout=60)
    assert first.status_code == again.status_code == 200, (first.text, again.text)
    assert first.headers["x-imagegen-job-id"] == again.headers["x-imagegen-job-id"]
    assert first.json()["data"] == again.json()["data"]
    other = {"image": ("in.png", encode(Image.new("RGB", (60, 40), (200, 20, 20))), "image/png")}
    conflict = httpx.post(url, files=other, data=form, headers=key, timeout=60)
    assert conflict.status_code == 409 and conflict.json()["error"]["code"] == "idempotency_conflict", conflict.text


def test_openai_sdk_create_variation(vstack: Stack) -> None:
    client = openai.OpenAI(base_url=vstack.base_url + "/v1", api_key="sk-test", max_retries=0, timeout=60)
    result = client.images.create_variation(
        image=("in.png", SOURCE, "image/png"),
        n=2,
        size="32x32",
        response_format="b64_json",
        extra_body={"seed": 21, "num_inference_steps": 4},
    )
    assert result.data is not None and len(result.data) == 2
    images = [png(base64.b64decode(d.b64_json or "")) for d in result.data]
    assert [i.size for i in images] == [(32, 32)] * 2 and [i.text["seed"] for i in images] == ["21", "22"]
    with pytest.raises(openai.APIStatusError) as info:
        client.images.create_variation(image=("in.png", b"not an image", "image/png"))
    assert info.value.status_code == 415 and info.value.body["param"] == "image"  # type: ignore[index]
    assert info.value.body["code"] == "unsupported_media_type"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as bad:
        client.images.create_variation(image=("in.png", SOURCE, "image/png"), size="33x32")
    assert bad.value.body["param"] == "size"  # type: ignore[index]
    # `param` names the field at fault, not always `image` (as it once did).
    url = vstack.base_url + "/v1/images/variations"
    stray = httpx.post(url, files={"file": ("in.png", SOURCE, "image/png")})
    assert stray.status_code == 400 and stray.json()["error"]["param"] == "file", stray.text
    assert httpx.post(url, json=[1, 2]).json()["error"]["param"] is None
    with pytest.raises(openai.BadRequestError) as missing:
        client.images.create_variation(image=("in.png", SOURCE, "image/png"), model="dall-e-2")
    assert missing.value.code == "model_not_found"
