#!/usr/bin/env bash
# Make sure PYTHON (default python3) can create a virtual environment: Debian and Ubuntu ship
# venv's pip bootstrap apart, as pythonX.Y-venv. Installs it when root, else says the one command.
set -euo pipefail
py=${1:-python3}
"$py" -c 'import ensurepip' >/dev/null 2>&1 && exit 0
exec "$(dirname "$0")/apt-install.sh" "$("$py" -c 'import sys; print("python%d.%d-venv" % sys.version_info[:2])')"
