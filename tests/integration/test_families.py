"""Every model family through the real worker: tiny random-weight SDXL and Kandinsky 2.2 (unCLIP
prior + decoder) pipelines built offline, each served by its own `python -m worker`, one API
routing jobs to them by `model`. Stable Diffusion 1.x/2.x is covered by test_service.py."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator

import pytest
from PIL import Image
from rq import Worker

from app.core.jobs import MODELS_KEY, ModelInfo
from tests.procs import RedisServer, Stack, service_env, start_api, start_worker

pytestmark = pytest.mark.integration
DB = 6
FAMILIES = {"tiny-sdxl": "sdxl", "tiny-kandinsky": "kandinsky-2.2"}
FAST = {"num_inference_steps": 4, "width": 32, "height": 32}


@pytest.fixture(scope="module")
def families(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("families")
    client = redis_server.client(DB)
    client.flushdb()
    env = service_env(f"redis://127.0.0.1:{redis_server.port}/{DB}", tmp, model="tiny-sdxl")
    # Both workers load at once (imports dominate); each builds its model into the shared cache.
    workers = [start_worker(env | {"IMAGEGEN_MODEL": model}, tmp / f"worker-{model}.log") for model in FAMILIES]

    api, base = start_api(env, tmp / "api.log")
    stack = Stack(redis=redis_server, base_url=base, api=api, workers=workers, env=env)
    try:
        deadline = time.monotonic() + 120
        while len(Worker.all(connection=client)) < len(workers):
            for w in workers:
                assert w.alive(), f"worker exited:\n{w.output()[-3000:]}"
            assert time.monotonic() < deadline, "\n".join(w.output()[-2000:] for w in workers)
            time.sleep(0.1)
        yield stack
    finally:
        stack.close()
    for w in workers:  # canceled jobs log RQ's traceback; a sampling failure would be a bug
        assert "sampling failed" not in w.output(), w.output()[-3000:]


def png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def test_models_lists_what_live_workers_serve(families: Stack) -> None:
    # A model whose worker is gone (only its published info is left) is not listed.
    ghost = ModelInfo(name="ghost", width=8, height=8, num_inference_steps=1, guidance_scale=1, scheduler="ddim")
    families.redis.client(DB).hset(MODELS_KEY, "ghost", ghost.model_dump_json())
    with families.client() as http:
        r = http.get("/models")
        assert r.status_code == 200
        models = {m["name"]: m for m in r.json()["models"]}
        assert set(models) == set(FAMILIES)
        for name, family in FAMILIES.items():
            m = models[name]
            assert m["family"] == family and m["workers"] == 1 and m["default"] == (name == "tiny-sdxl")
            assert (m["width"], m["height"]) == (32, 32)
        assert models["tiny-kandinsky"]["variations"] == "image_embedding"
        assert models["tiny-sdxl"]["variations"] == "img2img"
        assert [m["id"] for m in http.get("/v1/models").json()["data"]] == ["tiny-sdxl", "tiny-kandinsky"]
        r = http.post("/generate", json={"prompt": "x", "model": "ghost"})
        assert r.status_code == 422, r.text
        err = r.json()["error"]
        assert err["code"] == "validation_error" and "model" in err["message"]
        assert sorted(err["details"][0]["served"]) == sorted(FAMILIES)


def test_metrics_cover_every_model(families: Stack) -> None:
    """Queue depth, running jobs and live workers per model: they covered only the API's own model,
    so a second model's backlog never showed."""
    from prometheus_client.parser import text_string_to_metric_families

    with families.client() as http:
        text = http.get("/metrics").text
    samples = {f.name: f.samples for f in text_string_to_metric_families(text)}
    for name in ("imagegen_queue_depth", "imagegen_jobs_running"):
        series = {(s.labels["model"], s.labels["priority"]) for s in samples[name]}
        assert {(m, p) for m in FAMILIES for p in ("high", "normal", "low")} <= series, (name, series)
    workers = {s.labels["model"]: s.value for s in samples["imagegen_workers"]}
    assert all(workers[m] == 1 for m in FAMILIES), workers


