#!/usr/bin/env bash
# Make sure PYTHON (default python3) is Python 3.11 or newer and can create a virtual environment:
# Debian and Ubuntu ship venv's pip bootstrap apart, as pythonX.Y-venv. Installs it when root,
# else says the one command.
set -euo pipefail
py=${1:-python3}
if ! command -v "$py" >/dev/null 2>&1; then
  echo "$py: not found. Install Python 3.11 or newer with its venv module (Debian/Ubuntu: python3.11 python3.11-venv), or name one:" >&2
  echo "  make PYTHON=/path/to/python3.11 ..." >&2
  exit 1
fi
# Checked first: an older Python got as far as `pip install -e .`, after the torch download.
if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "$py is Python $("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])'); imagegen needs 3.11 or newer." >&2
  echo "Install Python 3.11 or newer with its venv module (Debian/Ubuntu: python3.11 python3.11-venv), or name one:" >&2
  echo "  make PYTHON=/path/to/python3.11 ..." >&2
  exit 1
fi
"$py" -c 'import ensurepip' >/dev/null 2>&1 && exit 0
exec "$(dirname "$0")/apt-install.sh" "$("$py" -c 'import sys; print("python%d.%d-venv" % sys.version_info[:2])')"
