"""The model registry, which models count as served (live workers only), and routing a job to the
model it names (JobService on a real redis-server; no worker process)."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from rq.utils import utcformat
from rq.worker_registration import WORKERS_BY_QUEUE_KEY

from app.api.services import JobService
from app.core.catalog import live_workers, model_of_queue, served_models
from app.core.config import Settings
from app.core.errors import InvalidRequestError
from app.core.jobs import MODELS_KEY, GenerationParams, ModelInfo, Priority, Scheduler, queue_name
from models.registry import REGISTRY, lookup, resolve
from tests.procs import RedisServer


def info(name: str, multiple: int = 8) -> ModelInfo:
    return ModelInfo(
        name=name,
        width=64,
        height=64,
        num_inference_steps=3,
        guidance_scale=2,
        scheduler="ddim",
        size_multiple=multiple,
    )


def publish(redis, name: str, *, live: bool = True, multiple: int = 8, beat_ago: float = 1.0) -> None:
    """What a worker does at start: its ModelInfo in the hash, itself registered on its queues
    (its RQ key with its last heartbeat `beat_ago` seconds ago)."""
    redis.hset(MODELS_KEY, name, info(name, multiple).model_dump_json())
    key = f"rq:worker:fake-{name}"
    for priority in Priority:
        redis.sadd(WORKERS_BY_QUEUE_KEY % queue_name(name, priority), key)
    if live:
        beat = datetime.now(UTC) - timedelta(seconds=beat_ago)
        redis.hset(key, mapping={"state": "idle", "last_heartbeat": utcformat(beat)})


@pytest.fixture
def service(redis_db, redis_server: RedisServer) -> JobService:
    settings = Settings(redis_url=f"redis://127.0.0.1:{redis_server.port}/15", model="main")
    return JobService(settings, redis_db)


def test_registry_entries_are_consistent() -> None:
    for name, entry in REGISTRY.items():
        assert entry.name == name
        assert sum(x is not None for x in (entry.folder, entry.builder, entry.hub_id)) == 1, name
        if entry.scheduler is not None:
            Scheduler(entry.scheduler)
        for key in ("width", "height"):
            assert entry.defaults().get(key, 8) % 8 == 0
    for name in ("sd-1.5", "sd-turbo", "sdxl", "kandinsky-2.2", "tiny-sdxl", "tiny-kandinsky"):
        assert name in REGISTRY
    # Hub entries resolve to their id without touching the network; unknown names pass through.
    assert resolve("sd-turbo") == "stabilityai/sd-turbo"
    assert lookup("kandinsky-2.2").defaults()["family"] == "kandinsky-2.2"  # type: ignore[union-attr]
    assert resolve("/some/folder") == "/some/folder" and lookup("/some/folder") is None
    # Real Kandinsky's MoVQ needs sizes in multiples of 64.
    assert REGISTRY["kandinsky-2.2"].width % 64 == 0  # type: ignore[operator]


def test_a_failed_build_leaves_nothing_behind(tmp_path, monkeypatch) -> None:
    """A builder that failed left its hidden half-built folder for good, one per try (2 GB each
    for sd15-random); a folder in the way without a pipeline was taken for a lost race."""
    import sys
    import types

    from models import registry

    calls: list[str] = []

    def build(out) -> None:
        calls.append(str(out))
        (out / "half-written.bin").write_bytes(b"x" * 10)
        if len(calls) == 1:
            raise RuntimeError("out of disk")
        (out / "model_index.json").write_text("{}")

    monkeypatch.setitem(sys.modules, "fake_builder", types.SimpleNamespace(build=build))
    monkeypatch.setattr(registry, "CACHE", tmp_path)
    monkeypatch.setitem(registry.REGISTRY, "fake", registry.ModelEntry("fake", "test", builder="fake_builder:build"))
    with pytest.raises(RuntimeError, match="out of disk"):
        resolve("fake")
    assert list(tmp_path.iterdir()) == []
    assert resolve("fake") == str(tmp_path / "fake") and (tmp_path / "fake" / "model_index.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["fake"]
    # A stray folder where the model goes: a clear error naming it, and again nothing left over.
    (tmp_path / "stray").mkdir()
    (tmp_path / "stray" / "notes.txt").write_text("not a pipeline")
    monkeypatch.setitem(registry.REGISTRY, "stray", registry.ModelEntry("stray", "test", builder="fake_builder:build"))
    with pytest.raises(OSError, match="could not build it into"):
        resolve("stray")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake", "stray"]


def test_an_empty_model_cache_setting_counts_as_unset(tmp_path) -> None:
    import subprocess
    import sys

    code = "from models.registry import CACHE, ROOT; print(CACHE == ROOT.parent / '.data' / 'models')"
    env = {**os.environ, "IMAGEGEN_MODEL_CACHE": ""}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert out.stdout.strip() == "True", out.stderr


def test_only_models_with_a_live_worker_are_served(redis_db) -> None:
    publish(redis_db, "alive")
    publish(redis_db, "dead", live=False)  # registered, but its worker key has expired
    # Killed: its key is still there (RQ keeps it a minute and more; nothing removes it while no
    # worker lives), but three beats have been missed (IMAGEGEN_WORKER_HEARTBEAT=5: 20 s).
    publish(redis_db, "killed", beat_ago=21)
    redis_db.hset(MODELS_KEY, "garbage", "{not json")
    served = served_models(redis_db, 5.0)
    assert list(served) == ["alive"] and served["alive"][1] == 1
    assert live_workers(redis_db, "alive", 5.0) == 1 and live_workers(redis_db, "killed", 5.0) == 0
    assert live_workers(redis_db, "killed", 10.0) == 1  # within 3 × 10 + 5 s
    assert model_of_queue(queue_name("a:b", Priority.low)) == "a:b"
    assert model_of_queue("other") is None


def test_jobs_route_to_a_served_model_and_its_queues(service: JobService, redis_db) -> None:
    publish(redis_db, "other")
    placed = service.submit(GenerationParams(prompt="x"), model="other", priority=Priority.high)
    job = service.get(placed.id)
    assert job.origin == queue_name("other", Priority.high) and placed.position == 0
    assert job.kwargs["params"]["num_inference_steps"] == 3  # the routed model's defaults filled it
    view = service.view(job, lambda i, n: "")
    assert view.priority is Priority.high and view.queue_position == 0
    default = service.submit(GenerationParams(prompt="x"))  # no worker needed for the default model
    assert service.get(default.id).origin == queue_name("main")
    with pytest.raises(InvalidRequestError) as info_:
        service.submit(GenerationParams(prompt="x"), model="missing")
    assert info_.value.details[0]["served"] == ["other"]


def test_sizes_must_fit_the_models_multiple(service: JobService, redis_db) -> None:
    publish(redis_db, "kandinsky", multiple=64)
    with pytest.raises(InvalidRequestError, match="multiple of 64"):
        service.submit(GenerationParams(prompt="x", width=72, height=64), model="kandinsky")
    assert service.submit(GenerationParams(prompt="x", width=128, height=64), model="kandinsky")


class KandinskyV22CombinedPipeline:  # the name is what family detection reads
    def __init__(self) -> None:
        from types import SimpleNamespace

        self.unet = SimpleNamespace(config=SimpleNamespace(sample_size=96))
        self.decoder_pipe = SimpleNamespace(movq_scale_factor=8)
        self.scheduler = SimpleNamespace()
        self.prior_tokenizer = SimpleNamespace(model_max_length=77)


def test_family_native_size_and_size_multiple_are_read_off_the_pipeline() -> None:
    from worker.runtime import _model_info, check_size

    info = _model_info("k", KandinskyV22CombinedPipeline(), {})
    assert (info.family, info.width, info.height, info.size_multiple) == ("kandinsky-2.2", 768, 768, 64)
    # The registry entry or imagegen.json wins over what the pipeline says.
    assert _model_info("k", KandinskyV22CombinedPipeline(), {"width": 512, "family": "x"}).width == 512
    with pytest.raises(ValueError, match="multiple of 64"):
        check_size(info, GenerationParams(prompt="x", width=520, height=512))
    check_size(info, GenerationParams(prompt="x", width=576, height=512))
    # Up to 8× the native size unless imagegen.json or the registry says otherwise.
    assert (info.max_width, info.max_height) == (6144, 6144)
    small = _model_info("s", KandinskyV22CombinedPipeline(), {"width": 64, "height": 128, "max_width": 128})
    assert (small.max_width, small.max_height) == (128, 1024)
    with pytest.raises(ValueError, match="width: must be at most 128 for model s"):
        check_size(small, GenerationParams(prompt="x", width=192, height=64))
    check_size(small, GenerationParams(prompt="x", width=128, height=1024))


def test_metrics_scrape_takes_the_same_round_trips_however_many_models(
    redis_db, redis_server: RedisServer, monkeypatch
) -> None:
    """Queue depth and running jobs were read with two round trips per queue, three queues per
    model: a scrape grew by six per model. Now one pipeline reads them all."""
    from fastapi.testclient import TestClient
    from prometheus_client.parser import text_string_to_metric_families
    from redis.client import Pipeline, Redis

    from app.main import create_app

    trips: list[str] = []
    real_command, real_execute = Redis.execute_command, Pipeline.execute

    def counted(real: Any, what: str) -> Any:
        return lambda self, *a, **k: trips.append(what) or real(self, *a, **k)

    monkeypatch.setattr(Redis, "execute_command", counted(real_command, "command"))
    monkeypatch.setattr(Pipeline, "execute", counted(real_execute, "pipeline"))
    settings = Settings(redis_url=f"redis://127.0.0.1:{redis_server.port}/15", model="main")

    def scrape(http: TestClient) -> tuple[int, dict[tuple[str, str], float]]:
        trips.clear()
        text = http.get("/metrics").text
        count = len(trips)
        depth = next(f for f in text_string_to_metric_families(text) if f.name == "imagegen_queue_depth")
        return count, {(s.labels["model"], s.labels["priority"]): s.value for s in depth.samples}

    with TestClient(create_app(settings)) as http:
        publish(redis_db, "one")
        few, _ = scrape(http)
        for i in range(5):
            publish(redis_db, f"more-{i}")
        redis_db.rpush(f"rq:queue:{queue_name('more-3', Priority.low)}", "a", "b")
        many, depth = scrape(http)
    assert many == few, (few, many)
    assert depth[("more-3", "low")] == 2 and depth[("main", "normal")] == 0 and len(depth) == 7 * 3
