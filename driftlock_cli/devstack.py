"""`driftlock-gateway dev`: the whole stack on this machine, with one command.

Embedded PostgreSQL (kept in the state directory between runs) unless DATABASE_URL is set; the schema
migrated; a demo organisation and a fresh demo key; authz, the Stripe webhook service (with the secrets in
STRIPE_WEBHOOK_SECRET, else one generated and kept in the state directory), Envoy, and the demo backend unless
--backend is given. Without STRIPE_API_KEY, a local Stripe API (tests/support/stripe_api.py, run from the
repository) stands in for Stripe's: the demo organisation is put on a metered plan with a linked customer, so
its calls become meter events there (`stripe exports list`), and each start gives it a clean billing state.
Every start revokes the demo keys printed before (one live demo key per stack); `--reset` removes what earlier
runs kept; `--tls` serves HTTPS with a local CA's certificate. What the CLI beside the stack needs is written to
`<state dir>/stack.json` (dev_state.py), so that each line of the banner works pasted alone in the checkout.
Ctrl-C or SIGTERM stops every child and the embedded database.
"""

import asyncio
import contextlib
import secrets
import shlex
import shutil
import signal
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO

from driftlock_cli import dev_state, local_tls, stripe_player
from driftlock_cli.embedded_db import EmbeddedDatabase
from driftlock_cli.stack import LOOPBACK, StackPorts, start_stack
from driftlock_cli.supervisor import Child, ChildFailed, first_exit, free_port, start_child, tcp_open, wait_until
from driftlock_kernel import api_keys, context_keys, db, migrate, orgs, plans
from driftlock_kernel.billing import Overage
from driftlock_kernel.settings import HostPort, Settings, require_strong_secret

DEMO_ORG_NAME = "Demo organisation"
DEMO_KEY_NAME = "dev demo key"
REPO_ROOT = Path(__file__).resolve().parent.parent
# The local Stripe API: a test-mode key it accepts, the meter it creates, and the plan the demo organisation is
# put on so that its usage is reported there.
LOCAL_STRIPE_KEY = "sk_test_driftlock_local_dev"
LOCAL_STRIPE_PORT = 12111
DEV_METER = "driftlock_api_calls"
DEV_PLAN = "dev-metered"
# Quicker than production, so that a call shows at the local Stripe within half a minute: the demo backend
# answers at once, so its refunds (of calls it fails) are in long before.
# Each applies unless the operator set the setting (to something other than its default).
DEV_STRIPE_TIMINGS = {"stripe_export_interval_seconds": 10.0, "stripe_settle_seconds": 15.0}


async def _start_local_stripe(log_to: IO[str]) -> tuple[Child, str]:
    """`python -m tests.support.stripe_api` from the repository (tests is not an installed package)."""
    if not (REPO_ROOT / "tests" / "support" / "stripe_api.py").is_file():
        raise ChildFailed(
            "STRIPE_API_KEY is not set and the local Stripe API (tests/support/stripe_api.py) is not here: run dev "
            "from a clone of the repository, or set STRIPE_API_KEY to a test-mode key"
        )
    port = LOCAL_STRIPE_PORT
    with contextlib.suppress(Exception):
        if await tcp_open(LOOPBACK, port)():
            port = free_port()
    argv = [sys.executable, "-m", "tests.support.stripe_api", "--port", str(port), "--meter", DEV_METER]
    # The price the demo plan is mapped to exists there too, so that `doctor` finds it.
    argv += ["--price", stripe_player.DEFAULT_PRICE_ID]
    child = await start_child(
        "stripe", [*argv, "--auto-customers"], cwd=REPO_ROOT, prefix_output_to=log_to, env={"PYTHONUNBUFFERED": "1"}
    )
    try:
        await wait_until(tcp_open(LOOPBACK, port), timeout=30, what="the local Stripe API to listen", child=child)
    except BaseException:
        await child.stop()
        raise
    return child, f"http://{LOOPBACK}:{port}"


