"""`driftlock-gateway doctor`: each misconfiguration planted here is named by its check, with a fix, and makes
the exit code 1; a sound configuration passes every check. Runs the real command, as an operator would."""

import asyncio
import json
import os
import secrets
import time
from pathlib import Path

import pytest

from driftlock_cli.doctor import weakness
from driftlock_kernel import db, migrate, plans
from driftlock_kernel.context_keys import Ed25519Key
from tests.support import pgbouncer
from tests.support.cli import run_cli
from tests.support.net import free_port
from tests.support.redis_server import REDIS_URL, redis_answers
from tests.support.stripe_api import LocalStripe

STRONG = secrets.token_urlsafe(48)
ADMIN = secrets.token_urlsafe(48)
EXT_AUTHZ = secrets.token_urlsafe(48)
WHSEC = "whsec_" + secrets.token_urlsafe(32)
SIGNING_KEY = Ed25519Key.generate("gw-doctor").entry()


@pytest.fixture
def doctor(database_url, listen_url):
    """Runs `doctor --json` with a sound environment changed by `env` (a value of None removes a variable)."""

    async def run(
        *args: str, env: dict[str, str | None] | None = None, url: str | None = database_url, offline: bool = True
    ):
        environ = {
            "DRIFTLOCK_JWT_SECRET": STRONG,
            "DRIFTLOCK_ADMIN_TOKEN_SECRET": ADMIN,
            "DRIFTLOCK_EXT_AUTHZ_SECRET": EXT_AUTHZ,
            "DRIFTLOCK_CONTEXT_SIGNING_KEYS": SIGNING_KEY,
            "DRIFTLOCK_CONTEXT_SIGNING_KEYS_FILE": "",
            "DRIFTLOCK_CONTEXT_TOKEN_ALGORITHM": "",
            "STRIPE_WEBHOOK_SECRET": WHSEC,
            "DATABASE_LISTEN_URL": listen_url,
            # What the suite runs behind (PgBouncer or not) stays as it is.
            "DRIFTLOCK_DB_TRANSACTION_POOLER": os.environ.get("DRIFTLOCK_DB_TRANSACTION_POOLER", ""),
            "DRIFTLOCK_AUTHZ_ADDRESS": "",
            "DRIFTLOCK_WEBHOOKS_ADDRESS": "",
            "DRIFTLOCK_REDIS_URL": "",
            "STRIPE_API_KEY": "",
        }
        for name, value in (env or {}).items():
            environ[name] = value if value is not None else ""
        if offline and not args:
            # Without a service flag doctor probes every service the settings name; these tests run none.
            args = ("--offline",)
        result = await asyncio.to_thread(run_cli, "doctor", "--json", *args, database_url=url, env=environ)
        report = json.loads(result.stdout)
        assert result.code == (0 if report["ok"] else 1), result.stderr
        assert set(report) == {"ok", "checks"}
        assert all({"name", "ok", "detail"} <= set(check) for check in report["checks"])
        return report

    return run


def failing(report: dict) -> dict[str, dict]:
    return {check["name"]: check for check in report["checks"] if not check["ok"]}


async def test_a_sound_configuration_passes_every_check(doctor):
    report = await doctor()
    assert report["ok"], failing(report)
    names = {check["name"] for check in report["checks"]}
    assert {
        "settings", "jwt_secret", "context_keys", "admin_token_secret", "webhook_secrets", "database", "migrations",
        "listen", "envoy_config",
    } <= names  # fmt: skip


async def test_text_output_is_one_line_per_check_and_a_verdict(database_url, listen_url):
    env = {
        "DRIFTLOCK_JWT_SECRET": STRONG,
        "DRIFTLOCK_ADMIN_TOKEN_SECRET": "short-admin",
        "DRIFTLOCK_EXT_AUTHZ_SECRET": EXT_AUTHZ,
        "DRIFTLOCK_CONTEXT_SIGNING_KEYS": SIGNING_KEY,
        "STRIPE_WEBHOOK_SECRET": WHSEC,
        "DATABASE_LISTEN_URL": listen_url,
    }
    result = await asyncio.to_thread(run_cli, "doctor", "--offline", database_url=database_url, env=env)
    assert result.code == 1
    lines = result.stdout.splitlines()
    assert any(line.startswith("FAIL  admin_token_secret") for line in lines)
    assert any("fix: set DRIFTLOCK_ADMIN_TOKEN_SECRET" in line for line in lines)
    assert lines[-1] == "1 problem(s): admin_token_secret."
    assert "short-admin" not in result.stdout and STRONG not in result.stdout  # a secret is never echoed


