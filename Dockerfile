# syntax=docker/dockerfile:1
# Targets: `api` (no torch), `worker` (CPU torch, serves the tiny model), `worker-gpu` (CUDA torch).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# Any CUDA PyTorch runtime image with Python 3.11+ works; torch comes from the image.
ARG CUDA_IMAGE=pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN useradd --create-home --uid 10001 imagegen && mkdir -p /results /cache && chown imagegen /results /cache
WORKDIR /srv

FROM base AS api
# Dependencies first, in a layer of their own: a change to the code reinstalls only the project.
COPY pyproject.toml scripts/deps.py ./
RUN python deps.py > /tmp/requirements.txt && pip install -r /tmp/requirements.txt
COPY README.md ./
COPY app ./app
COPY worker ./worker
COPY models ./models
RUN pip install --no-deps .
USER imagegen
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"
CMD ["uvicorn", "app.main:app", "--host", "0.0.0.0", "--port", "8000", "--proxy-headers"]

FROM base AS worker
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml scripts/deps.py ./
RUN python deps.py worker > /tmp/requirements.txt && pip install -r /tmp/requirements.txt
COPY README.md ./
COPY app ./app
COPY worker ./worker
COPY models ./models
RUN pip install --no-deps .
ENV HF_HOME=/cache/huggingface IMAGEGEN_MODEL_CACHE=/cache/models
USER imagegen
CMD ["python", "-m", "worker"]

FROM ${CUDA_IMAGE} AS worker-gpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN useradd --create-home --uid 10001 imagegen && mkdir -p /results /cache && chown imagegen /results /cache
WORKDIR /srv
# torch is already in the image; pip keeps it because it satisfies `torch>=2.4`.
COPY pyproject.toml scripts/deps.py ./
RUN python deps.py worker > /tmp/requirements.txt && pip install -r /tmp/requirements.txt
COPY README.md ./
COPY app ./app
COPY worker ./worker
COPY models ./models
RUN pip install --no-deps .
# No IMAGEGEN_DTYPE: the registry entry's precision applies on CUDA (float16 for the hub models).
ENV HF_HOME=/cache/huggingface IMAGEGEN_MODEL_CACHE=/cache/models IMAGEGEN_DEVICE=cuda
USER imagegen
CMD ["python", "-m", "worker"]
