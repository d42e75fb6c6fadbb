"""The real `driftlock-gateway` command against a real database: outputs and error handling."""

import socket
import uuid

import pytest

from tests.support.admin import signing_key_env
from tests.support.authz_requests import EXT_AUTHZ_SECRET
from tests.support.cli import run_cli
from tests.support.net import free_port


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.code != 0
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture
def cli(database_url):
    def run(*args: str):
        return run_cli(*args, database_url=database_url)

    return run


def test_plans_upsert_creates_then_updates_keeping_options(cli):
    name = f"plan-{uuid.uuid4().hex[:8]}"
    created = cli(
        "plans",
        "upsert",
        name,
        "--included-units",
        "5000",
        "--stripe-price",
        f"price_{name}",
        "--overage",
        "block",
        "--hard-cap-percent",
        "150",
        "--rate-limit",
        "25",
        "--stripe-meter",
        "api_calls",
        "--json",
    ).json()
    assert created == {
        "name": name,
        "included_units": 5000,
        "overage": "block",
        "hard_cap_percent": 150,
        "rate_limit_rps": 25.0,
        "stripe_price_ids": [f"price_{name}"],
        "stripe_meter": "api_calls",
        "test_included_units": 1000,
        "test_rate_limit_rps": 5.0,
        "products": None,
        "created": True,
    }
    tested = cli("plans", "upsert", name, "--included-units", "5000", "--test-units", "50", "--test-rate-limit", "2")
    assert tested.code == 0, tested.stderr
    updated = cli("plans", "upsert", name, "--included-units", "6000", "--json").json()
    assert (updated["test_included_units"], updated["test_rate_limit_rps"]) == (50, 2.0)
    assert updated["included_units"] == 6000
    assert (updated["overage"], updated["hard_cap_percent"], updated["rate_limit_rps"]) == ("block", 150, 25.0)
    assert (updated["stripe_price_ids"], updated["stripe_meter"]) == ([f"price_{name}"], "api_calls")
    assert updated["created"] is False
    cleared = cli(
        "plans",
        "upsert",
        name,
        "--included-units",
        "6000",
        "--hard-cap-percent",
        "none",
        "--stripe-meter",
        "none",
        "--json",
    ).json()
    assert (cleared["hard_cap_percent"], cleared["stripe_meter"]) == (None, None)
    listed = cli("plans", "list", "--json").json()["plans"]
    assert {p["name"] for p in listed} >= {"free", name}


def test_a_price_moves_to_the_plan_that_claims_it(cli):
    a, b = (f"plan-{uuid.uuid4().hex[:8]}" for _ in range(2))
    price = f"price_{uuid.uuid4().hex[:8]}"
    cli("plans", "upsert", a, "--included-units", "1", "--stripe-price", price, "--json").json()
    cli("plans", "upsert", b, "--included-units", "1", "--stripe-price", price, "--json").json()
    plans = {p["name"]: p for p in cli("plans", "list", "--json").json()["plans"]}
    assert plans[a]["stripe_price_ids"] == []
    assert plans[b]["stripe_price_ids"] == [price]


def test_orgs_create_show_suspend_resume(cli):
    org = cli("orgs", "create", "Acme Ltd", "--json").json()
    assert uuid.UUID(org["id"])
    assert org["plan"] == "free"
    shown = cli("orgs", "show", org["id"], "--json").json()
    assert {k: shown[k] for k in ("id", "name", "plan", "billing_status")} == {
        "id": org["id"],
        "name": "Acme Ltd",
        "plan": "free",
        "billing_status": "none",
    }
    assert shown["period_start"].endswith("Z") and shown["period_end"].endswith("Z")
    suspended = cli("orgs", "suspend", org["id"], "--json").json()
    assert suspended["id"] == org["id"] and suspended["suspended"] is True
    assert cli("orgs", "suspend", org["id"], "--json").json()["suspended_at"] == suspended["suspended_at"]
    assert cli("orgs", "resume", org["id"], "--json").json()["suspended"] is False
    text = cli("orgs", "show", org["id"])
    assert text.code == 0 and org["id"] in text.stdout and "billing_status" in text.stdout


def test_global_json_flag_before_the_command_works(cli):
    assert cli("--json", "plans", "list").json()["plans"]


def test_keys_create_shows_the_secret_once_and_list_never(cli):
    org = cli("orgs", "create", "Keys Inc", "--json").json()
    created = cli(
        "keys", "create", "--org", org["id"], "--name", "ci", "--scopes", "detect,read", "--expires-in", "30d", "--json"
    ).json()
    assert created["key"].startswith("dlk_live_")
    assert created["prefix"] == created["key"][:15]
    assert created["scopes"] == ["detect", "read"]
    assert created["expires_at"].endswith("Z")
    test_key = cli("keys", "create", "--org", org["id"], "--test", "--json").json()
    assert test_key["key"].startswith("dlk_test_") and test_key["expires_at"] is None
    listing = cli("keys", "list", "--org", org["id"], "--json")
    assert [k["id"] for k in listing.json()["keys"]] == [created["id"], test_key["id"]]
    assert created["key"] not in listing.stdout and test_key["key"] not in listing.stdout
    text_listing = cli("keys", "list", "--org", org["id"])
    assert created["key"] not in text_listing.stdout and created["prefix"] in text_listing.stdout


