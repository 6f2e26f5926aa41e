# syntax=docker/dockerfile:1
# Targets: `api` (no torch), `worker` (CPU torch, serves the tiny model), `worker-gpu` (CUDA torch).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# The one torch release of both workers (the tests and `make` use it too): the CPU build in
# `worker`, PyPI's CUDA build in `worker-gpu`.
ARG TORCH_VERSION=2.13.0

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN useradd --create-home --uid 10001 imagegen && mkdir -p /results /cache && chown imagegen /results /cache
WORKDIR /srv

FROM base AS api
# Dependencies first, in a layer of their own: a change to the code reinstalls only the project.
COPY pyproject.toml scripts/deps.py scripts/constraints.txt ./
RUN python deps.py > /tmp/requirements.txt && pip install -r /tmp/requirements.txt -c constraints.txt
COPY README.md ./
COPY app ./app
COPY worker ./worker
COPY models ./models
RUN pip install --no-deps .
USER imagegen
EXPOSE 8000
# With IMAGEGEN_ALLOWED_HOSTS set, the probe names one of its hosts: any other gets 400.
HEALTHCHECK --interval=10s --timeout=3s CMD ["python", "-c", "import os, urllib.request as u; h = [n.strip().replace('*', 'x') for n in os.environ.get('IMAGEGEN_ALLOWED_HOSTS', '').split(',') if n.strip()]; u.urlopen(u.Request('http://127.0.0.1:8000/healthz', headers={'Host': h[0]} if h else {}), timeout=2)"]
CMD ["uvicorn", "app.main:app", "--host", "0.0.0.0", "--port", "8000", "--proxy-headers"]

FROM base AS worker
ARG TORCH_VERSION
ARG TORCH_CPU_INDEX_URL=https://download.pytorch.org/whl/cpu
# Without its dependencies: the next layer installs them from PyPI at the pinned versions.
RUN pip install --no-deps "torch==${TORCH_VERSION}+cpu" --index-url "${TORCH_CPU_INDEX_URL}"
COPY pyproject.toml scripts/deps.py scripts/constraints.txt ./
RUN python deps.py worker > /tmp/requirements.txt && pip install -r /tmp/requirements.txt -c constraints.txt
COPY README.md ./
COPY app ./app
COPY worker ./worker
COPY models ./models
RUN pip install --no-deps .
ENV HF_HOME=/cache/huggingface IMAGEGEN_MODEL_CACHE=/cache/models
USER imagegen
CMD ["python", "-m", "worker"]

# PyPI's Linux x86-64 torch is a CUDA build that brings its CUDA libraries as nvidia-* wheels
# (torch 2.13.0: CUDA 13.0), so no CUDA base image is needed: only the host's NVIDIA driver
# (>= 580 for CUDA 13; the README says more) and the NVIDIA Container Toolkit. For another CUDA
# build, name PyTorch's index for it: --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
FROM base AS worker-gpu
ARG TORCH_VERSION
ARG TORCH_INDEX_URL=
# A C compiler for IMAGEGEN_COMPILE: Triton builds its kernel launcher with the host's compiler when
# it first runs (without one, compiling fails and the worker runs the UNet uncompiled, with a warning).
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
RUN pip install "torch==${TORCH_VERSION}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
COPY pyproject.toml scripts/deps.py scripts/constraints.txt ./
RUN python deps.py worker > /tmp/requirements.txt && pip install -r /tmp/requirements.txt -c constraints.txt
COPY README.md ./
COPY app ./app
COPY worker ./worker
COPY models ./models
RUN pip install --no-deps .
# No IMAGEGEN_DTYPE: the registry entry's precision applies on CUDA (float16 for the hub models).
ENV HF_HOME=/cache/huggingface IMAGEGEN_MODEL_CACHE=/cache/models IMAGEGEN_DEVICE=cuda \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER imagegen
CMD ["python", "-m", "worker"]
