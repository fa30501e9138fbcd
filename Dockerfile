# syntax=docker/dockerfile:1
# driftloop image: `docker build -t driftloop .`; every process runs from it (see compose.yaml):
#   driftloop migrate | bootstrap | serve --host 0.0.0.0 --port 8000 [--no-scheduler] | worker --host 0.0.0.0 --port 9100

# --- builder: compilers for any dependency without a wheel; produces a self-contained venv --------------
FROM python:3.11-slim AS builder

RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
COPY pyproject.toml README.md ./
COPY core ./core
COPY retrain ./retrain
COPY monitor ./monitor
COPY service ./service
RUN pip install --upgrade pip \
    && pip install . \
    && driftloop --help > /dev/null

# --- runtime: the venv only, no compilers, no source tree, an unprivileged user --------------------------
FROM python:3.11-slim

RUN groupadd --system --gid 10001 driftloop \
    && useradd --system --uid 10001 --gid driftloop --home-dir /var/lib/driftloop --shell /usr/sbin/nologin driftloop \
    && mkdir -p /var/lib/driftloop/artifacts /var/lib/driftloop/spool /var/lib/driftloop/reports \
        /var/lib/driftloop/evidently \
    && chown -R driftloop:driftloop /var/lib/driftloop

COPY --from=builder /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/var/lib/driftloop \
    MPLCONFIGDIR=/tmp/matplotlib \
    DRIFTLOOP_ARTIFACT_DIR=/var/lib/driftloop/artifacts \
    DRIFTLOOP_SPOOL_DIR=/var/lib/driftloop/spool \
    DRIFTLOOP_REPORT_DIR=/var/lib/driftloop/reports \
    HEALTHCHECK_URL=http://127.0.0.1:8000/health

WORKDIR /var/lib/driftloop
USER 10001:10001

EXPOSE 8000

# slim has no curl: ask /health with the standard library. The worker sets HEALTHCHECK_URL to its port.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; sys.exit(0 if urllib.request.urlopen(os.environ['HEALTHCHECK_URL'], timeout=4).status == 200 else 1)"]

ENTRYPOINT ["driftloop"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
