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
from authz_service.check.assembly import assemble_authorizer, database_parts
from authz_service.check.audit import AuditLog
from authz_service.check.context_signer import ContextSigner
from authz_service.check.ext_authz import AUTHORIZATION_SERVICE, AuthorizationServicer
from authz_service.check.grants import GrantStore
from authz_service.check.key_index import KeyIndex
from authz_service.check.key_index import database_load as key_index_load
from authz_service.check.key_last_used import LastUsedRecorder
from authz_service.check.plan_book import PlanBook
from authz_service.check.shared_rate_limit import SharedRateLimiter
from authz_service.events.delivery import EVENTS_CHANNEL, EventDeliverer, OperatorEndpoint
from authz_service.events.spend_cap import spend_cap_announcer
from authz_service.heap import HeapSettler
from authz_service.management.admin_api import AdminGate
from authz_service.management.controls_api import OrganizationControlServicer, PlanServicer
from authz_service.management.events_api import EventEndpointServicer
from authz_service.management.history_api import UsageHistoryServicer
from authz_service.management.management_api import KeyServicer, OrganizationServicer, PublicKeyServicer
from authz_service.management.usage_api import UsageServicer
from authz_service.usage import spill_dirs
from authz_service.usage.access_log import AccessLogServicer
from driftlock_api.management.v1 import (
    events_pb2_grpc,
    history_pb2_grpc,
    jwks_pb2_grpc,
    keys_pb2_grpc,
    org_controls_pb2_grpc,
    orgs_pb2_grpc,
    plans_pb2_grpc,
)
from driftlock_api.usage.v1 import usage_pb2_grpc
from driftlock_kernel import context_keys, db, tls_files
from driftlock_kernel.background import BackgroundTask, every
from driftlock_kernel.context_keys import ContextKeys
from driftlock_kernel.errors import OperatorError, one_line
from driftlock_kernel.listener import ChangeListener, NotificationHandler
from driftlock_kernel.logs import configure_logging
from driftlock_kernel.retention import AUTHZ_TABLES, Pruner, configured_retentions, count_pruned, count_run
from driftlock_kernel.settings import Settings

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_SECONDS = 5.0
SHUTDOWN_FLUSH_SECONDS = 15.0
# How often the heap is looked at (heap.py): the key cache grows by at most a few thousand keys in that time.
HEAP_SETTLE_SECONDS = 1.0
INVALIDATE_CHANNEL = "driftlock_invalidate"
REFUNDED_CHANNEL = "driftlock_usage_refunded"
USAGE_SERVICE = "driftlock.usage.v1.UsageService"
MANAGEMENT_SERVICES = (
    "driftlock.management.v1.KeyService",
    "driftlock.management.v1.OrganizationService",
    "driftlock.management.v1.PublicKeyService",
    "driftlock.management.v1.UsageHistoryService",  # usage history and the audit log (issue 18)
    "driftlock.management.v1.EventEndpointService",  # events to the product
    "driftlock.management.v1.PlanService",  # customer controls: the plan catalogue
    "driftlock.management.v1.OrganizationControlService",  # customer controls: spend cap, erasure
)
# What the health service answers for: the whole server ("") and each service on it.
HEALTH_SERVICES = ("", AUTHORIZATION_SERVICE, USAGE_SERVICE, *MANAGEMENT_SERVICES)


def invalidation_handler(store: GrantStore, plans: PlanBook, index: KeyIndex | None = None) -> NotificationHandler:
    def handle(message: dict) -> None:
        table, row_id = message.get("table"), message.get("id")
        if not isinstance(row_id, str):
            return
        if table == "api_keys":
            if index is not None and "hash" in message:  # a new key: known to the index before its first check
                index.add_hex(message["hash"])
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
    pool: asyncpg.Pool,
    url: str,
    health: health_aio.HealthServicer,
    plans: PlanBook,
    timeout: float = 5.0,
    index: KeyIndex | None = None,
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
    if index is not None:
        # Every key known before the first check: right after a start, no key is rationed as if invented.
        index.reload_soon()
        await index.wait_loaded()
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


GRPC_OPTIONS = [
    ("grpc.max_concurrent_streams", 1000),
    # gRPC's default on Linux, said here because workers depend on it: each binds the same port, and the kernel
    # spreads new connections over them.
    ("grpc.so_reuseport", 1),
    # Envoy keeps its connections for a long time; let it ping them to find dead ones.
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5000),
]

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
    settings.operator_events_endpoint()  # events: refuse a URL without a (valid) secret
    _server_credentials(settings)  # mutual TLS: all three files or none, each readable
    return StartupSettings(keys, admin_secret, caller_secret, url)


