# StreamEdit for NVIDIA GPU hosts: the service on the TensorRT backend (engines built at first start, cached).
# Build: docker build -t streamedit:gpu .      Run: see README "Deploying on a GPU host".
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ARG DEBIAN_FRONTEND=noninteractive
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1
RUN python3 -m venv /opt/venv

WORKDIR /app
# Dependencies first (a layer that survives code changes), pinned to what the project was tested with.
COPY docker/requirements-gpu.txt docker/
RUN pip install --requirement docker/requirements-gpu.txt
COPY pyproject.toml README.md ./
COPY engines engines
COPY server server
COPY training training
COPY loadtest loadtest
COPY streamedit streamedit
COPY client_web client_web
# The project itself; every dependency is already pinned above.
RUN pip install --no-deps .

RUN useradd --create-home --uid 10001 streamedit \
    && mkdir -p /cache \
    && chown streamedit /cache
USER 10001

# STREAMEDIT_ICE_HOST_ADDRESSES must name the host's public address (JSON list) and the UDP range must be
# published 1:1, or browsers cannot reach the media ports; alternatively set STREAMEDIT_ICE_SERVERS to a TURN.
ENV STREAMEDIT_HOST=0.0.0.0 \
    STREAMEDIT_PORT=8000 \
    STREAMEDIT_BACKEND=tensorrt \
    STREAMEDIT_DEVICE=cuda \
    STREAMEDIT_MAX_SESSIONS=16 \
    STREAMEDIT_MAX_BATCH=16 \
    STREAMEDIT_UDP_PORTS=40000-40100 \
    STREAMEDIT_CACHE_DIR=/cache
VOLUME ["/cache"]
EXPOSE 8000/tcp 40000-40100/udp

HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

CMD ["streamedit", "serve"]
