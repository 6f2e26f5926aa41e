#!/usr/bin/env bash
# Make sure Debian's redis-server is installed: install it when root, else say the one command.
set -euo pipefail
command -v redis-server >/dev/null 2>&1 && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing redis-server (Debian package)..." >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  exit 0
fi
echo "redis-server is missing. Install it with:  sudo apt-get install -y redis-server" >&2
echo "(or point IMAGEGEN_REDIS_URL at a Redis you already run)" >&2
exit 1