async def test_a_malformed_setting_is_named(doctor):
    report = await doctor(env={"DRIFTLOCK_AUTHZ_PORT": "ninety"})
    assert list(failing(report)) == ["settings"]
    assert "DRIFTLOCK_AUTHZ_PORT" in failing(report)["settings"]["detail"]


@pytest.mark.parametrize(
    ("secret", "why"),
    [
        ("x" * 20, "at least 32"),
        ("changeme-changeme-changeme-changeme", "placeholder"),
        ("abcabcabcabcabcabcabcabcabcabcabcabc", "repeated"),
        ("0101010110101010010101011010101001010101", "bits"),
    ],
)
async def test_a_weak_jwt_secret_is_named(doctor, secret, why):
    report = await doctor(env={"DRIFTLOCK_JWT_SECRET": secret})
    problem = failing(report)["jwt_secret"]
    assert why in problem["detail"] and "openssl rand" in problem["fix"]


async def test_without_a_signing_key_for_eddsa_context_tokens_it_is_named(doctor):
    report = await doctor(env={"DRIFTLOCK_CONTEXT_SIGNING_KEYS": None})
    problem = failing(report)["context_keys"]
    assert "signing key" in problem["detail"] and "jwks generate-key" in problem["fix"]
    hs256 = await doctor(env={"DRIFTLOCK_CONTEXT_SIGNING_KEYS": None, "DRIFTLOCK_CONTEXT_TOKEN_ALGORITHM": "HS256"})
    assert "context_keys" not in failing(hs256) and "jwt_secret" not in failing(hs256)
    missing = await doctor(env={"DRIFTLOCK_JWT_SECRET": None, "DRIFTLOCK_CONTEXT_TOKEN_ALGORITHM": "HS256"})
    assert "not set" in failing(missing)["jwt_secret"]["detail"]
    eddsa_only = await doctor(env={"DRIFTLOCK_JWT_SECRET": None})
    assert "jwt_secret" not in failing(eddsa_only)


@pytest.mark.parametrize(
    ("value", "why"),
    [(None, "refuse every call"), ("x" * 12, "at least 32"), (STRONG, "must differ from DRIFTLOCK_JWT_SECRET")],
)
async def test_a_missing_weak_or_shared_admin_token_secret_is_named(doctor, value, why):
    report = await doctor(env={"DRIFTLOCK_ADMIN_TOKEN_SECRET": value})
    assert why in failing(report)["admin_token_secret"]["detail"]


@pytest.mark.parametrize(
    ("value", "why"), [(None, "not set"), ("sk_live_oops", "whsec_"), ("whsec_short", "too short")]
)
async def test_a_missing_or_malformed_webhook_secret_is_named(doctor, value, why):
    report = await doctor(env={"STRIPE_WEBHOOK_SECRET": value})
    assert why in failing(report)["webhook_secrets"]["detail"]


async def test_an_unreachable_database_is_named(doctor):
    report = await doctor(url=f"postgresql://postgres@127.0.0.1:{free_port()}/postgres")
    assert "cannot connect" in failing(report)["database"]["detail"]


async def test_missing_migrations_are_named(doctor, databases):
    if not await databases.can_create():
        pytest.skip("needs a database of its own")
    report = await doctor(url=await databases.create("driftlock_unmigrated"))
    problem = failing(report)["migrations"]
    assert "no driftlock schema" in problem["detail"] and "driftlock-gateway migrate" in problem["fix"]


async def test_listen_through_the_transaction_pooler_port_is_named(doctor):
    report = await doctor(env={"DATABASE_LISTEN_URL": "postgresql://postgres@127.0.0.1:6543/postgres"})
    assert "transaction pooler" in failing(report)["listen"]["detail"]


