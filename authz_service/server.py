"""Wiring of the authz process: pool, caches, listener, meter, audit, gRPC server, metrics, signals.

With `authz --workers N` (driftlock_cli/authz_workers.py) N processes run `serve` side by side, each with a
`WorkerRole`: they share the gRPC port through SO_REUSEPORT, and each has its own caches, meter, LISTEN connection,
spill folder and a metrics endpoint on loopback that the parent serves the union of.

SIGTERM (or SIGINT): health turns NOT_SERVING and checks are still answered for DRIFTLOCK_AUTHZ_DRAIN_SECONDS,
until Envoy's health check has taken this replica out of rotation; then the server stops, in-flight checks get
`SHUTDOWN_GRACE_SECONDS` to finish, the meter writes everything it counted (or spills it), the audit log is
written, and the process exits 0.
"""

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import asyncpg
import grpc
from envoy.service.accesslog.v3 import als_pb2_grpc
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import start_http_server

from authz_service import metrics
from authz_service.check.audit import AuditLog
from authz_service.check.authorizer import Authorizer
from authz_service.check.context_signer import ContextSigner
from authz_service.check.ext_authz import AUTHORIZATION_SERVICE, AuthorizationServicer
from authz_service.check.grants import GrantStore, database_fetch
from authz_service.check.key_last_used import LastUsedRecorder
from authz_service.check.lookup_budget import LookupBudget
from authz_service.check.plan_book import PlanBook, database_load
from authz_service.check.rate_limit import RateLimiter
from authz_service.check.shared_rate_limit import SharedRateLimiter
from authz_service.management.admin_api import AdminGate
from authz_service.management.controls_api import OrganizationControlServicer, PlanServicer
from authz_service.management.management_api import KeyServicer, OrganizationServicer, PublicKeyServicer
from authz_service.management.usage_api import UsageServicer
from authz_service.usage import spill_dirs
from authz_service.usage.access_log import AccessLogServicer
from authz_service.usage.alerts import AlertNotifier
from authz_service.usage.meter_store import KEY_TABLES, TEST_TABLES, MeterStore
from authz_service.usage.metering import Meter
from authz_service.usage.usage_ledger import UsageLedger
from driftlock_api.management.v1 import (
    jwks_pb2_grpc,
    keys_pb2_grpc,
    org_controls_pb2_grpc,
    orgs_pb2_grpc,
    plans_pb2_grpc,
)
from driftlock_api.usage.v1 import usage_pb2_grpc
from driftlock_kernel import context_keys, db
from driftlock_kernel.background import BackgroundTask
from driftlock_kernel.context_keys import ContextKeys
from driftlock_kernel.errors import OperatorError, one_line
from driftlock_kernel.listener import ChangeListener, NotificationHandler
from driftlock_kernel.logs import configure_logging
from driftlock_kernel.retention import Pruner
from driftlock_kernel.settings import Settings

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_SECONDS = 5.0
SHUTDOWN_FLUSH_SECONDS = 15.0
INVALIDATE_CHANNEL = "driftlock_invalidate"
USAGE_SERVICE = "driftlock.usage.v1.UsageService"
MANAGEMENT_SERVICES = (
    "driftlock.management.v1.KeyService",
    "driftlock.management.v1.OrganizationService",
    "driftlock.management.v1.PublicKeyService",
    "driftlock.management.v1.PlanService",
    "driftlock.management.v1.OrganizationControlService",
)
# What the health service answers for: the whole server ("") and each service on it.
HEALTH_SERVICES = ("", AUTHORIZATION_SERVICE, USAGE_SERVICE, *MANAGEMENT_SERVICES)


def invalidation_handler(store: GrantStore, plans: PlanBook) -> NotificationHandler:
    def handle(message: dict) -> None:
        table, row_id = message.get("table"), message.get("id")
        if not isinstance(row_id, str):
            return
        if table == "api_keys":
            store.forget_key(row_id)
        elif table == "organizations":
            store.forget_org(row_id)
        elif table == "plans":
            plans.reload_soon()
        else:
            return
        metrics.INVALIDATIONS.labels(table=table).inc()

    return handle


READINESS_QUERY = "SELECT count(*) FROM driftlock.plans"
READINESS_LOG_EVERY_SECONDS = 10.0


