#!/usr/bin/env bash
# Record the versions of every package in .venv (what the tests last passed with) as pip
# constraints: `make` and the Docker images install exactly these, so a new release of a
# dependency cannot change a fresh install until someone runs this again, runs `make test` and
# commits the file. torch is left out: its build differs by machine (CPU here, CUDA in the GPU
# image) and the Makefile and Dockerfile pin its release themselves.
set -euo pipefail
cd "$(dirname "$0")/.."
out=scripts/constraints.txt
{
  echo "# pip constraints: the versions the tests passed with. Made by scripts/lock.sh (make lock); do not edit."
  .venv/bin/pip freeze --exclude-editable --all | grep -v -i -E '^(torch|triton|nvidia-[a-z0-9-]*|pip|setuptools|wheel)==' | LC_ALL=C sort -f
} >"$out.tmp"
mv "$out.tmp" "$out"
echo "wrote $out ($(grep -vc '^#' "$out") packages)"
