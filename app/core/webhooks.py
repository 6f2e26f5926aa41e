"""Webhook targets and deliveries: SSRF checks, HMAC-SHA256 signatures, retries with backoff.

Signature scheme: header `X-Imagegen-Timestamp: <unix seconds>` and
`X-Imagegen-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>." + raw body)>`.
Receivers recompute it over the raw body and reject stale timestamps. `X-Imagegen-Delivery` is
the same on each retry of one event, so receivers drop repeats by it.

Deliveries are at least once and, with Redis, survive their sender: see `WebhookSender`'s outbox.

The secret is the server's `IMAGEGEN_WEBHOOK_SECRET`, or the one of the API key that made the
job when that key has its own (`python -m app.keys create NAME --webhook-secret`): with one
secret for all, any tenant able to verify its webhooks could forge them to another's receiver.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import secrets
import socket
import ssl
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import SplitResult, urlsplit

import httpx

from app.core.events import EventType, JobEvent
from app.core.logs import job_context

if TYPE_CHECKING:
    from app.core.config import Settings

log = logging.getLogger(__name__)
RETRY_STATUSES = {429, 500, 502, 503, 504}
BACKOFF_BASE = 0.5  # seconds; doubles per attempt, capped at BACKOFF_CAP
BACKOFF_CAP = 30.0
DEADLINE = 30.0  # seconds one delivery attempt may take in all
RESOLVE_TIMEOUT = 3.0  # seconds a submission waits for its webhook host's lookup
DELIVERY_RESOLVE_TIMEOUT = 10.0  # seconds a delivery waits for it (then retried later)
MAX_LOOKUPS = 8  # lookups in flight at once, for submissions and deliveries each (see _resolve_in_time)
MAX_LOOKUPS_PER_OWNER = 2  # of the submissions' ones, held by one API key's requests at once
OWNER_WAIT = 1.0  # seconds a key's lookup waits for one of its own to end (a burst of fast ones)


class WebhookTargetError(ValueError):
    """The URL is not an acceptable webhook target."""


class LookupUnavailableError(WebhookTargetError):
    """The host's lookup did not end in time, or too many are in flight: nothing is wrong with the
    URL as far as we know, so the request may be tried again (a 503, not a 422)."""


SECRETS_KEY = "imagegen:webhook-secrets"  # owner id (see app.core.auth) -> that key's own secret
SECRET_TTL = 60.0  # seconds a worker trusts its copy of an owner's secret (rotation takes that long)


def new_secret() -> str:
    return "whsec_" + secrets.token_urlsafe(32)


def secret_for(redis: Any, owner: str | None, default: str) -> str:
    """The secret that signs the webhooks of `owner`'s jobs: its own, else the server's."""
    if owner is None:
        return default
    own = redis.hget(SECRETS_KEY, owner)
    return own.decode() if own else default


class Secrets:
    """`secret_for` with each owner's answer kept SECRET_TTL seconds (workers look it up for every
    event they deliver)."""

    def __init__(self, redis: Any, default: str, ttl: float = SECRET_TTL) -> None:
        self.redis = redis
        self.default = default
        self.ttl = ttl
        self._known: dict[str, tuple[str, float]] = {}

    def for_owner(self, owner: str | None) -> str:
        if owner is None:
            return self.default
        known = self._known.get(owner)
        if known is None or time.monotonic() - known[1] > self.ttl:
            known = self._known[owner] = (secret_for(self.redis, owner, self.default), time.monotonic())
        return known[0]


def sign(secret: str, timestamp: str, body: bytes) -> str:
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(secret: str, timestamp: str, body: bytes, signature: str) -> bool:
    return hmac.compare_digest(sign(secret, timestamp, body), signature)


def _blocked(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address):
        # IPv4 addresses carried inside IPv6 ones (mapped, 6to4, NAT64) are judged as themselves.
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return _blocked(embedded)
    return (
        ip.is_loopback
        or ip.is_private
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
        or ip in HOST_SERVICES
        or (isinstance(ip, ipaddress.IPv4Address) and ip in SHARED)
        or (isinstance(ip, ipaddress.IPv6Address) and ip in SITE_LOCAL)
    )


NAT64 = ipaddress.ip_network("64:ff9b::/96")
SHARED = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT
SITE_LOCAL = ipaddress.ip_network("fec0::/10")  # deprecated, yet still routed inside some networks
# Cloud hosts' own services on public-looking addresses (169.254.169.254 is link-local already):
# Alibaba's metadata, Azure's host service (wire server: VM agent, extensions, DNS).
HOST_SERVICES = {ipaddress.ip_address("100.100.100.200"), ipaddress.ip_address("168.63.129.16")}


def shown(url: str) -> str:
    """A webhook URL as logs show it: scheme and host only. Receivers often carry a token in the
    path or query, which would otherwise land in the operator's logs."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<malformed URL>"
    rest = "/…" if parts.path.strip("/") or parts.query or parts.fragment else ""
    return f"{parts.scheme}://{_bracketed(host)}{port}{rest}"


