"""`driftlock-gateway dev`: the whole stack on this machine, with one command.

Embedded PostgreSQL (kept in the state directory between runs) unless DATABASE_URL is set; the schema
migrated; a demo organisation and a fresh demo key; authz, the Stripe webhook service (with the secrets in
STRIPE_WEBHOOK_SECRET, else one generated and kept in the state directory), Envoy, and the demo backend unless
--backend is given. Ctrl-C or SIGTERM stops every child and the embedded database.
"""

import asyncio
import contextlib
import secrets
import signal
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

from driftlock_cli.embedded_db import EmbeddedDatabase
from driftlock_cli.stack import LOOPBACK, StackPorts, start_stack
from driftlock_cli.supervisor import first_exit
from driftlock_kernel import api_keys, context_keys, db, migrate, orgs
from driftlock_kernel.settings import HostPort, Settings, require_strong_secret

DEMO_ORG_NAME = "Demo organisation"


def _secret_file(path: Path, make: Callable[[], str]) -> str:
    """Read a generated secret, or generate and keep it (readable by this user only)."""
    if path.exists():
        return path.read_text().strip()
    value = make()
    path.touch(mode=0o600)
    path.write_text(value + "\n")
    return value


async def _demo_org_and_key(url: str, state_dir: Path, pooler: bool | None) -> tuple[uuid.UUID, str]:
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
        _key, secret = await api_keys.create_key(conn, org.id, name="dev demo key")
    return org.id, secret


async def run_dev_stack(settings: Settings, *, backend: HostPort | None, state_dir: str) -> None:
    state = Path(state_dir).resolve()
    state.mkdir(parents=True, exist_ok=True)
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
        require_strong_secret("DRIFTLOCK_JWT_SECRET", jwt_secret)
        if settings.ext_authz_secret:
            settings.require_ext_authz_secret()
        admin_path = state / "admin_token_secret"
        admin_secret = settings.admin_token_secret or _secret_file(admin_path, lambda: secrets.token_urlsafe(48))
        keys_path, keys_env = _context_keys(settings, state)
        webhook_path = state / "stripe_webhook_secret"
        webhook_secret = ",".join(settings.stripe_webhook_secrets) or _secret_file(
            webhook_path, lambda: "whsec_" + secrets.token_urlsafe(32)
        )
        org_id, key = await _demo_org_and_key(url, state, settings.database_transaction_pooler)
        ports = StackPorts.from_settings(settings)
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
            extra_env={**keys_env, "DRIFTLOCK_LOG_FORMAT": "text"},
            ext_authz_secret=settings.ext_authz_secret,
            cors_origins=settings.cors_allowed_origins,
            requests_per_source=settings.edge_requests_per_source,
        )
        try:
            _print_banner(
                stack.envoy_url,
                ports,
                backend,
                where,
                url,
                jwt_path if not settings.jwt_secret else None,
                org_id,
                key,
                # A secret of the operator's own is not printed; a generated one is, with where it is kept.
                None if settings.stripe_webhook_secrets else (webhook_secret, webhook_path),
                stack.management_url,
                None if settings.admin_token_secret else admin_path,
                keys_path if keys_path is not None and not settings.context_signing_keys_file else None,
                settings.context_token_algorithm,
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
            await stack.stop()
    finally:
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)
    print("Stopped.", flush=True)


def _context_keys(settings: Settings, state: Path) -> tuple[Path | None, dict[str, str]]:
    """The signing key file of the stack (the operator's, or one generated and kept in the state directory) and
    the environment that says so."""
    if settings.context_signing_keys:  # the operator's keys, inherited from the environment: no file
        return None, {"DRIFTLOCK_CONTEXT_SIGNING_KEYS_FILE": ""}
    if settings.context_signing_keys_file:
        return Path(settings.context_signing_keys_file), {}
    path = state / "context_signing_keys"
    if not path.exists():
        context_keys.write_key_file(path, (context_keys.Ed25519Key.generate(kid="dev-1"),))
    return path, {}


def _print_banner(
    envoy_url: str,
    ports: StackPorts,
    backend: HostPort | None,
    where: str,
    url: str,
    jwt_path: Path | None,
    org_id: uuid.UUID,
    key: str,
    webhook: tuple[str, Path] | None,
    management_url: str,
    admin_path: Path | None,
    keys_path: Path | None,
    algorithm: str,
) -> None:
    backend_line = f"{backend} (yours)" if backend else f"http://{LOOPBACK}:{ports.backend} (demo: echoes requests)"
    lines = [
        "",
        "DriftLock gateway is running.",
        f"  public API (Envoy)  {envoy_url}",
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
    lines += [
        "",
        "Use the CLI against this stack:",
        f"  export DATABASE_URL='{url}'",
    ]
    if webhook is not None:
        lines.append(f"  export STRIPE_WEBHOOK_SECRET='{webhook[0]}'")
    if admin_path is not None:
        lines.append(f'  export DRIFTLOCK_ADMIN_TOKEN_SECRET="$(cat {admin_path})"')
    if keys_path is not None:
        lines.append(f"  export DRIFTLOCK_CONTEXT_SIGNING_KEYS_FILE='{keys_path}'")
    lines += [
        "",
        f"Demo key for organisation {org_id} (shown once):",
        f"  {key}",
        "",
        "Try it:",
        f"  curl -H 'Authorization: Bearer {key}' {envoy_url}/api/v1/stream/detect",
        "",
        "The management API (JSON; an admin token lasts 5 minutes):",
        f'  curl -H "Authorization: Bearer $(driftlock-gateway admin-token)" {management_url}/v1/orgs/{org_id}/keys',
        "",
        "Play Stripe (a signed event through Envoy; see --help for the other types):",
        f"  driftlock-gateway stripe send-event checkout.session.completed --org {org_id}",
        f"  driftlock-gateway stripe send-event invoice.payment_failed --org {org_id} --ago 8d",
        "",
        "Ctrl-C stops everything.",
        "",
    ]
    print("\n".join(lines), flush=True)
