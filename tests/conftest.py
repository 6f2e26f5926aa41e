"""Shared fixtures. Integration fixtures start real processes once per session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.procs import RedisServer, Stack, service_env, start_api, start_redis, start_worker

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class RoundTrips:
    """Every batch of commands a Redis client sends (one per round trip) while `record()` is open,
    as bytes; for tests that pin how many round trips a step takes and what each one carries."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from redis.connection import AbstractConnection

        self.sent: list[bytes] = []
        self._on = False
        send = AbstractConnection.send_packed_command

        def recorded(conn, command, check_health=True):  # type: ignore[no-untyped-def]
            if self._on:
                parts = [command] if isinstance(command, bytes | str) else command
                self.sent.append(b"".join(p.encode() if isinstance(p, str) else bytes(p) for p in parts))
            return send(conn, command, check_health)

        monkeypatch.setattr(AbstractConnection, "send_packed_command", recorded)

    @contextmanager
    def record(self) -> Iterator[list[bytes]]:
        self.sent.clear()
        self._on = True
        try:
            yield self.sent
        finally:
            self._on = False


@pytest.fixture
def round_trips(monkeypatch: pytest.MonkeyPatch) -> RoundTrips:
    return RoundTrips(monkeypatch)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.proc.stop()


@pytest.fixture(scope="session")
def quiet_redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server no stack uses, for tests that read its server-wide `commandstats`: the
    session's stacks keep polling `redis_server` (an idle worker claims every second)."""
    server = start_redis(tmp_path_factory.mktemp("redis-quiet"))
    yield server
    server.proc.stop()


@pytest.fixture
def quiet_db(quiet_redis_server: RedisServer):
    """A flushed database of `quiet_redis_server`, its command counts reset."""
    client = quiet_redis_server.client(db=15)
    client.flushdb()
    client.config_resetstat()
    yield client
    client.flushdb()


@pytest.fixture
def redis_db(redis_server: RedisServer):
    """A flushed database 15 of the session's real redis-server (for unit tests of Redis code)."""
    client = redis_server.client(db=15)
    client.flushdb()
    yield client
    client.flushdb()


def _stack(tmp: Path, server: RedisServer, db: int, **settings: str) -> Stack:
    url = f"redis://127.0.0.1:{server.port}/{db}"
    env = service_env(url, tmp, **settings)
    worker = start_worker(env, tmp / "worker.log", ready=server.client(db))
    api, base = start_api(env, tmp / "api.log")
    return Stack(redis=server, base_url=base, api=api, workers=[worker], env=env)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer) -> Iterator[Stack]:
    """Redis + one worker (tiny random model, local image store) + the API over HTTP."""
    s = _stack(tmp_path_factory.mktemp("stack"), redis_server, 1)
    yield s
    s.close()


@pytest.fixture(scope="session")
def short_ttl_stack(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer) -> Iterator[Stack]:
    """Local image store with results kept 4 s and swept every second (expiry tests)."""
    s = _stack(tmp_path_factory.mktemp("stack-ttl"), redis_server, 3, result_ttl="4", sweep_interval="1")
    yield s
    s.close()


@pytest.fixture(scope="session")
def redis_store_stack(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer) -> Iterator[Stack]:
    """Like `stack` but the PNGs live in Redis (no shared disk between API and worker); results kept 6 s."""
    s = _stack(tmp_path_factory.mktemp("stack-redis"), redis_server, 2, storage="redis", result_ttl="6")
    yield s
    s.close()
