# Multi-arch (amd64, arm64): every dependency ships wheels for both.
#   docker buildx build --platform linux/amd64,linux/arm64 -t edge-proxy .
#   docker run --shm-size=256m -p 8000:8000 -v $PWD/config.json:/app/config.json:ro edge-proxy
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
COPY --from=build /install /usr/local
WORKDIR /app
COPY granian.toml /app/granian.toml
# Documents are published to workers through /dev/shm: size it above the sum of your documents
# (`docker run --shm-size`, or a Kubernetes emptyDir with medium: Memory mounted at /dev/shm).
ENV CONFIG_PATH=/app/config.json
USER nobody
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s CMD ["edge-proxy", "health"]
CMD ["edge-proxy", "serve"]
