# stream-kpis worker image.
#
#   docker build -t stream-kpis .
#   docker run --rm -e STREAM_KPIS_BROKER=kafka://kafka:9092 stream-kpis worker
#
# The same image runs the one-shot `stream-kpis topics create` (see docker-compose.yml and
# deploy/k8s/topics-job.yaml). Partition state (RocksDB) lives under /var/lib/stream-kpis: mount
# a volume there so a restarted worker reads only the tail of the state topic.
#
# Two stages: the first builds the wheel, with the native fast paths (native/, Rust: Debian's
# cargo), the second installs it on a clean python:3.11-slim without the Rust toolchain.
FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN apt-get update \
    && apt-get install -y --no-install-recommends cargo \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY native ./native
COPY stream_kpis ./stream_kpis
RUN pip wheel --no-deps --wheel-dir /wheels .

FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

COPY --from=build /wheels /wheels
RUN pip install /wheels/*.whl \
    && rm -rf /wheels \
    && useradd --system --uid 10001 --user-group --home-dir /var/lib/stream-kpis --no-create-home stream-kpis \
    && mkdir -p /var/lib/stream-kpis \
    && chown stream-kpis:stream-kpis /var/lib/stream-kpis

WORKDIR /var/lib/stream-kpis
USER 10001:10001
ENV STREAM_KPIS_DATA_DIR=/var/lib/stream-kpis \
    STREAM_KPIS_WEB_PORT=6066
VOLUME ["/var/lib/stream-kpis"]
# Prometheus metrics at :6066/metrics
EXPOSE 6066

ENTRYPOINT ["stream-kpis"]
CMD ["worker"]
