"""The webhook service: `create_app` (routes and the lifetime of its database pool) and `serve` (the process).

Routes: `POST /stripe/webhook` (webhook.py), `GET /healthz` (200 only while the database answers and the
service is not draining), `GET /metrics` (Prometheus text format). Anything else is a JSON error: 404, or 405
with `Allow` (json_routing_errors).

With STRIPE_API_KEY set, the service is also the one that talks to Stripe: it reports usage to Stripe Billing
Meters (exporter.py) and pulls subscriptions from Stripe's API every hour on one replica (sync.py). Both start
after the pool and stop before it, letting a call to Stripe in flight finish. Every replica also prunes
`stripe_events` past its retention (one replica per interval; driftlock_kernel/retention.py).

The composition root is `create_app`: each part with a lifetime (the pool, the Stripe work, retention) is one
`cleanup_ctx` entry, started in order and stopped in reverse. `WebhookService` is the process around it: it binds
the port, and `serve` runs it until a signal.

SIGTERM or SIGINT: /healthz turns 503, the listener closes, deliveries in flight get `SHUTDOWN_GRACE_SECONDS`
to finish, the pool closes, and the process exits 0.
"""

import asyncio
import logging
import os
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta

import asyncpg
import prometheus_client
from aiohttp import web

from billing_webhooks.inbox.sync import SyncJob
from billing_webhooks.inbox.webhook import BODY_TIMEOUT_SECONDS, MAX_BODY_BYTES, WebhookEndpoint, error_response
from billing_webhooks.stripe_client import StripeApi
from billing_webhooks.usage_export.exporter import Exporter
from billing_webhooks.usage_export.exports import ExportRules
from driftlock_kernel import db, edge_timeouts, retention
from driftlock_kernel.errors import OperatorError
from driftlock_kernel.logs import configure_logging
from driftlock_kernel.settings import Settings

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_SECONDS = 10.0
HEALTH_TIMEOUT_SECONDS = 2.0
POOL_MAX_SIZE = 8
# A connection that has not sent a whole request head within this long, or stays idle this long between
# requests, is closed (aiohttp's keep-alive timer also runs from the connection's start, and bytes trickling in
# do not reset it). Short, because the port takes connections from anyone who reaches it: slow connections are
# held at most this long. Envoy's webhooks cluster closes its idle connections sooner (2 s), so it never sends on
# one being closed here; Stripe's deliveries arrive through Envoy whole (its buffer filter).
HEADER_TIMEOUT_SECONDS = 5.0


@dataclass
class ServiceState:
    pool: asyncpg.Pool | None = None
    draining: bool = False


STATE = web.AppKey("driftlock_webhooks_state", ServiceState)


@web.middleware
async def json_routing_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """A request for no route, or with a method its route does not take, gets the JSON error every other refusal
    of the service has (aiohttp's own answer is text/plain); a 405 keeps the router's `Allow` header."""
    try:
        return await handler(request)
    except web.HTTPNotFound:
        return error_response(request, 404, "not_found", "No such route.")
    except web.HTTPMethodNotAllowed as refusal:
        allow = refusal.headers.get("Allow", "")
        message = f"This route takes {allow.replace(',', ' or ')} only."
        return error_response(request, 405, "method_not_allowed", message, {"Allow": allow})


def create_app(
    settings: Settings, *, pool: asyncpg.Pool | None = None, body_timeout: float = BODY_TIMEOUT_SECONDS
) -> web.Application:
    """The aiohttp application. Without `pool`, it opens its own from settings.database_url on start-up (lazily:
    the service starts while the database is down) and closes it on clean-up; a given pool is the caller's."""
    secrets = settings.require_webhook_secrets()
    url = None if pool is not None else settings.require_database_url()
    # The body is read by WebhookEndpoint with its own limit; aiohttp's own limit only has to be above it.
    app = web.Application(client_max_size=MAX_BODY_BYTES + 1, middlewares=[json_routing_errors])
    state = ServiceState(pool=pool)
    app[STATE] = state

    async def database(app: web.Application) -> AsyncIterator[None]:
        if url is None:
            yield
            return
        state.pool = await db.create_pool(
            url,
            application_name="driftlock-webhooks",
            max_size=POOL_MAX_SIZE,
            transaction_pooler=settings.database_transaction_pooler,
        )
        try:
            yield
        finally:
            await state.pool.close()

    # --- parts with a lifetime: started in this order after the pool, stopped in reverse before it closes ---
    app.cleanup_ctx.append(database)
    if settings.stripe_api_key:
        app.cleanup_ctx.append(_stripe_work(settings, state))
    else:
        log.info("STRIPE_API_KEY is not set: usage is not reported to Stripe and subscriptions are not synced")
    app.cleanup_ctx.append(_retention(settings, state))

    def pool_of(request: web.Request) -> asyncpg.Pool:
        if state.pool is None:
            raise RuntimeError("the webhook service's database pool is not open")
        return state.pool

    async def healthz(request: web.Request) -> web.Response:
        if state.draining:
            return web.json_response({"status": "draining"}, status=503)
        try:
            async with asyncio.timeout(HEALTH_TIMEOUT_SECONDS):
                async with pool_of(request).acquire() as conn:
                    await conn.fetchval("SELECT 1")
        except db.DATABASE_ERRORS as error:
            return web.json_response({"status": "database_unavailable", "error": type(error).__name__}, status=503)
        return web.json_response({"status": "ok"})

    async def metrics_endpoint(request: web.Request) -> web.Response:
        return web.Response(
            body=prometheus_client.generate_latest(), headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST}
        )

    endpoint = WebhookEndpoint(secrets, pool_of, settings.billing_policy(), body_timeout=body_timeout)

    async def flush_logs(app: web.Application) -> None:
        endpoint.flush_logs()

    app.on_shutdown.append(flush_logs)
    app.router.add_post("/stripe/webhook", endpoint.handle)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics_endpoint)
    return app


