#!/usr/bin/env bash
# Make sure Debian's redis-server is installed: install it when root, else say the one command.
set -euo pipefail
command -v redis-server >/dev/null 2>&1 && exit 0
"$(dirname "$0")/apt-install.sh" redis-server && exit 0
echo "(or point IMAGEGEN_REDIS_URL at a Redis you already run)" >&2
exit 1
