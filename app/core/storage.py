"""Where finished PNGs live: the `ImageStore` interface and its local-directory and Redis versions.

Keys are built only from a canonical job UUID and an integer index, never from user text.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from redis import Redis

    from app.core.config import Settings


def _check(job_id: str, index: int) -> tuple[str, int]:
    canonical = str(uuid.UUID(job_id))
    if canonical != job_id or not isinstance(index, int) or index < 0:
        raise ValueError("image keys take a canonical job UUID and a non-negative index")
    return canonical, index


class ImageStore(Protocol):
    def put(self, job_id: str, index: int, png: bytes, ttl: int) -> None: ...

    def get(self, job_id: str, index: int) -> bytes | None: ...

    def delete(self, job_id: str) -> None: ...


class LocalImageStore:
    """PNGs under `root/<job id>/<index>.png`, written atomically (temp file + rename).

    Suits one host or a volume shared by the API and workers. Expiry is by job record: the
    API answers 410 once the job is gone and `delete` removes the files.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _path(self, job_id: str, index: int) -> Path:
        job_id, index = _check(job_id, index)
        return self.root / job_id / f"{index}.png"

    def check_writable(self) -> None:
        """Raise OSError unless a file can be written here (a worker checks before it takes jobs:
        otherwise each job sampled, failed to store, and ran again on every retry)."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=self.root, prefix=".probe-")
        os.close(fd)
        os.unlink(probe)

    def put(self, job_id: str, index: int, png: bytes, ttl: int) -> None:
        path = self._path(job_id, index)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".png")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(png)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get(self, job_id: str, index: int) -> bytes | None:
        try:
            return self._path(job_id, index).read_bytes()
        except FileNotFoundError:
            return None

    def delete(self, job_id: str) -> None:
        job_id, _ = _check(job_id, 0)
        shutil.rmtree(self.root / job_id, ignore_errors=True)


class RedisImageStore:
    """PNG bytes under `imagegen:image:<job id>:<index>` with the job's TTL: no shared disk needed."""

    def __init__(self, connection: Redis) -> None:
        self.redis = connection

    @staticmethod
    def _key(job_id: str, index: int) -> str:
        job_id, index = _check(job_id, index)
        return f"imagegen:image:{job_id}:{index}"

    def put(self, job_id: str, index: int, png: bytes, ttl: int) -> None:
        self.redis.set(self._key(job_id, index), png, ex=ttl)

    def get(self, job_id: str, index: int) -> bytes | None:
        data = self.redis.get(self._key(job_id, index))
        return bytes(data) if data is not None else None  # type: ignore[arg-type]

    def delete(self, job_id: str) -> None:
        job_id, _ = _check(job_id, 0)
        keys = list(self.redis.scan_iter(match=f"imagegen:image:{job_id}:*", count=100))
        if keys:
            self.redis.delete(*keys)


def make_store(settings: Settings, connection: Redis) -> ImageStore:
    """The store named by `IMAGEGEN_STORAGE`."""
    if settings.storage == "redis":
        return RedisImageStore(connection)
    return LocalImageStore(settings.results_dir)
