"""The API process tunes its garbage collector once started (see `app.core.process.tune_gc`)."""

from __future__ import annotations

import asyncio
import gc

from app.core.config import Settings
from app.main import create_app
from tests.procs import RedisServer


def test_the_api_freezes_what_start_up_loaded_and_collects_young_objects_less_often(
    redis_server: RedisServer, tmp_path
) -> None:
    app = create_app(Settings(redis_url=f"redis://127.0.0.1:{redis_server.port}/15", results_dir=tmp_path))
    before = gc.get_threshold()
    seen: dict[str, object] = {}

    async def start_and_stop() -> None:
        async with app.router.lifespan_context(app):
            seen["frozen"], seen["threshold"] = gc.get_freeze_count(), gc.get_threshold()

    try:
        asyncio.run(start_and_stop())
    finally:
        gc.unfreeze()  # this test process goes on with CPython's own settings
        gc.set_threshold(*before)
    assert isinstance(seen["frozen"], int) and seen["frozen"] > 10_000
    assert seen["threshold"] == (50_000, 20, 100)