async def _meter_the_demo_org(url: str, org_id: uuid.UUID, pooler: bool | None) -> None:
    """Put the demo organisation on a metered plan, linked to the customer `stripe send-event` uses for it."""
    async with db.connection(url, application_name="driftlock-dev", transaction_pooler=pooler) as conn:
        await plans.upsert_plan(
            conn,
            DEV_PLAN,
            included_units=1000,
            overage=Overage.SOFT,
            stripe_price_ids=[stripe_player.DEFAULT_PRICE_ID],
            stripe_meter=DEV_METER,
        )
        await conn.execute(
            """UPDATE driftlock.organizations
               SET plan_name = $2, stripe_customer_id = coalesce(stripe_customer_id, $3), updated_at = now()
               WHERE id = $1""",
            org_id,
            DEV_PLAN,
            stripe_player.customer_for(org_id),
        )


def _secret_file(path: Path, make: Callable[[], str]) -> str:
    """Read a generated secret, or generate and keep it (readable by this user only)."""
    if path.exists():
        return path.read_text().strip()
    value = make()
    path.touch(mode=0o600)
    path.write_text(value + "\n")
    return value


async def _reset_demo_billing(url: str, org_id: uuid.UUID, pooler: bool | None) -> None:
    """Forget what played Stripe events did to the demo organisation (a cancellation leaves it `canceled`, on
    `free`, over its quota: every later "Try it" would answer 429). The local Stripe API starts empty each run,
    so the demo starts where it does: on the metered plan, linked to its customer, no subscription."""
    async with (
        db.connection(url, application_name="driftlock-dev", transaction_pooler=pooler) as conn,
        conn.transaction(),
    ):
        await conn.execute(
            "DELETE FROM driftlock.stripe_subscriptions WHERE org_id = $1 OR customer_id = $2",
            org_id,
            stripe_player.customer_for(org_id),
        )
        await conn.execute(
            """UPDATE driftlock.organizations
               SET billing_status = 'none', past_due_since = NULL, stripe_subscription_id = NULL,
                   period_start = NULL, period_end = NULL, trial_end = NULL, cancel_at_period_end = false,
                   suspended_at = NULL, updated_at = now()
               WHERE id = $1""",
            org_id,
        )


async def _demo_org_and_key(url: str, state_dir: Path, pooler: bool | None) -> tuple[uuid.UUID, str, int]:
    """The demo organisation (made once per state directory) and its one live demo key: the keys printed by
    earlier runs are revoked, so a stack has one. Returns how many were revoked too."""
    org_file = state_dir / "demo_org_id"
    async with db.connection(url, application_name="driftlock-dev", transaction_pooler=pooler) as conn:
        await migrate.migrate(conn)
        org = None
        if org_file.exists():
            with contextlib.suppress(ValueError, orgs.NotFound):
                org = await orgs.get_org(conn, uuid.UUID(org_file.read_text().strip()))
        if org is None:
            org = await orgs.create_org(conn, DEMO_ORG_NAME)
            org_file.write_text(f"{org.id}\n")
        revoked = 0
        for old in await api_keys.list_keys(conn, org.id):
            if old.name == DEMO_KEY_NAME and old.revoked_at is None:
                await api_keys.revoke_key(conn, old.id)
                revoked += 1
        _key, secret = await api_keys.create_key(conn, org.id, name=DEMO_KEY_NAME)
    return org.id, secret, revoked


async def _demo_state(url: str, org_id: uuid.UUID, pooler: bool | None) -> str:
    async with db.connection(url, application_name="driftlock-dev", transaction_pooler=pooler) as conn:
        org = await orgs.get_org(conn, org_id)
    suspended = ", suspended" if org.suspended_at else ""
    return f"plan {org.plan}, billing {org.billing_status}{suspended}"