def test_keys_revoke_is_idempotent(cli):
    org = cli("orgs", "create", "Revokers", "--json").json()
    key = cli("keys", "create", "--org", org["id"], "--json").json()
    first = cli("keys", "revoke", key["id"], "--json").json()
    assert first["id"] == key["id"] and first["revoked_at"].endswith("Z")
    assert cli("keys", "revoke", key["id"], "--json").json()["revoked_at"] == first["revoked_at"]


def test_text_output_of_keys_create_names_the_key(cli):
    org = cli("orgs", "create", "Texty", "--json").json()
    result = cli("keys", "create", "--org", org["id"])
    assert result.code == 0
    assert "dlk_live_" in result.stdout and "only time" in result.stdout


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("orgs", "show", "not-a-uuid"), "malformed organisation id"),
        (("keys", "create", "--org", "12345"), "malformed organisation id"),
        (("keys", "revoke", "xyz"), "malformed key id"),
        (("keys", "create", "--org", str(uuid.uuid4()), "--expires-in", "30x"), "malformed duration"),
        (("keys", "create", "--org", str(uuid.uuid4()), "--scopes", "detect,admin"), "unknown scope"),
        (("plans", "upsert", "p", "--included-units", "-5"), "whole number"),
        (("plans", "upsert", "p", "--included-units", "5", "--overage", "maybe"), "invalid choice"),
        (("orgs",), "required"),
        (("frobnicate",), "invalid choice"),
    ],
)
def test_bad_arguments_get_one_line_and_exit_2(cli, args, fragment):
    result = cli(*args)
    assert_one_line_error(result, fragment)
    assert result.code == 2


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("orgs", "show", "00000000-0000-0000-0000-000000000001"), "no organisation"),
        (("orgs", "suspend", "00000000-0000-0000-0000-000000000001"), "no organisation"),
        (("keys", "create", "--org", "00000000-0000-0000-0000-000000000001"), "no organisation"),
        (("keys", "list", "--org", "00000000-0000-0000-0000-000000000001"), "no organisation"),
        (("keys", "revoke", "00000000-0000-0000-0000-000000000001"), "no API key"),
        (("orgs", "create", "X", "--plan", "no-such-plan"), "no plan named"),
    ],
)
def test_unknown_records_get_one_line_and_exit_1(cli, args, fragment):
    result = cli(*args)
    assert_one_line_error(result, fragment)
    assert result.code == 1


def test_no_database_url_is_one_line():
    assert_one_line_error(run_cli("plans", "list", database_url=None), "DATABASE_URL is not set")


def test_unreachable_database_is_one_line_without_password():
    result = run_cli("plans", "list", database_url="postgresql://someone:hunter2@127.0.0.1:1/nowhere")
    assert_one_line_error(result, "cannot connect", "127.0.0.1:1/nowhere")
    assert "hunter2" not in result.stderr


async def test_unmigrated_database_says_to_migrate(fresh_database_url):
    assert_one_line_error(run_cli("plans", "list", database_url=fresh_database_url), "migrate")


def test_every_command_has_help():
    for args in (
        (),
        ("migrate",),
        ("plans", "upsert"),
        ("plans", "list"),
        ("orgs", "create"),
        ("orgs", "show"),
        ("orgs", "suspend"),
        ("orgs", "resume"),
        ("keys", "create"),
        ("keys", "list"),
        ("keys", "revoke"),
        ("usage",),
        ("alerts", "list"),
        ("audit", "prune"),
        ("authz",),
        ("webhooks",),
        ("webhooks", "events"),
        ("webhooks", "prune"),
        ("stripe",),
        ("stripe", "send-event"),
        ("stripe", "export"),
        ("stripe", "exports", "list"),
        ("stripe", "sync"),
        ("webhooks", "replay"),
        ("dev",),
        ("envoy",),
    ):
        result = run_cli(*args, "--help", database_url=None)
        assert result.code == 0 and "usage:" in result.stdout, args