@pytest.mark.parametrize("model", list(FAMILIES))
def test_text_to_image_progress_seeds_and_pngs(families: Stack, model: str) -> None:
    body = {"prompt": "a red circle on a blue background", "model": model, "num_images": 2, "seed": 11, **FAST}
    with families.client() as http:
        started = time.monotonic()
        job = families.wait(http, families.submit(http, **body)["id"])
        elapsed = time.monotonic() - started
        assert job["status"] == "succeeded", job
        assert job["progress"] == {"step": 4, "total": 4}
        assert job["params"]["scheduler"] == ("ddim" if model == "tiny-kandinsky" else "euler")
        assert [i["seed"] for i in job["images"]] == [11, 12]
        blobs = [http.get(i["url"]).content for i in job["images"]]
        images = [png(b) for b in blobs]
        assert all(i.size == (32, 32) for i in images) and blobs[0] != blobs[1]
        assert images[0].text["seed"] == "11" and images[0].text["prompt"] == body["prompt"]
        # Same seed and parameters, same bytes; another sampler works too.
        again = families.wait(http, families.submit(http, **body)["id"])
        assert [http.get(i["url"]).content for i in again["images"]] == blobs
        # Every sampler works on every family (Kandinsky's decoder passes a generator that PNDM's
        # and UniPC's steps refused: those jobs failed).
        for scheduler in ("dpmpp_2m", "pndm", "unipc"):
            other = families.wait(http, families.submit(http, **(body | {"scheduler": scheduler}))["id"])
            assert other["status"] == "succeeded", (scheduler, other)
        # The job went to that model's worker (its own queue), not the API's default model.
        assert families.redis.client(DB).hget(f"imagegen:steptime:{model}", "32x32") is not None
    print(f"{model}: 2 images, 4 steps, 32 px in {elapsed:.2f}s end to end")


@pytest.mark.parametrize("model", list(FAMILIES))
def test_cancel_stops_a_running_job(families: Stack, model: str) -> None:
    with families.client() as http:
        job = families.submit(http, prompt="slow", model=model, num_inference_steps=150, width=64, height=64)
        deadline = time.monotonic() + 60
        while True:
            view = http.get(f"/jobs/{job['id']}").json()
            if view["status"] == "running" and view["progress"]["step"] >= 1:
                break
            assert view["status"] in ("queued", "running") and time.monotonic() < deadline, view
            time.sleep(0.02)
        assert http.delete(f"/jobs/{job['id']}").status_code == 202
        done = families.wait(http, job["id"], timeout=60)
        assert done["status"] == "canceled" and done["error"]["code"] == "canceled", done
        assert done["progress"]["step"] < 150
        assert http.get(f"/jobs/{job['id']}/images/0").status_code == 409
        # The worker keeps serving.
        ok = families.wait(http, families.submit(http, prompt="after", model=model, **FAST)["id"])
        assert ok["status"] == "succeeded"


@pytest.mark.parametrize("model", list(FAMILIES))
def test_variations_on_each_family(families: Stack, model: str) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (48, 40), (220, 30, 30)).save(buf, format="PNG")
    # Without guidance too (scale 1): Kandinsky's decoder then met two images with one embedding.
    for guidance in ({}, {"guidance_scale": "1"}):
        with families.client() as http:
            r = http.post(
                "/variations",
                files={"image": ("in.png", buf.getvalue(), "image/png")},
                data={"model": model, "num_images": "2", "seed": "5", "num_inference_steps": "4", **guidance},
            )
            assert r.status_code == 202, r.text
            job = families.wait(http, r.json()["id"])
            assert job["status"] == "succeeded", job
            assert job["progress"] == {"step": 4, "total": 4}
            assert [i["seed"] for i in job["images"]] == [5, 6]
            blobs = [http.get(i["url"]).content for i in job["images"]]
            assert all(png(b).size == (32, 32) for b in blobs) and blobs[0] != blobs[1]


def test_kandinsky_sizes_follow_its_multiple(families: Stack) -> None:
    # Tiny Kandinsky's MoVQ halves the size, so any multiple of 8 works; real checkpoints need 64.
    with families.client() as http:
        body = {"prompt": "wide", "model": "tiny-kandinsky", "num_inference_steps": 2, "width": 48, "height": 24}
        job = families.wait(http, families.submit(http, **body)["id"])
        assert job["status"] == "succeeded" and (job["images"][0]["width"], job["images"][0]["height"]) == (48, 24)