# What `dev --reset` removes from a state directory: everything dev itself puts there, and nothing else (the
# directory may be one the operator named).
STATE_ENTRIES = (
    "pgdata",
    "demo_org_id",
    "jwt_secret",
    "ext_authz_secret",
    "admin_token_secret",
    "stripe_webhook_secret",
    "context_signing_keys",
    "meter-spill",
    "tls",
    "envoy.yaml",
    dev_state.STACK_FILE,
)


def reset_state(state: Path) -> list[str]:
    """Remove what earlier runs kept (the embedded database with its demo organisation, generated secrets,
    spilled units); the names removed."""
    running = dev_state.running_stack_pid(state)
    if running is not None:
        raise ChildFailed(f"a dev stack (PID {running}) is running on {state}: stop it before `dev --reset`")
    removed = []
    for name in STATE_ENTRIES:
        path = state / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed


async def run_dev_stack(
    settings: Settings, *, backend: HostPort | None, state_dir: str, reset: bool = False, tls: bool = False
) -> None:
    state = Path(state_dir).resolve()
    state.mkdir(parents=True, exist_ok=True)
    if reset:
        removed = reset_state(state)
        print(f"Reset {state}: removed {', '.join(removed) or 'nothing (it was clean)'}.", flush=True)
    embedded = None
    if settings.database_url:
        url = settings.database_url
        where = db.describe(url)
    else:
        print(f"Starting embedded PostgreSQL in {state / 'pgdata'} ...", flush=True)
        embedded = await asyncio.to_thread(EmbeddedDatabase, state / "pgdata")
        url = embedded.url
        where = url
    try:
        jwt_path = state / "jwt_secret"
        jwt_secret = settings.jwt_secret or _secret_file(jwt_path, lambda: secrets.token_urlsafe(48))
        require_strong_secret(Settings.variable("jwt_secret"), jwt_secret)
        ext_authz_path = state / "ext_authz_secret"
        ext_authz_secret = settings.ext_authz_secret or _secret_file(ext_authz_path, lambda: secrets.token_urlsafe(48))
        require_strong_secret(Settings.variable("ext_authz_secret"), ext_authz_secret)
        admin_path = state / "admin_token_secret"
        admin_secret = settings.admin_token_secret or _secret_file(admin_path, lambda: secrets.token_urlsafe(48))
        keys_path, keys_env = _context_keys(settings, state)
        webhook_path = state / "stripe_webhook_secret"
        webhook_secret = ",".join(settings.stripe_webhook_secrets) or _secret_file(
            webhook_path, lambda: "whsec_" + secrets.token_urlsafe(32)
        )
        org_id, key, revoked = await _demo_org_and_key(url, state, settings.database_transaction_pooler)
        ports = StackPorts.from_settings(settings)
        tls_files, ca_file = _tls(settings, state, generate=tls)
        local_stripe: Child | None = None
        stripe_env: dict[str, str] = {}
        stripe_url: str | None = None
        if not settings.stripe_api_key:
            local_stripe, stripe_url = await _start_local_stripe(sys.stderr)
            await _meter_the_demo_org(url, org_id, settings.database_transaction_pooler)
            await _reset_demo_billing(url, org_id, settings.database_transaction_pooler)
            defaults = Settings()
            # The operator's own timings win.
            timings = {
                name: value
                for name, value in DEV_STRIPE_TIMINGS.items()
                if getattr(settings, name) == getattr(defaults, name)
            }
            stripe_env = Settings.environment_for(
                stripe_api_key=LOCAL_STRIPE_KEY, stripe_api_base=stripe_url, **timings
            )
        try:
            stack = await start_stack(
                database_url=url,
                jwt_secret=jwt_secret,
                state_dir=state,
                ports=ports,
                backend=backend,
                output=sys.stderr,
                webhook_secret=webhook_secret,
                admin_token_secret=admin_secret,
                context_signing_keys=keys_path,
                # Production logs one JSON object per line; a terminal reads better as text.
                # Event endpoints on this machine (`events listen`) are allowed under dev only.
                extra_env={
                    **keys_env,
                    **stripe_env,
                    **Settings.environment_for(log_format="text", events_allow_private_urls=True),
                },
                ext_authz_secret=ext_authz_secret,
                cors_origins=settings.cors_allowed_origins,
                requests_per_source=settings.edge_requests_per_source,
                tls=tls_files,
            )
        except BaseException:
            if local_stripe is not None:
                await local_stripe.stop()
            raise
        if local_stripe is not None:
            stack.children["stripe"] = local_stripe
        # What the CLI beside this stack needs, for it to find by itself (dev_state.py): what dev generated or
        # chose, never a setting of the operator's own (it may hold a password).
        generated: dict[str, object] = {
            "envoy_port": ports.envoy,
            "envoy_admin_port": ports.envoy_admin,
            "admin_port": stack.ports.admin,
            "authz_port": ports.authz[0],
            "authz_metrics_port": ports.authz_metrics[0],
            "webhooks_port": ports.webhooks,
        }
        if ports.envoy_stats is not None:
            generated["envoy_stats_port"] = ports.envoy_stats
        if embedded is not None:
            generated["database_url"] = url
        if not settings.jwt_secret:
            generated["jwt_secret"] = jwt_secret
        if not settings.stripe_webhook_secrets:
            generated["stripe_webhook_secrets"] = (webhook_secret,)
        if not settings.admin_token_secret:
            generated["admin_token_secret"] = admin_secret
        if not settings.ext_authz_secret:
            generated["ext_authz_secret"] = ext_authz_secret
        if keys_path is not None:
            generated["context_signing_keys_file"] = str(keys_path)
        if tls_files is not None and ca_file is not None:
            # The certificate `--tls` made (the operator's own is in the operator's environment).
            generated["tls_cert_path"], generated["tls_key_path"] = tls_files
        cli_env = {**Settings.environment_for(**generated), **stripe_env}
        dev_state.write(state, cli_env)
        try:
            demo_state = await _demo_state(url, org_id, settings.database_transaction_pooler)
            _print_banner(
                stack.envoy_url,
                ports,
                backend,
                where,
                # The embedded database's URL holds no password; an operator's own is never printed.
                url if embedded is not None else None,
                jwt_path if not settings.jwt_secret else None,
                org_id,
                key,
                # A secret of the operator's own is not printed; a generated one is, with where it is kept.
                None if settings.stripe_webhook_secrets else (webhook_secret, webhook_path),
                stack.management_url,
                None if settings.admin_token_secret else admin_path,
                keys_path if keys_path is not None and not settings.context_signing_keys_file else None,
                settings.context_token_algorithm,
                stripe_url,
                None if settings.ext_authz_secret else ext_authz_path,
                state,
                demo_state,
                revoked,
                ca_file,
            )
            stopping = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stopping.set)
            stop_wait = asyncio.ensure_future(stopping.wait())
            exited = asyncio.ensure_future(first_exit(list(stack.children.values())))
            done, _ = await asyncio.wait({stop_wait, exited}, return_when=asyncio.FIRST_COMPLETED)
            stop_wait.cancel()
            exited.cancel()
            if exited in done and not exited.cancelled():
                child = exited.result()
                print(f"{child.name} exited with code {child.process.returncode}; stopping everything.", flush=True)
        finally:
            print("Stopping ...", flush=True)
            dev_state.remove(state)
            await stack.stop()
    finally:
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)
    print("Stopped.", flush=True)


