"""`python -m app.keys create|list|update|revoke`: manage API keys stored (hashed) in Redis.

A stored key may queue jobs with priority `high` only when granted (`--high-priority`), and may
have `IMAGEGEN_MAX_QUEUED_PER_KEY` jobs waiting at once unless it has a bound of its own
(`--max-queued N`, 0 for none). Keys in `IMAGEGEN_API_KEYS` are the operator's: they may use
every priority, under the server's bound. A key given a webhook secret of its own
(`--webhook-secret`, printed once on the line after the key) has its jobs' webhooks signed with
it instead of the server's `IMAGEGEN_WEBHOOK_SECRET`.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from typing import Any

from app.core.auth import (
    AmbiguousKeyName,
    digest,
    keys_named,
    list_keys,
    revoke,
    set_webhook_secrets,
    store_key,
    update_grants,
)
from app.core.config import Settings, load_settings
from app.core.queue import connect


def _max_queued(text: str) -> int | None:
    """`--max-queued`: a count (0: no bound), or `default` for the server's setting."""
    if text == "default":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number or 'default': {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 (no bound) or more")
    return value


def _grant_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--high-priority",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="may (or, with --no-high-priority, may not) queue jobs with priority high",
    )
    parser.add_argument(
        "--max-queued",
        type=_max_queued,
        default=argparse.SUPPRESS,  # absent unless given: `update` keeps the key's bound
        metavar="N|default",
        help="jobs it may have waiting at once (0: no bound; default: IMAGEGEN_MAX_QUEUED_PER_KEY)",
    )


def _describe(meta: dict, settings: Settings) -> str:
    created = datetime.datetime.fromtimestamp(meta["created"], datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    bound = meta.get("max_queued")
    queued = f"default ({settings.max_queued_per_key})" if bound is None else str(bound or "unbounded")
    priority = "high allowed" if meta.get("high_priority") else "normal/low only"
    hooks = "its own" if meta.get("webhook_secret") else "the server's"
    return f"{meta['name']}  created {created}  priority: {priority}  max queued: {queued}  webhook secret: {hooks}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.keys", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    create = sub.add_parser("create", help="create a key and print it (shown only once)")
    create.add_argument("name")
    _grant_options(create)
    create.add_argument(
        "--webhook-secret",
        action="store_true",
        help="give it a webhook secret of its own (printed once, after the key)",
    )
    sub.add_parser("list", help="list keys: digest prefix, name, creation time, grants")
    update = sub.add_parser("update", help="change the grants of a key, by name or digest prefix (8+ hex digits)")
    update.add_argument("name_or_prefix")
    _grant_options(update)
    hooks = update.add_mutually_exclusive_group()
    hooks.add_argument(
        "--new-webhook-secret", action="store_true", help="give it a new webhook secret of its own (printed once)"
    )
    hooks.add_argument(
        "--no-webhook-secret", action="store_true", help="sign its jobs' webhooks with the server's secret again"
    )
    rm = sub.add_parser("revoke", help="revoke a key, by name or digest prefix (8+ hex digits)")
    rm.add_argument("name_or_prefix")
    args = parser.parse_args(argv)
    settings = load_settings("keys")
    redis = connect(settings.redis_url)
    try:
        return _run(parser, args, settings, redis)
    except AmbiguousKeyName as exc:
        print(f"{parser.prog} {args.command}: {exc}", file=sys.stderr)
        return 1


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace, settings: Settings, redis: Any) -> int:
    if args.command == "create":
        others = keys_named(redis, args.name)
        key = store_key(
            redis, args.name, high_priority=bool(args.high_priority), max_queued=getattr(args, "max_queued", None)
        )
        print(key)
        if others:  # a rotation, say: the old key stays until revoked by its prefix
            print(
                f"note: {len(others)} other key(s) named {args.name!r} ({', '.join(others)}); this one is "
                f"{digest(key)[:12]}: update and revoke now need a digest prefix",
                file=sys.stderr,
            )
        if args.webhook_secret:
            [(_, secret)] = set_webhook_secrets(redis, digest(key)[:12], new=True)
            print(secret)
            if not settings.webhook_secret:
                print("note: webhooks are off here (no IMAGEGEN_WEBHOOK_SECRET)", file=sys.stderr)
        if not settings.auth_enabled:
            print("note: IMAGEGEN_AUTH is off here: the API checks keys only with it on", file=sys.stderr)
    elif args.command == "list":
        for prefix, meta in list_keys(redis):
            print(f"{prefix}  {_describe(meta, settings)}")
    elif args.command == "update":
        grants: dict[str, bool | int | None] = {}
        if args.high_priority is not None:
            grants["high_priority"] = args.high_priority
        if hasattr(args, "max_queued"):
            grants["max_queued"] = args.max_queued
        hooks_change = args.new_webhook_secret or args.no_webhook_secret
        if not grants and not hooks_change:
            parser.error(
                "update: give --high-priority, --no-high-priority, --max-queued, --new-webhook-secret "
                "or --no-webhook-secret"
            )
        n = update_grants(redis, args.name_or_prefix, **grants) if grants else 0
        if hooks_change:
            changed = set_webhook_secrets(redis, args.name_or_prefix, new=args.new_webhook_secret)
            n = max(n, len(changed))
            for name, secret in changed:
                if secret is not None:
                    print(f"{name}: webhook secret {secret}")
        print(f"updated {n} key(s)")
        return 0 if n else 1
    else:
        n = revoke(redis, args.name_or_prefix)
        print(f"revoked {n} key(s)")
        return 0 if n else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
