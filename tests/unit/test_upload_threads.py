"""app.api.uploads: uploads waiting to be decoded do not hold the threads every plain route needs."""

from __future__ import annotations

import asyncio
import threading

import anyio.to_thread

from app.api import uploads
from app.core.images import DECODING_AT_ONCE


def test_waiting_uploads_hold_no_shared_threads(monkeypatch) -> None:
    """Forty large uploads at once each took a thread of the shared pool (40) while waiting for
    one of the two decoding slots; `/healthz`, `GET /jobs` and downloads then queued behind them."""
    release = threading.Event()
    decoding: list[int] = []

    def slow_normalize(data: bytes, content_type: str | None, fit: int) -> bytes:
        decoding.append(1)
        release.wait(10)
        return b"png"

    monkeypatch.setattr(uploads, "normalize_image", slow_normalize)

    async def main() -> None:
        shared = anyio.to_thread.current_default_thread_limiter()
        tasks = [
            asyncio.create_task(uploads.normalized_png(uploads.Upload(b"x", "image/png", {}), 64)) for _ in range(40)
        ]
        await asyncio.sleep(0.3)
        assert len(decoding) == DECODING_AT_ONCE  # two decode, the rest wait
        assert shared.borrowed_tokens == 0  # none of them holds a thread of the shared pool
        assert await anyio.to_thread.run_sync(lambda: "served") == "served"  # a plain route still runs
        release.set()
        assert await asyncio.gather(*tasks) == [b"png"] * 40

    asyncio.run(main())