async def _serve_once_the_database_answers(
    pool: asyncpg.Pool, url: str, health: health_aio.HealthServicer, plans: PlanBook, timeout: float = 5.0
) -> None:
    """Report SERVING from the first time the database answers a query on the schema; until then say, in the
    log, why not (at once, then every READINESS_LOG_EVERY_SECONDS)."""
    delay, last_logged = 0.1, float("-inf")
    while True:
        try:
            await asyncio.wait_for(pool.fetchval(READINESS_QUERY), timeout)
            break
        except asyncio.CancelledError:
            raise
        except Exception as error:  # whatever it is (refused, DNS, a malformed DSN, no schema), keep trying
            now = time.monotonic()
            if now - last_logged >= READINESS_LOG_EVERY_SECONDS:
                last_logged = now
                hint = " (run `driftlock-gateway migrate`)" if isinstance(error, asyncpg.UndefinedTableError) else ""
                log.warning(
                    "NOT_SERVING: the database at %s has not answered yet: %s: %s%s",
                    db.describe(url),
                    type(error).__name__,
                    one_line(error),
                    hint,
                )
        await asyncio.sleep(delay)
        delay = min(delay * 2, 2.0)
    plans.reload_soon()
    for service in HEALTH_SERVICES:
        await health.set(service, health_pb2.HealthCheckResponse.SERVING)
    log.info("the database answered; SERVING")


@dataclass(frozen=True)
class WorkerRole:
    """This process is worker `index` of those `authz --workers N` started: it spills to a folder of its own,
    serves its metrics on loopback at a port of the system's choosing, and tells the parent through `report`
    (one JSON-able dict per event: {"ready": True, "metrics_port": P} once it serves)."""

    index: int
    report: Callable[[dict[str, object]], None]


# What the private metrics endpoint of a worker binds to: only its parent scrapes it.
WORKER_METRICS_HOST = "127.0.0.1"


class StartupSettings(NamedTuple):
    keys: ContextKeys
    admin_secret: bytes | None
    caller_secret: bytes
    database_url: str


def check_settings(settings: Settings) -> StartupSettings:
    """Every setting authz refuses to start without, checked: SettingsError (one line) on the first problem.
    The parent of workers calls it too, so that a bad setting stops it at once instead of failing each worker."""
    keys = context_keys.load(settings)
    admin_secret = settings.admin_secret()
    caller_secret = settings.require_ext_authz_secret()
    url = settings.require_database_url()
    if settings.alert_webhook_url:
        settings.require_alert_webhook_secrets()
    return StartupSettings(keys, admin_secret, caller_secret, url)


def _spill_dir(settings: Settings, worker: WorkerRole | None) -> Path | None:
    if not settings.meter_spill_dir:
        return None
    root = Path(settings.meter_spill_dir)
    if worker is None:
        # Alone: replay what workers of an earlier run left too. (With workers, the parent does this before any
        # of them starts, so that no two processes move files at once.)
        try:
            spill_dirs.adopt_leftovers(root, 1)
        except OSError as error:
            log.error("could not take over spill files left in %s: %s", root, one_line(error))
    return spill_dirs.worker_dir(root, worker.index if worker is not None else None)


def _check_can_listen(host: str, port: int) -> None:
    """Fail with one line when the port is taken, before gRPC's core would log its own multi-line complaint.
    (SO_REUSEPORT as gRPC binds, so workers that share the port on purpose pass.)"""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            raise OperatorError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None


