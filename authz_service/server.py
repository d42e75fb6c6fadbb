"""Wiring of the authz process: database pool, key store, invalidation listener, gRPC server, metrics, signals.

SIGTERM (or SIGINT): health turns NOT_SERVING so Envoy stops choosing this replica, in-flight checks get
`SHUTDOWN_GRACE_SECONDS` to finish, then everything is closed and the process exits 0.
"""

import asyncio
import logging
import signal

import grpc
from envoy.service.auth.v3 import external_auth_pb2_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import start_http_server

from authz_service import metrics
from authz_service.authorizer import Authorizer
from authz_service.context_token import ContextSigner
from authz_service.decision import BillingPolicy
from authz_service.ext_authz import AuthorizationServicer
from authz_service.grants import GrantStore, database_fetch
from driftlock_gateway import db
from driftlock_gateway.listener import ChangeListener
from driftlock_gateway.logs import configure_logging
from driftlock_gateway.settings import Settings

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_SECONDS = 5.0
INVALIDATE_CHANNEL = "driftlock_invalidate"
AUTHORIZATION_SERVICE = "envoy.service.auth.v3.Authorization"


def invalidation_handler(store: GrantStore):
    def handle(message: dict) -> None:
        table, row_id = message.get("table"), message.get("id")
        if not isinstance(row_id, str):
            return
        if table == "api_keys":
            store.forget_key(row_id)
        elif table == "organizations":
            store.forget_org(row_id)
        elif table == "plans":
            store.forget_plan(row_id)
        else:
            return
        metrics.INVALIDATIONS.labels(table=table).inc()

    return handle


async def serve(settings: Settings) -> None:
    configure_logging()
    secret = settings.require_jwt_secret()
    url = settings.require_database_url()
    pool = await db.create_pool(url, application_name="driftlock-authz", max_size=4)
    store = GrantStore(
        database_fetch(pool),
        ttl=settings.key_cache_ttl_seconds,
        negative_ttl=settings.key_cache_negative_ttl_seconds,
        stale_for=settings.key_cache_stale_seconds,
        max_entries=settings.key_cache_max_entries,
        fetch_timeout=settings.database_lookup_timeout_seconds,
        on_result=lambda result: metrics.CACHE_EVENTS.labels(result=result.value).inc(),
    )
    listener = ChangeListener(
        settings.listen_url(),
        {INVALIDATE_CHANNEL: invalidation_handler(store)},
        on_connect=store.expire_all,
        on_state=lambda up: metrics.LISTENER_CONNECTED.set(1 if up else 0),
        application_name="driftlock-authz-listener",
    )
    policy = BillingPolicy(
        grace_seconds=settings.dunning_grace_days * 86400.0,
        block_billable_when_overdue=settings.dunning_policy == "block",
    )
    authorizer = Authorizer(store, policy=policy)

    server = grpc.aio.server(
        options=[
            ("grpc.max_concurrent_streams", 1000),
            # Envoy keeps its connections for a long time; let it ping them to find dead ones.
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 5000),
        ]
    )
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(
        AuthorizationServicer(authorizer, ContextSigner(secret)), server
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    address = f"{settings.authz_host}:{settings.authz_port}"
    server.add_insecure_port(address)
    metrics_server, _ = start_http_server(settings.authz_metrics_port, addr=settings.authz_host)

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)

    listener.start()
    await server.start()
    for service in ("", AUTHORIZATION_SERVICE):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    log.info("authz listening on %s (metrics on :%d)", address, settings.authz_metrics_port)

    await stopping.wait()
    log.info("shutting down: draining for up to %.0fs", SHUTDOWN_GRACE_SECONDS)
    await health_servicer.enter_graceful_shutdown()
    await server.stop(SHUTDOWN_GRACE_SECONDS)
    await listener.stop()
    await pool.close()
    metrics_server.shutdown()
    log.info("authz stopped")
