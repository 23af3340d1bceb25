# syntax=docker/dockerfile:1
# memspace: one image, two entry points: `memspace serve` (a server shard) and
# `memspace operator`. Built with `docker build -t memspace:dev .` (hack/e2e-kind.sh does it).

ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/memspace
COPY pyproject.toml README.md ./
COPY server/ server/
COPY contract/ contract/
COPY operator/ operator/
COPY cli/ cli/
RUN /opt/memspace/bin/pip install --no-compile . \
 && find /opt/memspace -name '__pycache__' -prune -exec rm -rf {} +

FROM python:${PYTHON_VERSION}-slim
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
EXPOSE 50051 9090
# gRPC health (grpc.health.v1) of a server shard; the chart uses Kubernetes' native gRPC probes.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; s = g.HealthStub(grpc.insecure_channel('127.0.0.1:50051')).Check(h.HealthCheckRequest(), timeout=3); sys.exit(0 if s.status == h.HealthCheckResponse.SERVING else 1)"]
ENTRYPOINT ["memspace"]
CMD ["serve", "--data-root", "/var/lib/memspace/spaces", "--index-dir", "/etc/memspace/spaces", "--listen", "0.0.0.0:50051", "--metrics-listen", "0.0.0.0:9090", "--insecure"]
