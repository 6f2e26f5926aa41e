"""API keys and per-key rate limits. Keys are never stored in clear: only SHA-256 digests.

Keys come from `IMAGEGEN_API_KEYS` or from the Redis hash `imagegen:apikeys` (digest -> JSON),
managed with `python -m app.keys`. A key's owner id (a digest prefix) tags the jobs it creates.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from app.core.errors import ForbiddenError, RateLimitedError, UnauthorizedError
from app.core.jobs import Priority
from app.core.webhooks import SECRETS_KEY as WEBHOOK_SECRETS_KEY
from app.core.webhooks import new_secret as new_webhook_secret

if TYPE_CHECKING:
    from redis import Redis

    from app.core.config import Settings

KEYS_HASH = "imagegen:apikeys"
RATE_PREFIX = "imagegen:rate:"


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return "ig_" + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class Principal:
    """Who is calling. `owner` is None when authentication is off (everyone sees every job).

    `high_priority`: whether the key may queue jobs with priority `high`. `max_queued`: how many
    of its jobs may wait at once (0: no bound of its own; `IMAGEGEN_MAX_QUEUE` still holds).
    """

    owner: str | None
    high_priority: bool = True
    max_queued: int = 0

    def check_priority(self, priority: Priority) -> None:
        if priority is Priority.high and not self.high_priority:
            raise ForbiddenError(
                "priority: this API key may not queue jobs with priority high "
                "(the operator grants it: python -m app.keys update <name> --high-priority)",
                details=[{"loc": ["body", "priority"], "msg": "high priority is not granted to this API key"}],
            )


ANONYMOUS = Principal(owner=None)


def authenticate(authorization: str | None, settings: Settings, redis: Redis) -> Principal:
    if not settings.auth_enabled:
        return ANONYMOUS
    scheme, _, token = (authorization or "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise UnauthorizedError("missing API key: send `Authorization: Bearer <key>`")
    presented = digest(token)
    # Compare digests in constant time, and check every configured key (no early exit).
    matched = False
    for key in settings.api_key_list:
        matched |= hmac.compare_digest(presented, digest(key))
    owner = owner_of(presented)
    if matched:  # the operator's own keys (IMAGEGEN_API_KEYS): every grant, the default bound
        return Principal(owner, high_priority=True, max_queued=settings.max_queued_per_key)
    stored = redis.hget(KEYS_HASH, presented)
    if stored is None:
        raise UnauthorizedError("invalid API key")
    grants = json.loads(stored)  # type: ignore[arg-type]
    max_queued = grants.get("max_queued")
    return Principal(
        owner,
        high_priority=bool(grants.get("high_priority", False)),
        max_queued=settings.max_queued_per_key if max_queued is None else int(max_queued),
    )


def is_limited(principal: Principal, limit: int) -> bool:
    """Whether `charge` has anything to count (a limit is set and the caller has a key)."""
    return limit > 0 and principal.owner is not None


def charge(redis: Redis, principal: Principal, kind: str, amount: int, limit: int) -> str | None:
    """Fixed one-minute windows per key, shared by every API process through Redis. Returns the
    window's key (for `refund`), None when nothing was counted."""
    if not is_limited(principal, limit):
        return None
    window = int(time.time() // 60)
    key = f"{RATE_PREFIX}{kind}:{principal.owner}:{window}"
    with redis.pipeline() as pipe:
        pipe.incrby(key, amount)
        pipe.expire(key, 120)
        used = int(pipe.execute()[0])
    if used > limit:
        redis.decrby(key, amount)  # a refused request does not use up the budget
        retry_after = max(1, 60 - int(time.time()) % 60)
        raise RateLimitedError(f"rate limit: {limit} {kind} per minute for this key", retry_after=retry_after)
    return key


def refund(redis: Redis, window_key: str, amount: int) -> None:
    """Give back what `charge` counted, for a request refused after it (a full queue, no worker)."""
    redis.decrby(window_key, amount)


def store_key(redis: Redis, name: str, *, high_priority: bool = False, max_queued: int | None = None) -> str:
    """Create a key, store its digest and grants, return the key (shown once).

    `max_queued` None: the server's `IMAGEGEN_MAX_QUEUED_PER_KEY` applies; 0: no bound of its own."""
    key = new_key()
    record = {"name": name, "created": int(time.time()), "high_priority": high_priority, "max_queued": max_queued}
    redis.hset(KEYS_HASH, digest(key), json.dumps(record))
    return key


def update_grants(redis: Redis, name_or_prefix: str, **grants: bool | int | None) -> int:
    """Change the grants (`high_priority`, `max_queued`) of the keys a name or digest prefix names;
    returns how many. A grant left out (not passed) is kept."""
    named = _named(redis, name_or_prefix)
    for full, record in named:
        redis.hset(KEYS_HASH, full, json.dumps({**record, **grants}))  # type: ignore[arg-type]
    return len(named)


def owner_of(full_digest: bytes | str) -> str:
    """The owner id jobs made with a key carry (see `authenticate`)."""
    text = full_digest.decode() if isinstance(full_digest, bytes) else full_digest
    return text[:32]


def set_webhook_secrets(redis: Redis, name_or_prefix: str, *, new: bool) -> list[tuple[str, str | None]]:
    """Give each key named a webhook secret of its own (`new`, a fresh one each), or take it away
    (its jobs' webhooks are signed with the server's again). Returns (name, secret) per key."""
    changed: list[tuple[str, str | None]] = []
    for full, record in _named(redis, name_or_prefix):
        secret = new_webhook_secret() if new else None
        with redis.pipeline() as pipe:
            if secret is None:
                pipe.hdel(WEBHOOK_SECRETS_KEY, owner_of(full))
            else:
                pipe.hset(WEBHOOK_SECRETS_KEY, owner_of(full), secret)
            pipe.hset(KEYS_HASH, full, json.dumps({**record, "webhook_secret": new}))
            pipe.execute()
        changed.append((record["name"], secret))
    return changed


MIN_PREFIX = 8  # hex digits of a digest prefix that `update`/`revoke` accept (`list` shows 12)


class AmbiguousKeyName(ValueError):
    """A name that several stored keys carry: `update`/`revoke` then need a digest prefix."""


def _named(redis: Redis, name_or_prefix: str) -> list[tuple[bytes, dict]]:
    """The stored key (full digest, record) that `name_or_prefix` names (see `_names`): none or
    one. A name several keys share (a key made again to rotate it) names none of them, since
    acting on all of them (revoking the new key with the old) is rarely what was meant."""
    stored: dict[bytes, bytes] = redis.hgetall(KEYS_HASH) or {}  # type: ignore[assignment]
    records = ((full, json.loads(raw)) for full, raw in stored.items())
    named = [(full, record) for full, record in records if _names(full, record, name_or_prefix)]
    if len(named) > 1:
        prefixes = ", ".join(sorted(full.decode()[:12] for full, _ in named))
        raise AmbiguousKeyName(f"{name_or_prefix!r} names {len(named)} keys ({prefixes}): give a digest prefix")
    return named


def keys_named(redis: Redis, name: str) -> list[str]:
    """The digest prefixes (as `list` shows them) of the stored keys called `name`."""
    return [prefix for prefix, record in list_keys(redis) if record["name"] == name]


def _names(full: bytes, record: dict, name_or_prefix: str) -> bool:
    """Whether a stored key is the one named: by its exact name, or by a digest prefix of at least
    MIN_PREFIX hex digits (a short one, such as a one-letter name, could match keys by chance)."""
    if not name_or_prefix:
        return False
    if record["name"] == name_or_prefix:
        return True
    is_prefix = len(name_or_prefix) >= MIN_PREFIX and all(c in "0123456789abcdef" for c in name_or_prefix)
    return is_prefix and full.decode().startswith(name_or_prefix)


def list_keys(redis: Redis) -> list[tuple[str, dict]]:
    raw = redis.hgetall(KEYS_HASH) or {}
    return sorted(((k.decode()[:12], json.loads(v)) for k, v in raw.items()), key=lambda kv: kv[1]["created"])  # type: ignore[union-attr]


def revoke(redis: Redis, name_or_prefix: str) -> int:
    """Delete the key named (and its webhook secret); returns how many (0 or 1)."""
    removed = 0
    for full, _ in _named(redis, name_or_prefix):
        removed += int(redis.hdel(KEYS_HASH, full))  # type: ignore[arg-type]
        redis.hdel(WEBHOOK_SECRETS_KEY, owner_of(full))
    return removed


URL_SECRET_KEY = "imagegen:url-secret"  # shared by every API process on the same Redis
SIGNATURE_CHARS = 32  # of the URL-safe base64 HMAC-SHA256: 192 bits
SECRET_TTL = 60.0  # seconds a process trusts its copy of the secret (all processes agree within it)


class ImageLinks:
    """With API keys on, image links carry `exp` and `sig` (HMAC-SHA256 of the job id, the image
    index and `exp`), so that whatever they are handed to (an `<img>`, another service, OpenAI's
    SDK users) can fetch the PNG without the key, until `exp`, as OpenAI's own links can. The
    secret is made once and kept in Redis (`URL_SECRET_KEY`); deleting it voids every link.

    `exp` is the end of the current hour plus the result TTL, so that a link outlives its image
    and stays the same for an hour (a page polling a job does not see its links change).

    Each process re-reads the secret every SECRET_TTL seconds, and at once when a link fails its
    check: after the key is deleted or Redis lost it, every process signs with the new secret
    within a minute and accepts links signed with it at once, whatever links failed just before (a
    failed link costs one Redis read, no more than the rest of its 401)."""

    def __init__(self, redis: Redis, result_ttl: int) -> None:
        self.redis = redis
        self.result_ttl = result_ttl
        self._secret: bytes | None = None
        self._read_at = 0.0

    def secret(self, max_age: float = SECRET_TTL) -> bytes:
        """The shared secret (blocking: called from worker threads), made if there is none yet."""
        if self._secret is None or time.monotonic() - self._read_at > max_age:
            value = self.redis.get(URL_SECRET_KEY)
            if value is None:  # the first process to sign, or the secret was deleted or lost
                self.redis.set(URL_SECRET_KEY, secrets.token_urlsafe(32), nx=True)
                value = self.redis.get(URL_SECRET_KEY)
                if value is None:
                    raise RuntimeError("the image link secret vanished right after it was written")
            self._secret, self._read_at = bytes(value), time.monotonic()  # type: ignore[arg-type]
        return self._secret

    def expiry(self, now: float | None = None) -> int:
        now = time.time() if now is None else now
        return (int(now) // 3600 + 1) * 3600 + self.result_ttl

    def signature(self, job_id: str, index: int | str, exp: int | str, secret: bytes | None = None) -> str:
        mac = hmac.new(secret or self.secret(), f"{job_id}:{index}:{exp}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).decode()[:SIGNATURE_CHARS]

    def query(self, job_id: str, index: int) -> str:
        """`exp=…&sig=…` for image `index` of job `job_id`."""
        exp = self.expiry()
        return f"exp={exp}&sig={self.signature(job_id, index, exp)}"

    def valid(self, job_id: str, index: str, exp: str, sig: str) -> bool:
        if not (exp.isascii() and exp.isdigit() and len(exp) <= 12) or int(exp) < time.time():
            return False
        if not (sig.isascii() and len(sig) == SIGNATURE_CHARS):  # compare_digest takes ASCII text only
            return False
        if hmac.compare_digest(self.signature(job_id, index, exp), sig):
            return True
        # Signed by a process that read a newer secret (the old one deleted or lost)?
        current = self.secret(max_age=0)
        return hmac.compare_digest(self.signature(job_id, index, exp, current), sig)
