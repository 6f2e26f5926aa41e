"""Webhook targets and deliveries: SSRF checks, HMAC-SHA256 signatures, retries with backoff.

Signature scheme: header `X-Imagegen-Timestamp: <unix seconds>` and
`X-Imagegen-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>." + raw body)>`.
Receivers recompute it over the raw body and reject stale timestamps.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import socket
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import httpx

log = logging.getLogger(__name__)
RETRY_STATUSES = {429, 500, 502, 503, 504}
BACKOFF_BASE = 0.5  # seconds; doubles per attempt, capped at BACKOFF_CAP
BACKOFF_CAP = 30.0


class WebhookTargetError(ValueError):
    """The URL is not an acceptable webhook target."""


def sign(secret: str, timestamp: str, body: bytes) -> str:
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(secret: str, timestamp: str, body: bytes, signature: str) -> bool:
    return hmac.compare_digest(sign(secret, timestamp, body), signature)


def _blocked(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return (
        ip.is_loopback
        or ip.is_private
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
        or str(ip) == "100.100.100.200"  # Alibaba metadata; 169.254.169.254 is link-local already
        or (isinstance(ip, ipaddress.IPv4Address) and ip in ipaddress.ip_network("100.64.0.0/10"))
    )


def check_target(url: str, *, allow_private: bool, resolve: Callable[[str], list[str]] | None = None) -> None:
    """Refuse non-HTTP(S) URLs and, unless allowed, hosts that resolve to internal addresses."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookTargetError("webhook must be an http(s) URL with a host")
    if parts.username or parts.password:
        raise WebhookTargetError("webhook URLs must not carry credentials")
    if allow_private:
        return
    try:
        addresses = (resolve or _resolve)(parts.hostname)
    except OSError as exc:
        raise WebhookTargetError(f"webhook host {parts.hostname!r} does not resolve") from exc
    for addr in addresses:
        if _blocked(ipaddress.ip_address(addr.split("%")[0])):
            raise WebhookTargetError(
                f"webhook host {parts.hostname!r} resolves to an internal address ({addr}); refused"
            )


def _resolve(host: str) -> list[str]:
    return sorted({str(info[4][0]) for info in socket.getaddrinfo(host, None)})


def deliver(
    url: str,
    body: bytes,
    *,
    secret: str,
    max_attempts: int,
    allow_private: bool,
    client: httpx.Client | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> bool:
    """POST `body` until a 2xx/3xx/4xx (but 429) answer or `max_attempts`; True when delivered."""
    own = client is None
    http = client or httpx.Client(timeout=10, follow_redirects=False)
    try:
        for attempt in range(1, max_attempts + 1):
            try:
                check_target(url, allow_private=allow_private)  # again: DNS may have changed since submit
                ts = str(int(time.time()))
                headers = {
                    "content-type": "application/json",
                    "user-agent": "imagegen-webhook/1",
                    "x-imagegen-timestamp": ts,
                    "x-imagegen-signature": sign(secret, ts, body),
                }
                response = http.post(url, content=body, headers=headers)
                if response.status_code not in RETRY_STATUSES:
                    return response.status_code < 400
                reason = f"HTTP {response.status_code}"
            except WebhookTargetError as exc:
                log.warning("webhook %s refused: %s", url, exc)
                return False
            except httpx.HTTPError as exc:
                reason = type(exc).__name__
            if attempt < max_attempts:
                delay = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (attempt - 1))
                log.info("webhook %s failed (%s); retry %d in %.1fs", url, reason, attempt, delay)
                sleep(delay)
        log.warning("webhook %s gave up after %d attempts", url, max_attempts)
        return False
    finally:
        if own:
            http.close()
