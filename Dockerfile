# syntax=docker/dockerfile:1
# smtp-gateway: build wheels with the compilers, run without them.

FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway/ gateway/
COPY policies/ policies/
# Wheels for the gateway and every dependency (uvloop for speed); nothing else.
RUN pip wheel --no-cache-dir --wheel-dir /wheels '.[fast]'

FROM python:3.11-slim-bookworm
LABEL org.opencontainers.image.title="smtp-gateway" \
      org.opencontainers.image.description="Inbound SMTP security gateway"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    GATEWAY_LOG_FORMAT=json
# Install from the wheels only, then drop pip's caches; no compiler in this stage.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index /wheels/*.whl \
    && groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin gateway
USER 10001:10001
# Unprivileged ports; the Service maps 25/465/587 to them. 9125: metrics and health.
EXPOSE 2525 4650 5870 9125
# The health check asks the metrics endpoint the configuration names (metrics.listen).
ENV GATEWAY_CONFIG=/etc/smtp-gateway/config/gateway.yaml
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["smtp-gateway", "health"]
ENTRYPOINT ["smtp-gateway", "run"]
CMD ["--config", "/etc/smtp-gateway/config/gateway.yaml"]