async def test_usage_of_the_previous_period_is_the_closed_period_before_the_current_one(make_org, pool, database_url):
    from datetime import UTC, datetime, timedelta

    from driftlock_kernel.periods import calendar_month

    async def counted(org_id, start, product, units):
        await pool.execute(
            "INSERT INTO driftlock.usage_counters (org_id, period_start, product, units) VALUES ($1, $2, $3, $4)",
            org_id,
            start,
            product,
            units,
        )

    month = calendar_month(datetime.now(UTC))
    last_month = calendar_month(month.start - timedelta(days=1))
    org = await make_org()
    await counted(org.id, last_month.start, "stream", 7)
    await counted(org.id, last_month.start, "monitor", 2)
    await counted(org.id, month.start, "stream", 1)
    previous = run_cli("usage", str(org.id), "--period", "previous", "--json", database_url=database_url).json()
    assert previous["used"] == {"stream": 7, "monitor": 2, "total": 9}
    assert (previous["period_start"], previous["period_end"]) == (
        last_month.start.isoformat().replace("+00:00", "Z"),
        month.start.isoformat().replace("+00:00", "Z"),
    )
    assert run_cli("usage", str(org.id), "--json", database_url=database_url).json()["used"]["total"] == 1

    # A Stripe subscription's periods: the previous one is the one Stripe reported before the current one.
    subscribed = await make_org()
    now = datetime.now(UTC).replace(microsecond=0)
    first = (now - timedelta(days=40), now - timedelta(days=10))
    for start, end in (first, (first[1], first[1] + timedelta(days=30))):
        await pool.execute(
            "UPDATE driftlock.organizations SET period_start = $2, period_end = $3 WHERE id = $1",
            subscribed.id,
            start,
            end,
        )
    await counted(subscribed.id, first[0], "stream", 4)
    previous = run_cli("usage", str(subscribed.id), "--period", "previous", "--json", database_url=database_url).json()
    assert previous["used"]["total"] == 4
    assert previous["period_start"] == first[0].isoformat().replace("+00:00", "Z")
    bad = run_cli("usage", str(org.id), "--period", "last", database_url=database_url)
    assert bad.code == 2 and "invalid choice" in bad.stderr


def test_a_malformed_stripe_api_key_stops_only_what_calls_stripe(database_url):
    env = {"STRIPE_API_KEY": "pk_live_publishable"}
    assert run_cli("plans", "list", "--json", database_url=database_url, env=env).code == 0
    result = run_cli("stripe", "export", "--once", database_url=database_url, env=env)
    assert_one_line_error(result, "STRIPE_API_KEY", "secret")
    assert "pk_live_publishable" not in result.stderr


def test_authz_refuses_a_short_jwt_secret(database_url):
    result = run_cli("authz", database_url=database_url, env={"DRIFTLOCK_JWT_SECRET": "short"})
    assert_one_line_error(result, "DRIFTLOCK_JWT_SECRET", "32")


@pytest.mark.parametrize("weak", [" " * 32, "a" * 32, "changeme" * 4])
def test_authz_refuses_a_guessable_jwt_secret_and_says_how_to_make_one(database_url, weak):
    result = run_cli("authz", database_url=database_url, env={"DRIFTLOCK_JWT_SECRET": weak})
    assert_one_line_error(result, "DRIFTLOCK_JWT_SECRET", "openssl rand")


def test_authz_refuses_to_start_without_the_ext_authz_secret(database_url, jwt_secret):
    result = run_cli(
        "authz",
        database_url=database_url,
        env={"DRIFTLOCK_JWT_SECRET": jwt_secret, **signing_key_env(), "DRIFTLOCK_EXT_AUTHZ_SECRET": ""},
    )
    assert_one_line_error(result, "DRIFTLOCK_EXT_AUTHZ_SECRET is not set", "openssl rand")


@pytest.mark.parametrize("weak", ["whsec_", "whsec_" + "a" * 32])
def test_webhooks_refuse_a_guessable_signing_secret(database_url, weak):
    result = run_cli("webhooks", database_url=database_url, env={"STRIPE_WEBHOOK_SECRET": weak})
    assert_one_line_error(result, "STRIPE_WEBHOOK_SECRET", "Stripe Dashboard")


def test_envoy_renders_the_ext_authz_secret_and_refuses_to_run_without_it():
    result = run_cli("envoy", "--print-config", database_url=None, env={"DRIFTLOCK_EXT_AUTHZ_SECRET": ""})
    assert_one_line_error(result, "DRIFTLOCK_EXT_AUTHZ_SECRET")
    rendered = run_cli(
        "envoy", "--print-config", database_url=None, env={"DRIFTLOCK_EXT_AUTHZ_SECRET": EXT_AUTHZ_SECRET}
    )
    assert rendered.code == 0 and EXT_AUTHZ_SECRET in rendered.stdout


def test_a_malformed_webhook_secret_stops_only_the_webhook_service(database_url):
    result = run_cli("plans", "list", "--json", database_url=database_url, env={"STRIPE_WEBHOOK_SECRET": "sk_live_1"})
    assert result.code == 0 and result.json()["plans"]


@pytest.mark.parametrize("taken", ["DRIFTLOCK_AUTHZ_PORT", "DRIFTLOCK_AUTHZ_METRICS_PORT"])
def test_authz_on_a_port_in_use_says_so_in_one_line_and_exits(database_url, jwt_secret, taken):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        ports = {"DRIFTLOCK_AUTHZ_PORT": str(free_port()), "DRIFTLOCK_AUTHZ_METRICS_PORT": str(free_port())}
        ports[taken] = str(holder.getsockname()[1])
        result = run_cli(
            "authz",
            database_url=database_url,
            env={
                "DRIFTLOCK_JWT_SECRET": jwt_secret,
                **signing_key_env(),
                "DRIFTLOCK_EXT_AUTHZ_SECRET": EXT_AUTHZ_SECRET,
                "DRIFTLOCK_AUTHZ_HOST": "127.0.0.1",
                **ports,
            },
            timeout=60,
        )
    assert_one_line_error(result, "cannot")
    assert result.code == 1
