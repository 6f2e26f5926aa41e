#!/usr/bin/env bash
# Make sure Debian's chromium is there for the browser tests (tests/e2e, driven by Playwright):
# install it when root, else say the one command. Never fatal: without a browser those tests skip.
set -uo pipefail
command -v chromium >/dev/null 2>&1 && exit 0
"$(dirname "$0")/apt-install.sh" chromium && exit 0
echo "without chromium the browser tests will be skipped" >&2
exit 0
