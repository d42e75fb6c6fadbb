"""The CLI's customer controls against a real database (issue 20): plans upsert --products, orgs update
--max-overage-units, orgs delete, keys create|update with --max-units, --rate-limit, --allow-cidr, --products;
bad input as one-line errors."""

import uuid

import pytest

from driftlock_kernel import admin_audit
from tests.support.cli import assert_one_line_error, run_cli


@pytest.fixture
def cli(database_url):
    def run(*args: str):
        return run_cli(*args, database_url=database_url)

    return run


def test_plan_products_spend_cap_and_key_limits(cli):
    plan = f"cli-{uuid.uuid4().hex[:6]}"
    created = cli("plans", "upsert", plan, "--included-units", "100", "--overage", "soft", "--rate-limit", "10",
                  "--products", "stream", "--json").json()  # fmt: skip
    assert created["products"] == ["stream"]
    org = cli("orgs", "create", "CLI controls", "--plan", plan, "--json").json()
    capped = cli("orgs", "update", org["id"], "--max-overage-units", "50", "--json").json()
    assert capped["max_overage_units"] == 50
    assert cli("orgs", "update", org["id"], "--max-overage-units", "none", "--json").json()["max_overage_units"] is None
    key = cli("keys", "create", "--org", org["id"], "--max-units", "500", "--rate-limit", "20",
              "--allow-cidr", "10.0.0.0/8", "--allow-cidr", "2001:db8::/32", "--products", "stream",
              "--json").json()  # fmt: skip
    assert (key["max_units_per_period"], key["rate_limit_rps"], key["products"]) == (500, 20.0, ["stream"])
    assert key["allowed_cidrs"] == ["10.0.0.0/8", "2001:db8::/32"]
    updated = cli("keys", "update", key["id"], "--max-units", "none", "--any-source", "--json").json()
    assert updated["max_units_per_period"] is None and updated["allowed_cidrs"] is None
    assert updated["rate_limit_rps"] == 20.0  # kept
    rolled = cli("keys", "roll", key["id"], "--json").json()
    assert (rolled["rate_limit_rps"], rolled["products"]) == (20.0, ["stream"])  # the limits go with the grants
    assert "10.0.0.0/8" not in cli("keys", "show", key["id"]).stdout

    assert_one_line_error(cli("keys", "update", key["id"], "--allow-cidr", "10.0.0.0/33"), "allowed_cidrs")
    assert_one_line_error(cli("keys", "update", key["id"], "--products", "ledger"), "products")
    assert_one_line_error(cli("keys", "update", key["id"], "--rate-limit", "-1"), "rate-limit")
    block = f"cli-{uuid.uuid4().hex[:6]}"
    cli("plans", "upsert", block, "--included-units", "100", "--overage", "block")
    other = cli("orgs", "create", "Blocked", "--plan", block, "--json").json()
    assert_one_line_error(cli("orgs", "update", other["id"], "--max-overage-units", "5"), "soft plan")


async def test_orgs_delete_erases_and_answers_not_found_after(cli, pool):
    org = cli("orgs", "create", "To be erased", "--json").json()
    key = cli("keys", "create", "--org", org["id"], "--name", "Jane's", "--json").json()
    deleted = cli("orgs", "delete", org["id"], "--json").json()
    assert deleted == {"id": org["id"], "deleted": True, "keys_revoked": 1}
    assert_one_line_error(cli("orgs", "show", org["id"]), "no organisation")
    assert_one_line_error(cli("orgs", "delete", org["id"]), "no organisation")
    assert org["id"] not in cli("orgs", "list").stdout
    assert_one_line_error(cli("keys", "show", key["id"]), "no API key")
    async with pool.acquire() as conn:
        row = await conn.fetchrow("SELECT name, revoked_at FROM driftlock.api_keys WHERE id = $1", uuid.UUID(key["id"]))
        entries = await admin_audit.actions(conn, org_id=uuid.UUID(org["id"]))
    assert row["name"] is None and row["revoked_at"] is not None
    assert entries[0].action == "orgs.delete"
