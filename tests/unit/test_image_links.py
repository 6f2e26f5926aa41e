"""app.core.auth.ImageLinks on a real redis-server: signed image links across processes and a new secret."""

from __future__ import annotations

import time
from urllib.parse import parse_qs

from app.core.auth import URL_SECRET_KEY, ImageLinks


def parts(query: str) -> tuple[str, str]:
    q = {k: v[0] for k, v in parse_qs(query).items()}
    return q["exp"], q["sig"]


def test_links_check_out_in_another_process_until_they_expire(redis_db) -> None:
    one, two = ImageLinks(redis_db, 3600), ImageLinks(redis_db, 3600)
    exp, sig = parts(one.query("job-1", 0))
    assert int(exp) > time.time() + 3600
    assert two.valid("job-1", "0", exp, sig)
    assert not two.valid("job-1", "1", exp, sig)  # another image of the job
    assert not two.valid("job-2", "0", exp, sig)
    assert not two.valid("job-1", "0", str(int(exp) + 1), sig)
    past = str(int(time.time()) - 1)
    assert not two.valid("job-1", "0", past, two.signature("job-1", 0, past))


def test_a_new_secret_is_taken_at_once_even_right_after_a_bad_link(redis_db) -> None:
    """Each process keeps the secret for a minute; a link it cannot verify makes it read the secret
    again. That read was skipped within a second of the last one, so a forged link sent just before
    kept the first link signed with a new secret refused."""
    old, new = ImageLinks(redis_db, 3600), ImageLinks(redis_db, 3600)
    exp, sig = parts(old.query("job-1", 0))
    assert not old.valid("job-1", "0", exp, sig[::-1])  # a bad link: the secret is read again
    redis_db.delete(URL_SECRET_KEY)  # voids every link (within a minute); the next signer makes a new secret
    exp2, sig2 = parts(new.query("job-1", 0))
    assert sig2 != sig
    assert old.valid("job-1", "0", exp2, sig2)


def test_a_bad_link_costs_one_redis_read(redis_db) -> None:
    """Anyone can send bad links without a key: each used to cost a write attempt (SET NX) and a
    read. Now it is one GET while the secret is there; it is made again only when it is gone."""
    links = ImageLinks(redis_db, 3600)
    exp, sig = parts(links.query("job-1", 0))
    redis_db.config_resetstat()
    for _ in range(5):
        assert not links.valid("job-1", "0", exp, sig[::-1])
    stats = redis_db.info("commandstats")
    assert stats["cmdstat_get"]["calls"] == 5 and "cmdstat_set" not in stats
    redis_db.delete(URL_SECRET_KEY)
    assert not links.valid("job-1", "0", exp, sig[::-1])  # the secret is gone: a new one is made
    assert redis_db.get(URL_SECRET_KEY) is not None
    assert not links.valid("job-1", "0", exp, sig)  # and the old links are void