async def serve(settings: Settings, worker: WorkerRole | None = None) -> None:
    """Run until SIGTERM/SIGINT, then drain and return. Whatever started is stopped in reverse order, also when
    a later part fails to start: the meter still flushes (or spills) what it counted, the pool still closes."""
    configure_logging(settings.log_level, settings.log_format)
    keys, admin_secret, caller_secret, url = check_settings(settings)
    spill_dir = _spill_dir(settings, worker)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)

    async with contextlib.AsyncExitStack() as stack:
        pool = await db.create_pool(
            url,
            application_name="driftlock-authz",
            max_size=4,
            transaction_pooler=settings.database_transaction_pooler,
        )
        stack.push_async_callback(pool.close)

        store = GrantStore(
            database_fetch(pool, timeout=settings.database_lookup_timeout_seconds),
            ttl=settings.key_cache_ttl_seconds,
            negative_ttl=settings.key_cache_negative_ttl_seconds,
            stale_for=settings.key_cache_stale_seconds,
            max_entries=settings.key_cache_max_entries,
            max_unknown_entries=settings.key_cache_unknown_max_entries,
            budget=LookupBudget(
                overall=settings.unknown_key_lookups_per_second,
                per_source=settings.unknown_key_lookups_per_source_per_second,
            ),
            fetch_timeout=settings.database_lookup_timeout_seconds,
            on_result=metrics.CHECK_STATS.cache_event,
        )
        metrics.watch_key_cache(store)
        plans = PlanBook(database_load(pool))
        notifier = None
        if settings.alert_webhook_url:
            notifier = AlertNotifier(
                settings.alert_webhook_url,
                pool,
                settings.require_alert_webhook_secrets(),
                expiry_seconds=settings.alert_delivery_expiry_hours * 3600,
            )
        replica = f"{socket.gethostname()}:{os.getpid()}"
        meter_store = MeterStore(pool, replica=replica)
        meter = Meter(
            UsageLedger(stale_after=settings.usage_refresh_seconds),
            meter_store,
            flush_interval=settings.meter_flush_interval_seconds,
            load_timeout=settings.database_lookup_timeout_seconds,
            org_labels=settings.org_id_metric_labels,
            notifier=notifier,
            spill_dir=spill_dir,
        )
        # Test keys' usage: the same ledger, flush and reservation, in tables of its own (never billed).
        test_meter = Meter(
            UsageLedger(stale_after=settings.usage_refresh_seconds),
            MeterStore(pool, replica=meter_store.replica, tables=TEST_TABLES),
            flush_interval=settings.meter_flush_interval_seconds,
            load_timeout=settings.database_lookup_timeout_seconds,
            spill_dir=spill_dir / spill_dirs.TEST_SUBDIR if spill_dir is not None else None,
            live=False,
        )
        # Keys with a cap of their own (max_units_per_period): their usage per key, in tables of its own.
        key_meter = Meter(
            UsageLedger(stale_after=settings.usage_refresh_seconds),
            MeterStore(pool, replica=meter_store.replica, tables=KEY_TABLES),
            flush_interval=settings.meter_flush_interval_seconds,
            load_timeout=settings.database_lookup_timeout_seconds,
            spill_dir=spill_dir / spill_dirs.KEYS_SUBDIR if spill_dir is not None else None,
            live=False,
        )
        audit = AuditLog(pool, allow_sample_rate=settings.audit_allow_sample_rate)
        policy = settings.billing_policy()
        last_used = LastUsedRecorder(pool, interval=settings.key_last_used_interval_seconds)
        limiter = RateLimiter()
        shared_limits = None
        if settings.redis_url:
            shared_limits = SharedRateLimiter.from_url(
                settings.redis_url, limiter, timeout=settings.redis_timeout_seconds
            )
            stack.push_async_callback(shared_limits.close)
        authorizer = Authorizer(
            store,
            plans,
            meter,
            test_meter=test_meter,
            limiter=limiter,
            shared_limits=shared_limits,
            audit=audit,
            policy=policy,
            last_used=last_used,
            exact_margin_units=settings.quota_exact_margin_units,
            reserve_timeout=settings.database_lookup_timeout_seconds,
            key_meter=key_meter,
        )

        def on_connect() -> None:
            store.expire_all()
            plans.reload_soon()

        listener = ChangeListener(
            settings.listen_url(),
            {INVALIDATE_CHANNEL: invalidation_handler(store, plans)},
            on_connect=on_connect,
            on_state=lambda up: metrics.LISTENER_CONNECTED.set(1 if up else 0),
            application_name="driftlock-authz-listener",
        )

        server = grpc.aio.server(
            options=[
                ("grpc.max_concurrent_streams", 1000),
                # gRPC's default on Linux, said here because workers depend on it: each binds the same port, and
                # the kernel spreads new connections over them.
                ("grpc.so_reuseport", 1),
                # Envoy keeps its connections for a long time; let it ping them to find dead ones.
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 5000),
            ]
        )
        signer = ContextSigner(keys)
        AuthorizationServicer(authorizer, signer, caller_secret=caller_secret).add_to_server(server)
        # Envoy's access log of billed calls that failed: the refunds.
        als_pb2_grpc.add_AccessLogServiceServicer_to_server(
            AccessLogServicer(meter, refunds_enabled=settings.refund_failed_calls, caller_secret=caller_secret), server
        )
        gate = AdminGate(admin_secret, pool)
        usage_pb2_grpc.add_UsageServiceServicer_to_server(
            UsageServicer(pool, plans, meter, meter_store, gate, policy=policy), server
        )
        keys_pb2_grpc.add_KeyServiceServicer_to_server(KeyServicer(pool, gate), server)
        orgs_pb2_grpc.add_OrganizationServiceServicer_to_server(OrganizationServicer(pool, gate), server)
        jwks_pb2_grpc.add_PublicKeyServiceServicer_to_server(PublicKeyServicer(keys), server)
        # Customer controls (issue 20): the plan catalogue, an organisation's spend cap and erasure.
        plans_pb2_grpc.add_PlanServiceServicer_to_server(PlanServicer(pool, gate), server)
        org_controls_pb2_grpc.add_OrganizationControlServiceServicer_to_server(
            OrganizationControlServicer(pool, gate), server
        )
        health_servicer = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        address = f"{settings.authz_host}:{settings.authz_port}"
        _check_can_listen(settings.authz_host, settings.authz_port)
        try:
            server.add_insecure_port(address)
        except RuntimeError as error:  # grpc's way of saying the bind failed
            raise OperatorError(f"cannot listen on {address}: {one_line(error)}") from None
        # A worker's metrics are private (its parent serves them on the contract's port): loopback, any free port.
        metrics_host = WORKER_METRICS_HOST if worker is not None else settings.authz_host
        metrics_port = 0 if worker is not None else settings.authz_metrics_port
        try:
            metrics_server, _ = start_http_server(metrics_port, addr=metrics_host)
        except OSError as error:
            raise OperatorError(f"cannot serve metrics on {metrics_host}:{metrics_port}: {one_line(error)}") from None
        stack.callback(metrics_server.shutdown)
        metrics_port = metrics_server.server_port

        # Started in this order, stopped in the reverse: the meter and audit log outlive the gRPC server, so
        # what in-flight checks count is still written; the pool outlives them all.
        meter.restore_spilled()
        test_meter.restore_spilled()
        key_meter.restore_spilled()
        listener.start()
        stack.push_async_callback(listener.stop)
        if notifier is not None:
            notifier.start()
            stack.push_async_callback(notifier.close)
        audit.start()
        stack.push_async_callback(audit.close)
        last_used.start()
        stack.push_async_callback(last_used.close)
        pruner = Pruner(
            pool,
            {
                "meter_flushes": settings.retention_meter_flushes,
                "usage_reports": settings.retention_usage_reports,
                "audit_log": settings.retention_audit_log,
                "audit_denials": settings.retention_audit_denials,
                "stripe_events": settings.retention_stripe_events,
            },
            interval=settings.prune_interval_seconds,
            replica=replica,
            on_pruned=lambda table, rows: metrics.RETENTION_PRUNED.labels(table=table).inc(rows),
            on_run=lambda outcome: metrics.RETENTION_RUNS.labels(outcome=outcome).inc(),
        )
        pruner.start()
        stack.push_async_callback(pruner.close)
        meter.start()
        test_meter.start()
        key_meter.start()

        async def close_meters() -> None:  # side by side: a database outage costs the flush timeout once
            await asyncio.gather(
                meter.close(SHUTDOWN_FLUSH_SECONDS),
                test_meter.close(SHUTDOWN_FLUSH_SECONDS),
                key_meter.close(SHUTDOWN_FLUSH_SECONDS),
            )

        stack.push_async_callback(close_meters)
        # Everything built so far lives as long as the process: out of the collector's sight, a collection
        # (every few hundred checks) walks only what checks allocate, not every module and cache.
        gc.collect()
        gc.freeze()
        await server.start()
        stack.push_async_callback(server.stop, SHUTDOWN_GRACE_SECONDS)
        # NOT_SERVING until the database has answered once: a replica that never reached it (unreachable,
        # unparseable DATABASE_URL, no schema) could only answer 503, so it must not join rotation. After
        # that, health stays SERVING through outages: the key cache's stale window decides what is served.
        for service in HEALTH_SERVICES:
            await health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        readiness = BackgroundTask(
            "readiness", lambda: _serve_once_the_database_answers(pool, url, health_servicer, plans)
        )
        readiness.start()
        stack.push_async_callback(readiness.stop)
        log.info(
            "authz%s listening on %s (metrics on :%d; rate limits %s; event loop %s); context tokens %s%s",
            f" worker {worker.index}" if worker is not None else "",
            address,
            metrics_port,
            "shared through Redis" if shared_limits else "per replica",
            type(loop).__module__.partition(".")[0],
            keys.algorithm,
            f", signing key {keys.signing_kid}" if keys.signing_kid else "",
        )
        if admin_secret is None:
            log.warning(
                "DRIFTLOCK_ADMIN_TOKEN_SECRET is not set: the management API and UsageService refuse every call"
            )

        if worker is not None:
            worker.report({"ready": True, "metrics_port": metrics_port})

        await stopping.wait()
        # Spill first: what was counted is on disk before anything else happens, however long the database takes
        # (a SIGKILL at the end of a stop timeout loses nothing counted before the server stopped).
        meter.spill_now()
        test_meter.spill_now()
        key_meter.spill_now()
        log.info("shutting down: NOT_SERVING, answering for %.1fs more", settings.authz_drain_seconds)
        await health_servicer.enter_graceful_shutdown()
        await asyncio.sleep(settings.authz_drain_seconds)
    log.info("authz%s stopped", f" worker {worker.index}" if worker is not None else "")