def _bracketed(host: str) -> str:
    """A host as a URL names it: IPv6 addresses in brackets."""
    return f"[{host}]" if ":" in host else host


def _parts(url: str) -> SplitResult:
    if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in url):
        raise WebhookTargetError("webhook URLs must not contain spaces or control characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - parsed on access: out of range or not a number raises here
    except ValueError as exc:  # an unclosed `[`, a port like 99999 or `abc`
        raise WebhookTargetError(f"webhook: not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookTargetError("webhook must be an http(s) URL with a host")
    if parts.username or parts.password:
        raise WebhookTargetError("webhook URLs must not carry credentials")
    return parts


def _addresses(
    parts: SplitResult,
    allow_private: bool,
    resolve: Callable[[str], list[str]] | None,
    *,
    slots: threading.BoundedSemaphore,
    timeout: float,
    owner: str | None = None,
) -> list[str]:
    """The addresses `parts`' host resolves to, all of them public unless `allow_private`, looked
    up as `_resolve_in_time` does with `slots`, `timeout` and `owner`."""
    host = parts.hostname
    assert host is not None
    try:
        found = _resolve_in_time(resolve or _resolve, host, slots, timeout, owner)
        addresses = [a.split("%")[0] for a in found]
    except (OSError, UnicodeError) as exc:  # UnicodeError: a label the IDNA codec refuses (empty, too long)
        raise WebhookTargetError(f"webhook host {host!r} does not resolve") from exc
    if not addresses:
        raise WebhookTargetError(f"webhook host {host!r} does not resolve")
    for addr in addresses if not allow_private else ():
        if _blocked(ipaddress.ip_address(addr)):
            # The address stays in the operator's log: told to the client, it maps the inside network.
            log.info("webhook host %r resolves to %s, not a public address: refused", host, addr)
            raise WebhookTargetError(f"webhook host {host!r} is not a public address; refused")
    return addresses


def check_target(
    url: str, *, allow_private: bool, resolve: Callable[[str], list[str]] | None = None, owner: str | None = None
) -> None:
    """Refuse non-HTTP(S) URLs and, unless allowed, hosts that resolve to internal addresses.

    Called from the API's shared threadpool: the lookup runs as `_resolve_in_time` says, so a host
    whose nameserver never answers costs a request RESOLVE_TIMEOUT seconds and a refusal, not a
    pool thread for as long as the system resolver keeps trying. `owner` is the API key's (see
    app.core.auth; None with keys off): one key holds at most MAX_LOOKUPS_PER_OWNER lookups."""
    parts = _parts(url)
    if not allow_private:
        _addresses(parts, allow_private, resolve, slots=_lookups, timeout=RESOLVE_TIMEOUT, owner=owner)


def _resolve(host: str) -> list[str]:
    return sorted({str(info[4][0]) for info in socket.getaddrinfo(host, None)})


_lookups = threading.BoundedSemaphore(MAX_LOOKUPS)  # submissions' (the API's shared threadpool)
_delivery_lookups = threading.BoundedSemaphore(MAX_LOOKUPS)  # deliveries' (the sender threads)
_owners_lookups: Counter[str] = Counter()  # API key owner -> its submissions' lookups in flight
_owners_freed = threading.Condition()


def _resolve_in_time(
    resolve: Callable[[str], list[str]],
    host: str,
    slots: threading.BoundedSemaphore,
    timeout: float,
    owner: str | None = None,
) -> list[str]:
    """`resolve(host)` on a thread of its own, waited for `timeout` seconds at most.

    `getaddrinfo` cannot be interrupted: a lookup that is given up on goes on, holding its slot of
    `slots` until the system resolver itself gives up. With every slot held, a lookup is refused
    at once (a refusal that may be retried) rather than queued behind the stuck ones. So that one
    API key whose nameserver never answers cannot hold every slot (and have everyone's webhooks
    refused), an `owner` holds at most MAX_LOOKUPS_PER_OWNER of them at once; its next lookup waits
    up to OWNER_WAIT seconds for one of those to end (a burst of submissions whose lookups take
    milliseconds passes), then is refused."""
    if owner is not None:
        with _owners_freed:
            if not _owners_freed.wait_for(lambda: _owners_lookups[owner] < MAX_LOOKUPS_PER_OWNER, OWNER_WAIT):
                raise LookupUnavailableError(
                    "too many of this API key's webhook host lookups in progress; try again shortly"
                )
            _owners_lookups[owner] += 1
    if not slots.acquire(blocking=False):
        _release_owner(owner)
        raise LookupUnavailableError("too many webhook host lookups in progress; try again shortly")
    answer: Future[list[str]] = Future()

    def lookup() -> None:
        try:
            found = resolve(host)
        except BaseException as exc:  # handed to the waiter, which raises it
            slots.release()
            _release_owner(owner)
            answer.set_exception(exc)
        else:
            slots.release()
            _release_owner(owner)
            answer.set_result(found)

    try:
        threading.Thread(target=lookup, name="webhook-lookup", daemon=True).start()
    except BaseException:  # no thread to run it (nor to give the slot back)
        slots.release()
        _release_owner(owner)
        raise
    try:
        return answer.result(timeout=timeout)
    except TimeoutError:  # raised by the wait, or by `resolve` (socket.timeout is one too)
        if answer.done():
            return answer.result()  # its answer, or its own error (the lookup's timeout: an OSError)
        raise LookupUnavailableError(f"webhook host {host!r} did not resolve in time; try again shortly") from None


def _release_owner(owner: str | None) -> None:
    """Give back one of `owner`'s lookups (see `_resolve_in_time`)."""
    if owner is None:
        return
    with _owners_freed:
        _owners_lookups[owner] -= 1
        if _owners_lookups[owner] <= 0:
            del _owners_lookups[owner]
        _owners_freed.notify_all()


@functools.cache
def _tls() -> ssl.SSLContext:
    """One TLS context per process: loading the CA bundle costs ~40 ms of CPU per client."""
    return httpx.create_ssl_context()


def attempt(
    url: str,
    body: bytes,
    *,
    secret: str,
    allow_private: bool,
    deadline: float = DEADLINE,
    resolve: Callable[[str], list[str]] | None = None,
) -> bool | None:
    """One signed POST of `body`: True when delivered (2xx/3xx), False when it must not be tried
    again (refused target, a 4xx but 429), None when it may be retried.

    The host is resolved and checked here, then the request goes to the address that was checked
    (with the URL's `Host` and TLS name): a second lookup by the HTTP client could answer an
    internal address (DNS rebinding). The whole attempt ends within about `deadline` seconds: a
    receiver dribbling its answer would otherwise hold it for as long as it likes, since the
    client's timeout applies to each read.

    Only the status line and headers are read (h11 bounds those): the response body never is, and
    the connection is dropped under it. A receiver answering an endless body, a slowly dribbled one
    or a compressed bomb (none asked for, with `Accept-Encoding: identity`) costs no memory and no
    time."""
    try:
        parts = _parts(url)
        address = _addresses(
            parts, allow_private, resolve, slots=_delivery_lookups, timeout=min(deadline, DELIVERY_RESOLVE_TIMEOUT)
        )[0]
    except LookupUnavailableError as exc:  # a nameserver that is slow or down: later, not never
        log.info("webhook %s failed: %s", shown(url), exc)
        return None
    except WebhookTargetError as exc:
        log.warning("webhook %s refused: %s", shown(url), exc)
        return False
    host = _bracketed(address)
    pinned = parts._replace(netloc=f"{host}:{parts.port}" if parts.port else host).geturl()
    ts = str(int(time.time()))
    headers = {
        "host": parts.netloc,
        "content-type": "application/json",
        "accept-encoding": "identity",
        "user-agent": "imagegen-webhook/1",
        "x-imagegen-timestamp": ts,
        "x-imagegen-signature": sign(secret, ts, body),
        "x-imagegen-delivery": delivery_id(body),
    }
    extensions = {"sni_hostname": parts.hostname} if parts.scheme == "https" else {}
    http = httpx.Client(timeout=min(10.0, deadline), follow_redirects=False, verify=_tls())
    timer = threading.Timer(deadline, http.close)  # closing the client ends its request
    timer.daemon = True
    timer.start()
    try:
        with http.stream("POST", pinned, content=body, headers=headers, extensions=extensions) as response:
            status = response.status_code  # the body is never read: leaving closes the connection
    except Exception as exc:  # httpx's errors, and whatever a client closed under a request raises
        log.info("webhook %s failed: %s", shown(url), type(exc).__name__)
        return None
    finally:
        timer.cancel()
        http.close()
    if status in RETRY_STATUSES:
        log.info("webhook %s failed: HTTP %d", shown(url), status)
        return None
    return status < 400


def delivery_id(body: bytes) -> str:
    """The event's delivery id: the same on every retry of one event (its body does not change),
    different for any other event (each body holds its job, type and timestamp), so a receiver can
    drop repeats by this one header."""
    return hashlib.sha256(body).hexdigest()[:32]


def backoff(attempts: int) -> float:
    """Seconds before the next try after `attempts` failed ones."""
    return min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (attempts - 1))


class _Pending(NamedTuple):
    job_id: str
    progress: bool
    body: bytes
    secret: str  # the job's key's own, or the server's (see app.core.webhooks)
    key: str | None = None  # its field in the sender's outbox; None: kept in memory only


@dataclass
class _Target:
    """One webhook URL's deliveries: in order, one at a time, with its own backoff."""

    host: str  # the URL's host: whose share of the threads it takes (see WebhookSender)
    pending: deque[_Pending] = field(default_factory=deque)
    busy: bool = False
    failures: int = 0  # failed tries of the delivery at the head
    not_before: float = 0.0  # monotonic time its head is (or became) due: due ones go oldest first


OUTBOXES_KEY = "imagegen:webhooks:outboxes"  # set of the ids of senders that keep an outbox


def outbox_key(sender: str) -> str:
    """A sender's deliveries not yet ended: hash of field (order) -> entry (JSON: url, job_id, owner, body)."""
    return f"imagegen:webhooks:outbox:{sender}"


def alive_key(sender: str) -> str:
    """Set (with a TTL) while its sender runs: once gone, anyone may adopt the sender's outbox."""
    return f"imagegen:webhooks:alive:{sender}"


# Adopt a stopped sender's outbox: unless its alive key (KEYS[1]) exists, move every entry of its
# outbox (KEYS[2]) into the adopter's (KEYS[3]), delete it and take its id (ARGV[1]) out of the
# set of outboxes (KEYS[4]). Answers the entries moved, as HGETALL does (none for a live sender).
# One script: of two senders adopting the same outbox at once, the second finds it gone.
ADOPT_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {}
end
local entries = redis.call('HGETALL', KEYS[2])
for i = 1, #entries, 2 do
  redis.call('HSET', KEYS[3], entries[i], entries[i + 1])
end
redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[4], ARGV[1])
return entries
"""


class WebhookSender:
    """Delivers webhooks on `threads` threads, off the sampling thread.

    Each URL gets its events in order (start → progress → completed), one delivery at a time, and
    waits out its own retries: a slow or failing receiver holds back only its own events, never
    other URLs' (one thread for all made every receiver wait behind one that answered 503 for a
    minute per event). A job's progress event that is still waiting when a newer one comes is
    replaced by it, and a URL keeps at most `MAX_PENDING` events, dropping the oldest progress first.

    Nor may slow receivers take every thread, whichever URLs or host names they are spread over:
    one host's URLs take at most half the threads at once, and hosts not known to be fast (no
    attempt under `SLOW` seconds in the last `FAST_MEMORY` seconds: slow ones, and new ones, which a
    caller can make up by the thousand with a wildcard DNS name) all the threads but one, which
    stays for the known-fast receivers. Due deliveries otherwise go in order of when they became due.

    With a Redis `connection` the deliveries outlive the process: retries wait minutes for a
    receiver that is down, and a worker killed (or stopped for a deploy) meanwhile lost them, so a
    client relying on webhooks never learned its job ended. Each event but progress (superseded
    within seconds, harmless to lose) is also written to the sender's outbox in Redis until its
    delivery ends, and the sender keeps an alive key with a short TTL. Every live sender adopts the
    outboxes whose alive key is gone (at start, then every `ADOPT_EVERY` seconds) and delivers their
    events in their order, with the same bodies, so receivers drop repeats by the same delivery id:
    a crash after a delivery but before its entry is deleted sends it again. A clean `close` leaves
    what still waits in its outbox and deletes its alive key, for the next sender to adopt at once.

    All of Redis is one thread's (`_keep`): `submit` only notes the write, so neither a job nor a
    delivery ever waits on Redis; while Redis fails, events are delivered from memory as without
    one, and the writes are retried once it answers.
    """

    THREADS = 4
    MAX_PENDING = 100
    SLOW = 5.0  # seconds: an attempt this long (a receiver that hangs, dribbles or times out) is slow
    FAST_MEMORY = 600.0  # seconds a host stays known-fast after an attempt that was not slow
    ALIVE_TTL = 30.0  # seconds a sender's alive key outlives its last refresh
    HEARTBEAT = 10.0  # seconds between refreshes
    ADOPT_EVERY = 10.0  # seconds between looks for stopped senders' outboxes
    RETRY_CAP = 10.0  # seconds at most between tries while Redis fails

    def __init__(self, settings: Settings, threads: int = THREADS, connection: Any = None) -> None:
        self.settings = settings
        self._per_host = max(1, threads // 2)
        self._for_slow = max(1, threads - 1)
        self._fast: dict[str, float] = {}  # host -> monotonic time its last fast attempt ended
        self._targets: dict[str, _Target] = {}
        self._ready = threading.Condition()
        self._closing = False
        self._stopped = False
        self.connection = connection
        self.id = uuid.uuid4().hex
        self._seq = 0
        # Outbox writes not yet made: field -> entry to write, or None to delete. Under `_writing`,
        # taken after `_ready` where both are held.
        self._writing = threading.Lock()
        self._writes: dict[str, bytes | None] = {}
        self._unsure: set[str] = set()  # fields whose write failed: it may have been made all the same
        self._held: set[str] = set()  # fields whose delivery this sender holds (queued, adopted, in flight)
        self._reconcile = False  # after a Redis error: its outbox may hold entries it does not know of
        self._others_after = 0.0  # monotonic time from which it may adopt other senders' outboxes
        self._beat_sent = -math.inf  # monotonic time the alive key was last sent
        self._failing = False
        self._orphans: dict[str, bytes] = {}  # adopted entries not yet queued (their secrets unread)
        self._halt = threading.Event()
        self._wake = threading.Event()
        self._threads = [threading.Thread(target=self._run, name=f"webhooks-{i}", daemon=True) for i in range(threads)]
        for thread in self._threads:
            thread.start()
        self._keeper: threading.Thread | None = None
        if connection is not None:
            self._secrets = Secrets(connection, settings.webhook_secret)
            self._adopt_script = connection.register_script(ADOPT_SCRIPT)
            self._keeper = threading.Thread(target=self._keep, name="webhooks-outbox", daemon=True)
            self._keeper.start()

    def submit(self, url: str, event: JobEvent, secret: str | None = None, owner: str | None = None) -> None:
        """Queue `event` for `url`, signed with `secret` (default: the server's). `owner` is the
        job's (see app.core.auth): a sender adopting the event reads its secret again by it."""
        if self._stopped:  # closed: no thread would ever send it
            log.warning("webhook %s: %s event after the sender stopped; not delivered", shown(url), event.type,
                        extra={"job_id": event.job_id})  # fmt: skip
            return
        body = event.model_dump_json(exclude_none=True).encode()
        progress = event.type is EventType.progress
        key = None
        if self.connection is not None and not progress:
            entry = {"url": url, "job_id": event.job_id, "owner": owner, "body": body.decode()}
            with self._writing:  # before it is queued: its delivery may end (and delete it) at once
                self._seq = max(self._seq + 1, time.time_ns())  # orders entries across senders too
                key = f"{self._seq:020d}-{self.id}"
                self._writes[key] = json.dumps(entry).encode()
                self._held.add(key)
            self._wake.set()
        self._queue(url, _Pending(event.job_id, progress, body, secret or self.settings.webhook_secret, key))

    def _queue(self, url: str, item: _Pending) -> None:
        with self._ready:
            target = self._targets.get(url)
            if target is None:
                target = self._targets[url] = _Target(_host(url), not_before=time.monotonic())
            pending = target.pending
            first = 1 if target.busy else 0  # the head is being sent: it stays
            if item.progress:  # the newest progress of a job replaces a waiting one
                for i in range(len(pending) - 1, first - 1, -1):
                    if pending[i].job_id == item.job_id and pending[i].progress:
                        del pending[i]
            pending.append(item)
            if len(pending) > self.MAX_PENDING:
                drop = next((i for i in range(first, len(pending)) if pending[i].progress), first)
                dropped = pending[drop]
                del pending[drop]
                self._forget(dropped.key)
                log.warning("webhook %s: %d events waiting; one dropped", shown(url), self.MAX_PENDING,
                            extra={"job_id": dropped.job_id})  # fmt: skip
            self._ready.notify()

    def _forget(self, key: str | None) -> None:
        """Delete the outbox entry `key` (its delivery ended), unless it was never written."""
        if key is None:
            return
        with self._writing:
            self._held.discard(key)
            if self._writes.get(key) is not None and key not in self._unsure:
                del self._writes[key]  # not written yet: nothing to delete
            else:
                self._writes[key] = None
        self._wake.set()

    def close(self, timeout: float = 10) -> None:
        """Deliver what is waiting (tries due within `timeout`), then stop the threads. What still
        waits then stays in the outbox, handed over to the next sender; without one, it is lost."""
        with self._ready:
            self._closing = True
            self._ready.notify_all()
        end = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, end - time.monotonic()))
        with self._ready:  # past the timeout: what still waits is handed over or dropped, and said so
            self._stopped = True
            self._ready.notify_all()
            # A receiver's head that a thread is still sending may yet arrive: not counted as dropped.
            waiting = [
                (url, p)
                for url, target in self._targets.items()
                for i, p in enumerate(target.pending)
                if not (i == 0 and target.busy)
            ]
        unwritten = self._hand_over() if self._keeper is not None else None
        in_outbox = [unwritten is not None and p.key is not None and p.key not in unwritten for _, p in waiting]
        kept = [(url, p.job_id) for (url, p), there in zip(waiting, in_outbox, strict=True) if there]
        dropped = [(url, p.job_id) for (url, p), there in zip(waiting, in_outbox, strict=True) if not there]
        if kept:
            soon = "now" if not unwritten else "once this one's alive key expires"
            log.warning("webhooks: %d event(s) for %d receiver(s) handed over (left in the outbox for the next "
                        "sender to deliver %s; jobs %s)", *_count(kept), soon, _jobs(kept),
                        extra=_about(kept))  # fmt: skip
        if dropped:
            log.warning("webhooks: %d event(s) for %d receiver(s) not delivered before shutdown (jobs %s)",
                        *_count(dropped), _jobs(dropped), extra=_about(dropped))  # fmt: skip

    def _hand_over(self) -> set[str]:
        """Stop the outbox thread, make the writes it had not made and delete the alive key, so
        another sender adopts the outbox now rather than once the key expires. The fields that may
        be missing from the outbox (none, unless Redis failed)."""
        assert self._keeper is not None
        self._halt.set()
        self._wake.set()
        # A write in flight may take Redis's timeouts; one made after ours at worst sends an event twice.
        self._keeper.join(5)
        with self._writing:
            writes, self._writes = self._writes, {}
        unwritten = {k for k, v in writes.items() if v is not None} | self._unsure
        if self._failing:  # not tried again: a stop would wait on Redis's timeouts for nothing
            log.warning("webhooks: Redis fails: what this sender wrote to its outbox is adopted once its alive "
                        "key expires")  # fmt: skip
            return unwritten
        pipe = self.connection.pipeline(transaction=False)
        if any(v is not None for v in writes.values()):
            pipe.sadd(OUTBOXES_KEY, self.id)  # in case the outbox thread never got to it
        _write(pipe, outbox_key(self.id), writes)
        pipe.delete(alive_key(self.id))
        try:
            pipe.execute()
        except Exception as exc:
            log.warning("webhooks: could not hand the outbox over (%s): what this sender wrote to it is adopted "
                        "once its alive key expires", exc)  # fmt: skip
            return unwritten
        return set()

    def _keep(self) -> None:
        """The outbox's thread: make the writes `submit` and the deliveries note, refresh the alive
        key, adopt stopped senders' outboxes. While Redis fails, each again after a growing pause."""
        adopt_at = 0.0  # monotonic: at once, then every ADOPT_EVERY
        failures = 0
        while not self._halt.is_set():
            self._wake.clear()  # a write noted from here on wakes the wait below
            now = time.monotonic()
            try:
                self._flush()
                if now >= adopt_at:
                    self._adopt(others=now >= self._others_after)
                    adopt_at = now + self.ADOPT_EVERY
            except Exception as exc:
                failures += 1
                if not self._failing:
                    log.warning("webhooks: cannot write the outbox in Redis (%s); deliveries are kept in "
                                "memory only until it answers", exc)  # fmt: skip
                self._failing = True
                # A reply lost after its command ran (an adoption's above all) leaves entries in
                # this sender's outbox that it does not know of: read it again once Redis answers.
                self._reconcile = True
                # Other senders' alive keys may expire in the outage while they go on running:
                # adopting their outboxes once Redis answers would send their events twice. Each
                # refreshes its key within RETRY_CAP of Redis answering again.
                self._others_after = time.monotonic() + self.ALIVE_TTL + self.RETRY_CAP
                self._halt.wait(min(self.RETRY_CAP, 0.5 * 2 ** min(failures - 1, 10)))
                continue
            if self._failing:
                log.info("webhooks: the outbox is written again")
                self._failing, failures = False, 0
            self._wake.wait(max(0.0, min(self._beat_sent + self.HEARTBEAT, adopt_at) - time.monotonic()))

    def _flush(self) -> None:
        """Make the writes noted, with the alive key when it is due for a refresh. Raises when Redis
        fails, with the writes noted again (later ones for the same field win)."""
        with self._writing:
            writes, self._writes = self._writes, {}
        sent = time.monotonic()
        beat = sent - self._beat_sent >= self.HEARTBEAT
        if not writes and not beat:
            return
        pipe = self.connection.pipeline(transaction=False)
        if beat:  # first: an entry is never in an outbox whose alive key has expired
            pipe.set(alive_key(self.id), 1, px=int(self.ALIVE_TTL * 1000))
            pipe.sadd(OUTBOXES_KEY, self.id)
        _write(pipe, outbox_key(self.id), writes)
        try:
            pipe.execute()
        except Exception:
            with self._writing:
                self._unsure.update(k for k, v in writes.items() if v is not None)
                self._writes = writes | self._writes
            self._wake.set()
            raise
        if beat:
            self._beat_sent = sent
        if self._unsure:
            with self._writing:
                self._unsure.difference_update(writes)

    def _adopt(self, others: bool = True) -> None:
        """Adopt the outboxes of senders whose alive key is gone (unless not `others`), and entries
        of its own outbox it does not hold (see `_reconcile`), and queue their events in order."""
        mine = outbox_key(self.id)
        if self._reconcile:
            fields = [f.decode() for f in self.connection.hkeys(mine)]
            with self._writing:
                unknown = [f for f in fields if f not in self._held and f not in self._writes]
            if unknown:
                values = self.connection.hmget(mine, unknown)
                self._note_orphans([(f, v) for f, v in zip(unknown, values, strict=True) if v is not None])
            self._reconcile = False
        members = self.connection.smembers(OUTBOXES_KEY) if others else set()
        stopped = [m.decode() for m in members if m.decode() != self.id]
        pipe = self.connection.pipeline(transaction=False)
        for other in stopped:
            pipe.exists(alive_key(other))
        alive = pipe.execute() if stopped else []
        for other, live in zip(stopped, alive, strict=True):
            if not live:
                keys = [alive_key(other), outbox_key(other), mine, OUTBOXES_KEY]
                found = self._adopt_script(keys=keys, args=[other])
                self._note_orphans([(found[i].decode(), found[i + 1]) for i in range(0, len(found), 2)])
        if not self._orphans:
            return
        adopted = []
        for key in sorted(self._orphans):  # the order they were submitted in
            try:
                entry = json.loads(self._orphans[key])
                url, job_id, owner, body = entry["url"], entry["job_id"], entry.get("owner"), entry["body"].encode()
            except (ValueError, KeyError, TypeError, AttributeError):
                log.warning("webhooks: an unreadable outbox entry %s dropped", key)
                self._forget(key)
                continue
            # Read again, not kept in Redis: a Redis error leaves them all for the next round.
            adopted.append((url, _Pending(job_id, False, body, self._secrets.for_owner(owner), key)))
        self._orphans.clear()
        for url, item in adopted:
            self._queue(url, item)
        if adopted:
            taken = [(url, item.job_id) for url, item in adopted]
            log.info("webhooks: %d event(s) for %d receiver(s) adopted from stopped senders (jobs %s)",
                     *_count(taken), _jobs(taken), extra=_about(taken))  # fmt: skip

    def _note_orphans(self, entries: list[tuple[str, bytes]]) -> None:
        """Entries now in this sender's outbox that it is to deliver (queued by `_adopt`)."""
        with self._writing:
            self._held.update(f for f, _ in entries)
        self._orphans.update(entries)

    def _next(self) -> tuple[str, _Target] | None:
        """The next URL whose head delivery is due (marked busy), waiting for one; None to stop.
        Due ones whose host has its share of the threads wait for one of those to end."""
        with self._ready:
            while not self._stopped:
                now = time.monotonic()
                busy = Counter(t.host for t in self._targets.values() if t.busy)
                slow = sum(n for host, n in busy.items() if self._is_slow(host, now))
                due = [(t.not_before, u) for u, t in self._targets.items() if t.pending and not t.busy]
                ready = [u for when, u in due if when <= now and self._may_take(self._targets[u].host, busy, slow, now)]
                if ready:
                    url = min(ready, key=lambda u: self._targets[u].not_before)
                    self._targets[url].busy = True
                    return url, self._targets[url]
                if self._closing and not due:
                    return None
                # Due ones held back by their host's share wake on the notify of an attempt's end.
                self._ready.wait(min((when for when, _ in due if when > now), default=now + 1.0) - now)
            return None

    def _is_slow(self, host: str, now: float) -> bool:
        """Not known to be fast: slow lately, or not tried lately (a new host name counts as slow)."""
        since = self._fast.get(host)
        return since is None or now - since >= self.FAST_MEMORY

    def _may_take(self, host: str, busy: Counter[str], slow: int, now: float) -> bool:
        """Whether a thread may start an attempt to `host`, with `busy` threads per host of which
        `slow` on slow hosts."""
        return busy[host] < self._per_host and (slow < self._for_slow or not self._is_slow(host, now))

    def _timed(self, host: str, started: float) -> None:
        """Note how long an attempt to `host` that began at `started` took (under the lock)."""
        now = time.monotonic()
        if now - started >= self.SLOW:
            self._fast.pop(host, None)
            return
        self._fast[host] = now
        for known, since in list(self._fast.items()):  # forget those not fast lately
            if now - since >= self.FAST_MEMORY:
                del self._fast[known]

    def _run(self) -> None:
        while (item := self._next()) is not None:
            url, target = item
            head = target.pending[0]
            started = time.monotonic()
            try:
                with job_context(head.job_id):  # `attempt`'s lines name the delivery's job
                    outcome = attempt(
                        url,
                        head.body,
                        secret=head.secret,
                        allow_private=self.settings.webhook_allow_private,
                    )
            except Exception:
                log.exception("webhook delivery to %s crashed", shown(url), extra={"job_id": head.job_id})
                outcome = False
            with self._ready:
                target.busy = False
                self._timed(target.host, started)
                if outcome is None:
                    target.failures += 1
                    if target.failures < self.settings.webhook_max_attempts:
                        target.not_before = time.monotonic() + backoff(target.failures)
                        self._ready.notify_all()
                        continue
                    log.warning("webhook %s gave up after %d attempts", shown(url), target.failures,
                                extra={"job_id": head.job_id})  # fmt: skip
                self._forget(target.pending.popleft().key)
                # Its next event is due now: behind those already due, so a URL with many events
                # waiting takes its turn with the others rather than keeping a thread to itself.
                target.failures, target.not_before = 0, time.monotonic()
                if not target.pending:
                    del self._targets[url]
                self._ready.notify_all()