def authz_pruner(pool: asyncpg.Pool, settings: Settings, replica: str) -> Pruner:
    """Retention of the tables authz writes; stripe_events is the webhook service's to prune."""
    configured = configured_retentions(settings)
    return Pruner(
        pool,
        {name: configured[name] for name in AUTHZ_TABLES},
        interval=settings.prune_interval_seconds,
        replica=replica,
        on_pruned=count_pruned,
        on_run=count_run,
    )


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


def _server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """authz's port requiring a client certificate (DRIFTLOCK_AUTHZ_TLS_*), or None for a plain port."""
    tls = settings.authz_server_tls()
    if tls is None:
        return None
    cert, key = tls_files.key_pair("DRIFTLOCK_AUTHZ_TLS_CERT", tls.cert_path, "DRIFTLOCK_AUTHZ_TLS_KEY", tls.key_path)
    client_ca = tls_files.certificates("DRIFTLOCK_AUTHZ_TLS_CLIENT_CA", tls.client_ca_path)
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca, require_client_auth=True)


def _event_deliverer(settings: Settings, pool: asyncpg.Pool) -> EventDeliverer:
    operator = settings.operator_events_endpoint()
    if operator is not None and operator[2]:
        log.warning(
            "DRIFTLOCK_ALERT_WEBHOOK_URL and _SECRET are deprecated: set DRIFTLOCK_EVENTS_WEBHOOK_URL and "
            "DRIFTLOCK_EVENTS_WEBHOOK_SECRET (whsec_...); that URL now receives every event, Standard Webhooks signed"
        )
    return EventDeliverer(
        pool,
        operator=OperatorEndpoint(operator[0], operator[1]) if operator is not None else None,
        allow_private=settings.events_allow_private_urls,
        policy=settings.billing_policy(),
        expiry_seconds=settings.events_delivery_expiry_hours * 3600,
        disable_after_seconds=settings.events_disable_after_hours * 3600,
    )


