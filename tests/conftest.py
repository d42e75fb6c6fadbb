"""Fixtures shared by every test: a real PostgreSQL (embedded unless DATABASE_URL names one), migrated once per
session, and factories for organisations and keys."""

import asyncio
import os
import secrets
import shutil
import tempfile
from pathlib import Path

# The tests use gRPC and then start processes; gRPC's fork handlers would only print warnings about it.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import pytest

from driftlock_cli.embedded_db import EmbeddedDatabase, claim, orphaned_folders, stop_orphaned_servers
from driftlock_kernel import api_keys, db, migrate, orgs, plans
from driftlock_kernel.billing import Overage
from driftlock_kernel.keys import ALL_SCOPES, Environment, Scope
from tests.support import pgbouncer
from tests.support.database import DatabaseFactory
from tests.support.loop_exceptions import expect_loop_exception, fail_on_loop_exceptions

__all__ = ["expect_loop_exception", "fail_on_loop_exceptions"]  # fixtures every test gets from here

_OWN_BASETEMP = pytest.StashKey[str]()


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    # A temporary folder of this session's own: pytest's shared /tmp/pytest-of-<user> keeps only the last three
    # sessions' folders, so a fourth test run on the same machine would delete the embedded database under ours.
    if config.option.basetemp is None:
        config.option.basetemp = tempfile.mkdtemp(prefix="driftlock-tests-")
        config.stash[_OWN_BASETEMP] = config.option.basetemp


def pytest_unconfigure(config: pytest.Config) -> None:
    own = config.stash.get(_OWN_BASETEMP, None)
    if own is not None and not os.environ.get("DRIFTLOCK_KEEP_TEST_TMP"):
        shutil.rmtree(own, ignore_errors=True)


JWT_SECRET = secrets.token_urlsafe(48)
ADMIN_TOKEN_SECRET = secrets.token_urlsafe(48)
# The one origin the tests' gateway answers CORS preflights for.
CORS_ORIGIN = "https://app.example.test"
ALERT_SECRET = secrets.token_urlsafe(48)
# Organisations of the tests are on this plan unless a test says otherwise: no rate limit and a soft quota, so
# that a test meets a limit only when it asks for one.
TEST_PLAN = "tests-unlimited"


@pytest.fixture(scope="session")
def jwt_secret() -> str:
    return JWT_SECRET


@pytest.fixture(scope="session")
def admin_secret() -> str:
    """DRIFTLOCK_ADMIN_TOKEN_SECRET of the session's gateway: what management API callers sign tokens with."""
    return ADMIN_TOKEN_SECRET


@pytest.fixture(scope="session")
def context_signing_keys(tmp_path_factory):
    """The session gateway's context-token keys: two, as during a rotation (the first signs, both published)."""
    from driftlock_kernel import context_keys

    keys = (context_keys.Ed25519Key.generate("tests-current"), context_keys.Ed25519Key.generate("tests-next"))
    path = tmp_path_factory.mktemp("context-keys") / "context_signing_keys"
    context_keys.write_key_file(path, keys)
    return context_keys.ContextKeys(context_keys.EDDSA, keys), path


