"""`python -m app.keys create|list|revoke`: manage API keys stored (hashed) in Redis."""

from __future__ import annotations

import argparse
import sys

from app.core.auth import list_keys, revoke, store_key
from app.core.config import Settings
from app.core.queue import connect


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.keys", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    create = sub.add_parser("create", help="create a key and print it (shown only once)")
    create.add_argument("name")
    sub.add_parser("list", help="list keys: digest prefix, name, creation time")
    rm = sub.add_parser("revoke", help="revoke keys by name or digest prefix")
    rm.add_argument("name_or_prefix")
    args = parser.parse_args(argv)
    settings = Settings()
    redis = connect(settings.redis_url)
    if args.command == "create":
        print(store_key(redis, args.name))
        if not settings.auth_enabled:
            print("note: IMAGEGEN_AUTH is off here: the API checks keys only with it on", file=sys.stderr)
    elif args.command == "list":
        for prefix, meta in list_keys(redis):
            print(f"{prefix}  {meta['name']}  {meta['created']}")
    else:
        n = revoke(redis, args.name_or_prefix)
        print(f"revoked {n} key(s)")
        return 0 if n else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
