#!/usr/bin/env bash
# The benchmark on a GPU, on a machine whose image has CUDA PyTorch but not this project's other
# packages, nor Redis, nor a registry to fetch them from: installs the kit made by
# scripts/gpu-kit.sh (KIT, default .whl), builds sd15-random (SD 1.5's size, random weights) and
# runs bench.run on the GPU in float16, without ingress (no wrk there; it does not touch the GPU).
# Extra arguments go to bench.run. Writes bench/results/latest.json (partial.json while it runs)
# and copies them to $OUT if set.
set -euo pipefail
cd "$(dirname "$0")/.."
KIT=${KIT:-.whl}
site=/tmp/imagegen-site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$KIT"/*.whl
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
if ! command -v redis-server >/dev/null; then
  root=/tmp/imagegen-redis
  for deb in "$KIT"/deb/*.deb; do dpkg -x "$deb" "$root"; done
  mkdir -p "$root/bin"
  # The libraries only for redis-server: Python and PyTorch keep the image's own.
  printf '#!/bin/sh\nLD_LIBRARY_PATH=%s exec %s "$@"\n' "$root/usr/lib/x86_64-linux-gnu" "$root/usr/bin/redis-server" \
    >"$root/bin/redis-server"
  chmod +x "$root/bin/redis-server"
  export PATH="$root/bin:$PATH"
fi
redis-server --version
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c 'import torch, diffusers; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "diffusers", diffusers.__version__)'
export HF_HUB_OFFLINE=1 IMAGEGEN_MODEL_CACHE=${IMAGEGEN_MODEL_CACHE:-/tmp/imagegen-models}
SECONDS=0
python3 -c 'from models.registry import resolve; print("built", resolve("sd15-random"))'
echo "sd15-random built in ${SECONDS}s"
# Ends by itself (BENCH_LIMIT seconds) before a lease's command limit, so that what was measured so
# far (bench.run saves partial.json after every phase) is copied out either way.
status=0
rm -f bench/results/latest.json bench/results/partial.json  # nothing from an earlier run is copied out
timeout "${BENCH_LIMIT:-480}" python3 -m bench.run --models sd15-random --device cuda --dtype float16 --no-ingress \
  --jobs 64 --idle 10 --cold 1 --seconds 3 "$@" || status=$?
if [ -n "${OUT:-}" ]; then cp bench/results/latest.json bench/results/partial.json "$OUT/" 2>/dev/null || true; fi
exit "$status"
