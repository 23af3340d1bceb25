# memspace: one image, two entry points: `memspace serve` (a server shard) and
# `memspace operator`.
#
# `docker build -t memspace:dev .` builds it on the upstream Python base pinned below by digest.
# `make image` (hack/image.sh) builds the same Dockerfile with BASE_IMAGE set to a Debian bookworm
# base made on the building machine (debootstrap: Debian's Python 3.11 and venv), without a
# registry. Either base must provide python3 with venv, groupadd and useradd.
# Python packages come only from requirements.lock, every file checked against its hash
# (`make lock` regenerates it from pyproject.toml; `make lint` checks that it is current).

ARG BASE_IMAGE=python:3.11.15-slim-bookworm@sha256:d29f48a31a8b408ed19272ca1e7b10ebae13b240a27e862d3d4217c528e2e0c3

FROM ${BASE_IMAGE} AS build
# hack/image/pip/pip.conf is empty in the repository; `make image` fills it in its copy of the
# sources with the building machine's pip settings (index, CA bundle). This stage does not ship.
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CONFIG_FILE=/etc/memspace-build/pip/pip.conf
COPY hack/image/pip/ /etc/memspace-build/pip/
WORKDIR /src
RUN python3 -m venv /opt/memspace
COPY requirements.lock ./
RUN /opt/memspace/bin/pip install --no-compile --only-binary=:all: --require-hashes \
      -r requirements.lock
COPY pyproject.toml README.md ./
COPY server/ server/
COPY contract/ contract/
COPY operator/ operator/
COPY cli/ cli/
# The project itself: its dependencies and build backend are already installed from the lock.
# The build backend does not ship.
# Bytecode is compiled here, once: the root filesystem is read-only at run time, and a server
# compiling its imports at every start took about 2 s more to serve (a shard restart). Checked
# against a hash, not a time, so the same sources give the same files.
RUN /opt/memspace/bin/pip install --no-compile --no-deps --no-build-isolation . \
 && /opt/memspace/bin/pip uninstall --yes setuptools wheel \
 && find /opt/memspace -name '__pycache__' -prune -exec rm -rf {} + \
 && /opt/memspace/bin/python -m compileall -q -j 0 --invalidation-mode unchecked-hash \
      /opt/memspace/lib

FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="memspace" \
      org.opencontainers.image.description="Kubernetes-native, multi-tenant memory spaces"
ENV PATH=/opt/memspace/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MEMSPACE_LOG_FORMAT=json
COPY --from=build /opt/memspace /opt/memspace
RUN groupadd --system --gid 10001 memspace \
 && useradd --system --uid 10001 --gid memspace --no-create-home --shell /usr/sbin/nologin memspace \
 && mkdir -p /var/lib/memspace/spaces /etc/memspace/spaces \
 && chown -R 10001:10001 /var/lib/memspace
USER 10001:10001
WORKDIR /var/lib/memspace
EXPOSE 50051 8080 9090
# gRPC health (grpc.health.v1) of a server shard; the chart uses Kubernetes' native gRPC probes.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; s = g.HealthStub(grpc.insecure_channel('127.0.0.1:50051')).Check(h.HealthCheckRequest(), timeout=3); sys.exit(0 if s.status == h.HealthCheckResponse.SERVING else 1)"]
ENTRYPOINT ["memspace"]
CMD ["serve", "--data-root", "/var/lib/memspace/spaces", "--index-dir", "/etc/memspace/spaces", "--listen", "0.0.0.0:50051", "--metrics-listen", "0.0.0.0:9090", "--http-listen", "0.0.0.0:8080", "--insecure"]