@pytest.fixture(scope="module")
async def bouncer(direct_database_url):
    if pgbouncer.binary() is None:
        pytest.skip("pgbouncer is not installed (apt-get install pgbouncer)")
    try:
        started = await pgbouncer.PgBouncer(direct_database_url).start()
    except RuntimeError as error:
        pytest.skip(str(error))
    yield started
    await started.stop()


async def test_listen_that_never_hears_a_notify_is_named(doctor, bouncer, direct_database_url):
    """A transaction pooler on another port than 6543 takes LISTEN and then never delivers."""
    report = await doctor(env={"DATABASE_LISTEN_URL": bouncer.pooled(direct_database_url)})
    assert "did not arrive" in failing(report)["listen"]["detail"]


async def test_an_undeclared_pooler_in_front_of_the_database_is_named(doctor, bouncer, direct_database_url):
    report = await doctor(url=bouncer.pooled(direct_database_url), env={"DRIFTLOCK_DB_TRANSACTION_POOLER": None})
    assert "DRIFTLOCK_DB_TRANSACTION_POOLER=true" in failing(report)["transaction_pooler"]["fix"]
    declared = await doctor(url=bouncer.pooled(direct_database_url), env={"DRIFTLOCK_DB_TRANSACTION_POOLER": "true"})
    assert "transaction_pooler" not in failing(declared)


async def test_an_envoy_config_that_does_not_validate_is_named(doctor, tmp_path):
    broken = tmp_path / "envoy.yaml"
    broken.write_text(Path(_shipped()).read_text().replace("lb_policy: ROUND_ROBIN", "lb_policy: NONSENSE"))
    report = await doctor(env={"DRIFTLOCK_ENVOY_CONFIG": str(broken)})
    assert "envoy --mode validate refused" in failing(report)["envoy_config"]["detail"]


def _shipped() -> str:
    from driftlock_cli.envoy_config import REPO_ENVOY_DIR

    return str(REPO_ENVOY_DIR / "envoy.yaml")


async def test_tls_files_that_do_not_load_are_named(doctor, tmp_path):
    (tmp_path / "cert.pem").write_text("not a certificate")
    report = await doctor(
        env={"DRIFTLOCK_TLS_CERT": str(tmp_path / "cert.pem"), "DRIFTLOCK_TLS_KEY": str(tmp_path / "key.pem")}
    )
    assert {"tls", "envoy_config"} <= set(failing(report))


async def test_services_that_do_not_answer_are_named(doctor):
    report = await doctor("--authz", f"127.0.0.1:{free_port()}", "--webhooks", f"127.0.0.1:{free_port()}")
    assert {"authz_health", "webhooks_health"} <= set(failing(report))


async def test_running_services_pass_their_health_checks(doctor, gateway):
    report = await doctor(
        "--authz", f"{gateway.authz_target(0)},{gateway.authz_target(1)}", "--webhooks", gateway.webhooks_url[7:]
    )
    health = [check for check in report["checks"] if check["name"].endswith("_health")]
    assert len(health) == 3 and all(check["ok"] for check in health), health


async def test_without_flags_it_probes_every_service_the_settings_name_and_names_the_one_it_cannot_reach(
    doctor, gateway
):
    stack = gateway.stack
    dead = free_port()
    report = await doctor(
        offline=False,
        env={
            "DRIFTLOCK_AUTHZ_ADDRESS": f"{stack.authz_target(0)},{stack.authz_target(1)}",
            "DRIFTLOCK_WEBHOOKS_ADDRESS": f"127.0.0.1:{dead}",
            "DRIFTLOCK_ENVOY_PORT": str(stack.ports.envoy),
            "DRIFTLOCK_ADMIN_PORT": str(stack.ports.admin),
            "DRIFTLOCK_ENVOY_STATS_PORT": str(stack.ports.envoy_stats),
        },
    )
    services = ("authz_health", "webhooks_health", "envoy_health", "envoy_public", "envoy_management")
    probes = {check["name"]: check for check in report["checks"] if check["name"] in services}
    assert set(probes) == {"authz_health", "webhooks_health", "envoy_health", "envoy_public", "envoy_management"}
    assert [name for name, check in probes.items() if not check["ok"]] == ["webhooks_health"]
    assert "could not reach" in probes["webhooks_health"]["detail"] and str(dead) in probes["webhooks_health"]["detail"]
    assert not report["ok"]
    assert sum(check["name"] == "authz_health" for check in report["checks"]) == 2  # every replica named


