# syntax=docker/dockerfile:1
# The fleet service as a container: `edge-fleet serve` from edgefleet[fleet], as a non-root
# user, for several workers on one PostgreSQL and one Mosquitto (docs/operations.md). Build
# from the repository root:
#
#   docker build -f deploy/fleet.Dockerfile -t edgefleet-fleet .
#   docker build -f deploy/fleet.Dockerfile --build-arg EXTRAS=fleet,s3 ...   # a bucket store
#
# The image has no broker of its own: give it EDGEFLEET_BROKER_URL (a worker account) and
# EDGEFLEET_DATABASE_URL. It also carries `edgefleet-dynsec-init` (deploy/mosquitto/
# dynsec-init.py), which makes the broker's account store and the workers' accounts.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The service's user; its data directory (per worker: admin token, drift webhook secret)
# and the mount point of the store shared by every worker (signing keys, TUF repository).
RUN groupadd --system --gid 10001 edgefleet \
 && useradd --system --uid 10001 --gid edgefleet --no-create-home \
        --home-dir /var/lib/edgefleet --shell /usr/sbin/nologin edgefleet \
 && install -d -o edgefleet -g edgefleet -m 0700 /var/lib/edgefleet \
 && install -d -o edgefleet -g edgefleet -m 0750 /srv/edgefleet/store

# Only what the package is built from (fleet.Dockerfile.dockerignore keeps the rest out).
WORKDIR /build
COPY pyproject.toml README.md ./
COPY agent/ agent/
COPY fleet/ fleet/
# EXTRAS: fleet, or fleet,s3 for the repository in an S3-compatible bucket (boto3).
ARG EXTRAS=fleet
RUN pip install ".[${EXTRAS}]" && cd / && rm -rf /build
COPY --chmod=0755 deploy/mosquitto/dynsec-init.py /usr/local/bin/edgefleet-dynsec-init

USER edgefleet
WORKDIR /var/lib/edgefleet
ENV EDGEFLEET_HOST=0.0.0.0 \
    EDGEFLEET_PORT=8000 \
    EDGEFLEET_DATA_DIR=/var/lib/edgefleet
EXPOSE 8000

# /healthz answers while the process serves; its JSON says more (leader, worker,
# ingest_connected, publisher_connected). No curl in the slim image: Python asks.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('EDGEFLEET_PORT', '8000'), timeout=4)"]

# SIGTERM: the fleet stops its API, chores, leadership and broker links in order.
STOPSIGNAL SIGTERM
ENTRYPOINT ["edge-fleet"]
CMD ["serve"]
