#!/usr/bin/env bash
# Packs what scripts/gpu-bench.sh needs on a GPU machine that cannot reach a package registry:
# CPython wheels of this project's packages that such a machine's image lacks (it has PyTorch,
# transformers, numpy, pillow, httpx, prometheus-client, click and tqdm), at the versions installed
# in .venv, and Debian's redis-server with the libraries it links that a CUDA image may not have.
# Run it here (after `make venv`), then carry the folder to the GPU machine (bench/README.md, "GPU").
#   KIT=.whl PYVER=3.12 scripts/gpu-kit.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PYVER=${PYVER:-3.12}
KIT=${KIT:-.whl}
PACKAGES=(
  diffusers importlib-metadata lazy-importer
  fastapi starlette opentelemetry-api python-multipart sse-starlette uvicorn
  pydantic pydantic-core pydantic-settings python-dotenv annotated-types typing-inspection typing-extensions
  redis hiredis rq croniter
)
specs=()
for name in "${PACKAGES[@]}"; do
  specs+=("$name==$("$PY" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$name")")
done
rm -rf "$KIT"
mkdir -p "$KIT/deb"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$KIT" "${specs[@]}"
# redis-server is a link to redis-tools' redis-check-rdb; the libraries are Debian 12's.
(cd "$KIT/deb" && apt-get download -q redis-server redis-tools liblzf1 libjemalloc2 libatomic1 >/dev/null)
echo "$KIT: $(ls "$KIT"/*.whl | wc -l) wheels, $(ls "$KIT"/deb/*.deb | wc -l) Debian packages, $(du -sh "$KIT" | cut -f1)"