async def test_redis_that_does_not_answer_is_named(doctor):
    report = await doctor(env={"DRIFTLOCK_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
    assert "does not answer" in failing(report)["redis"]["detail"]
    if redis_answers():
        assert "redis" not in failing(await doctor(env={"DRIFTLOCK_REDIS_URL": REDIS_URL}))


async def test_stale_spill_files_are_named(doctor, tmp_path):
    old = tmp_path / "meter-00000000-0000-0000-0000-000000000000.json"
    old.write_text("[]")
    forty_days_ago = time.time() - 40 * 86400
    os.utime(old, (forty_days_ago, forty_days_ago))
    report = await doctor(env={"DRIFTLOCK_METER_SPILL_DIR": str(tmp_path)})
    assert "older than the meter_flushes retention" in failing(report)["meter_spill_dir"]["detail"]


@pytest.fixture
async def stripe_db(databases, transaction_pooler):
    """A database of its own: the session database holds other tests' plans and prices."""
    if not await databases.can_create():
        pytest.skip("needs a database of its own")
    url = await databases.create("driftlock_doctor")
    async with db.connection(url, transaction_pooler=transaction_pooler) as conn:
        await migrate.migrate(conn)
    return url


async def test_plans_mapped_to_prices_stripe_does_not_have_are_named(doctor, stripe_db):
    stripe = await LocalStripe().start()
    try:
        stripe.put_price("price_known")
        stripe.put_price("price_archived", active=False)
        env = {"STRIPE_API_KEY": "sk_test_doctor", "STRIPE_API_BASE": stripe.url}
        async with db.connection(stripe_db) as conn:
            await plans.upsert_plan(conn, "pro", included_units=100, stripe_price_ids=["price_known"])
        assert "stripe_prices" not in failing(await doctor(url=stripe_db, env=env))
        async with db.connection(stripe_db) as conn:
            await plans.upsert_plan(conn, "team", included_units=100, stripe_price_ids=["price_missing"])
        problem = failing(await doctor(url=stripe_db, env=env))["stripe_prices"]
        assert "price_missing" in problem["detail"] and "plan team" in problem["detail"]
        async with db.connection(stripe_db) as conn:
            await plans.upsert_plan(conn, "team", included_units=100, stripe_price_ids=["price_archived"])
        assert "archived" in failing(await doctor(url=stripe_db, env=env))["stripe_prices"]["detail"]
    finally:
        await stripe.stop()


async def test_a_plan_with_a_meter_and_no_stripe_key_is_named(doctor, stripe_db):
    async with db.connection(stripe_db) as conn:
        # The column usage export adds to plans (absent from this schema until then).
        await conn.execute("ALTER TABLE driftlock.plans ADD COLUMN IF NOT EXISTS stripe_meter text")
        await conn.execute("UPDATE driftlock.plans SET stripe_meter = 'api_calls' WHERE name = 'free'")
    problem = failing(await doctor(url=stripe_db))["stripe_meters"]
    assert "free" in problem["detail"] and "STRIPE_API_KEY" in problem["fix"]


def test_weakness_lets_real_random_secrets_through():
    for _ in range(20):
        assert weakness(secrets.token_urlsafe(32)) is None
        assert weakness(secrets.token_hex(32)) is None


async def test_health_answers_for_each_running_service_and_fails_for_a_dead_one(gateway):
    stack = gateway.stack
    targets = {
        "authz": stack.authz_target(0),
        "webhooks": f"127.0.0.1:{stack.ports.webhooks}",
        "envoy": f"127.0.0.1:{stack.ports.envoy_stats}",
    }
    for service, address in targets.items():
        result = await asyncio.to_thread(run_cli, "health", service, "--address", address, "--json", database_url=None)
        assert result.code == 0 and json.loads(result.stdout)["ok"], (service, result.stdout, result.stderr)
    dead = await asyncio.to_thread(
        run_cli, "health", "authz", "--address", f"127.0.0.1:{free_port()}", database_url=None
    )
    assert dead.code == 1 and "no answer" in dead.stdout
