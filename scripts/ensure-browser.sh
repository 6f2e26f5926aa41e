#!/usr/bin/env bash
# Make sure Debian's chromium is there for the browser tests (tests/e2e, driven by Playwright):
# install it when root, else say the one command. Never fatal: without a browser those tests skip.
set -uo pipefail
command -v chromium >/dev/null 2>&1 && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing chromium (Debian package) for the browser tests..." >&2
  if apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; then
    exit 0
  fi
  echo "could not install chromium; the browser tests will be skipped" >&2
  exit 0
fi
echo "chromium is missing, so the browser tests will be skipped. Install it with:  sudo apt-get install -y chromium" >&2
exit 0