@pytest.fixture(scope="session")
async def embedded_server():
    """The embedded PostgreSQL server the session started, or None when DATABASE_URL names a server (which the
    tests must never stop)."""
    if os.environ.get("DATABASE_URL"):
        yield None
        return
    # In one fixed folder for every session, not in the session's temporary one: that is where the next session
    # looks for servers a killed session left running (and a session's own folder may be gone by then).
    root = Path(tempfile.gettempdir()) / "driftlock-test-postgres"
    root.mkdir(mode=0o755, exist_ok=True)
    # A session killed before it could stop its server (SIGKILL, a CI timeout) left that server running: stop
    # it now. Only servers whose session is dead; a session running right now keeps its own.
    await asyncio.to_thread(stop_orphaned_servers, root)
    for folder in orphaned_folders(root):
        shutil.rmtree(folder, ignore_errors=True)
    session_dir = root / f"session-{os.getpid()}-{secrets.token_hex(4)}"
    data_dir = session_dir / "data"
    claim(data_dir)
    server = await asyncio.to_thread(EmbeddedDatabase, data_dir)
    try:
        yield server
    finally:
        await asyncio.to_thread(server.stop)
        shutil.rmtree(session_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_admin_url(embedded_server) -> str:
    return embedded_server.url if embedded_server is not None else os.environ["DATABASE_URL"]


@pytest.fixture(scope="session")
async def databases(pg_admin_url):
    factory = DatabaseFactory(pg_admin_url)
    yield factory
    await factory.drop_all()


@pytest.fixture(scope="session")
async def pooler(pg_admin_url):
    """PgBouncer in transaction mode in front of the server when DRIFTLOCK_TEST_PGBOUNCER=1, else None."""
    if not pgbouncer.ENABLED:
        yield None
        return
    bouncer = await pgbouncer.PgBouncer(pg_admin_url).start()
    # Every process the tests start (services, CLI) is told it is behind a transaction pooler.
    os.environ["DRIFTLOCK_DB_TRANSACTION_POOLER"] = "true"
    try:
        yield bouncer
    finally:
        await bouncer.stop()


@pytest.fixture(scope="session")
def transaction_pooler(pooler) -> bool | None:
    """What the tests' own connections pass as `transaction_pooler` (None: guessed, as the services do)."""
    return True if pooler is not None else None


@pytest.fixture(scope="session")
async def direct_database_url(databases) -> str:
    """The session's database, migrated, reached directly (what DATABASE_LISTEN_URL names behind a pooler)."""
    url = await databases.create() if await databases.can_create() else databases.admin_url
    async with db.connection(url) as conn:
        await migrate.migrate(conn)
        await plans.upsert_plan(
            conn,
            TEST_PLAN,
            included_units=1_000_000_000,
            overage=Overage.SOFT,
            # Test keys too: no limit unless a test asks for one.
            test_included_units=1_000_000_000,
            test_rate_limit_rps=1_000_000.0,
        )
    return url


@pytest.fixture(scope="session")
def database_url(direct_database_url, pooler) -> str:
    """One migrated database for the session; tests keep apart by creating their own organisations. Behind
    PgBouncer when DRIFTLOCK_TEST_PGBOUNCER=1 (LISTEN then goes to DATABASE_LISTEN_URL, direct)."""
    if pooler is None:
        return direct_database_url
    os.environ["DATABASE_LISTEN_URL"] = direct_database_url
    return pooler.pooled(direct_database_url)


@pytest.fixture(scope="session")
def listen_url(direct_database_url) -> str:
    """Where a test LISTENs: never through a transaction pooler."""
    return direct_database_url


@pytest.fixture
async def fresh_database_url(databases, pooler) -> str:
    """An empty database of its own, for tests of the schema itself (through PgBouncer when it runs)."""
    if not await databases.can_create():
        pytest.skip("the server named by DATABASE_URL does not let this user create databases")
    url = await databases.create("driftlock_fresh")
    return url if pooler is None else pooler.pooled(url)


@pytest.fixture(scope="session")
async def pool(database_url, transaction_pooler):
    pool = await db.create_pool(
        database_url, application_name="driftlock-tests", max_size=4, transaction_pooler=transaction_pooler
    )
    yield pool
    await pool.close()


@pytest.fixture
def make_org(pool):
    async def make(*, plan: str = TEST_PLAN, name: str = "Test organisation") -> orgs.Organization:
        async with pool.acquire() as conn:
            return await orgs.create_org(conn, name, plan=plan)

    return make


@pytest.fixture
def make_key(pool):
    async def make(org_id, *, scopes=ALL_SCOPES, expires_in=None, test: bool = False):
        async with pool.acquire() as conn:
            return await api_keys.create_key(
                conn,
                org_id,
                scopes=tuple(Scope(s) for s in scopes),
                expires_in=expires_in,
                environment=Environment.TEST if test else Environment.LIVE,
            )

    return make


# --- the running gateway ----------------------------------------------------------------------------------------


# The gateway reports usage to a local Stripe API with this key and meter; its timings are shortened so that the
# tests can wait for them: the backend gets 2 s before Envoy answers 504, counted units wait 4 s for their
# refunds (longer than a call can last, plus the flushes), a pass runs every second, and calls to Stripe get 1 s
# (a dead sender's claim expires 4 s later).
GATEWAY_STRIPE_KEY = "sk_test_driftlock_gateway"
GATEWAY_METER = "driftlock_api_calls"
GATEWAY_BACKEND_TIMEOUT_SECONDS = 2
GATEWAY_SETTLE_SECONDS = 4


class Gateway:
    """Envoy + two authz replicas + the webhook service + a recording backend and alert receiver, on free ports,
    and the local Stripe API the webhook service reports usage to and syncs from.

    Every allowed check is audited (sample rate 1) so that tests can find their requests in the audit log.
    Context tokens are EdDSA (the `context_signing_keys` fixture); the management API answers on
    `management_port` to tokens signed with the `admin_secret` fixture. CORS is on for CORS_ORIGIN."""

    def __init__(self, stack, backend, webhook_secret, alerts, log_dir, stripe=None):
        self.stack = stack
        self.backend = backend
        self.webhook_secret = webhook_secret
        self.alerts = alerts
        self.log_dir = log_dir
        self.stripe = stripe

    @property
    def port(self) -> int:
        return self.stack.ports.envoy

    @property
    def management_port(self) -> int:
        return self.stack.ports.admin

    @property
    def webhooks_url(self) -> str:
        """The webhook service itself, bypassing Envoy (for its /metrics)."""
        return self.stack.webhooks_url

    def authz_target(self, replica: int) -> str:
        return self.stack.authz_target(replica)

    async def authz_checks(self) -> float:
        """Checks both authz replicas answered so far (driftlock_authz_checks_total)."""
        import aiohttp
        from prometheus_client.parser import text_string_to_metric_families

        total = 0.0
        async with aiohttp.ClientSession() as session:
            for port in self.stack.ports.authz_metrics:
                async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
                    text = await response.text()
                for family in text_string_to_metric_families(text):
                    if family.name == "driftlock_authz_checks":
                        total += sum(s.value for s in family.samples if s.name.endswith("_total"))
        return total

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-4000:]}" for p in sorted(self.log_dir.glob("*.log")))