def _context_keys(settings: Settings, state: Path) -> tuple[Path | None, dict[str, str]]:
    """The signing key file of the stack (the operator's, or one generated and kept in the state directory) and
    the environment that says so."""
    if settings.context_signing_keys:  # the operator's keys, inherited from the environment: no file
        return None, Settings.environment_for(context_signing_keys_file=None)
    if settings.context_signing_keys_file:
        return Path(settings.context_signing_keys_file), {}
    path = state / "context_signing_keys"
    if not path.exists():
        context_keys.write_key_file(path, (context_keys.Ed25519Key.generate(kid="dev-1"),))
    return path, {}


def _cli_command() -> str:
    """How this shell can run the CLI: by name when it is on PATH, else by the path of the one running now
    (after `make dev`, `.venv/bin/driftlock-gateway`, unless the virtual environment is activated)."""
    if shutil.which("driftlock-gateway"):
        return "driftlock-gateway"
    beside = Path(sys.executable).with_name("driftlock-gateway")
    with contextlib.suppress(ValueError):
        return str(beside.relative_to(Path.cwd()))
    return str(beside)


def _tls(settings: Settings, state: Path, *, generate: bool) -> tuple[tuple[str, str] | None, Path | None]:
    """The edge's certificate and key (the operator's DRIFTLOCK_TLS_CERT/KEY, or with `--tls` a local CA's,
    made once and kept in the state directory), and the CA file a client should trust (None: the operator's)."""
    configured = settings.tls()
    if configured is not None:
        return configured, None
    if not generate:
        return None, None
    folder = state / "tls"
    ca, cert, key = folder / "ca.crt", folder / "edge.crt", folder / "edge.key"
    if not (ca.exists() and cert.exists() and key.exists()):
        local_tls.write_local_ca_and_certificate(ca, cert, key)
    return (str(cert), str(key)), ca


