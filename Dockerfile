# syntax=docker/dockerfile:1
# edge-proxy, for linux/amd64 and linux/arm64 (every locked dependency has wheels for both):
#   docker buildx build --platform linux/amd64,linux/arm64 --build-arg VCS_REF=$(git rev-parse HEAD) -t edge-proxy .
# (CI: .github/workflows/image.yml builds and pushes both on tags.)
#   docker run --read-only --shm-size=256m -p 8000:8000 -v $PWD/config.json:/app/config.json:ro edge-proxy
# Dependencies come from requirements.lock (exact versions and hashes, `make lock`); the build tools from
# requirements-build.lock. The image runs as uid 10001 and writes nothing outside /dev/shm.

FROM python:3.11-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY requirements.lock requirements-build.lock ./
RUN python -m venv /opt/edge-proxy \
    && /opt/edge-proxy/bin/pip install --no-cache-dir --require-hashes --no-deps --only-binary=:all: -r requirements.lock \
    && python -m venv /opt/build \
    && /opt/build/bin/pip install --no-cache-dir --require-hashes --no-deps -r requirements-build.lock
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN /opt/build/bin/pip wheel --no-cache-dir --no-deps --no-build-isolation --wheel-dir /src/dist . \
    && /opt/edge-proxy/bin/pip install --no-cache-dir --no-deps --no-index /src/dist/edge_proxy-*.whl \
    && /opt/edge-proxy/bin/pip check

FROM python:3.11-slim-bookworm
ARG VERSION=0.1.0
ARG VCS_REF=unknown
ARG SOURCE=unknown
LABEL org.opencontainers.image.title="edge-proxy" \
      org.opencontainers.image.description="A fast, drop-in replacement for Flagsmith's Edge Proxy" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.source="${SOURCE}"
COPY --from=build /opt/edge-proxy /opt/edge-proxy
COPY granian.toml /app/granian.toml
# Bytecode was compiled at install time: nothing is written at run time, so the root can be read-only.
ENV PATH=/opt/edge-proxy/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    CONFIG_PATH=/app/config.json \
    EDGE_PROXY_COMMIT_SHA=${VCS_REF}
WORKDIR /app
# Numeric, so Kubernetes' runAsNonRoot can verify it without an /etc/passwd entry.
USER 10001:10001
EXPOSE 8000
# Documents are published to workers through /dev/shm: size it above the sum of your documents
# (`docker run --shm-size`, or a Kubernetes emptyDir with medium: Memory mounted at /dev/shm).
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s CMD ["edge-proxy", "health"]
ENTRYPOINT ["edge-proxy"]
CMD ["serve"]