@pytest.fixture(scope="session")
async def gateway(database_url, jwt_secret, admin_secret, context_signing_keys, tmp_path_factory):
    from driftlock_cli.stack import StackPorts, start_stack
    from driftlock_kernel.settings import HostPort
    from tests.support.authz_requests import EXT_AUTHZ_SECRET
    from tests.support.log_scan import scan_logs
    from tests.support.net import free_port
    from tests.support.recorder import Recorder
    from tests.support.stripe import SECRET
    from tests.support.stripe_api import LocalStripe

    backend = await Recorder().start(free_port())
    alerts = await Recorder().start(free_port())
    stripe = await LocalStripe(api_key=GATEWAY_STRIPE_KEY).start()
    stripe.add_meter(GATEWAY_METER)
    ports = StackPorts(
        envoy=free_port(),
        envoy_admin=free_port(),
        authz=(free_port(), free_port()),
        authz_metrics=(free_port(), free_port()),
        webhooks=free_port(),
        backend=backend.port,
        admin=free_port(),
        envoy_stats=free_port(),
    )
    state = tmp_path_factory.mktemp("gateway")
    log_dir = state / "logs"
    try:
        stack = await start_stack(
            database_url=database_url,
            jwt_secret=jwt_secret,
            state_dir=state,
            ports=ports,
            backend=HostPort("127.0.0.1", backend.port),
            log_dir=log_dir,
            webhook_secret=SECRET,
            admin_token_secret=admin_secret,
            context_signing_keys=context_signing_keys[1],
            ext_authz_secret=EXT_AUTHZ_SECRET,
            cors_origins=(CORS_ORIGIN,),
            extra_env={
                "DRIFTLOCK_ALERT_WEBHOOK_URL": f"http://127.0.0.1:{alerts.port}/alerts",
                "DRIFTLOCK_ALERT_WEBHOOK_SECRET": ALERT_SECRET,
                "DRIFTLOCK_AUDIT_ALLOW_SAMPLE_RATE": "1",
                # Customers' event endpoints in the tests are local receivers, as under `dev`.
                "DRIFTLOCK_EVENTS_ALLOW_PRIVATE_URLS": "true",
                "DRIFTLOCK_KEY_LAST_USED_INTERVAL_SECONDS": "0.5",
                "STRIPE_API_KEY": GATEWAY_STRIPE_KEY,
                "STRIPE_API_BASE": stripe.url,
                "DRIFTLOCK_STRIPE_EXPORT_INTERVAL_SECONDS": "1",
                "DRIFTLOCK_STRIPE_SETTLE_SECONDS": str(GATEWAY_SETTLE_SECONDS),
                "DRIFTLOCK_STRIPE_TIMEOUT_SECONDS": "1",
            },
            backend_timeout=f"{GATEWAY_BACKEND_TIMEOUT_SECONDS}s",
        )
    except Exception:
        print(Gateway(None, backend, SECRET, alerts, log_dir).logs())
        await stripe.stop()
        raise
    gateway = Gateway(stack, backend, SECRET, alerts, log_dir, stripe)
    yield gateway
    codes = await stack.stop()
    await backend.stop()
    await alerts.stop()
    await stripe.stop()
    assert all(code == 0 for code in codes.values()), f"exit codes {codes}\n{gateway.logs()}"
    # Every line the whole run made the gateway log, now that it is complete: no key, secret or token.
    leaked = scan_logs(log_dir, known=(jwt_secret, SECRET))
    assert leaked == [], "secrets in the gateway's logs:\n" + "\n".join(leaked[:20])
