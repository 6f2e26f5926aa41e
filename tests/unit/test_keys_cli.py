"""`python -m app.keys` against a real Redis: a name two keys share (a key made again to rotate
it) no longer makes `update`/`revoke` act on both; the digest prefix picks one."""

from __future__ import annotations

import pytest

from app import keys
from app.core.auth import KEYS_HASH, digest


def test_a_shared_name_needs_a_digest_prefix(redis_db, redis_server, monkeypatch, capsys) -> None:
    monkeypatch.setenv("IMAGEGEN_REDIS_URL", f"redis://127.0.0.1:{redis_server.port}/15")
    assert keys.main(["create", "alice"]) == 0
    old = capsys.readouterr().out.strip()
    assert keys.main(["create", "alice"]) == 0  # the rotation's new key
    out = capsys.readouterr()
    new = out.out.strip()
    assert f"1 other key(s) named 'alice' ({digest(old)[:12]})" in out.err and digest(new)[:12] in out.err
    # By name, neither is revoked: before, both were, and the new key with the old.
    assert keys.main(["revoke", "alice"]) == 1
    err = capsys.readouterr().err
    assert "names 2 keys" in err and digest(old)[:12] in err and digest(new)[:12] in err
    assert keys.main(["update", "alice", "--high-priority"]) == 1
    assert keys.main(["update", "alice", "--new-webhook-secret"]) == 1
    assert redis_db.hlen(KEYS_HASH) == 2
    # By its prefix, the old one alone; then the name is unique again.
    assert keys.main(["revoke", digest(old)[:12]]) == 0
    assert redis_db.hkeys(KEYS_HASH) == [digest(new).encode()]
    assert keys.main(["update", "alice", "--high-priority"]) == 0
    capsys.readouterr()
    assert keys.main(["list"]) == 0
    [listed] = capsys.readouterr().out.splitlines()
    assert listed.startswith(digest(new)[:12]) and "alice" in listed and "high allowed" in listed


@pytest.mark.parametrize("command", [["revoke", "nobody"], ["update", "nobody", "--high-priority"]])
def test_an_unknown_name_changes_nothing(redis_db, redis_server, monkeypatch, command) -> None:
    monkeypatch.setenv("IMAGEGEN_REDIS_URL", f"redis://127.0.0.1:{redis_server.port}/15")
    assert keys.main(command) == 1
