"""Both image stores, the Redis one against a real redis-server."""

from __future__ import annotations

import uuid

import pytest

from app.core.storage import LocalImageStore, RedisImageStore


@pytest.fixture(params=["local", "redis"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalImageStore(tmp_path / "results")
    return RedisImageStore(request.getfixturevalue("redis_db"))


def test_put_get_delete(store) -> None:
    job = str(uuid.uuid4())
    assert store.get(job, 0) is None
    store.put(job, 0, b"\x89PNG zero", ttl=60)
    store.put(job, 1, b"\x89PNG one", ttl=60)
    assert store.get(job, 0) == b"\x89PNG zero" and store.get(job, 1) == b"\x89PNG one"
    store.put(job, 1, b"\x89PNG again", ttl=60)
    assert store.get(job, 1) == b"\x89PNG again"
    other = str(uuid.uuid4())
    store.put(other, 0, b"other", ttl=60)
    store.delete(job)
    assert store.get(job, 0) is None and store.get(job, 1) is None
    assert store.get(other, 0) == b"other"


@pytest.mark.parametrize("job_id", ["../../etc", "a/b", "*", str(uuid.uuid4()).upper(), ""])
def test_keys_are_never_built_from_arbitrary_text(store, job_id) -> None:
    with pytest.raises(ValueError):
        store.put(job_id, 0, b"x", ttl=60)
    with pytest.raises(ValueError):
        store.get(str(uuid.uuid4()), -1)


def test_local_writes_are_atomic(tmp_path) -> None:
    store = LocalImageStore(tmp_path)
    job = str(uuid.uuid4())
    store.put(job, 0, b"data", ttl=60)
    assert [p.name for p in (tmp_path / job).iterdir()] == ["0.png"]  # no temp files left behind


def test_redis_keys_expire(redis_db) -> None:
    store = RedisImageStore(redis_db)
    job = str(uuid.uuid4())
    store.put(job, 0, b"data", ttl=30)
    assert 0 < redis_db.ttl(f"imagegen:image:{job}:0") <= 30
