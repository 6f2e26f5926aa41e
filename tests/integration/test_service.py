"""The whole service for real: redis-server, `python -m worker` (tiny model), uvicorn, HTTP."""

from __future__ import annotations

import io
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image
from rq import Queue
from rq.serializers import JSONSerializer

from app.core.jobs import TASK_GENERATE, queue_name
from tests.procs import Stack

pytestmark = pytest.mark.integration
FAST = {"num_inference_steps": 4, "width": 32, "height": 32}


def png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def test_submit_poll_download(stack: Stack) -> None:
    with stack.client() as http:
        r = http.post(
            "/generate",
            json={
                "prompt": "a red circle on a blue background",
                "seed": 7,
                "width": 48,
                "height": 32,
                "num_inference_steps": 5,
            },
        )
        assert r.status_code == 202
        job = r.json()
        assert r.headers["location"] == f"/jobs/{job['id']}"
        assert job["status"] in ("queued", "running")
        assert job["params"]["seed"] == 7
        assert job["params"]["scheduler"]  # filled from the served model's defaults
        done = stack.wait(http, job["id"])
        assert done["status"] == "succeeded", done
        assert done["progress"] == {"step": 5, "total": 5}
        assert done["error"] is None
        assert done["started_at"] and done["finished_at"]
        [ref] = done["images"]
        assert (ref["index"], ref["seed"], ref["width"], ref["height"]) == (0, 7, 48, 32)
        r = http.get(ref["url"])
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        image = png(r.content)
        assert image.size == (48, 32)
        assert image.text["prompt"] == "a red circle on a blue background"
        assert image.text["seed"] == "7"


def test_ten_concurrent_jobs_all_succeed(stack: Stack) -> None:
    with stack.client() as http, ThreadPoolExecutor(10) as pool:
        jobs = list(pool.map(lambda i: stack.submit(http, prompt=f"job {i}", seed=i, **FAST), range(10)))
        assert len({j["id"] for j in jobs}) == 10
        finished = list(pool.map(lambda j: stack.wait(http, j["id"]), jobs))
    assert [j["status"] for j in finished] == ["succeeded"] * 10


def test_num_images_gives_distinct_pngs_with_their_seeds(stack: Stack) -> None:
    with stack.client() as http:
        job = stack.wait(http, stack.submit(http, prompt="four", num_images=4, seed=100, **FAST)["id"])
        assert [img["seed"] for img in job["images"]] == [100, 101, 102, 103]
        blobs = [http.get(img["url"]).content for img in job["images"]]
        assert len(set(blobs)) == 4
        assert all(png(b).size == (32, 32) for b in blobs)


def test_same_seed_gives_identical_bytes_and_missing_seed_is_returned(stack: Stack) -> None:
    with stack.client() as http:
        a, b = (stack.wait(http, stack.submit(http, prompt="same", seed=42, **FAST)["id"]) for _ in range(2))
        assert http.get(a["images"][0]["url"]).content == http.get(b["images"][0]["url"]).content
        c = stack.submit(http, prompt="no seed given", **FAST)
        assert isinstance(c["params"]["seed"], int)
        c = stack.wait(http, c["id"])
        assert c["images"][0]["seed"] == c["params"]["seed"]


def test_long_prompt_is_truncated_with_a_warning(stack: Stack) -> None:
    with stack.client() as http:
        job = stack.wait(http, stack.submit(http, prompt="a red circle " * 40, **FAST)["id"])
    assert job["status"] == "succeeded"
    assert any("77" in w for w in job["warnings"]), job["warnings"]


def test_failed_job_has_a_readable_error_and_worker_keeps_serving(stack: Stack) -> None:
    # A producer that bypasses the API's validation (another client, an older API version).
    queue = Queue(queue_name("tiny-random"), connection=stack.redis.client(1), serializer=JSONSerializer)
    bad = queue.enqueue(
        TASK_GENERATE, kwargs={"params": {"prompt": "x", "width": 12, "seed": 1}}, job_id=str(uuid.uuid4())
    )
    with stack.client() as http:
        job = stack.wait(http, bad.id)
        assert job["status"] == "failed"
        assert job["error"]["code"] == "invalid_params"
        assert "width" in job["error"]["message"] and "multiple of 8" in job["error"]["message"]
        assert "Traceback" not in job["error"]["message"]
        r = http.get(f"/jobs/{bad.id}/images/0")
        assert r.status_code == 409 and r.json()["error"]["code"] == "job_not_succeeded"
        ok = stack.wait(http, stack.submit(http, prompt="after the failure", **FAST)["id"])
        assert ok["status"] == "succeeded"
        # Parameters that are not an object at all: the worker fails the job, and the API still
        # answers for it (and for the jobs queued behind it, whose ETA reads it) instead of a 500.
        odd = queue.enqueue(TASK_GENERATE, kwargs={"params": "hello"}, job_id=str(uuid.uuid4()))
        assert http.get(f"/jobs/{odd.id}").status_code == 200
        job = stack.wait(http, odd.id)
        assert job["status"] == "failed" and job["error"]["code"] == "invalid_params"