def _write(pipe: Any, outbox: str, writes: dict[str, bytes | None]) -> None:
    """Queue on `pipe` the outbox writes noted in `writes` (an entry, or None to delete it)."""
    entries = {k: v for k, v in writes.items() if v is not None}
    gone = [k for k, v in writes.items() if v is None]
    if entries:
        pipe.hset(outbox, mapping=entries)
    if gone:
        pipe.hdel(outbox, *gone)


def _count(waiting: list[tuple[str, str]]) -> tuple[int, int]:
    """How many events, and for how many URLs, in (url, job id) pairs."""
    return len(waiting), len({url for url, _ in waiting})


def _about(waiting: list[tuple[str, str]]) -> dict[str, str]:
    """The log record's job id, where (url, job id) pairs are about one job alone."""
    jobs = {job_id for _, job_id in waiting}
    return {"job_id": jobs.pop()} if len(jobs) == 1 else {}


def _jobs(waiting: list[tuple[str, str]]) -> str:
    """The jobs of (url, job id) pairs, for the log: the first ten."""
    jobs = sorted({job_id for _, job_id in waiting})
    return ", ".join(jobs[:10]) + (", …" if len(jobs) > 10 else "")


def _host(url: str) -> str:
    """Whose share of the sender's threads a URL's deliveries take: its host's (one for a URL that
    does not parse, which `attempt` refuses at once)."""
    try:
        return (urlsplit(url).hostname or "").rstrip(".")
    except ValueError:
        return ""
