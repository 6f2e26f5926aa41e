#!/usr/bin/env bash
# Install Debian packages when root (and apt-get is there); else print the one command and fail.
set -euo pipefail
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing $* (Debian packages)..." >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
  exit 0
fi
echo "missing: $*. Install with:  sudo apt-get install -y $*" >&2
exit 1