def test_error_paths(stack: Stack) -> None:
    with stack.client() as http:
        for body, field in [
            ({"prompt": ""}, "prompt"),
            ({"prompt": "x", "num_images": 11}, "num_images"),
            ({"prompt": "x", "width": 30}, "width"),
            ({"prompt": "x", "height": 4096}, "height"),
            ({"prompt": "x", "width": 512}, "width"),  # beyond 8× tiny-random's native 32 px
            ({"prompt": "x", "guidance_scale": 31}, "guidance_scale"),
            ({"prompt": "x", "seed": 2**32}, "seed"),
            ({"prompt": "x", "scheduler": "nope"}, "scheduler"),
            ({"prompt": "x", "num_inference_steps": 0}, "num_inference_steps"),
            ({"prompt": "x", "surprise": 1}, "surprise"),
            ({"prompt": 5}, "prompt"),
            ({"prompt": "x", "num_images": True}, "num_images"),  # taken as 1 by pydantic's lax mode
            ({"prompt": "x", "guidance_scale": False}, "guidance_scale"),
        ]:
            r = http.post("/generate", json=body)
            assert r.status_code == 422, (body, r.text)
            err = r.json()["error"]
            assert err["code"] == "validation_error" and field in err["message"], err
            if body.get("width") == 512:
                assert "at most 256 for model tiny-random" in err["message"], err
        # A preference the server cannot use is ignored (RFC 7240), however long: it was a 422.
        r = http.post("/generate", json={"prompt": "x", **FAST}, headers={"Prefer": "respond-async; " + "x" * 400})
        assert r.status_code == 202, r.text
        # Python's JSON reader takes NaN; it is refused as such (it was "should be at most 30").
        r = http.post(
            "/generate", content=b'{"prompt":"x","guidance_scale":NaN}', headers={"content-type": "application/json"}
        )
        assert r.status_code == 422 and "finite number" in r.json()["error"]["message"], r.text
        r = http.post("/generate", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "malformed_json"
        r = http.post("/generate", data={"prompt": "x"})  # a form post (curl -d): JSON is what we read
        assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type", r.text
        r = http.post("/generate", json={"prompt": "x"}, headers={"Idempotency-Key": "k" * 256})
        assert r.status_code == 422 and "idempotency-key" in r.json()["error"]["message"], r.text
        r = http.post(
            "/generate", content=b'{"prompt":"' + b"a" * 200_000 + b'"}', headers={"content-type": "application/json"}
        )
        assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
        for path in ("/jobs/not-a-uuid", f"/jobs/{uuid.uuid4()}", f"/jobs/{uuid.uuid4()}/images/0", "/nowhere"):
            r = http.get(path)
            assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", path
        # While a job waits or runs, its images are a 409; an index past the end is a 404.
        slow = stack.submit(http, prompt="slow", num_inference_steps=150, width=64, height=64)
        r = http.get(f"/jobs/{slow['id']}/images/0")
        assert r.status_code == 409 and r.json()["error"]["code"] == "not_ready"
        done = stack.wait(http, slow["id"], timeout=240)
        assert http.get(f"/jobs/{slow['id']}/images/0").headers["x-content-type-options"] == "nosniff"
        assert http.get(f"/jobs/{slow['id']}/images/1").status_code == 404
        # Not an index: a 404, never a file name (a superscript digit, a name too long for the disk).
        for index in ("x", "\u00b2", "٣", "9" * 300, "-1"):
            r = http.get(f"/jobs/{slow['id']}/images/{index}")
            assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", (index, r.text)
        assert http.get(done["images"][0]["url"]).status_code == 200


def test_expired_job_answers_410(stack: Stack) -> None:
    with stack.client() as http:
        job = stack.wait(http, stack.submit(http, prompt="short lived", **FAST)["id"])
        stack.redis.client(1).delete(f"rq:job:{job['id']}")  # what Redis does when result_ttl runs out
        for path in (f"/jobs/{job['id']}", f"/jobs/{job['id']}/images/0"):
            r = http.get(path)
            assert r.status_code == 410 and r.json()["error"]["code"] == "gone", path


def test_local_store_writes_under_results_dir(stack: Stack) -> None:
    with stack.client() as http:
        job = stack.wait(http, stack.submit(http, prompt="on disk", **FAST)["id"])
    files = sorted((Path(stack.env["IMAGEGEN_RESULTS_DIR"]) / job["id"]).iterdir())
    assert [f.name for f in files] == ["0.png"]


def test_redis_store_needs_no_shared_disk(redis_store_stack: Stack) -> None:
    s = redis_store_stack
    with s.client() as http:
        job = s.wait(http, s.submit(http, prompt="in redis", num_images=2, **FAST)["id"])
        assert job["status"] == "succeeded"
        blobs = [http.get(img["url"]).content for img in job["images"]]
    assert all(png(b).size == (32, 32) for b in blobs)
    r = s.redis.client(2)
    assert r.get(f"imagegen:image:{job['id']}:1") == blobs[1]
    assert 0 < r.ttl(f"imagegen:image:{job['id']}:1") <= 6
    assert not Path(s.env["IMAGEGEN_RESULTS_DIR"]).exists()


def test_api_process_never_loads_torch(stack: Stack) -> None:
    with stack.client() as http:
        stack.wait(http, stack.submit(http, prompt="check", **FAST)["id"])
        assert http.get("/readyz").status_code == 200
    maps = Path(f"/proc/{stack.api.pid}/maps").read_text()
    assert "libtorch" not in maps
    worker_maps = Path(f"/proc/{stack.workers[0].pid}/maps").read_text()
    assert "libtorch" in worker_maps  # the check itself can see torch where it is loaded