def _print_banner(
    envoy_url: str,
    ports: StackPorts,
    backend: HostPort | None,
    where: str,
    url: str | None,
    jwt_path: Path | None,
    org_id: uuid.UUID,
    key: str,
    webhook: tuple[str, Path] | None,
    management_url: str,
    admin_path: Path | None,
    keys_path: Path | None,
    algorithm: str,
    local_stripe: str | None,
    ext_authz_path: Path | None,
    state: Path,
    demo_state: str,
    revoked: int,
    ca_file: Path | None,
) -> None:
    backend_line = f"{backend} (yours)" if backend else f"http://{LOOPBACK}:{ports.backend} (demo: echoes requests)"
    cli = _cli_command()
    cacert = f" --cacert {shlex.quote(str(ca_file))}" if ca_file is not None else ""
    lines = [
        "",
        "DriftLock gateway is running.",
        f"  public API (Envoy)  {envoy_url}" + (f"   (certificate of a local CA: {ca_file})" if ca_file else ""),
        f"  authz (gRPC)        {LOOPBACK}:{ports.authz[0]}   metrics http://{LOOPBACK}:{ports.authz_metrics[0]}/metrics",
        f"  Stripe webhooks     {envoy_url}/stripe/webhook   "
        f"(service http://{LOOPBACK}:{ports.webhooks}, metrics /metrics)",
        f"  management API      {management_url}   (JSON; docs/management-api.md)",
        f"  JWKS                {management_url}/.well-known/jwks.json   (context tokens: {algorithm})",
        f"  Envoy admin         http://{LOOPBACK}:{ports.envoy_admin}",
        f"  backend             {backend_line}",
        f"  database            {where}",
    ]
    if jwt_path is not None:
        lines.append(f"  JWT secret          generated, in {jwt_path}")
    if webhook is not None:
        lines.append(f"  webhook secret      generated, in {webhook[1]}")
    if admin_path is not None:
        lines.append(f"  admin token secret  generated, in {admin_path}")
    if keys_path is not None:
        lines.append(f"  context signing key generated, in {keys_path}")
    if local_stripe is not None:
        lines.append(f"  Stripe API          {local_stripe} (local, test mode, in memory; meter {DEV_METER})")
    lines += [
        "",
        f"Run from this checkout, the CLI ({cli}) finds this stack's settings in {state / dev_state.STACK_FILE} by",
        "itself and says so on stderr. Elsewhere, or in scripts, export them"
        + ("" if cli == "driftlock-gateway" else " (and `source .venv/bin/activate` for `driftlock-gateway`)")
        + ":",
        f"  export {Settings.variable('database_url')}='{url}'"
        if url is not None
        else "  (DATABASE_URL: the one you started dev with)",
    ]
    if webhook is not None:
        lines.append(f"  export {Settings.variable('stripe_webhook_secrets')}='{webhook[0]}'")
    if admin_path is not None:
        lines.append(f'  export {Settings.variable("admin_token_secret")}="$(cat {admin_path})"')
    if ext_authz_path is not None:
        lines.append(f'  export {Settings.variable("ext_authz_secret")}="$(cat {ext_authz_path})"')
    if keys_path is not None:
        lines.append(f"  export {Settings.variable('context_signing_keys_file')}='{keys_path}'")
    if local_stripe is not None:
        exports = Settings.environment_for(stripe_api_key=LOCAL_STRIPE_KEY, stripe_api_base=local_stripe)
        lines.append("  export " + " ".join(f"{name}='{value}'" for name, value in exports.items()))
    ports_env = Settings.environment_for(
        envoy_port=ports.envoy, admin_port=int(management_url.rsplit(":", 1)[1]), webhooks_port=ports.webhooks
    )
    lines.append("  export " + " ".join(f"{name}={value}" for name, value in ports_env.items()))
    old_keys = f"; {revoked} earlier demo key(s) revoked" if revoked else ""
    lines += [
        "",
        f"Demo organisation {org_id} ({demo_state}{old_keys}).",
        "Its key (shown once; the only live demo key of this stack):",
        f"  {key}",
        "",
        "Try it:",
        f"  curl{cacert} -H 'Authorization: Bearer {key}' {envoy_url}/api/v1/stream/detect",
        "",
        "The management API (JSON; an admin token lasts 5 minutes):",
        f'  curl -H "Authorization: Bearer $({cli} admin-token)" {management_url}/v1/orgs/{org_id}/keys',
        "",
        "Customer controls, e.g. a key for a CI job (100 units a period, 2 requests a second, this machine only,",
        "Stream only; see docs/management-api.md):",
        f"  {cli} keys create --org {org_id} --name ci --max-units 100 --rate-limit 2 --allow-cidr 127.0.0.1"
        " --products stream",
        "",
    ]
    lines += [
        "Every check of the configuration, the database and each service of this stack:",
        f"  {cli} doctor",
        "",
    ]
    if local_stripe is not None:
        lines += [
            f"Its calls reach the local Stripe API within half a minute (plan {DEV_PLAN}, meter {DEV_METER}):",
            f"  {cli} stripe exports list --org {org_id}",
            "",
        ]
    send = f"{cli} stripe send-event"
    where_to = f" --url {envoy_url}/stripe/webhook{cacert}" if envoy_url.startswith("https:") else ""
    lines += [
        "Watch this organisation's events as the dashboard would get them (signed, verified, one per line):",
        f"  {cli} events listen --org {org_id}",
        "",
        "Play Stripe (a signed event through Envoy; see --help for the other types):",
        f"  {send} checkout.session.completed --org {org_id}{where_to}",
        f"  {send} invoice.payment_failed --org {org_id} --ago 8d{where_to}   # past the grace days: 402",
    ]
    if local_stripe is not None:
        lines += [
            "The local Stripe API learns what each event says. A payment whose webhook never arrived, then the repair"
            " from Stripe's API:",
            f"  {send} invoice.payment_succeeded --org {org_id} --skip-webhook",
            f"  {cli} stripe sync --org {org_id}   # serves again",
        ]
    lines += [
        "",
        "The next start resets the demo's billing state; `dev --reset` starts from a clean slate.",
        "Ctrl-C stops everything.",
        "",
    ]
    print("\n".join(lines), flush=True)