class AuthzService:
    """authz, wired from Settings: the composition root. `start()` builds and starts every part in the order of
    the sections below, pushing each part's stop onto one stack; `drain()` is the signal's first half (spill,
    NOT_SERVING, keep answering a while); `stop()` stops every part in reverse. A new part goes into the section
    it belongs to: built from `self.settings`, started, and its stop pushed with `self._on_stop`."""

    def __init__(self, settings: Settings, worker: WorkerRole | None = None):
        self.settings = settings
        self.worker = worker
        self.startup = check_settings(settings)
        self.spill_dir = _spill_dir(settings, worker)
        self.replica = f"{socket.gethostname()}:{os.getpid()}"
        self.health = health_aio.HealthServicer()
        self.metrics_port = 0
        self._stack = contextlib.AsyncExitStack()
        self._on_stop = self._stack.push_async_callback

    async def start(self) -> None:
        """Start every part; when one fails, whatever started is stopped again before the error propagates."""
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        settings, startup = self.settings, self.startup
        # --- database ---------------------------------------------------------------------------------------
        pool = self.pool = await db.create_pool(
            startup.database_url,
            application_name="driftlock-authz",
            max_size=4,
            transaction_pooler=settings.database_transaction_pooler,
        )
        self._on_stop(pool.close)

        # --- the check pipeline: key cache, plans, meters, audit, rate limits --------------------------------
        # Every key's hash prefix in memory: invented keys are refused without a query, real ones never rationed.
        self.key_index = key_index = KeyIndex(key_index_load(pool))
        self._stack.callback(key_index.stop)
        parts = database_parts(pool, settings, replica=self.replica, spill_dir=self.spill_dir, index=key_index)
        metrics.watch_key_cache(parts.store)
        parts.audit = AuditLog(pool, allow_sample_rate=settings.audit_allow_sample_rate)
        parts.last_used = LastUsedRecorder(pool, interval=settings.key_last_used_interval_seconds)
        if settings.redis_url:
            parts.shared_limits = SharedRateLimiter.from_url(
                settings.redis_url, parts.limiter, timeout=settings.redis_timeout_seconds
            )
            self._on_stop(parts.shared_limits.close)
        self.parts = parts
        # Events to the product, fanned out and delivered through connections of their own, so that a burst of
        # deliveries never delays a key look-up.
        events_pool = await db.create_pool(
            startup.database_url,
            application_name="driftlock-authz-events",
            max_size=2,
            transaction_pooler=settings.database_transaction_pooler,
        )
        self._on_stop(events_pool.close)
        self.deliverer = _event_deliverer(settings, events_pool)
        parts.on_spend_cap_reached = spend_cap_announcer(events_pool)
        authorizer = assemble_authorizer(parts, settings)

        # --- gRPC: Check, the access log, the management and usage APIs, health -------------------------------
        server = grpc.aio.server(options=GRPC_OPTIONS)
        caller_secret, policy = startup.caller_secret, settings.billing_policy()
        signer = ContextSigner(startup.keys)
        AuthorizationServicer(authorizer, signer, caller_secret=caller_secret).add_to_server(server)
        # Envoy's access log of billed calls that failed: the refunds.
        als_pb2_grpc.add_AccessLogServiceServicer_to_server(
            AccessLogServicer(parts.meter, refunds_enabled=settings.refund_failed_calls, caller_secret=caller_secret),
            server,
        )
        gate = AdminGate(startup.admin_secret, pool)
        usage_pb2_grpc.add_UsageServiceServicer_to_server(
            UsageServicer(pool, parts.plans, parts.meter, parts.meter.store, gate, policy=policy), server
        )
        keys_pb2_grpc.add_KeyServiceServicer_to_server(KeyServicer(pool, gate), server)
        orgs_pb2_grpc.add_OrganizationServiceServicer_to_server(OrganizationServicer(pool, gate), server)
        jwks_pb2_grpc.add_PublicKeyServiceServicer_to_server(PublicKeyServicer(startup.keys), server)
        # Usage history and the audit log, read from the database (what the meter's flush wrote).
        history_pb2_grpc.add_UsageHistoryServiceServicer_to_server(UsageHistoryServicer(pool, gate), server)
        # Events to the product: an organisation's event endpoints.
        events_pb2_grpc.add_EventEndpointServiceServicer_to_server(
            EventEndpointServicer(pool, gate, allow_private=settings.events_allow_private_urls), server
        )
        # Customer controls: the plan catalogue, an organisation's spend cap and erasure.
        plans_pb2_grpc.add_PlanServiceServicer_to_server(PlanServicer(pool, gate), server)
        org_controls_pb2_grpc.add_OrganizationControlServiceServicer_to_server(
            OrganizationControlServicer(pool, gate), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        self.address = f"{settings.authz_host}:{settings.authz_port}"
        _check_can_listen(settings.authz_host, settings.authz_port)
        try:
            # Mutual TLS when configured: a caller without a certificate from the client CA is refused at the
            # handshake, before any call reaches a servicer.
            credentials = _server_credentials(settings)
            if credentials is None:
                server.add_insecure_port(self.address)
            else:
                server.add_secure_port(self.address, credentials)
        except RuntimeError as error:  # grpc's way of saying the bind failed
            raise OperatorError(f"cannot listen on {self.address}: {one_line(error)}") from None

        # --- metrics endpoint ----------------------------------------------------------------------------------
        self._start_metrics_endpoint()

        # --- background work: started in this order, stopped in the reverse, so the meters and the audit log
        # outlive the gRPC server (what in-flight checks count is still written); the pool outlives them all.
        self._start_background()

        # --- serving ---------------------------------------------------------------------------------------------
        # Everything built so far lives as long as the process: out of the collector's sight, a collection
        # (every few hundred checks) walks only what checks allocate, not every module and cache.
        gc.collect()
        gc.freeze()
        await server.start()
        self._on_stop(server.stop, SHUTDOWN_GRACE_SECONDS)
        # NOT_SERVING until the database has answered once: a replica that never reached it (unreachable,
        # unparseable DATABASE_URL, no schema) could only answer 503, so it must not join rotation. After
        # that, health stays SERVING through outages: the key cache's stale window decides what is served.
        for service in HEALTH_SERVICES:
            await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        readiness = BackgroundTask(
            "readiness",
            lambda: _serve_once_the_database_answers(
                pool, startup.database_url, self.health, parts.plans, index=self.key_index
            ),
        )
        readiness.start()
        self._on_stop(readiness.stop)

    def _start_metrics_endpoint(self) -> None:
        settings, worker = self.settings, self.worker
        # A worker's metrics are private (its parent serves them on the contract's port): loopback, any free port.
        host = WORKER_METRICS_HOST if worker is not None else settings.authz_host
        port = 0 if worker is not None else settings.authz_metrics_port
        try:
            metrics_server, _ = start_http_server(port, addr=host)
        except OSError as error:
            raise OperatorError(f"cannot serve metrics on {host}:{port}: {one_line(error)}") from None
        self._stack.callback(metrics_server.shutdown)
        self.metrics_port = metrics_server.server_port

    def _start_background(self) -> None:
        settings, parts = self.settings, self.parts
        meters = [m for m in (parts.meter, parts.test_meter, parts.key_meter) if m is not None]
        for meter in meters:
            meter.restore_spilled()

        def on_connect() -> None:
            parts.store.expire_all()
            parts.plans.reload_soon()
            self.key_index.listener_connected()

        def on_listener_state(up: bool) -> None:
            metrics.LISTENER_CONNECTED.set(1 if up else 0)
            if not up:
                self.key_index.listener_lost()

        listener = ChangeListener(
            settings.listen_url(),
            # Refunds stored by any replica: every replica reads the total again at once.
            {
                INVALIDATE_CHANNEL: invalidation_handler(parts.store, parts.plans, self.key_index),
                REFUNDED_CHANNEL: parts.meter.refunded_elsewhere,
                EVENTS_CHANNEL: self.deliverer.wake,
            },
            on_connect=on_connect,
            on_state=on_listener_state,
            application_name="driftlock-authz-listener",
        )
        listener.start()
        self._on_stop(listener.stop)
        # Events to the product: this replica fans out and delivers them, with the others.
        self.deliverer.start()
        self._on_stop(self.deliverer.close)
        for recorder in (parts.audit, parts.last_used):
            if recorder is not None:
                recorder.start()
                self._on_stop(recorder.close)
        # The key cache's growth frozen out of the collector's sight, step by step (heap.py): no full collection
        # walking every cached key on the request path.
        store = parts.store
        settler = HeapSettler(lambda: store.verified_entries + store.unknown_entries)
        settling = every(HEAP_SETTLE_SECONDS, settler.step, name="heap")
        settling.start()
        self._on_stop(settling.stop)
        pruner = authz_pruner(self.pool, settings, self.replica)
        pruner.start()
        self._on_stop(pruner.close)
        for meter in meters:
            meter.start()

        async def close_meters() -> None:  # side by side: a database outage costs the flush timeout once
            await asyncio.gather(*(meter.close(SHUTDOWN_FLUSH_SECONDS) for meter in meters))

        self._on_stop(close_meters)

    async def drain(self) -> None:
        """Spill first: what was counted is on disk before anything else happens, however long the database takes
        (a SIGKILL at the end of a stop timeout loses nothing counted before the server stopped). Then
        NOT_SERVING, while checks are still answered until Envoy's health check has taken this replica out."""
        for meter in (self.parts.meter, self.parts.test_meter, self.parts.key_meter):
            if meter is not None:
                meter.spill_now()
        log.info("shutting down: NOT_SERVING, answering for %.1fs more", self.settings.authz_drain_seconds)
        await self.health.enter_graceful_shutdown()
        await asyncio.sleep(self.settings.authz_drain_seconds)

    async def stop(self) -> None:
        await self._stack.aclose()


async def serve(settings: Settings, worker: WorkerRole | None = None) -> None:
    """Run until SIGTERM/SIGINT, then drain and return. Whatever started is stopped in reverse order, also when
    a later part fails to start: the meter still flushes (or spills) what it counted, the pool still closes."""
    configure_logging(settings.log_level, settings.log_format)
    service = AuthzService(settings, worker)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    name = f" worker {worker.index}" if worker is not None else ""
    await service.start()
    try:
        keys = service.startup.keys
        log.info(
            "authz%s listening on %s (metrics on :%d; rate limits %s; event loop %s); context tokens %s%s",
            name,
            service.address,
            service.metrics_port,
            "shared through Redis" if service.parts.shared_limits else "per replica",
            type(loop).__module__.partition(".")[0],
            keys.algorithm,
            f", signing key {keys.signing_kid}" if keys.signing_kid else "",
        )
        if service.startup.admin_secret is None:
            log.warning(
                "DRIFTLOCK_ADMIN_TOKEN_SECRET is not set: the management API and UsageService refuse every call"
            )
        if worker is not None:
            worker.report({"ready": True, "metrics_port": service.metrics_port})
        await stopping.wait()
        await service.drain()
    finally:
        await service.stop()
    log.info("authz%s stopped", name)