def app_runner(app: web.Application, *, header_timeout: float = HEADER_TIMEOUT_SECONDS) -> web.AppRunner:
    """The runner `serve` uses (and the tests): no access log, its own signal handling, a header-read timeout."""
    return web.AppRunner(
        app,
        access_log=None,
        handle_signals=False,
        shutdown_timeout=SHUTDOWN_GRACE_SECONDS,
        keepalive_timeout=header_timeout,
    )


def export_rules(settings: Settings) -> ExportRules:
    return ExportRules(
        settle=timedelta(seconds=edge_timeouts.refund_window(settings)),
        finalization_grace=timedelta(seconds=settings.stripe_finalization_grace_seconds),
    )


def stripe_api(settings: Settings) -> StripeApi:
    return StripeApi(
        settings.require_stripe_api_key(), api_base=settings.stripe_api_base, timeout=settings.stripe_timeout_seconds
    )


def export_lease(settings: Settings) -> timedelta:
    """How long a claimed row stays a sender's: longer than a call to Stripe can take, however it ends."""
    return timedelta(seconds=settings.stripe_timeout_seconds * 3 + 1)


def runner_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _stripe_work(settings: Settings, state: ServiceState) -> Callable[[web.Application], AsyncIterator[None]]:
    settings.require_stripe_api_key()  # a malformed key stops the service at start, with one line

    async def work(app: web.Application) -> AsyncIterator[None]:
        if state.pool is None:
            raise RuntimeError("the webhook service's database pool is not open")
        api = stripe_api(settings)
        policy = settings.billing_policy()
        exporter = Exporter(
            state.pool,
            api,
            policy=policy,
            rules=export_rules(settings),
            interval=settings.stripe_export_interval_seconds,
            lease=export_lease(settings),
            runner=runner_name(),
        )
        syncer = SyncJob(
            state.pool, api, interval=settings.stripe_sync_interval_seconds, runner=runner_name(), policy=policy
        )
        exporter.start()
        syncer.start()
        log.info(
            "reporting usage to Stripe every %.0fs; syncing subscriptions every %.0fs",
            settings.stripe_export_interval_seconds,
            settings.stripe_sync_interval_seconds,
        )
        try:
            yield
        finally:
            await asyncio.gather(exporter.stop(SHUTDOWN_GRACE_SECONDS), syncer.stop(SHUTDOWN_GRACE_SECONDS))
            await api.close()

    return work


def webhook_pruner(pool: asyncpg.Pool, settings: Settings, replica: str) -> retention.Pruner:
    """Retention of the table this service writes (stripe_events); authz prunes its own."""
    configured = retention.configured_retentions(settings)
    return retention.Pruner(
        pool,
        {name: configured[name] for name in retention.WEBHOOK_TABLES},
        interval=settings.prune_interval_seconds,
        replica=replica,
        task=retention.WEBHOOK_TASK,
        on_pruned=retention.count_pruned,
        on_run=retention.count_run,
    )


def _retention(settings: Settings, state: ServiceState) -> Callable[[web.Application], AsyncIterator[None]]:
    async def pruning(app: web.Application) -> AsyncIterator[None]:
        if state.pool is None:
            raise RuntimeError("the webhook service's database pool is not open")
        pruner = webhook_pruner(state.pool, settings, runner_name())
        pruner.start()
        try:
            yield
        finally:
            await pruner.close()

    return pruning


class WebhookService:
    """The webhook process: the application of `create_app` served on the configured address."""

    def __init__(self, settings: Settings):
        self._settings = settings
        self.app = create_app(settings)
        self._runner = app_runner(self.app)

    async def start(self) -> None:
        """Start every part and listen; OperatorError (one line) when the port is taken. On failure, whatever
        started is stopped again."""
        settings = self._settings
        await self._runner.setup()
        site = web.TCPSite(self._runner, settings.webhooks_host, settings.webhooks_port)
        try:
            await site.start()
        except OSError as error:
            await self._runner.cleanup()
            raise OperatorError(
                f"cannot listen on {settings.webhooks_host}:{settings.webhooks_port}: {error.strerror or error}"
            ) from None
        except BaseException:
            await self._runner.cleanup()
            raise
        log.info(
            "webhooks listening on %s:%d (%d signing secret(s))",
            settings.webhooks_host,
            settings.webhooks_port,
            len(settings.stripe_webhook_secrets),
        )

    async def stop(self) -> None:
        """/healthz turns 503; deliveries in flight get SHUTDOWN_GRACE_SECONDS; then every part stops."""
        log.info("shutting down: draining for up to %.0fs", SHUTDOWN_GRACE_SECONDS)
        self.app[STATE].draining = True
        await self._runner.cleanup()


async def serve(settings: Settings) -> None:
    """`driftlock-gateway webhooks`: run until SIGTERM/SIGINT, then drain and return."""
    configure_logging(settings.log_level, settings.log_format)
    service = WebhookService(settings)
    await service.start()
    try:
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        await stopping.wait()
    finally:
        await service.stop()
    log.info("webhooks stopped")
